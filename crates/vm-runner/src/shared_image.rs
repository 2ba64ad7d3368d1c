//! `vmrun shared-image`: one golden image, two VMs on it at once through `--snapshot` daemons.
//! The image lives on an xfs file system made here (a loop mount: reflink needs xfs or btrfs,
//! and the machines' own disks are ext4). A first, read-write run writes generation 1 into
//! the golden image. Then VM A boots on a snapshot daemon, writes generation 2 and, after a
//! reboot inside the same QEMU, must find its own generation 2 and write 3; VM B starts on a
//! second snapshot daemon once A has written generation 2, and must still find generation 1.
//! While both daemons run, a read-write daemon on the golden image must be refused, saying
//! why; after both, the golden image must be byte-identical to what it was. Each VM's host
//! checks are made against its own daemon's private layer.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use clap::Args;

use crate::cli::{AccelArg, Defaults, EndArg, RunArgs};
use crate::hostcheck;
use crate::one_daemon::closing_line;
use crate::run;

/// mkfs.xfs refuses smaller file systems.
const XFS_BYTES: u64 = 320 << 20;
/// How long VM A may take to write its generation 2.
const A_WRITES: Duration = Duration::from_secs(300);

#[derive(Args, Debug)]
pub struct SharedImageArgs {
    /// The initramfs to boot.
    #[arg(long)]
    pub initrd: PathBuf,
    /// Where the logs go (emptied first; default $VUP_BUILD/shared-image).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Device size (the golden image's).
    #[arg(long, default_value = "128M")]
    pub size: String,
    /// Daemon binary (default: vhost-user-pmem beside vmrun).
    #[arg(long)]
    pub daemon: Option<PathBuf>,
    /// mkfs.xfs to run (default: the one in the fetched guest tools,
    /// $VUP_CACHE/guest-tools/out, run through their own loader).
    #[arg(long, value_name = "PATH")]
    pub mkfs_xfs: Option<PathBuf>,
    /// qemu-system-x86_64 (default $QEMU, else the fetched one).
    #[arg(long)]
    pub qemu: Option<PathBuf>,
    /// The guest kernel (default $KERNEL, else the fetched one).
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    #[arg(long, value_enum)]
    pub accel: Option<AccelArg>,
}

fn info(msg: impl AsRef<str>) {
    eprintln!("shared-image: {}", msg.as_ref());
}

/// Says how one run went; true when it passed.
fn judge(name: &str, r: Result<run::Outcome, String>) -> bool {
    match r {
        Ok(o) if o.ok() => {
            info(format!("{name}: ok ({})", o.summary_line()));
            true
        }
        Ok(o) => {
            info(format!("{name}: FAILED ({})", o.summary_line()));
            false
        }
        Err(e) => {
            info(format!("{name}: FAILED: {e}"));
            false
        }
    }
}

/// Counts one result.
fn count(ok: bool, passed: &mut usize, failed: &mut usize) {
    if ok {
        *passed += 1;
    } else {
        *failed += 1;
    }
}

/// An xfs file system in a file, loop-mounted, unmounted (lazily) when dropped.
struct XfsMount {
    dir: PathBuf,
}

impl XfsMount {
    fn create(out: &Path, mkfs: Option<&Path>, cache: &Path) -> Result<XfsMount, String> {
        let img = out.join("xfs.img");
        let f =
            std::fs::File::create(&img).map_err(|e| format!("create {}: {e}", img.display()))?;
        f.set_len(XFS_BYTES).map_err(|e| e.to_string())?;
        let mut cmd = match mkfs {
            Some(m) => Command::new(m),
            None => {
                let tools = cache.join("guest-tools/out");
                let mut c = Command::new(tools.join("lib/ld-linux-x86-64.so.2"));
                c.arg("--library-path")
                    .arg(tools.join("lib"))
                    .arg(tools.join("bin/mkfs.xfs"));
                c
            }
        };
        let o =
            cmd.args(["-q", "-f"]).arg(&img).output().map_err(|e| {
                format!("run mkfs.xfs: {e} (scripts/fetch-guest-tools.sh fetches it)")
            })?;
        if !o.status.success() {
            return Err(format!(
                "mkfs.xfs failed ({}): {}",
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            ));
        }
        let dir = out.join("xfs");
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let st = Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(&dir)
            .status()
            .map_err(|e| format!("run mount: {e}"))?;
        if !st.success() {
            return Err(format!("mount -o loop {} failed ({st})", img.display()));
        }
        Ok(XfsMount { dir })
    }
}

impl Drop for XfsMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// Waits until `path` exists and, if `text` is given, contains it.
fn wait_for(path: &Path, text: Option<&str>, limit: Duration) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if let Ok(s) = std::fs::read_to_string(path) {
            if text.is_none_or(|t| s.contains(t)) {
                return true;
            }
        }
        if crate::children::stop_requested().is_some() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

pub fn main(a: SharedImageArgs, d: &Defaults) -> i32 {
    closing_line("shared-image", shared_image(a, d))
}

fn shared_image(a: SharedImageArgs, d: &Defaults) -> Result<(usize, usize), String> {
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| d.build.join("shared-image"));
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).map_err(|e| format!("create {}: {e}", out.display()))?;
    let out = out.canonicalize().map_err(|e| e.to_string())?;
    let fs = XfsMount::create(&out, a.mkfs_xfs.as_deref(), &d.cache)?;
    let golden = fs.dir.join("golden.img");
    info(format!(
        "golden image {} on a loop-mounted xfs",
        golden.display()
    ));
    let base = |run: &str, args: &str| RunArgs {
        image: Some(golden.clone()),
        size: a.size.clone(),
        args: args.to_string(),
        initrd: Some(a.initrd.clone()),
        kernel: a.kernel.clone(),
        qemu: a.qemu.clone(),
        accel: a.accel,
        daemon: a.daemon.clone(),
        log_dir: Some(out.join(run)),
        ..RunArgs::defaults()
    };
    let snapshot = |r: RunArgs| RunArgs {
        daemon_args: vec!["--snapshot".into()],
        expect_image_unchanged: true,
        ..r
    };
    let (mut passed, mut failed) = (0usize, 0usize);
    let go = |r: RunArgs| -> Result<run::Outcome, String> {
        let spec = r.spec(d).map_err(|e| e.to_string())?;
        run::run(&spec).map_err(|e| e.to_string())
    };

    count(
        judge(
            "golden (read-write daemon): generation 1 written",
            go(base("golden", "--mkfs e2e")),
        ),
        &mut passed,
        &mut failed,
    );
    let before =
        hostcheck::sha256_file(&golden).map_err(|e| format!("read the golden image: {e}"))?;

    // A: two boots in one QEMU on one snapshot daemon: boot N expects generation N.
    let run_a = RunArgs {
        end: EndArg::Reboot,
        reboots: Some(1),
        expect_hostchecks: Some(2),
        ..snapshot(base("snapshot-a", "--expect-gen boot+0 persist"))
    };
    let run_b = RunArgs {
        expect_hostchecks: Some(1),
        ..snapshot(base("snapshot-b", "--expect-gen 1 persist"))
    };
    let (a_out, b_out, writer) = std::thread::scope(|s| {
        let ta = s.spawn(|| go(run_a));
        let a_wrote = wait_for(
            &out.join("snapshot-a/guest-out.raw"),
            Some("persist.dat now holds generation 2"),
            A_WRITES,
        );
        if !a_wrote {
            info("VM A did not write generation 2; VM B starts anyway");
        }
        let tb = s.spawn(|| go(run_b));
        // B's daemon writes its first metrics once the image is locked and the layer made.
        let writer = if wait_for(
            &out.join("snapshot-b/daemon-metrics.json"),
            None,
            Duration::from_secs(30),
        ) {
            try_writer(&a, d, &golden, &out)
        } else {
            Err("VM B's daemon never started".to_string())
        };
        (ta.join(), tb.join(), writer)
    });
    let joined = |r: std::thread::Result<Result<run::Outcome, String>>| {
        r.unwrap_or_else(|_| Err("the run's thread panicked".into()))
    };
    count(
        judge(
            "VM A (--snapshot, 2 boots): its own generation 2 after a reboot",
            joined(a_out),
        ),
        &mut passed,
        &mut failed,
    );
    count(
        judge(
            "VM B (--snapshot, at the same time): generation 1, none of A's writes",
            joined(b_out),
        ),
        &mut passed,
        &mut failed,
    );
    match writer {
        Ok(msg) => {
            passed += 1;
            info(format!(
                "a read-write daemon on the golden image was refused: {msg}"
            ));
        }
        Err(e) => {
            failed += 1;
            info(format!(
                "FAILED: a read-write daemon while the snapshots ran: {e}"
            ));
        }
    }
    match hostcheck::sha256_file(&golden) {
        Ok(after) if after == before => {
            passed += 1;
            info(format!(
                "the golden image is unchanged (sha256 {})",
                &after[..16]
            ));
        }
        Ok(after) => {
            failed += 1;
            info(format!(
                "FAILED: the golden image changed: {before} -> {after}"
            ));
        }
        Err(e) => {
            failed += 1;
            info(format!("FAILED: cannot read the golden image: {e}"));
        }
    }
    drop(fs);
    Ok((passed, failed))
}

/// A read-write daemon on the golden image while snapshot daemons hold it: it must exit 1
/// with the one-line reason, and create no socket.
fn try_writer(
    a: &SharedImageArgs,
    d: &Defaults,
    golden: &Path,
    out: &Path,
) -> Result<String, String> {
    let bin = a
        .daemon
        .clone()
        .unwrap_or_else(|| d.exe_dir.join("vhost-user-pmem"));
    let socket = out.join("writer.sock");
    let log = out.join("writer.log");
    let mut child = Command::new(&bin)
        .arg("--socket-path")
        .arg(&socket)
        .arg("--file")
        .arg(golden)
        .stderr(std::fs::File::create(&log).map_err(|e| e.to_string())?)
        .spawn()
        .map_err(|e| format!("run {}: {e}", bin.display()))?;
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().map_err(|e| e.to_string())? {
            break st;
        }
        if t0.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            return Err("it started serving the golden image (killed after 10 s)".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let err = std::fs::read_to_string(&log)
        .unwrap_or_default()
        .trim()
        .to_string();
    if status.code() != Some(1) || !err.contains("share-locked") {
        return Err(format!("{status}, stderr: {err}"));
    }
    if socket.exists() {
        return Err("the refused daemon left a socket".into());
    }
    Ok(err)
}
