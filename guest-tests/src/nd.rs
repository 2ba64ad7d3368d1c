//! libnvdimm sysfs: the region behind a pmem block device, its physical start (PMD
//! mappings need 2 MiB alignment) and its deep_flush attribute (a bare device flush).

use std::path::{Path, PathBuf};

pub const PMD_SIZE: u64 = 2 << 20;

/// Why a region may lack deep_flush. Linux (6.12 at least) hides the attribute when
/// nvdimm_has_flush() returns -ENXIO, which it does for any region without DIMM
/// mappings, before it looks at the region's flush callback. virtio-pmem regions have
/// no DIMMs, so they never show it.
pub const NO_DEEP_FLUSH: &str =
    "no deep_flush attribute (libnvdimm hides it for regions without DIMM mappings, as virtio-pmem's)";

/// /sys/devices/.../regionN for block device `dev_name` (e.g. "pmem0").
pub fn region_dir(dev_name: &str) -> Option<PathBuf> {
    // /sys/block/pmem0/device is the namespace (namespace0.0); its parent is the region.
    let ns = std::fs::canonicalize(format!("/sys/block/{dev_name}/device")).ok()?;
    let region = ns.parent()?;
    let name = region.file_name()?.to_string_lossy();
    if name.starts_with("region") {
        return Some(region.to_path_buf());
    }
    // Unexpected topology: fall back to the first region on the nd bus.
    let mut regions: Vec<PathBuf> = std::fs::read_dir("/sys/bus/nd/devices")
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("region"))
        .map(|e| e.path())
        .collect();
    regions.sort();
    regions.into_iter().next()
}

/// Parse a sysfs hex value such as "0x240000000\n".
pub fn parse_hex(text: &str) -> Option<u64> {
    let t = text.trim();
    let t = t
        .strip_prefix("0x")
        .or_else(|| t.strip_prefix("0X"))
        .unwrap_or(t);
    u64::from_str_radix(t, 16).ok()
}

pub fn region_start(region: &Path) -> Option<u64> {
    parse_hex(&std::fs::read_to_string(region.join("resource")).ok()?)
}

pub fn read_trimmed(path: impl AsRef<Path>) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_values() {
        assert_eq!(parse_hex("0x240000000\n"), Some(0x2_4000_0000));
        assert_eq!(parse_hex("1f"), Some(0x1f));
        assert_eq!(parse_hex("zz"), None);
        assert_eq!(0x2_4000_0000 % PMD_SIZE, 0);
    }
}
