//! /proc/mounts: is the mount point mounted, and with which options.

use std::path::Path;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountEntry {
    pub source: String,
    pub target: String,
    pub fstype: String,
    pub options: Vec<String>,
}

impl MountEntry {
    /// ext4 and xfs both print `dax=always` when every file is DAX.
    pub fn dax_always(&self) -> bool {
        self.options.iter().any(|o| o == "dax=always" || o == "dax")
    }
}

/// /proc/mounts escapes space, tab, newline and backslash as \ooo octal.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b));
        if bytes[i] == b'\\' && octal {
            let digit = |k: usize| u16::from(bytes[i + k] - b'0');
            // Truncation only matters for \4xx and above, which the kernel never emits.
            out.push((digit(1) * 64 + digit(2) * 8 + digit(3)) as u8);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn parse(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let source = unescape(f.next()?);
            let target = unescape(f.next()?);
            let fstype = f.next()?.to_string();
            let options = f.next()?.split(',').map(String::from).collect();
            Some(MountEntry {
                source,
                target,
                fstype,
                options,
            })
        })
        .collect()
}

/// The topmost mount on `target` in `text`, if any.
pub fn find(text: &str, target: &Path) -> Option<MountEntry> {
    let target = target.to_string_lossy();
    let target = target.trim_end_matches('/');
    parse(text).into_iter().rev().find(|m| m.target == target)
}

/// The current mount on `target`, read from /proc/mounts.
pub fn current(target: &Path) -> Option<MountEntry> {
    let text = std::fs::read_to_string("/proc/mounts").ok()?;
    find(&text, target)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
rootfs / rootfs rw 0 0
proc /proc proc rw,relatime 0 0
/dev/pmem0 /mnt/pmem ext4 rw,relatime,dax=always 0 0
tmpfs /mnt/with\\040space tmpfs rw 0 0
/dev/pmem0 /mnt/other xfs rw,attr2,inode64,dax=never 0 0
";

    #[test]
    fn finds_mount_and_dax_option() {
        let m = find(SAMPLE, Path::new("/mnt/pmem")).unwrap();
        assert_eq!(m.source, "/dev/pmem0");
        assert_eq!(m.fstype, "ext4");
        assert!(m.dax_always());
        let other = find(SAMPLE, Path::new("/mnt/other/")).unwrap();
        assert!(!other.dax_always());
        assert!(find(SAMPLE, Path::new("/mnt")).is_none());
    }

    #[test]
    fn unescapes_octal() {
        assert!(find(SAMPLE, Path::new("/mnt/with space")).is_some());
        assert_eq!(unescape("a\\134b"), "a\\b");
        assert_eq!(unescape("trailing\\04"), "trailing\\04");
    }

    #[test]
    fn last_mount_wins() {
        let text = "a /m tmpfs rw 0 0\n/dev/pmem0 /m ext4 rw,dax=always 0 0\n";
        assert_eq!(find(text, Path::new("/m")).unwrap().fstype, "ext4");
    }
}
