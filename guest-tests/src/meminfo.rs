//! /proc/meminfo, read to show that DAX writes did not go through the page cache.

/// The value of `field` (e.g. "Cached") in KiB.
pub fn field_kib(text: &str, field: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (name, rest) = line.split_once(':')?;
        if name != field {
            return None;
        }
        rest.split_whitespace().next()?.parse().ok()
    })
}

pub fn cached_kib() -> std::io::Result<u64> {
    let text = std::fs::read_to_string("/proc/meminfo")?;
    field_kib(&text, "Cached")
        .ok_or_else(|| std::io::Error::other("no Cached: line in /proc/meminfo"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fields_exactly() {
        let text = "MemTotal:        1000 kB\nSwapCached:        7 kB\nCached:          4242 kB\n";
        assert_eq!(field_kib(text, "Cached"), Some(4242));
        assert_eq!(field_kib(text, "SwapCached"), Some(7));
        assert_eq!(field_kib(text, "Buffers"), None);
    }
}
