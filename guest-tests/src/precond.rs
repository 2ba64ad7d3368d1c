//! The three DAX preconditions of the catalogue. A suite that silently ran without DAX
//! tests nothing, so every one is checked and reported on its own line.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;

use crate::mounts::{self, MountEntry};
use crate::sys::{self, StatxAttributes, STATX_ATTR_DAX};

/// What was observed; gathered first so the verdict logic is testable on the host.
pub struct DaxFacts {
    /// Contents of /sys/block/<dev>/queue/dax, or why it could not be read.
    pub queue_dax: Result<String, String>,
    pub mount: Option<MountEntry>,
    /// statx of a file on the mount, or why it failed.
    pub statx: Result<StatxAttributes, String>,
}

pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
}

pub fn evaluate(facts: &DaxFacts, dev_name: &str) -> Vec<Check> {
    let queue = match &facts.queue_dax {
        Ok(v) => Check {
            name: "queue_dax",
            ok: v.trim() == "1",
            detail: format!("/sys/block/{dev_name}/queue/dax = {}", v.trim()),
        },
        Err(e) => Check {
            name: "queue_dax",
            ok: false,
            detail: format!("/sys/block/{dev_name}/queue/dax: {e}"),
        },
    };
    let mount = match &facts.mount {
        Some(m) => Check {
            name: "mount_dax_always",
            ok: m.dax_always(),
            detail: format!(
                "{} on {} type {} ({})",
                m.source,
                m.target,
                m.fstype,
                m.options.join(",")
            ),
        },
        None => Check {
            name: "mount_dax_always",
            ok: false,
            detail: "mount point not in /proc/mounts".into(),
        },
    };
    let statx = match &facts.statx {
        Ok(a) => {
            let supported = a.mask & STATX_ATTR_DAX != 0;
            let set = a.attributes & STATX_ATTR_DAX != 0;
            Check {
                name: "statx_attr_dax",
                ok: supported && set,
                detail: format!(
                    "STATX_ATTR_DAX supported={supported} set={set} (attributes={:#x} mask={:#x})",
                    a.attributes, a.mask
                ),
            }
        }
        Err(e) => Check {
            name: "statx_attr_dax",
            ok: false,
            detail: format!("statx: {e}"),
        },
    };
    vec![queue, mount, statx]
}

/// Observe the facts for block device `dev_name` mounted on `mnt`.
pub fn gather(dev_name: &str, mnt: &Path) -> DaxFacts {
    let queue_dax = std::fs::read_to_string(format!("/sys/block/{dev_name}/queue/dax"))
        .map_err(|e| crate::error::describe(&e));
    let mount = mounts::current(mnt);
    let probe = mnt.join(".dax-probe");
    let statx = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&probe)
        .and_then(|mut f| f.write_all(b"dax probe\n"))
        .and_then(|_| sys::statx_attributes(&probe))
        .map_err(|e| crate::error::describe(&e));
    DaxFacts {
        queue_dax,
        mount,
        statx,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> DaxFacts {
        DaxFacts {
            queue_dax: Ok("1\n".into()),
            mount: Some(MountEntry {
                source: "/dev/pmem0".into(),
                target: "/mnt/pmem".into(),
                fstype: "ext4".into(),
                options: vec!["rw".into(), "dax=always".into()],
            }),
            statx: Ok(StatxAttributes {
                attributes: STATX_ATTR_DAX,
                mask: STATX_ATTR_DAX | 0x10,
            }),
        }
    }

    #[test]
    fn all_good() {
        assert!(evaluate(&good(), "pmem0").iter().all(|c| c.ok));
    }

    #[test]
    fn each_failure_is_caught() {
        let mut f = good();
        f.queue_dax = Ok("0\n".into());
        assert_eq!(evaluate(&f, "pmem0").iter().filter(|c| !c.ok).count(), 1);

        let mut f = good();
        f.mount.as_mut().unwrap().options = vec!["rw".into()];
        assert!(!evaluate(&f, "pmem0")[1].ok);

        let mut f = good();
        f.mount = None;
        assert!(!evaluate(&f, "pmem0")[1].ok);

        // Attribute set but not claimed as supported: do not trust it.
        let mut f = good();
        f.statx = Ok(StatxAttributes {
            attributes: STATX_ATTR_DAX,
            mask: 0,
        });
        assert!(!evaluate(&f, "pmem0")[2].ok);

        let mut f = good();
        f.statx = Err("ENOENT".into());
        f.queue_dax = Err("ENOENT".into());
        assert_eq!(evaluate(&f, "pmem0").iter().filter(|c| !c.ok).count(), 2);
    }
}
