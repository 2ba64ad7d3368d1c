//! The metrics JSON that SIGUSR1, the periodic --metrics-path writes and the exit write
//! produce: [`pmem_metrics::Metrics`], the schema every reader shares (its module documents
//! each field). This module fills it from the device and writes it.

use std::io;
use std::path::{Path, PathBuf};

use pmem_metrics::{BackingSpace, FlushRateLimitSetting, Metrics, FORMAT_VERSION};

use crate::device::Device;
use crate::stats::{log2_buckets, summary};
use crate::sync::lock;

/// The metrics of `device` now, numbered `seq`.
pub fn snapshot(device: &Device, seq: u64) -> Metrics {
    let stats = &device.stats;
    let (fdatasync_latency_log2_us, fdatasync_latency_us) = {
        let h = lock(&stats.sync_latency);
        (log2_buckets(&h), summary(&h))
    };
    let (request_latency_log2_us, request_latency_us) = {
        let h = lock(&stats.request_latency);
        (log2_buckets(&h), summary(&h))
    };
    let map_latency_us = summary(&lock(&stats.map_latency));
    Metrics {
        version: FORMAT_VERSION,
        seq,
        pid: stats.pid,
        flush_mode: device.flush_mode().as_str().to_string(),
        read_only: device.backing.read_only(),
        uptime_s: (stats.epoch.elapsed().as_secs_f64() * 1000.0).round() / 1000.0,
        in_flight: device.flushes_in_flight() as u64,
        flush_failure: device.backing.failure().map(|f| f.0.clone()),
        largest_batch: stats
            .largest_batch
            .load(std::sync::atomic::Ordering::Relaxed),
        flush_rate_limit: device.flush_rate_limit().map(|l| FlushRateLimitSetting {
            ops_per_s: l.ops_per_sec,
            burst: l.burst,
        }),
        counters: stats.counters(),
        connection: stats.connection(),
        backing: backing_space(device),
        fdatasync_latency_us,
        request_latency_us,
        map_latency_us,
        fdatasync_latency_log2_us,
        request_latency_log2_us,
    }
}

fn backing_space(device: &Device) -> Option<BackingSpace> {
    let b = &device.backing;
    let space = b.space()?;
    Some(BackingSpace {
        allocation: b.policy().to_string(),
        size_bytes: space.size,
        unallocated_bytes: space.unallocated(),
        fs_free_bytes: space.fs_free,
    })
}

/// Numbers the reports: a reader that asked for one (SIGUSR1) waits for a `seq` above the
/// last it saw. Only the signal thread reports, so a plain counter does.
#[derive(Debug, Default)]
pub struct Reporter {
    /// `seq` of the last report made.
    seq: u64,
}

impl Reporter {
    /// Writes the next report to `path`. A failed write uses up no number, so the files a
    /// reader sees count 1, 2, 3, .. with no gap.
    pub fn write(&mut self, device: &Device, path: &Path) -> Result<(), WriteError> {
        write_file(path, &snapshot(device, self.seq + 1))?;
        self.seq += 1;
        Ok(())
    }

    /// The next report as one line of JSON, for stderr.
    pub fn line(&mut self, device: &Device) -> String {
        self.seq += 1;
        snapshot(device, self.seq).to_json()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot write the metrics to {path}: {source}")]
pub struct WriteError {
    pub path: PathBuf,
    pub source: io::Error,
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    PathBuf::from(tmp)
}

/// Checks, before anything else is set up, that [`write_file`] will be able to write `path`:
/// its directory takes new files, and `path` is not a directory.
pub fn check_writable(path: &Path) -> Result<(), WriteError> {
    let err = |source| WriteError {
        path: path.to_path_buf(),
        source,
    };
    if path.is_dir() {
        return Err(err(io::Error::from(io::ErrorKind::IsADirectory)));
    }
    let tmp = tmp_path(path);
    std::fs::File::create(&tmp).map_err(err)?;
    std::fs::remove_file(&tmp).map_err(err)
}

/// Writes `metrics` to `path` by way of `path.tmp` and a rename, so that a reader sees the
/// previous file or the new one, never a partial one.
pub fn write_file(path: &Path, metrics: &Metrics) -> Result<(), WriteError> {
    let tmp = tmp_path(path);
    let mut json = metrics.to_json();
    json.push('\n');
    std::fs::write(&tmp, json)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|source| {
            // A partial file (the file system was full) would keep taking its space. Emptied,
            // not removed: the sandbox allows unlink for the socket file alone.
            let _ = std::fs::File::create(&tmp);
            WriteError {
                path: path.to_path_buf(),
                source,
            }
        })
}
