//! `VUP-HOSTCHECK offset=O len=L sha256=H`: data the guest wrote and made durable, which the
//! host must find at that place in the image once QEMU is gone. A later check whose range
//! overlaps an earlier one supersedes it: a later boot may reuse the blocks (after checking
//! the earlier data itself), so only the newest claim about each byte is compared.

use std::fs::File;
use std::io;
use std::path::Path;

use sha2::{Digest, Sha256};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostCheck {
    pub offset: u64,
    pub len: u64,
    pub sha256: String,
}

/// Parses one line; `Err` names what is wrong with it.
pub fn parse(line: &str) -> Result<HostCheck, String> {
    let mut offset = None;
    let mut len = None;
    let mut sha = None;
    for word in line.split_whitespace().skip(1) {
        if let Some(v) = word.strip_prefix("offset=") {
            offset = v.parse().ok();
        } else if let Some(v) = word.strip_prefix("len=") {
            len = v.parse().ok();
        } else if let Some(v) = word.strip_prefix("sha256=") {
            if v.len() == 64
                && v.bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
            {
                sha = Some(v.to_string());
            }
        }
    }
    match (offset, len, sha) {
        (Some(offset), Some(len), Some(sha256)) => Ok(HostCheck {
            offset,
            len,
            sha256,
        }),
        _ => Err(format!("malformed VUP-HOSTCHECK line: {line}")),
    }
}

/// The checks still in force, in order: those no later check overlaps.
pub fn current(checks: &[HostCheck]) -> Vec<HostCheck> {
    checks
        .iter()
        .enumerate()
        .filter(|(i, c)| {
            !checks[i + 1..]
                .iter()
                .any(|l| l.offset < c.offset + c.len && c.offset < l.offset + l.len)
        })
        .map(|(_, c)| c.clone())
        .collect()
}

/// The sha256 of `len` bytes at `offset` of `image` (fewer if the file ends first).
pub fn sha256_of(image: &Path, offset: u64, len: u64) -> io::Result<String> {
    sha256_in(&File::open(image)?, offset, len)
}

/// [`sha256_of`] for a file already open (a `--snapshot` daemon's unlinked private layer).
pub fn sha256_in(f: &File, offset: u64, len: u64) -> io::Result<String> {
    use std::os::unix::fs::FileExt;
    let mut h = Sha256::new();
    let mut at = offset;
    let end = offset.saturating_add(len);
    let mut buf = vec![0u8; 1 << 20];
    while at < end {
        let want = (end - at).min(buf.len() as u64) as usize;
        let n = f.read_at(&mut buf[..want], at)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        at += n as u64;
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// The private layer of the `--snapshot` daemon `pid` over `image`: the unlinked file in the
/// image's directory that it holds open, opened here too so that it outlives the daemon and
/// the run can check the guest's data in it.
pub fn snapshot_layer(pid: u32, image: &Path) -> io::Result<File> {
    let dir = image.parent().unwrap_or(Path::new("/"));
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))?.flatten() {
        let Ok(target) = std::fs::read_link(e.path()) else {
            continue;
        };
        let t = target.to_string_lossy();
        if let Some(name) = t.strip_suffix(" (deleted)") {
            if Path::new(name).parent() == Some(dir) {
                return File::open(e.path());
            }
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!("daemon {pid} holds no unlinked file in {}", dir.display()),
    ))
}

/// The sha256 of the whole file.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    sha256_of(path, 0, u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(offset: u64, len: u64, s: char) -> HostCheck {
        HostCheck {
            offset,
            len,
            sha256: s.to_string().repeat(64),
        }
    }

    #[test]
    fn lines_parse_or_say_why_not() {
        let h = "a".repeat(64);
        assert_eq!(
            parse(&format!("VUP-HOSTCHECK offset=4096 len=8 sha256={h}")).unwrap(),
            HostCheck {
                offset: 4096,
                len: 8,
                sha256: h.clone()
            }
        );
        for bad in [
            "VUP-HOSTCHECK offset=x len=8 sha256=00",
            "VUP-HOSTCHECK len=8",
        ] {
            assert!(parse(bad).unwrap_err().contains("malformed"), "{bad}");
        }
    }

    #[test]
    fn later_overlapping_checks_supersede_earlier_ones() {
        let all = [c(0, 10, 'a'), c(100, 10, 'b'), c(5, 10, 'c'), c(10, 1, 'd')];
        // a overlaps c; c overlaps d (10 is inside 5..15); b stands alone.
        assert_eq!(current(&all), [c(100, 10, 'b'), c(10, 1, 'd')]);
        // Touching ranges do not overlap.
        assert_eq!(current(&[c(0, 10, 'a'), c(10, 10, 'b')]).len(), 2);
    }

    #[test]
    fn digests_of_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        std::fs::write(&p, b"xxabcxx").unwrap();
        // sha256("abc")
        assert_eq!(
            sha256_of(&p, 2, 3).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(sha256_file(&p).unwrap(), sha256_of(&p, 0, 7).unwrap());
    }
}
