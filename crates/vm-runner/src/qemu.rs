//! The QEMU command line, built in one place: the machine, the pmem device (the only place
//! the vhost-user `-device` string is written), the kernel, the consoles.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::spec::{Accel, GuestEnd, RunSpec};

/// The generic vhost-user device of QEMU 11 as a virtio-pmem device: device id 27, one
/// queue of 256 entries (catalogue E18 counts on that size), 16 bytes of config space.
pub const VHOST_USER_PMEM_DEVICE: &str =
    "vhost-user-test-device-pci,chardev=pmem0,virtio-id=27,num_vqs=1,vq_size=256,config_size=16";

/// The queue size in [`VHOST_USER_PMEM_DEVICE`].
pub const QUEUE_SIZE: u32 = 256;

/// Where `--pair-builtin` puts QEMU's built-in device: a fixed slot on q35's root bus, so
/// the guest can tell the two pmem devices apart by their sysfs path (the vhost-user device,
/// added first without an address, takes the lowest free slot).
const PAIR_PCI_SLOT: u8 = 6;

/// [`PAIR_PCI_SLOT`] as the guest's sysfs spells it (`0000:00:06.0`), for its `--pair-pci`.
pub fn pair_pci_addr() -> String {
    format!("0000:00:{PAIR_PCI_SLOT:02x}.0")
}

/// A comma inside a QEMU option value must be doubled.
pub fn escape(value: &Path) -> String {
    value.display().to_string().replace(',', ",,")
}

/// How QEMU reaches the pmem device's memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PmemBacking {
    /// The daemon's socket; `server`: QEMU listens (`server=on,wait=on`).
    VhostUser {
        socket: PathBuf,
        server: bool,
        chardev_opts: Option<String>,
    },
    /// QEMU maps the image itself (`memory-backend-file` + `virtio-pmem-pci`).
    Builtin { image: PathBuf, size: u64 },
}

/// The device arguments for `backing`; also used by whoever attaches QEMU by hand.
pub fn device_args(backing: &PmemBacking) -> Vec<String> {
    match backing {
        PmemBacking::VhostUser {
            socket,
            server,
            chardev_opts,
        } => {
            let mut chardev = format!("socket,id=pmem0,path={}", escape(socket));
            if *server {
                // wait=on: QEMU creates the device only once the daemon has connected; with
                // wait=off QEMU 11.1.3 fails (vhost_backend_init failed: Protocol error).
                chardev.push_str(",server=on,wait=on");
            }
            if let Some(o) = chardev_opts {
                chardev.push(',');
                chardev.push_str(o);
            }
            vec![
                "-chardev".into(),
                chardev,
                "-device".into(),
                VHOST_USER_PMEM_DEVICE.into(),
            ]
        }
        PmemBacking::Builtin { image, size } => vec![
            "-object".into(),
            format!(
                "memory-backend-file,id=pmemmem,share=on,mem-path={},size={size}",
                escape(image)
            ),
            "-device".into(),
            "virtio-pmem-pci,memdev=pmemmem,id=vpmem0".into(),
        ],
    }
}

/// The built-in device of `--pair-builtin`, with ids of its own beside the vhost-user one.
fn pair_device_args(image: &Path, size: u64) -> Vec<String> {
    vec![
        "-object".into(),
        format!(
            "memory-backend-file,id=pairmem,share=on,mem-path={},size={size}",
            escape(image)
        ),
        "-device".into(),
        format!("virtio-pmem-pci,memdev=pairmem,id=vpmem1,bus=pcie.0,addr=0x{PAIR_PCI_SLOT:02x}"),
    ]
}

/// The kernel command line: the console, a panic that ends QEMU, and the guest suite's
/// `vup.*` parameters.
pub fn kernel_cmdline(spec: &RunSpec) -> String {
    let g = &spec.guest;
    let mut c = format!("console=ttyS0 panic=-1 loglevel=5 vup.end={}", g.end.word());
    if let GuestEnd::Reboot(n) = g.end {
        c.push_str(&format!(" vup.reboots={n}"));
    }
    if !g.args.is_empty() {
        c.push_str(&format!(" vup.args={}", g.args.join(",")));
    }
    if let Some(a) = &g.append {
        c.push(' ');
        c.push_str(a);
    }
    c
}

/// QEMU's whole argument list. `guest_out` is the second serial port's file, where the guest
/// copies its binary's output free of kernel messages.
pub fn qemu_args(spec: &RunSpec, backing: &PmemBacking, guest_out: &Path) -> Vec<OsString> {
    let mem = spec.guest.memory.bytes;
    let mut memory = format!("{}M", mem >> 20);
    // A built-in device lives in the memory hotplug area: leave room for it above RAM.
    let builtin_bytes = match backing {
        PmemBacking::Builtin { size, .. } => *size,
        PmemBacking::VhostUser { .. } => 0,
    } + spec.pair_builtin.as_ref().map_or(0, |_| spec.size.bytes);
    if builtin_bytes > 0 {
        let maxmem = mem + builtin_bytes + (1 << 30);
        memory = format!("{}M,slots=2,maxmem={}M", mem >> 20, maxmem >> 20);
    }
    let (accel, cpu) = match spec.qemu.accel {
        Accel::Tcg => ("tcg", "max"),
        Accel::Kvm => ("kvm", "host"),
    };
    let mut a: Vec<String> = vec![
        "-machine".into(),
        "q35,memory-backend=mem0".into(),
        "-accel".into(),
        accel.into(),
        "-cpu".into(),
        cpu.into(),
        "-smp".into(),
        spec.guest.smp.to_string(),
        "-m".into(),
        memory,
        "-object".into(),
        // Shared guest RAM: the daemon maps it to read the rings.
        format!("memory-backend-memfd,id=mem0,size={mem},share=on"),
    ];
    a.extend(device_args(backing));
    if let Some(image) = &spec.pair_builtin {
        a.extend(pair_device_args(image, spec.size.bytes));
    }
    a.extend([
        "-kernel".into(),
        spec.guest.kernel.display().to_string(),
        "-initrd".into(),
        spec.guest.initrd.display().to_string(),
        "-append".into(),
        kernel_cmdline(spec),
        "-nographic".into(),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-serial".into(),
        "stdio".into(),
        "-serial".into(),
        format!("file:{}", escape(guest_out)),
    ]);
    if !matches!(spec.guest.end, GuestEnd::Reboot(_)) {
        a.push("-no-reboot".into());
    }
    // Thread names (`worker`, `CPU 0/TCG`, ...), by which LOGDIR/cpu.txt splits QEMU's CPU.
    a.extend(["-name".into(), "debug-threads=on".into()]);
    if spec.qemu.trace_vhost || matches!(spec.stop, crate::spec::Stop::KillDaemonAt { .. }) {
        // Wall-clock times on QEMU's messages, to line them up with a daemon kill.
        a.extend(["-msg".into(), "timestamp=on".into()]);
    }
    if spec.qemu.trace_vhost {
        for ev in [
            "vhost_user_write",
            "vhost_user_read",
            "vhost_dev_start*",
            "vhost_dev_stop*",
        ] {
            a.extend(["-trace".into(), ev.into()]);
        }
    }
    a.extend(spec.qemu.extra_args.iter().cloned());
    a.into_iter().map(OsString::from).collect()
}

/// The command as a shell line, for LOGDIR/qemu.cmd.
pub fn shell_line(bin: &Path, args: &[OsString]) -> String {
    std::iter::once(bin.as_os_str())
        .chain(args.iter().map(|a| a.as_os_str()))
        .map(|a| {
            let s = a.to_string_lossy();
            let plain = s
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "[]_./:=,+@%-".contains(c));
            if plain && !s.is_empty() {
                s.into_owned()
            } else {
                format!("'{}'", s.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Whether /dev/kvm can boot the guest kernel: the kernel boots without an initramfs and
/// panics at once for want of a root file system, which with `panic=-1 -no-reboot` ends QEMU
/// with status 0. A nested KVM that cannot run Linux stops with "KVM internal error" instead.
/// The answer is cached per host kernel, QEMU and guest kernel.
pub fn kvm_usable(qemu: &Path, kernel: &Path, cache: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/kvm")
        .is_err()
    {
        return false;
    }
    let uname = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let key = {
        use sha2::Digest;
        let h = sha2::Sha256::digest(format!(
            "{uname}\n{}\n{}\n",
            qemu.display(),
            kernel.display()
        ));
        h.iter()
            .take(8)
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let cached = cache.join(format!("kvm-probe.{key}"));
    if let Ok(v) = std::fs::read_to_string(&cached) {
        return v.trim() == "yes";
    }
    let log = std::env::temp_dir().join(format!("vmrun-kvm-probe-{}.log", std::process::id()));
    let ok = (|| {
        let out = std::fs::File::create(&log).ok()?;
        let mut child = Command::new(qemu)
            .args([
                "-accel",
                "kvm",
                "-cpu",
                "host",
                "-m",
                "256M",
                "-nodefaults",
                "-nographic",
            ])
            .args(["-no-reboot", "-serial", "stdio", "-kernel"])
            .arg(kernel)
            .args(["-append", "console=ttyS0 panic=-1 loglevel=1"])
            .stdin(Stdio::null())
            .stdout(out.try_clone().ok()?)
            .stderr(out)
            .spawn()
            .ok()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let internal_error =
            || std::fs::read_to_string(&log).is_ok_and(|l| l.contains("KVM internal error"));
        loop {
            if let Some(st) = child.try_wait().ok()? {
                return Some(st.success() && !internal_error());
            }
            if internal_error() || Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Some(false);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    })()
    .unwrap_or(false);
    let _ = std::fs::remove_file(&log);
    let _ = std::fs::create_dir_all(cache);
    let _ = std::fs::write(&cached, if ok { "yes\n" } else { "no\n" });
    ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::*;

    fn spec() -> RunSpec {
        RunSpec {
            device: Device::Builtin,
            image: "/i/p,0.img".into(),
            host_fs: None,
            pair_builtin: None,
            size: Size {
                text: "1G".into(),
                bytes: 1 << 30,
            },
            guest: Guest {
                kernel: "/k".into(),
                initrd: "/r".into(),
                args: vec!["--mkfs".into(), "e2e".into()],
                end: GuestEnd::Poweroff,
                append: Some("quiet".into()),
                memory: Size {
                    text: "1G".into(),
                    bytes: 1 << 30,
                },
                smp: 2,
            },
            qemu: Qemu {
                bin: "/q".into(),
                accel: Accel::Tcg,
                trace_vhost: false,
                extra_args: vec!["-s".into()],
                launch: crate::spec::Launch::Direct,
            },
            stop: Stop::GuestEnds,
            timeout: Duration::from_secs(1),
            log_dir: "/l".into(),
            expect: Expect::default(),
            allow_kernel_warnings: false,
            verbose: false,
        }
    }

    fn strings(a: &[OsString]) -> Vec<String> {
        a.iter().map(|s| s.to_string_lossy().into_owned()).collect()
    }

    fn after<'a>(a: &'a [String], flag: &str) -> Vec<&'a str> {
        a.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn vhost_user_listening_daemon() {
        let b = PmemBacking::VhostUser {
            socket: "/run/a,b.sock".into(),
            server: false,
            chardev_opts: None,
        };
        let a = strings(&qemu_args(&spec(), &b, Path::new("/l/out")));
        assert_eq!(
            after(&a, "-chardev"),
            ["socket,id=pmem0,path=/run/a,,b.sock"]
        );
        assert_eq!(after(&a, "-device"), [VHOST_USER_PMEM_DEVICE]);
        assert_eq!(after(&a, "-m"), ["1024M"]);
        assert_eq!(after(&a, "-cpu"), ["max"]);
        assert_eq!(after(&a, "-serial"), ["stdio", "file:/l/out"]);
        assert!(a.contains(&"-no-reboot".to_string()));
        assert_eq!(after(&a, "-name"), ["debug-threads=on"]);
        assert_eq!(a.last().unwrap(), "-s", "extra arguments come last");
        assert_eq!(
            after(&a, "-append"),
            ["console=ttyS0 panic=-1 loglevel=5 vup.end=poweroff vup.args=--mkfs,e2e quiet"]
        );
    }

    #[test]
    fn qemu_listening_waits_for_the_daemon() {
        let b = PmemBacking::VhostUser {
            socket: "/s".into(),
            server: true,
            chardev_opts: Some("logfile=/x".into()),
        };
        let a = device_args(&b);
        assert_eq!(a[1], "socket,id=pmem0,path=/s,server=on,wait=on,logfile=/x");
    }

    #[test]
    fn builtin_device_gets_room_above_ram_and_reboots_keep_qemu() {
        let mut s = spec();
        s.guest.end = GuestEnd::Reboot(2);
        s.qemu.accel = Accel::Kvm;
        s.qemu.trace_vhost = true;
        let b = PmemBacking::Builtin {
            image: s.image.clone(),
            size: 1 << 30,
        };
        let a = strings(&qemu_args(&s, &b, Path::new("/o")));
        assert_eq!(after(&a, "-m"), ["1024M,slots=2,maxmem=3072M"]);
        assert_eq!(
            after(&a, "-object")[1],
            "memory-backend-file,id=pmemmem,share=on,mem-path=/i/p,,0.img,size=1073741824"
        );
        assert!(!a.contains(&"-no-reboot".to_string()));
        assert_eq!(after(&a, "-cpu"), ["host"]);
        assert_eq!(after(&a, "-trace").len(), 4);
        assert!(after(&a, "-append")[0].contains("vup.end=reboot vup.reboots=2"));
    }

    #[test]
    fn paired_builtin_device_sits_at_its_fixed_slot_with_room_above_ram() {
        let mut s = spec();
        s.pair_builtin = Some("/l/pair.img".into());
        let b = PmemBacking::VhostUser {
            socket: "/s".into(),
            server: false,
            chardev_opts: None,
        };
        let a = strings(&qemu_args(&s, &b, Path::new("/o")));
        assert_eq!(after(&a, "-m"), ["1024M,slots=2,maxmem=3072M"]);
        assert_eq!(
            after(&a, "-device"),
            [
                VHOST_USER_PMEM_DEVICE,
                "virtio-pmem-pci,memdev=pairmem,id=vpmem1,bus=pcie.0,addr=0x06"
            ]
        );
        assert_eq!(
            after(&a, "-object")[1],
            "memory-backend-file,id=pairmem,share=on,mem-path=/l/pair.img,size=1073741824"
        );
        assert_eq!(pair_pci_addr(), "0000:00:06.0");
    }

    #[test]
    fn shell_line_quotes_what_a_shell_would_split() {
        let l = shell_line(
            Path::new("/q"),
            &[
                "-append".into(),
                "a b".into(),
                "it's".into(),
                "x,y=1".into(),
            ],
        );
        assert_eq!(l, r"/q -append 'a b' 'it'\''s' x,y=1");
    }
}
