//! Catalogue B7 (and the store+msync half of B8): virtio-pmem registers an asynchronous
//! region, so the kernel must refuse MAP_SYNC, which promises that CPU stores are durable
//! once the page fault that allowed them returned.

use std::fs::OpenOptions;

use super::{Ctx, Verdict};
use crate::error::{describe, fail, Context, Result};
use crate::sys::{self, Mapping, MAP_PRIVATE, MAP_SHARED, MAP_SHARED_VALIDATE, MAP_SYNC};

const LEN: usize = 2 << 20;
const RW: i32 = sys::PROT_READ | sys::PROT_WRITE;

fn try_map(file: &std::fs::File, flags: i32) -> std::io::Result<Mapping> {
    Mapping::new(file, LEN, RW, flags, 0)
}

pub fn matrix(ctx: &mut Ctx) -> Result<Verdict> {
    let path = ctx.mnt().join("map_sync.dat");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .ctx(format!("create {}", path.display()))?;
    sys::fallocate(&f, 0, LEN as u64).ctx("fallocate 2 MiB")?;

    // The assertion: MAP_SYNC through the validating flag type must be refused.
    let sync_verdict = match try_map(&f, MAP_SHARED_VALIDATE | MAP_SYNC) {
        Ok(_) => Some(
            "MAP_SHARED_VALIDATE|MAP_SYNC succeeded: the kernel treats this device as synchronous"
                .to_string(),
        ),
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
            ctx.diag("MAP_SHARED_VALIDATE|MAP_SYNC: EOPNOTSUPP (as required)");
            None
        }
        Err(e) => Some(format!(
            "MAP_SHARED_VALIDATE|MAP_SYNC failed with {}, want EOPNOTSUPP",
            describe(&e)
        )),
    };

    // Plain validated shared mapping works, and is the fallback: store + msync.
    let mut map = try_map(&f, MAP_SHARED_VALIDATE).ctx("mmap MAP_SHARED_VALIDATE")?;
    ctx.diag("MAP_SHARED_VALIDATE: ok");
    map.as_mut_slice()[..4096].fill(0x5a);
    sys::msync(&map.as_slice()[..4096], libc::MS_SYNC)
        .ctx("msync after MAP_SHARED_VALIDATE store")?;
    ctx.diag("fallback store + msync(MS_SYNC): ok");
    drop(map);

    // Legacy flag types ignore unknown bits; recorded, not asserted.
    for (label, flags) in [
        ("MAP_SHARED|MAP_SYNC", MAP_SHARED | MAP_SYNC),
        ("MAP_PRIVATE|MAP_SYNC", MAP_PRIVATE | MAP_SYNC),
    ] {
        match try_map(&f, flags) {
            Ok(_) => ctx.diag(&format!("{label}: succeeds (MAP_SYNC silently ignored)")),
            Err(e) => ctx.diag(&format!("{label}: {}", describe(&e))),
        }
    }
    let _ = std::fs::remove_file(&path);
    if let Some(why) = sync_verdict {
        fail!("{why}");
    }
    Ok(Verdict::Pass)
}
