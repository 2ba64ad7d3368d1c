//! Fill the file system on the device file by file, each one written, fsynced and reported
//! with `VUP-HOSTCHECK`, until the guest's own file system says ENOSPC: what a guest does to a
//! host file system too small for the device (vmrun --host-fs-size). With the daemon's
//! `--allocate full` the guest must reach ENOSPC alive; with `sparse` QEMU dies of SIGBUS
//! first, and the host checks printed before prove the fsynced files intact either way.

use std::io::Write;
use std::os::unix::fs::FileExt;

use super::fs_state::{ensure_dax_mount, NEEDS_DAX};
use super::fsync_loop::line;
use super::suites::SuiteDef;
use super::{common, device, persist, Ctx, Verdict};
use crate::error::{describe, fail, Result};
use crate::pattern;

const FILE_SIZE: usize = 1 << 20;
/// More files than any device the runner gives this suite could hold.
const MAX_FILES: u64 = 4096;

fn no_space(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENOSPC)
}

pub fn fill_to_enospc(ctx: &mut Ctx) -> Result<Verdict> {
    let mut n = 0u64;
    let stop = loop {
        if n == MAX_FILES {
            fail!("no ENOSPC after {n} files of 1 MiB");
        }
        let path = ctx.mnt().join(format!("fill-{n:04}.dat"));
        let data = pattern::seeded(0x4649_4c4c_0000 + n, FILE_SIZE);
        let f = common::create(&path)?;
        let written = f.write_all_at(&data, 0).and_then(|()| f.sync_all());
        match written {
            Ok(()) => {}
            Err(e) if no_space(&e) => break describe(&e),
            Err(e) => fail!("file {n}: write or fsync: {}", describe(&e)),
        }
        persist::host_check(ctx, "VUP-HOSTCHECK", &f, &data)?;
        line(&format!("VUP-FILL n={n} fsynced"));
        let _ = std::io::stdout().flush();
        n += 1;
    };
    if n == 0 {
        fail!("{stop} before the first file was fsynced");
    }
    ctx.diag(&format!(
        "{n} files of 1 MiB fsynced, then {stop} from the guest's file system"
    ));
    Ok(Verdict::Pass)
}

pub const SUITE: SuiteDef = SuiteDef {
    name: "fill",
    help: &[
        "1 MiB files written, fsynced and host-checked one by one until ENOSPC",
        "(for a host file system smaller than the device: vmrun --host-fs-size)",
    ],
    run: suite,
};

fn suite(ctx: &mut Ctx) {
    ctx.case("pmem0_present", &[], device::pmem0_present);
    ensure_dax_mount(ctx);
    ctx.case("fill_to_enospc", NEEDS_DAX, fill_to_enospc);
}
