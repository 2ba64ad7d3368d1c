//! `--snapshot`: the guest writes to a private copy-on-write layer over a shared image. The
//! layer is a reflink clone of the image (FICLONE) in an unlinked file of the image's own
//! directory (O_TMPFILE): instant, no space until the guest writes, and gone when the daemon's
//! last descriptor and QEMU's mapping are. The image itself is only read and share-locked.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(
        "--snapshot cannot clone {path}: its file system ({fs}) makes no reflink copies \
         (FICLONE: {source}); keep the image on xfs (reflink is mkfs.xfs's default) or btrfs, \
         or serve a copy of it without --snapshot"
    )]
    NoReflink {
        path: PathBuf,
        fs: &'static str,
        source: io::Error,
    },
    #[error("--snapshot cannot create its private layer in {dir} (an unlinked O_TMPFILE file): {source}")]
    Layer { dir: PathBuf, source: io::Error },
}

/// A name for the file system of `file`, for the message that it cannot reflink.
fn fs_name(file: &File) -> &'static str {
    // SAFETY: statfs is plain old data, fully written by fstatfs on success.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: the descriptor is open for the call and `st` is writable.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } != 0 {
        return "unknown";
    }
    // The magic numbers of linux/magic.h.
    match st.f_type as u64 {
        0x5846_5342 => "xfs",
        0x9123_683e => "btrfs",
        0xef53 => "ext2/ext3/ext4",
        0x0102_1994 => "tmpfs",
        0x6573_5546 => "fuse",
        0x6969 => "nfs",
        0x794c_7630 => "overlayfs",
        0x2fc1_2fc1 => "zfs",
        0x0187 => "autofs",
        _ => "unknown type",
    }
}

/// The private layer over `image` (open for reading), in the directory of `path`.
pub fn private_layer(image: &File, path: &Path) -> Result<File, SnapshotError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let layer = OpenOptions::new()
        .read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_TMPFILE)
        .open(&dir)
        .map_err(|source| SnapshotError::Layer {
            dir: dir.clone(),
            source,
        })?;
    // SAFETY: FICLONE reads the source descriptor number passed by value; both descriptors
    // are open for the call.
    if unsafe { libc::ioctl(layer.as_raw_fd(), libc::FICLONE, image.as_raw_fd()) } != 0 {
        return Err(SnapshotError::NoReflink {
            path: path.to_path_buf(),
            fs: fs_name(image),
            source: io::Error::last_os_error(),
        });
    }
    Ok(layer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_system_without_reflink_is_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("golden.img");
        std::fs::write(&path, vec![3u8; 4096]).unwrap();
        let image = File::open(&path).unwrap();
        match private_layer(&image, &path) {
            // The test directory is on a reflink file system: the layer reads as the image.
            Ok(layer) => {
                let mut got = vec![0u8; 4096];
                std::os::unix::fs::FileExt::read_exact_at(&layer, &mut got, 0).unwrap();
                assert_eq!(got, vec![3u8; 4096]);
            }
            Err(e) => {
                let text = e.to_string();
                assert!(text.contains("makes no reflink copies"), "{text}");
                assert!(!text.contains("unknown type"), "{text}");
            }
        }
        let entries = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(entries, 1, "the layer has no name in the directory");
    }
}
