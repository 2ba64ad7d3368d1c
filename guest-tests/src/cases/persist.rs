//! Catalogue E15, guest half: check the generation a previous boot left in persist.dat,
//! write the next one durably, and tell the host where its bytes lie on the device.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read};
use std::os::unix::fs::FileExt;

use super::fs_state::{
    ensure_dax_checked, ensure_dax_mount, ensure_mounted, make_fs, release_mount, NEEDS_DAX,
};
use super::suites::SuiteDef;
use super::{dax, device, map_sync, Ctx, Verdict};
use crate::error::{fail, Context, Result};
use crate::fiemap;
use crate::pattern;
use crate::sha256;

const FILE: &str = "persist.dat";
const TMP: &str = "persist.dat.tmp";

fn check_generation(ctx: &mut Ctx, expect: u64) -> Result<()> {
    let path = ctx.mnt().join(FILE);
    if expect == 0 {
        return match std::fs::metadata(&path) {
            Err(e) if e.kind() == ErrorKind::NotFound => {
                ctx.diag("persist.dat absent, as expected for generation 0");
                Ok(())
            }
            Err(e) => Err(e).ctx(format!("stat {}", path.display())),
            Ok(_) => {
                let mut head = [0u8; 64];
                let n = File::open(&path)
                    .and_then(|mut f| f.read(&mut head))
                    .unwrap_or(0);
                fail!(
                    "persist.dat exists (header gen {:?}) but generation 0 means no file",
                    pattern::persist_generation(&head[..n])
                )
            }
        };
    }
    let got = std::fs::read(&path).ctx(format!("read {}", path.display()))?;
    let want = pattern::persist(expect);
    if let Some(at) = pattern::first_difference(&got, &want) {
        let header = match pattern::persist_generation(&got) {
            Some(g) if g == expect => format!("header says gen {g} but the data is wrong"),
            Some(g) => format!("file holds gen {g}"),
            None => "no valid header".to_string(),
        };
        fail!(
            "persist.dat is not generation {expect}: {} bytes (want {}), first difference at byte {at}, {header}",
            got.len(),
            want.len()
        );
    }
    ctx.diag(&format!(
        "persist.dat holds generation {expect}, as expected"
    ));
    Ok(())
}

/// Write-to-temporary, fsync, rename, fsync directory: after this the new generation is
/// durable whole, and a crash at any point leaves one complete generation.
fn write_generation(ctx: &mut Ctx, generation: u64) -> Result<Vec<u8>> {
    let data = pattern::persist(generation);
    let tmp = ctx.mnt().join(TMP);
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .ctx(format!("create {}", tmp.display()))?;
    f.write_all_at(&data, 0).ctx("pwrite persist.dat.tmp")?;
    f.sync_all().ctx("fsync persist.dat.tmp")?;
    drop(f);
    std::fs::rename(&tmp, ctx.mnt().join(FILE)).ctx("rename persist.dat.tmp -> persist.dat")?;
    File::open(ctx.mnt())
        .and_then(|d| d.sync_all())
        .ctx(format!("fsync directory {}", ctx.mnt().display()))?;
    Ok(data)
}

/// `expect`: the generation that must be on disk now (0: no file). `None` when the suite
/// was not told.
pub fn fsync_persists(ctx: &mut Ctx, expect: Option<u64>) -> Result<Verdict> {
    let Some(expect) = expect else {
        fail!("persist suite needs --expect-gen N (the generation the previous boot wrote)");
    };
    check_generation(ctx, expect)?;
    let next = expect + 1;
    let data = write_generation(ctx, next)?;

    let path = ctx.mnt().join(FILE);
    let f = File::open(&path).ctx(format!("open {}", path.display()))?;
    let mut back = vec![0u8; data.len()];
    f.read_exact_at(&mut back, 0).ctx("read back persist.dat")?;
    if let Some(at) = pattern::first_difference(&back, &data) {
        fail!("persist.dat reads back wrong at byte {at} right after writing it");
    }
    let extents = fiemap::extents(&f).ctx("FIEMAP persist.dat")?;
    for e in &extents {
        ctx.diag(&format!(
            "extent logical={} physical={:#x} len={} flags={:#x}",
            e.logical, e.physical, e.length, e.flags
        ));
    }
    ctx.fs_state.persisted_gen = Some(next);
    ctx.diag(&format!(
        "persist.dat now holds generation {next} (fsync file + rename + fsync dir returned)"
    ));
    host_check(ctx, "VUP-HOSTCHECK", &f, &data)?;
    Ok(Verdict::Pass)
}

/// Print a `TAG offset=.. len=.. sha256=..` line (TAG: VUP-HOSTCHECK for the VM runner) for every
/// device extent of `file`, whose first `data.len()` bytes must be `data`, so the host can
/// compare them with the image.
pub fn host_check(ctx: &mut Ctx, tag: &str, file: &File, data: &[u8]) -> Result<()> {
    let extents = fiemap::extents(file).ctx("FIEMAP")?;
    let segments = match fiemap::segments(&extents, data.len() as u64) {
        Ok(s) => s,
        Err(why) => fail!("cannot locate the file on the device: {why}"),
    };
    for s in &segments {
        let bytes = &data[s.file_offset as usize..(s.file_offset + s.len) as usize];
        ctx.raw(&format!(
            "{tag} offset={} len={} sha256={}",
            s.dev_offset,
            s.len,
            sha256::hex_digest(bytes)
        ));
    }
    Ok(())
}

pub const E2E: SuiteDef = SuiteDef {
    name: "e2e",
    help: &[
        "device, (mkfs,) DAX mount, preconditions, data and mmap cases,",
        "MAP_SYNC matrix, persistence generation 1",
    ],
    run: e2e_suite,
};

fn e2e_suite(ctx: &mut Ctx) {
    ctx.case("pmem0_present", &[], device::pmem0_present);
    if ctx.args.mkfs {
        make_fs(ctx);
    }
    ensure_dax_mount(ctx);
    ctx.case("write_fsync", NEEDS_DAX, dax::write_fsync);
    ctx.case("pte_rw_basic", NEEDS_DAX, dax::pte_rw_basic);
    ctx.case("map_sync_matrix", NEEDS_DAX, map_sync::matrix);
    let expect = ctx
        .fs_state
        .persisted_gen
        .or(ctx.args.expect_gen)
        .unwrap_or(0);
    ctx.case("fsync_persists", NEEDS_DAX, |ctx| {
        fsync_persists(ctx, Some(expect))
    });
}

pub const PERSIST: SuiteDef = SuiteDef {
    name: "persist",
    help: &[
        "fsck, DAX mount, preconditions, check generation --expect-gen N,",
        "write generation N+1",
    ],
    run: persist_suite,
};

fn persist_suite(ctx: &mut Ctx) {
    ctx.case("pmem0_present", &[], device::pmem0_present);
    // fsck needs the filesystem unmounted; an earlier suite in this run may hold it.
    release_mount(ctx);
    ctx.case("fsck_clean", &["pmem0_present"], device::fsck_clean);
    ensure_mounted(ctx);
    // A fresh mount: check DAX again rather than trusting an earlier suite.
    ctx.fs_state.dax_checked = false;
    ensure_dax_checked(ctx);
    let expect = ctx.fs_state.persisted_gen.or(ctx.args.expect_gen);
    ctx.case("fsync_persists", NEEDS_DAX, |ctx| {
        fsync_persists(ctx, expect)
    });
}
