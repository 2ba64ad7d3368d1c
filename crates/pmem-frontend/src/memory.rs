//! Guest RAM: one memfd-backed region, shared with the backend like QEMU's
//! `memory-backend-memfd,share=on`.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::FromRawFd;

use vhost::VhostUserMemoryRegionInfo;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::error::{Error, Result};

/// Guest RAM of the emulated VM.
pub struct GuestRam {
    mem: GuestMemoryMmap,
    size: u64,
}

impl GuestRam {
    /// Creates `size` bytes of guest RAM at guest physical address 0.
    ///
    /// The backing is a memfd mapped MAP_SHARED, so the backend (which maps the same fd
    /// after SET_MEM_TABLE) and the harness see each other's writes.
    pub fn new(size: u64) -> Result<Self> {
        let name = CString::new("pmem-frontend-guest-ram").expect("no NUL in literal");
        // SAFETY: `name` is a valid NUL-terminated string; memfd_create has no other
        // memory-safety preconditions.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(Error::io("memfd_create")(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just returned by memfd_create, is valid and owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size)
            .map_err(Error::io("ftruncate guest RAM"))?;
        let len = usize::try_from(size)
            .map_err(|_| Error::InvalidArgument(format!("guest RAM size {size} too large")))?;
        let mem = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            len,
            Some(FileOffset::new(file, 0)),
        )])?;
        Ok(GuestRam { mem, size })
    }

    /// The guest memory, for reads and writes through vm-memory's `Bytes` trait.
    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The frontend's virtual address of guest address `gpa`, which is how vhost-user
    /// messages such as SET_VRING_ADDR name guest memory.
    pub fn host_address(&self, gpa: u64) -> Result<u64> {
        Ok(self.mem.get_host_address(GuestAddress(gpa))? as u64)
    }

    /// The regions to send with SET_MEM_TABLE. The fds stay owned by `self`, so `self`
    /// must outlive the request.
    pub fn region_infos(&self) -> Result<Vec<VhostUserMemoryRegionInfo>> {
        self.mem
            .iter()
            .map(|r| {
                VhostUserMemoryRegionInfo::from_guest_region(r)
                    .map_err(Error::vhost("describe guest region"))
            })
            .collect()
    }
}
