//! A file QEMU is writing (the console, the guest's output port), read as it grows.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

pub struct Tail {
    path: PathBuf,
    read: u64,
    /// Everything read so far, `\r` removed.
    pub text: String,
}

impl Tail {
    pub fn new(path: &Path) -> Tail {
        Tail {
            path: path.to_path_buf(),
            read: 0,
            text: String::new(),
        }
    }

    /// Reads what was added since the last call; returns the new text.
    pub fn refresh(&mut self) -> &str {
        let start = self.text.len();
        if let Ok(mut f) = File::open(&self.path) {
            if f.seek(SeekFrom::Start(self.read)).is_ok() {
                let mut buf = Vec::new();
                if let Ok(n) = f.read_to_end(&mut buf) {
                    self.read += n as u64;
                    let s = String::from_utf8_lossy(&buf).replace('\r', "");
                    self.text.push_str(&s);
                }
            }
        }
        &self.text[start..]
    }

    /// Bytes of the file read so far (an offset into the file, for after-kill.txt).
    pub fn offset(&self) -> u64 {
        self.read
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn reads_what_was_appended() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c");
        let mut t = Tail::new(&p);
        assert_eq!(t.refresh(), "", "a missing file is empty");
        let mut f = File::create(&p).unwrap();
        f.write_all(b"one\r\ntw").unwrap();
        assert_eq!(t.refresh(), "one\ntw");
        f.write_all(b"o\n").unwrap();
        assert_eq!(t.refresh(), "o\n");
        assert_eq!(t.text, "one\ntwo\n");
        assert_eq!(t.offset(), 9);
    }
}
