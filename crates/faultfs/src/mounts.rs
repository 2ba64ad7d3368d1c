//! Whether a FUSE filesystem is mounted somewhere, read from /proc/self/mountinfo.
//!
//! The mount table rather than a stat of the mount point: stat of a FUSE mount whose server
//! hangs or died blocks or fails, while the table always answers.

use std::io;
use std::path::Path;

/// Undoes mountinfo's octal escapes (`\040` for a space, and so on).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                out.push(
                    d.iter()
                        .fold(0u8, |v, c| v.wrapping_mul(8).wrapping_add(c - b'0')),
                );
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether `mountinfo` (the text of a mountinfo file) has a FUSE mount at `path`.
fn has_fuse_mount(mountinfo: &str, path: &str) -> bool {
    mountinfo.lines().any(|line| {
        let mut halves = line.splitn(2, " - ");
        let (Some(head), Some(tail)) = (halves.next(), halves.next()) else {
            return false;
        };
        let mount_point = head.split(' ').nth(4).map(unescape);
        let fstype = tail.split(' ').next().unwrap_or("");
        mount_point.as_deref() == Some(path) && (fstype == "fuse" || fstype.starts_with("fuse."))
    })
}

/// Whether a FUSE filesystem is mounted at `path` (compared after making it absolute
/// without touching the mount itself).
pub fn is_fuse_mounted(path: &Path) -> io::Result<bool> {
    let path = match path.parent().zip(path.file_name()) {
        // Canonicalize the parent only: resolving the mount point would stat the mount.
        Some((parent, name)) => parent.canonicalize()?.join(name),
        None => path.to_path_buf(),
    };
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(has_fuse_mount(&info, &path.to_string_lossy()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &str = "\
22 1 0:21 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
95 22 0:50 / /tmp/a\\040b rw,nosuid,nodev,relatime shared:50 - fuse.faultfs faultfs:/x rw,user_id=0
96 22 0:51 / /tmp/c rw,relatime - tmpfs tmpfs rw
";

    #[test]
    fn finds_fuse_mounts_only() {
        assert!(has_fuse_mount(INFO, "/tmp/a b"));
        assert!(!has_fuse_mount(INFO, "/tmp/c"), "tmpfs is not FUSE");
        assert!(!has_fuse_mount(INFO, "/tmp/a"));
        assert_eq!(unescape("x\\134y\\"), "x\\y\\");
    }

    #[test]
    fn root_is_not_fuse() {
        assert!(!is_fuse_mounted(Path::new("/")).unwrap());
    }
}
