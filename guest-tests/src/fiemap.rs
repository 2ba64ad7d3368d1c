//! FIEMAP: where a file's data lies on the block device. For this device a byte offset on
//! /dev/pmem0 is the same byte offset in the host's backing file, so the host runner can
//! check persisted data without mounting the image.

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;

const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
/// Flush dirty data before mapping, so delayed allocation has been resolved.
const FIEMAP_FLAG_SYNC: u32 = 0x1;

pub const FIEMAP_EXTENT_LAST: u32 = 0x0001;
const FIEMAP_EXTENT_UNKNOWN: u32 = 0x0002;
const FIEMAP_EXTENT_DELALLOC: u32 = 0x0004;
const FIEMAP_EXTENT_ENCODED: u32 = 0x0008;
const FIEMAP_EXTENT_DATA_ENCRYPTED: u32 = 0x0080;
const FIEMAP_EXTENT_NOT_ALIGNED: u32 = 0x0100;
const FIEMAP_EXTENT_DATA_INLINE: u32 = 0x0200;
const FIEMAP_EXTENT_DATA_TAIL: u32 = 0x0400;
const FIEMAP_EXTENT_UNWRITTEN: u32 = 0x0800;

/// Any of these means the bytes at fe_physical are not the file's bytes as read(2)
/// returns them.
const NOT_PLAIN: u32 = FIEMAP_EXTENT_UNKNOWN
    | FIEMAP_EXTENT_DELALLOC
    | FIEMAP_EXTENT_ENCODED
    | FIEMAP_EXTENT_DATA_ENCRYPTED
    | FIEMAP_EXTENT_NOT_ALIGNED
    | FIEMAP_EXTENT_DATA_INLINE
    | FIEMAP_EXTENT_DATA_TAIL
    | FIEMAP_EXTENT_UNWRITTEN;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub logical: u64,
    pub physical: u64,
    pub length: u64,
    pub flags: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct RawExtent {
    fe_logical: u64,
    fe_physical: u64,
    fe_length: u64,
    fe_reserved64: [u64; 2],
    fe_flags: u32,
    fe_reserved: [u32; 3],
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct RawHeader {
    fm_start: u64,
    fm_length: u64,
    fm_flags: u32,
    fm_mapped_extents: u32,
    fm_extent_count: u32,
    fm_reserved: u32,
}

const BATCH: usize = 64;

#[repr(C)]
struct Request {
    header: RawHeader,
    extents: [RawExtent; BATCH],
}

/// All extents of `file`, after syncing it.
pub fn extents(file: &File) -> io::Result<Vec<Extent>> {
    let mut out = Vec::new();
    let mut start = 0u64;
    loop {
        let mut req = Request {
            header: RawHeader {
                fm_start: start,
                fm_length: u64::MAX - start,
                fm_flags: FIEMAP_FLAG_SYNC,
                fm_extent_count: BATCH as u32,
                ..RawHeader::default()
            },
            extents: [RawExtent::default(); BATCH],
        };
        // SAFETY: req is a struct fiemap followed by room for fm_extent_count extents,
        // exactly what FS_IOC_FIEMAP reads and fills.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_FIEMAP, &mut req as *mut Request) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        let mapped = (req.header.fm_mapped_extents as usize).min(BATCH);
        if mapped == 0 {
            return Ok(out);
        }
        for raw in &req.extents[..mapped] {
            out.push(Extent {
                logical: raw.fe_logical,
                physical: raw.fe_physical,
                length: raw.fe_length,
                flags: raw.fe_flags,
            });
        }
        let last = out[out.len() - 1];
        if last.flags & FIEMAP_EXTENT_LAST != 0 || mapped < BATCH {
            return Ok(out);
        }
        start = last.logical + last.length;
    }
}

/// A piece of the file that lies contiguously on the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub file_offset: u64,
    pub dev_offset: u64,
    pub len: u64,
}

/// The device ranges holding bytes [0, file_len) of the file. Fails if any byte is not
/// plainly stored (a hole, unwritten, delalloc, inline or encoded extent), because the
/// host could not verify it.
pub fn segments(extents: &[Extent], file_len: u64) -> Result<Vec<Segment>, String> {
    let mut sorted = extents.to_vec();
    sorted.sort_by_key(|e| e.logical);
    let mut out = Vec::new();
    let mut covered = 0u64;
    for e in &sorted {
        if covered >= file_len {
            break;
        }
        let end = e.logical.saturating_add(e.length).min(file_len);
        if end <= covered {
            continue;
        }
        if e.logical > covered {
            return Err(format!("hole at file offset {covered}..{}", e.logical));
        }
        if e.flags & NOT_PLAIN != 0 {
            return Err(format!(
                "extent at file offset {} has flags {:#x}, not plain data",
                e.logical, e.flags
            ));
        }
        let skip = covered - e.logical;
        out.push(Segment {
            file_offset: covered,
            dev_offset: e.physical + skip,
            len: end - covered,
        });
        covered = end;
    }
    if covered < file_len {
        return Err(format!(
            "no extent covers file offset {covered}..{file_len}"
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(logical: u64, physical: u64, length: u64, flags: u32) -> Extent {
        Extent {
            logical,
            physical,
            length,
            flags,
        }
    }

    #[test]
    fn raw_layout_matches_kernel_abi() {
        assert_eq!(std::mem::size_of::<RawHeader>(), 32);
        assert_eq!(std::mem::size_of::<RawExtent>(), 56);
    }

    #[test]
    fn single_extent_clipped_to_file_length() {
        let s = segments(&[ext(0, 1 << 30, 2 << 20, FIEMAP_EXTENT_LAST)], 1 << 20).unwrap();
        assert_eq!(
            s,
            vec![Segment {
                file_offset: 0,
                dev_offset: 1 << 30,
                len: 1 << 20
            }]
        );
    }

    #[test]
    fn several_extents_out_of_order() {
        let s = segments(
            &[
                ext(4096, 90_000_000, 8192, FIEMAP_EXTENT_LAST),
                ext(0, 50_000_000, 4096, 0),
            ],
            12288,
        )
        .unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].dev_offset, 50_000_000);
        assert_eq!(s[1].file_offset, 4096);
        assert_eq!(s[1].dev_offset, 90_000_000);
        assert_eq!(s.iter().map(|s| s.len).sum::<u64>(), 12288);
    }

    #[test]
    fn overlapping_extent_is_entered_midway() {
        let s = segments(&[ext(0, 1000, 4096, 0), ext(2048, 9000, 4096, 0)], 6144).unwrap();
        assert_eq!(
            s[1],
            Segment {
                file_offset: 4096,
                dev_offset: 9000 + 2048,
                len: 2048
            }
        );
    }

    #[test]
    fn rejects_holes_and_unplain_extents() {
        assert!(segments(&[ext(4096, 0, 4096, 0)], 8192)
            .unwrap_err()
            .contains("hole"));
        assert!(segments(&[ext(0, 0, 4096, 0)], 8192)
            .unwrap_err()
            .contains("no extent"));
        for flag in [
            FIEMAP_EXTENT_UNWRITTEN,
            FIEMAP_EXTENT_DELALLOC,
            FIEMAP_EXTENT_UNKNOWN,
            FIEMAP_EXTENT_ENCODED,
            FIEMAP_EXTENT_DATA_INLINE,
        ] {
            assert!(
                segments(&[ext(0, 0, 4096, flag)], 4096).is_err(),
                "flag {flag:#x}"
            );
        }
        assert!(segments(&[], 0).unwrap().is_empty());
    }
}
