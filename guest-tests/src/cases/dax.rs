//! DAX preconditions and the basic data-path cases (catalogue "Preconditions" and A1).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::{common, Ctx, Verdict};
use crate::error::{fail, Context, Result};
use crate::meminfo;
use crate::pattern;
use crate::precond;
use crate::sys::{self, Mapping};

pub fn precond_dax(ctx: &mut Ctx) -> Result<Verdict> {
    let name = ctx.dev_name();
    let mnt = ctx.args.mnt.clone();
    let failed = dax_checks(ctx, &name, &mnt);
    ctx.fs_state.dax_checked = true;
    ctx.fs_state.dax_ok = failed.is_empty();
    if failed.is_empty() {
        return Ok(Verdict::Pass);
    }
    ctx.diag(
        "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\
         !!! DAX PRECONDITION FAILED: this is NOT a DAX mount.\n\
         !!! Every later DAX case is meaningless and is reported not ok.\n\
         !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!",
    );
    Ok(Verdict::Fail(format!(
        "DAX precondition failed: {}",
        failed.join(", ")
    )))
}

/// Checks the DAX preconditions of block device `dev_name` mounted on `mnt`, each on its own
/// diagnostic line; returns the names of those that failed.
pub fn dax_checks(ctx: &mut Ctx, dev_name: &str, mnt: &Path) -> Vec<&'static str> {
    let checks = precond::evaluate(&precond::gather(dev_name, mnt), dev_name);
    for c in &checks {
        let mark = if c.ok { "ok  " } else { "FAIL" };
        ctx.diag(&format!("{mark} {}: {}", c.name, c.detail));
    }
    checks.iter().filter(|c| !c.ok).map(|c| c.name).collect()
}

/// pwrite, fsync, fdatasync, read back. Any flush error (EIO from the device) fails it.
pub fn write_fsync(ctx: &mut Ctx) -> Result<Verdict> {
    let path = ctx.mnt().join("write_fsync.dat");
    let want = pattern::seeded(0x5752_4954_4553_594e, 1 << 20);
    let f = common::create(&path)?;
    f.write_all_at(&want, 0).ctx("pwrite 1 MiB")?;
    f.sync_all().ctx("fsync")?;
    f.sync_data().ctx("fdatasync")?;
    drop(f);
    // A fresh descriptor, so nothing can come from state held by the writer's fd.
    let f = File::open(&path).ctx(format!("open {}", path.display()))?;
    let mut got = vec![0u8; want.len()];
    f.read_exact_at(&mut got, 0).ctx("read back")?;
    common::compare("read after fsync", &got, &want)?;
    let _ = std::fs::remove_file(&path);
    Ok(Verdict::Pass)
}

const PTE_FILE_LEN: usize = 16 << 20;

/// Catalogue A1: stores through a MAP_SHARED mapping reach the file without the page
/// cache (ndctl's mmap.c).
pub fn pte_rw_basic(ctx: &mut Ctx) -> Result<Verdict> {
    let path = ctx.mnt().join("pte_rw_basic.dat");
    let f = common::create(&path)?;
    sys::fallocate(&f, 0, PTE_FILE_LEN as u64).ctx("fallocate 16 MiB")?;
    let want = pattern::seeded(0x5054_455f_5257, PTE_FILE_LEN);

    let cached_before = meminfo::cached_kib().ctx("read /proc/meminfo")?;
    let faults_before = sys::minor_faults();
    {
        let mut map = Mapping::new(
            &f,
            PTE_FILE_LEN,
            sys::PROT_READ | sys::PROT_WRITE,
            sys::MAP_SHARED,
            0,
        )
        .ctx("mmap MAP_SHARED 16 MiB")?;
        map.as_mut_slice().copy_from_slice(&want);
        sys::msync(map.as_slice(), libc::MS_SYNC).ctx("msync MS_SYNC")?;
    }
    let faults = sys::minor_faults().saturating_sub(faults_before);

    let mut got = vec![0u8; PTE_FILE_LEN];
    f.read_exact_at(&mut got, 0).ctx("read(2) back")?;
    let cached_after = meminfo::cached_kib().ctx("read /proc/meminfo")?;
    let growth = cached_after.saturating_sub(cached_before);
    let limit = (PTE_FILE_LEN / 4 / 1024) as u64;
    ctx.diag(&format!(
        "Cached: before={cached_before} kB after={cached_after} kB growth={growth} kB (limit < {limit} kB)"
    ));
    ctx.diag(&format!(
        "minor faults while storing: {faults} for {} pages (about {} would mean PMD mappings)",
        PTE_FILE_LEN / 4096,
        PTE_FILE_LEN >> 21
    ));
    common::compare("read(2) after msync", &got, &want)?;
    let _ = std::fs::remove_file(&path);
    if growth >= limit {
        fail!(
            "page cache grew by {growth} kB for a {} kB DAX file",
            PTE_FILE_LEN / 1024
        );
    }
    Ok(Verdict::Pass)
}
