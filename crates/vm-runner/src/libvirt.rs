//! QEMU started by libvirt instead of by the runner (`vmrun --libvirt`): the shipped domain
//! template (`contrib/libvirt/vhost-user-pmem-domain.xml`) filled in from the run's spec, and
//! libvirt's embedded QEMU driver (`virsh -c 'qemu:///embed?root=DIR'`), which needs no
//! libvirt daemon and keeps all its state in DIR. What the embedded driver needs on a machine
//! where libvirt is unpacked rather than installed is measured in docs/libvirt.md; each
//! work-around below names the failure it avoids.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::junit::escape as xml_escape;
use crate::qemu::{escape, VHOST_USER_PMEM_DEVICE};

/// The template operators copy; the run fills in exactly this file, so what is tested is
/// what ships.
pub const DOMAIN_TEMPLATE: &str =
    include_str!("../../../contrib/libvirt/vhost-user-pmem-domain.xml");

/// libvirt puts its own `pcie-root-port`s in slot 1; without an explicit address QEMU puts
/// the pmem device there too and the two collide.
pub const DEVICE_ADDRESS: &str = "bus=pcie.0,addr=0x5";

/// The domain's name, in a driver root of its own per run.
pub const DOMAIN_NAME: &str = "vmrun";

/// What fills the template's placeholders.
#[derive(Debug, Clone)]
pub struct Domain<'a> {
    pub kvm: bool,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub emulator: &'a Path,
    pub kernel: &'a Path,
    pub initrd: &'a Path,
    pub cmdline: &'a str,
    pub console: &'a Path,
    pub socket: &'a Path,
    /// More QEMU arguments, appended to `<qemu:commandline>`.
    pub extra_args: &'a [String],
}

/// The template with every placeholder filled in. Fails when the template no longer carries
/// `qemu.rs`'s device string (XML cannot include the constant, so the copy is checked here)
/// or when a placeholder is left.
pub fn domain_xml(d: &Domain) -> Result<String, String> {
    let device = format!("value='{VHOST_USER_PMEM_DEVICE},{DEVICE_ADDRESS}'");
    if !DOMAIN_TEMPLATE.contains(&device) {
        return Err(format!(
            "contrib/libvirt/vhost-user-pmem-domain.xml does not carry {device} \
             (qemu.rs's VHOST_USER_PMEM_DEVICE with the address)"
        ));
    }
    let path = |p: &Path| xml_escape(&p.display().to_string());
    let fills = [
        ("@TYPE@", (if d.kvm { "kvm" } else { "qemu" }).to_string()),
        ("@NAME@", DOMAIN_NAME.to_string()),
        ("@VCPUS@", d.vcpus.to_string()),
        ("@MEM_MIB@", d.memory_mib.to_string()),
        ("@EMULATOR@", path(d.emulator)),
        ("@KERNEL@", path(d.kernel)),
        ("@INITRD@", path(d.initrd)),
        ("@CMDLINE@", xml_escape(d.cmdline)),
        ("@CONSOLE@", path(d.console)),
        ("@SOCKET@", xml_escape(&escape(d.socket))),
    ];
    // The comment at the top names the placeholders; only the XML after it is filled in.
    let body_at = DOMAIN_TEMPLATE
        .find("<domain ")
        .ok_or("the template has no <domain>")?;
    let mut xml = DOMAIN_TEMPLATE[body_at..].to_string();
    for (key, value) in &fills {
        xml = xml.replace(key, value);
    }
    if !d.extra_args.is_empty() {
        let mut extra = String::new();
        for a in d.extra_args {
            let _ = writeln!(extra, "    <qemu:arg value='{}'/>", xml_escape(a));
        }
        extra.push_str("  </qemu:commandline>");
        xml = xml.replacen("  </qemu:commandline>", &extra, 1);
    }
    if let Some(p) = left_placeholder(&xml) {
        return Err(format!("the domain XML still has the placeholder {p}"));
    }
    Ok(xml)
}

/// An `@NAME@` the fills did not cover (a template grown a placeholder the runner lacks).
fn left_placeholder(xml: &str) -> Option<&str> {
    let mut parts = xml.split('@');
    parts.next();
    parts.find(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_uppercase() || b == b'_'))
}

/// What root in a container without systemd needs in the embedded driver's qemu.conf: no
/// SELinux/AppArmor/DAC relabelling, no mount namespace or cgroups of libvirt's own, QEMU's
/// output in a file (there is no virtlogd).
const QEMU_CONF: &str = "\
security_driver = \"none\"
namespaces = [ ]
cgroup_controllers = [ ]
user = \"root\"
group = \"root\"
stdio_handler = \"file\"
";

/// virsh runs in a private mount namespace: libvirt 9 as root looks up a `libvirt-qemu` user
/// before it reads qemu.conf (a passwd copy with one is bind-mounted over /etc/passwd), and
/// reads its CPU map from a compiled-in /usr/share path (an unpacked tree's usr/share is
/// overlaid there). One virsh both creates the domain and waits for its lifecycle event:
/// libvirt starts QEMU with -no-shutdown, and with the embedded driver only a process that
/// holds the driver acts on the guest's poweroff.
const VIRSH_SCRIPT: &str = r#"
mount --bind "$1/passwd" /etc/passwd && mount --bind "$1/group" /etc/group || exit 125
if [ -n "$2" ]; then mount -t overlay overlay -o "lowerdir=/usr/share:$2" /usr/share || exit 125; fi
exec "$3" -c "qemu:///embed?root=$1" "create $1/domain.xml; event --domain $4 --event lifecycle --timeout $5"
"#;

/// One domain in its own embedded-driver root. Dropping it kills a QEMU libvirt left running
/// (libvirt daemonizes QEMU, so it is not the runner's child).
pub struct Embedded {
    root: PathBuf,
}

impl Embedded {
    /// Writes the driver's root: `etc/qemu.conf`, the passwd and group copies, `domain.xml`.
    pub fn prepare(root: &Path, xml: &str) -> std::io::Result<Embedded> {
        // The driver puts the QEMU monitor socket at ROOT/lib/qemu/domain-N-NAME/monitor.sock.
        let longest = root.as_os_str().len() + "/lib/qemu/domain-99-/monitor.sock".len();
        if longest + DOMAIN_NAME.len() > 107 {
            return Err(std::io::Error::other(format!(
                "{} is too deep for libvirt's monitor socket (sun_path holds 107 bytes); \
                 give a shorter --log-dir",
                root.display()
            )));
        }
        let _ = std::fs::remove_dir_all(root);
        std::fs::create_dir_all(root.join("etc"))?;
        std::fs::write(root.join("etc/qemu.conf"), QEMU_CONF)?;
        let mut passwd = std::fs::read_to_string("/etc/passwd")?;
        let mut group = std::fs::read_to_string("/etc/group")?;
        if !passwd.lines().any(|l| l.starts_with("libvirt-qemu:")) {
            passwd.push_str("libvirt-qemu:x:0:0:libvirt-qemu:/:/usr/sbin/nologin\n");
        }
        for g in ["libvirt-qemu", "kvm"] {
            if !group.lines().any(|l| l.starts_with(&format!("{g}:"))) {
                group.push_str(&format!("{g}:x:0:\n"));
            }
        }
        std::fs::write(root.join("passwd"), passwd)?;
        std::fs::write(root.join("group"), group)?;
        std::fs::write(root.join("domain.xml"), xml)?;
        Ok(Embedded {
            root: root.to_path_buf(),
        })
    }

    /// The virsh process that starts the domain and exits at its first lifecycle event (the
    /// guest's poweroff) or after `timeout`. `share`: an unpacked libvirt's usr/share.
    pub fn virsh(&self, virsh: &Path, share: Option<&Path>, timeout: Duration) -> Command {
        let mut c = Command::new("unshare");
        c.arg("--mount")
            .arg("sh")
            .arg("-c")
            .arg(VIRSH_SCRIPT)
            .arg("sh")
            .arg(&self.root)
            .arg(share.map(Path::as_os_str).unwrap_or_default())
            .arg(virsh)
            .arg(DOMAIN_NAME)
            .arg(timeout.as_secs().max(1).to_string());
        c
    }

    /// QEMU's stderr (with `stdio_handler = "file"`), which starts with libvirt's command line.
    pub fn qemu_log(&self) -> PathBuf {
        self.root
            .join("log/qemu")
            .join(format!("{DOMAIN_NAME}.log"))
    }

    /// The QEMU libvirt started, while it runs.
    fn qemu_pid(&self) -> Option<i32> {
        let pid_file = self
            .root
            .join("run/qemu")
            .join(format!("{DOMAIN_NAME}.pid"));
        let pid: i32 = std::fs::read_to_string(pid_file)
            .ok()?
            .trim()
            .parse()
            .ok()?;
        // The pid file outlives QEMU; only a process whose command line names this domain
        // counts, so a recycled pid is never killed.
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let want = format!("guest={DOMAIN_NAME},");
        let ours = cmdline
            .split(|b| *b == 0)
            .any(|a| a.starts_with(want.as_bytes()));
        ours.then_some(pid)
    }

    /// After virsh exited: waits up to `grace` for libvirt's QEMU to be gone, then kills it.
    /// Returns what had to be done, if anything.
    pub fn finish(&self, grace: Duration) -> Option<String> {
        let t0 = Instant::now();
        while t0.elapsed() < grace {
            self.qemu_pid()?;
            std::thread::sleep(Duration::from_millis(100));
        }
        let pid = self.qemu_pid()?;
        // SAFETY: kill(2) on a pid checked just above to be this domain's QEMU.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        Some(format!(
            "QEMU (pid {pid}) was still running {} ms after virsh exited; killed",
            grace.as_millis()
        ))
    }
}

impl Drop for Embedded {
    fn drop(&mut self) {
        self.finish(Duration::ZERO);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn domain<'a>(extra: &'a [String]) -> Domain<'a> {
        Domain {
            kvm: false,
            vcpus: 2,
            memory_mib: 1024,
            emulator: Path::new("/q/qemu"),
            kernel: Path::new("/k/vmlinuz"),
            initrd: Path::new("/i/initrd & co"),
            cmdline: "console=ttyS0 vup.args=--mkfs,e2e",
            console: Path::new("/l/console.log"),
            socket: Path::new("/s/a,b.sock"),
            extra_args: extra,
        }
    }

    #[test]
    fn the_shipped_template_carries_the_runners_device_string() {
        assert!(DOMAIN_TEMPLATE.contains(&format!("{VHOST_USER_PMEM_DEVICE},{DEVICE_ADDRESS}")));
    }

    #[test]
    fn every_placeholder_is_filled_and_values_are_escaped() {
        let xml = domain_xml(&domain(&[])).unwrap();
        assert!(!xml.contains('@'), "{xml}");
        assert!(xml.starts_with("<domain type='qemu' "), "{xml}");
        assert!(xml.contains("<vcpu>2</vcpu>"));
        assert!(xml.contains("<initrd>/i/initrd &amp; co</initrd>"));
        // QEMU's comma doubling inside the option, then XML's own escaping.
        assert!(xml.contains("path=/s/a,,b.sock'"), "{xml}");
        assert!(xml.contains("<cmdline>console=ttyS0 vup.args=--mkfs,e2e</cmdline>"));
        assert_eq!(left_placeholder("a @HOST@ b"), Some("HOST"));
        assert_eq!(left_placeholder("user@host and a@b.c"), None);
    }

    #[test]
    fn kvm_and_extra_qemu_arguments_reach_the_xml() {
        let extra = ["-msg".to_string(), "timestamp=on".to_string()];
        let d = Domain {
            kvm: true,
            ..domain(&extra)
        };
        let xml = domain_xml(&d).unwrap();
        assert!(xml.starts_with("<domain type='kvm' "));
        let tail = &xml[xml.find(DEVICE_ADDRESS).unwrap()..];
        let msg = tail.find("<qemu:arg value='-msg'/>").unwrap();
        let ts = tail.find("<qemu:arg value='timestamp=on'/>").unwrap();
        let end = tail.find("</qemu:commandline>").unwrap();
        assert!(msg < ts && ts < end, "{tail}");
    }

    #[test]
    fn a_root_too_deep_for_the_monitor_socket_is_refused_up_front() {
        let deep = PathBuf::from("/tmp").join("d".repeat(80));
        let e = Embedded::prepare(&deep, "<domain/>").err().unwrap();
        assert!(e.to_string().contains("shorter --log-dir"), "{e}");
        assert!(!deep.exists(), "nothing is written before the check");
    }

    #[test]
    fn prepare_writes_the_drivers_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("lv");
        let e = Embedded::prepare(&root, "<domain/>").unwrap();
        let conf = std::fs::read_to_string(root.join("etc/qemu.conf")).unwrap();
        assert!(conf.contains("stdio_handler = \"file\""));
        let passwd = std::fs::read_to_string(root.join("passwd")).unwrap();
        assert!(passwd.lines().any(|l| l.starts_with("libvirt-qemu:")));
        assert!(passwd.starts_with(&std::fs::read_to_string("/etc/passwd").unwrap()));
        assert_eq!(
            std::fs::read_to_string(root.join("domain.xml")).unwrap(),
            "<domain/>"
        );
        assert_eq!(e.qemu_log(), root.join("log/qemu/vmrun.log"));
        assert_eq!(e.finish(Duration::ZERO), None, "no QEMU, nothing to kill");
    }
}
