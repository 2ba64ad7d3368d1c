//! Flush latency measurement (catalogue F20): each op is one guest flush of a different
//! kind, timed with CLOCK_MONOTONIC_RAW, at a given number of concurrent threads.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Barrier;

use crate::error::{fail, Context, Error, Result};
use crate::pattern::{self, XorShift64};
use crate::sys::{self, Mapping};

pub const FILE_LEN: usize = 64 << 20;
pub const PAGE: usize = 4096;
/// Untimed ops before the timed ones, per thread at one thread; see [`warmup_per_thread`].
pub const WARMUP: usize = 20;
/// Untimed ops before the timed ones, summed over the threads, at high concurrency.
const WARMUP_TOTAL: usize = 64;

/// Warm-up ops each thread makes before its timed ones: they fault in the lane's pages,
/// start the threads and fill the device's queue, so the timed ops see the steady state.
/// Every thread warms up at least twice, but the total stays near [`WARMUP_TOTAL`] at high
/// concurrency, where every thread's ops are other threads' warm-up anyway.
pub fn warmup_per_thread(threads: usize) -> usize {
    (WARMUP_TOTAL / threads.max(1)).clamp(2, WARMUP)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// 4 KiB pwrite at a random page + fdatasync: a data-only flush.
    PwriteFdatasync,
    /// Same with fsync: also commits the mtime change through the journal.
    PwriteFsync,
    /// 4 KiB store into a MAP_SHARED mapping + msync(MS_SYNC): the MAP_SYNC fallback.
    MmapMsync,
    /// fdatasync of the block device itself: one bare PREFLUSH.
    DevFdatasync,
    /// "1" into the region's deep_flush: nvdimm_flush with no filesystem involved.
    DeepFlush,
}

pub const ALL_OPS: [Op; 5] = [
    Op::PwriteFdatasync,
    Op::PwriteFsync,
    Op::MmapMsync,
    Op::DevFdatasync,
    Op::DeepFlush,
];

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Op::PwriteFdatasync => "pwrite_fdatasync",
            Op::PwriteFsync => "pwrite_fsync",
            Op::MmapMsync => "mmap_msync",
            Op::DevFdatasync => "dev_fdatasync",
            Op::DeepFlush => "deep_flush",
        }
    }
}

/// What the ops act on, prepared once for all ops and concurrencies.
pub struct Targets {
    file: File,
    map: Mapping,
    dev: Option<File>,
    deep_flush: Option<File>,
}

impl Targets {
    pub fn has(&self, op: Op) -> bool {
        match op {
            Op::DevFdatasync => self.dev.is_some(),
            Op::DeepFlush => self.deep_flush.is_some(),
            _ => true,
        }
    }
}

/// Create and fully write the 64 MiB file, so measured writes overwrite allocated,
/// written blocks: the figures are flush cost, not block allocation or unwritten-extent
/// conversion.
pub fn prepare(dir: &Path, dev: &Path, deep_flush: Option<&Path>) -> Result<Targets> {
    let path = dir.join("latency.dat");
    let file = crate::cases::common::create(&path)?;
    sys::fallocate(&file, 0, FILE_LEN as u64).ctx("fallocate 64 MiB")?;
    let chunk = pattern::seeded(0x4c41_5445_4e43_5900, 1 << 20);
    for i in 0..FILE_LEN / chunk.len() {
        file.write_all_at(&chunk, (i * chunk.len()) as u64)
            .ctx("fill latency.dat")?;
    }
    file.sync_all().ctx("fsync latency.dat")?;
    let map = Mapping::new(
        &file,
        FILE_LEN,
        sys::PROT_READ | sys::PROT_WRITE,
        sys::MAP_SHARED,
        0,
    )
    .ctx("mmap latency.dat")?;
    // The block device is optional: the figures for the file ops stand on their own.
    let dev = File::open(dev).ok();
    let deep_flush = match deep_flush {
        Some(p) => Some(
            OpenOptions::new()
                .write(true)
                .open(p)
                .ctx(format!("open {}", p.display()))?,
        ),
        None => None,
    };
    Ok(Targets {
        file,
        map,
        dev,
        deep_flush,
    })
}

/// One thread's share of the target: a disjoint slice of the file and mapping, so no two
/// threads ever touch the same page (no data race through the mapping).
enum Lane<'a> {
    Write {
        file: &'a File,
        base: u64,
        pages: u64,
        full_fsync: bool,
    },
    Store {
        chunk: &'a mut [u8],
    },
    Dev(&'a File),
    DeepFlush(&'a File),
}

impl Lane<'_> {
    fn run_once(&mut self, rng: &mut XorShift64, buf: &[u8]) -> Result<()> {
        match self {
            Lane::Write {
                file,
                base,
                pages,
                full_fsync,
            } => {
                let off = *base + rng.below(*pages) * PAGE as u64;
                file.write_all_at(buf, off)
                    .ctx(format!("pwrite at {off}"))?;
                if *full_fsync {
                    file.sync_all().ctx("fsync")?;
                } else {
                    file.sync_data().ctx("fdatasync")?;
                }
            }
            Lane::Store { chunk } => {
                let pages = chunk.len() / PAGE;
                let off = rng.below(pages as u64) as usize * PAGE;
                let page = &mut chunk[off..off + PAGE];
                page.copy_from_slice(buf);
                sys::msync(page, libc::MS_SYNC).ctx("msync MS_SYNC")?;
            }
            Lane::Dev(f) => f.sync_data().ctx("fdatasync block device")?,
            Lane::DeepFlush(f) => {
                let n = f.write_at(b"1", 0).ctx("write deep_flush")?;
                if n != 1 {
                    fail!("short write to deep_flush: {n}");
                }
            }
        }
        Ok(())
    }
}

pub struct Run {
    pub samples_ns: Vec<u64>,
    pub wall_ns: u64,
}

/// Timed samples plus the lane's first start and last end, for the wall-clock span.
struct LaneResult {
    samples: Vec<u64>,
    began: u64,
    ended: u64,
}

fn lane_loop(
    mut lane: Lane,
    seed: u64,
    (warmup, iters): (usize, usize),
    start: &Barrier,
) -> Result<LaneResult> {
    let mut rng = XorShift64::new(seed);
    let mut buf = pattern::seeded(seed, PAGE);
    let warm = (0..warmup).try_for_each(|_| lane.run_once(&mut rng, &buf));
    // Always reach the barrier, or the other threads would wait forever.
    start.wait();
    warm?;
    let mut samples = Vec::with_capacity(iters);
    let began = sys::monotonic_raw_ns();
    for i in 0..iters {
        // Different bytes every time, so no layer can skip an identical write.
        buf[..8].copy_from_slice(&(i as u64).to_le_bytes());
        let t0 = sys::monotonic_raw_ns();
        lane.run_once(&mut rng, &buf)?;
        samples.push(sys::monotonic_raw_ns() - t0);
    }
    Ok(LaneResult {
        samples,
        began,
        ended: sys::monotonic_raw_ns(),
    })
}

/// Run `op` on `threads` threads, `iters` timed ops each after [`warmup_per_thread`]
/// untimed ones.
pub fn measure(op: Op, targets: &mut Targets, threads: usize, iters: usize) -> Result<Run> {
    let per_lane_bytes = (FILE_LEN / threads) / PAGE * PAGE;
    if per_lane_bytes == 0 {
        fail!("{threads} threads leave less than a page each");
    }
    let mut lanes: Vec<Lane> = Vec::with_capacity(threads);
    match op {
        Op::PwriteFdatasync | Op::PwriteFsync => {
            for t in 0..threads {
                lanes.push(Lane::Write {
                    file: &targets.file,
                    base: (t * per_lane_bytes) as u64,
                    pages: (per_lane_bytes / PAGE) as u64,
                    full_fsync: op == Op::PwriteFsync,
                });
            }
        }
        Op::MmapMsync => {
            for chunk in targets
                .map
                .as_mut_slice()
                .chunks_mut(per_lane_bytes)
                .take(threads)
            {
                lanes.push(Lane::Store { chunk });
            }
        }
        Op::DevFdatasync | Op::DeepFlush => {
            let f = match op {
                Op::DevFdatasync => targets.dev.as_ref(),
                _ => targets.deep_flush.as_ref(),
            };
            let Some(f) = f else {
                fail!("{} target not available", op.name());
            };
            for _ in 0..threads {
                lanes.push(if op == Op::DevFdatasync {
                    Lane::Dev(f)
                } else {
                    Lane::DeepFlush(f)
                });
            }
        }
    }

    let start = Barrier::new(threads);
    // The span runs from the first lane's start to the last lane's end, measured by the
    // lanes themselves: this thread may not even be scheduled while fast ops run.
    let results: Vec<Result<LaneResult>> = std::thread::scope(|s| {
        let handles: Vec<_> = lanes
            .into_iter()
            .enumerate()
            .map(|(t, lane)| {
                let start = &start;
                let counts = (warmup_per_thread(threads), iters);
                s.spawn(move || lane_loop(lane, 0x1000 + t as u64, counts, start))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::Failed("measuring thread panicked".into())))
            })
            .collect()
    });

    let mut samples_ns = Vec::with_capacity(threads * iters);
    let mut errors = Vec::new();
    let (mut began, mut ended) = (u64::MAX, 0);
    for r in results {
        match r {
            Ok(lane) => {
                samples_ns.extend(lane.samples);
                began = began.min(lane.began);
                ended = ended.max(lane.ended);
            }
            Err(e) => errors.push(e.to_string()),
        }
    }
    if let Some(first) = errors.first() {
        fail!(
            "{} of {threads} thread(s) failed; first: {first}",
            errors.len()
        );
    }
    Ok(Run {
        samples_ns,
        wall_ns: ended.saturating_sub(began),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_shrinks_with_concurrency_but_never_below_two() {
        let w: Vec<usize> = [1, 4, 16, 64, 1024]
            .iter()
            .map(|&t| warmup_per_thread(t))
            .collect();
        assert_eq!(w, vec![WARMUP, 16, 4, 2, 2]);
    }
}
