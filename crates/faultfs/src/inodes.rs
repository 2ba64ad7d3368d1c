//! The inode table: FUSE node ids and the source paths they stand for.
//!
//! Node ids are handed out per path, counted the way the kernel counts them (one per LOOKUP,
//! CREATE or MKDIR reply, minus what FORGET returns) and dropped at zero. Keying by path
//! rather than by the source's inode number keeps the table trivially correct for renames
//! and unlinks done through the mount, which is all a test filesystem needs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The root directory's node id, fixed by the FUSE protocol.
pub const ROOT: u64 = 1;

#[derive(Debug)]
struct Node {
    /// Relative to the source directory; empty for the root.
    path: PathBuf,
    lookups: u64,
    /// False once the name was unlinked or renamed over; the node lives on (open files
    /// still use it) but no longer owns its path.
    linked: bool,
}

#[derive(Debug)]
pub struct Inodes {
    by_ino: HashMap<u64, Node>,
    by_path: HashMap<PathBuf, u64>,
    next: u64,
}

impl Default for Inodes {
    fn default() -> Self {
        let mut t = Inodes {
            by_ino: HashMap::new(),
            by_path: HashMap::new(),
            next: ROOT + 1,
        };
        t.by_ino.insert(
            ROOT,
            Node {
                path: PathBuf::new(),
                lookups: 1,
                linked: true,
            },
        );
        t.by_path.insert(PathBuf::new(), ROOT);
        t
    }
}

impl Inodes {
    /// The relative path of `ino`, if the kernel still knows it.
    pub fn path(&self, ino: u64) -> Option<&Path> {
        self.by_ino.get(&ino).map(|n| n.path.as_path())
    }

    /// The node id of `path` if it has one, without counting a lookup.
    pub fn peek(&self, path: &Path) -> Option<u64> {
        self.by_path.get(path).copied()
    }

    /// Counts one kernel reference to `path` and returns its node id.
    pub fn remember(&mut self, path: &Path) -> u64 {
        if let Some(&ino) = self.by_path.get(path) {
            if let Some(node) = self.by_ino.get_mut(&ino) {
                node.lookups += 1;
            }
            return ino;
        }
        let ino = self.next;
        self.next += 1;
        self.by_ino.insert(
            ino,
            Node {
                path: path.to_path_buf(),
                lookups: 1,
                linked: true,
            },
        );
        self.by_path.insert(path.to_path_buf(), ino);
        ino
    }

    /// The kernel dropped `n` references to `ino`.
    pub fn forget(&mut self, ino: u64, n: u64) {
        if ino == ROOT {
            return;
        }
        let Some(node) = self.by_ino.get_mut(&ino) else {
            return;
        };
        node.lookups = node.lookups.saturating_sub(n);
        if node.lookups == 0 {
            let node = self.by_ino.remove(&ino).expect("present");
            if node.linked {
                self.by_path.remove(&node.path);
            }
        }
    }

    /// `path` was removed: a new file of the same name must get a new node id.
    pub fn unlinked(&mut self, path: &Path) {
        if let Some(ino) = self.by_path.remove(path) {
            if let Some(node) = self.by_ino.get_mut(&ino) {
                node.linked = false;
            }
        }
    }

    /// `from` was renamed to `to`: the node (and everything below it, for a directory)
    /// follows, and whatever `to` named before is gone.
    pub fn renamed(&mut self, from: &Path, to: &Path) {
        self.unlinked(to);
        let moved: Vec<(PathBuf, u64)> = self
            .by_path
            .iter()
            .filter(|(p, _)| p.starts_with(from))
            .map(|(p, &ino)| (p.clone(), ino))
            .collect();
        for (old, ino) in moved {
            self.by_path.remove(&old);
            let rest = old.strip_prefix(from).expect("filtered by prefix");
            let new = if rest.as_os_str().is_empty() {
                to.to_path_buf()
            } else {
                to.join(rest)
            };
            if let Some(node) = self.by_ino.get_mut(&ino) {
                node.path = new.clone();
            }
            self.by_path.insert(new, ino);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_lookups() {
        let mut t = Inodes::default();
        let a = t.remember(Path::new("a"));
        assert_eq!(t.remember(Path::new("a")), a);
        t.forget(a, 1);
        assert_eq!(t.path(a), Some(Path::new("a")));
        t.forget(a, 1);
        assert_eq!(t.path(a), None);
        assert_ne!(t.remember(Path::new("a")), a, "ids are not reused");
        t.forget(ROOT, 100);
        assert_eq!(t.path(ROOT), Some(Path::new("")));
    }

    #[test]
    fn unlink_frees_the_name_not_the_node() {
        let mut t = Inodes::default();
        let a = t.remember(Path::new("a"));
        t.unlinked(Path::new("a"));
        let b = t.remember(Path::new("a"));
        assert_ne!(a, b);
        t.forget(a, 1);
        assert_eq!(
            t.peek(Path::new("a")),
            Some(b),
            "forgetting the old node keeps the new"
        );
    }

    #[test]
    fn rename_moves_children() {
        let mut t = Inodes::default();
        let d = t.remember(Path::new("d"));
        let f = t.remember(Path::new("d/f"));
        let other = t.remember(Path::new("e"));
        t.renamed(Path::new("d"), Path::new("e"));
        assert_eq!(t.path(d), Some(Path::new("e")));
        assert_eq!(t.path(f), Some(Path::new("e/f")));
        assert_eq!(t.peek(Path::new("e")), Some(d));
        assert_eq!(t.peek(Path::new("d/f")), None);
        t.forget(other, 1);
        assert_eq!(
            t.peek(Path::new("e")),
            Some(d),
            "the replaced node no longer owns e"
        );
        // A sibling whose name merely starts with the same letters stays put.
        let de = t.remember(Path::new("dd"));
        t.renamed(Path::new("e"), Path::new("x"));
        assert_eq!(t.path(de), Some(Path::new("dd")));
    }
}
