//! The latency suite: one case per op and concurrency. The figures are measurements, not
//! speed assertions: a case is ok when every op completed without an I/O error.

use super::fs_state::ensure_dax_mount;
use super::suites::SuiteDef;
use super::{Ctx, Verdict};
use crate::flush_timer::{self, Op, Targets};
use crate::nd;
use crate::stats;

pub fn suite(ctx: &mut Ctx) {
    ensure_dax_mount(ctx);
    let mut targets: Option<Targets> = None;
    ctx.case("latency_setup", &["mount_dax"], |ctx| {
        let deep_flush = nd::region_dir(&ctx.dev_name())
            .map(|r| r.join("deep_flush"))
            .filter(|p| p.exists());
        let t = flush_timer::prepare(ctx.mnt(), &ctx.args.dev, deep_flush.as_deref())?;
        ctx.diag(&format!(
            "latency.dat: {} MiB, written and synced; per op and concurrency (threads: warm-up + timed ops per thread): {}",
            flush_timer::FILE_LEN >> 20,
            ctx.args
                .threads
                .iter()
                .map(|&n| format!(
                    "{n}: {} + {}",
                    flush_timer::warmup_per_thread(n),
                    ctx.args.iters_per_thread(n)
                ))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        if !t.has(Op::DevFdatasync) {
            ctx.diag(&format!("{} cannot be opened: dev_fdatasync skipped", ctx.args.dev.display()));
        }
        targets = Some(t);
        Ok(Verdict::Pass)
    });
    let threads = ctx.args.threads.clone();
    for op in flush_timer::ALL_OPS {
        for &n in &threads {
            let name = format!("flush_latency {} threads={n}", op.name());
            ctx.case(&name, &["latency_setup"], |ctx| {
                let Some(t) = targets.as_mut() else {
                    return Ok(Verdict::Fail("latency targets were not prepared".into()));
                };
                if !t.has(op) {
                    let (why, token) = match op {
                        Op::DeepFlush => (nd::NO_DEEP_FLUSH, "no_deep_flush_attribute"),
                        _ => ("block device cannot be opened", "no_block_device"),
                    };
                    // The runner's table shows the op as n/a rather than leaving it out.
                    ctx.raw(&stats::format_na(op.name(), &[], n, token));
                    return Ok(Verdict::Skip(why.into()));
                }
                let run = flush_timer::measure(op, t, n, ctx.args.iters_per_thread(n))?;
                report(ctx, op, n, &run);
                if !ctx.fs_state.dax_ok {
                    return Ok(Verdict::Fail(
                        "precondition precond_dax failed: measured, but not on DAX".into(),
                    ));
                }
                Ok(Verdict::Pass)
            });
        }
    }
    drop(targets);
    let _ = std::fs::remove_file(ctx.mnt().join("latency.dat"));
}

fn report(ctx: &mut Ctx, op: Op, threads: usize, run: &flush_timer::Run) {
    let Some(summary) = stats::summarize(&run.samples_ns) else {
        ctx.diag("no samples");
        return;
    };
    let ops_s = stats::ops_per_sec(run.samples_ns.len(), run.wall_ns);
    let buckets = stats::log2_buckets(&run.samples_ns);
    ctx.diag(&stats::format_human(
        op.name(),
        threads,
        &summary,
        ops_s,
        &buckets,
    ));
    ctx.raw(&stats::format_metric(op.name(), threads, &summary, ops_s));
}

pub const SUITE: SuiteDef = SuiteDef {
    name: "latency",
    help: &[
        "catalogue F20 flush_latency: pwrite+fdatasync, pwrite+fsync, mmap",
        "store+msync, fdatasync of the block device, deep_flush (n/a where the",
        "region has none), at each --threads concurrency",
    ],
    run: suite,
};
