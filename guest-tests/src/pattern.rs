//! Deterministic data patterns. A pattern is a pure function of its seed so that a later
//! boot (or the host) can tell exactly which write it is looking at.

/// Size of the persistence file: big enough to span several extents' worth of pages,
/// small enough to write quickly under TCG.
pub const PERSIST_LEN: usize = 1 << 20;

const PERSIST_MAGIC: &str = "VUP-PERSIST gen=";

/// xorshift64*: fast, and good enough that neighbouring pages never repeat.
#[derive(Clone, Debug)]
pub struct XorShift64 {
    state: u64,
}

impl XorShift64 {
    pub fn new(seed: u64) -> Self {
        // splitmix64 spreads small seeds (0, 1, 2, ...) over the whole state space, and
        // xorshift must never start from 0, where it would stay forever.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        XorShift64 {
            state: if z == 0 { 0x2545_F491_4F6C_DD1D } else { z },
        }
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform enough for picking offsets; the modulo bias is irrelevant here.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for chunk in &mut chunks {
            chunk.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let last = self.next_u64().to_le_bytes();
        let n = rest.len();
        rest.copy_from_slice(&last[..n]);
    }
}

/// `len` bytes of the stream seeded with `seed`.
pub fn seeded(seed: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    XorShift64::new(seed).fill(&mut buf);
    buf
}

fn persist_header(generation: u64) -> String {
    format!("{PERSIST_MAGIC}{generation}\n")
}

/// The contents `persist.dat` must hold after generation `generation` was written:
/// a readable header, then pseudo-random bytes seeded with the generation.
pub fn persist(generation: u64) -> Vec<u8> {
    let header = persist_header(generation);
    let mut buf = seeded(generation ^ 0x5655_502D_5045_5253, PERSIST_LEN);
    buf[..header.len()].copy_from_slice(header.as_bytes());
    buf
}

/// The generation named in a persistence file's header, if the header is intact; used
/// only to explain a mismatch.
pub fn persist_generation(data: &[u8]) -> Option<u64> {
    let rest = data.strip_prefix(PERSIST_MAGIC.as_bytes())?;
    let end = rest.iter().position(|&b| b == b'\n')?;
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}

/// Offset of the first byte where `a` and `b` differ (including a length difference).
pub fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    match a.iter().zip(b).position(|(x, y)| x != y) {
        Some(i) => Some(i),
        None if a.len() != b.len() => Some(a.len().min(b.len())),
        None => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_is_deterministic_and_seed_dependent() {
        assert_eq!(seeded(7, 4099), seeded(7, 4099));
        assert_ne!(seeded(7, 64), seeded(8, 64));
        // A prefix of a longer stream is the shorter stream (whole words only).
        assert_eq!(seeded(7, 4096)[..], seeded(7, 8192)[..4096]);
    }

    #[test]
    fn seed_zero_is_not_degenerate() {
        let buf = seeded(0, 4096);
        assert!(buf.iter().filter(|&&b| b == 0).count() < 100);
    }

    #[test]
    fn odd_lengths_are_filled() {
        for len in [0, 1, 7, 9, 15] {
            assert_eq!(seeded(3, len).len(), len);
        }
    }

    #[test]
    fn persist_pattern_has_header_and_length() {
        let p = persist(42);
        assert_eq!(p.len(), PERSIST_LEN);
        assert!(p.starts_with(b"VUP-PERSIST gen=42\n"));
        assert_eq!(persist_generation(&p), Some(42));
        assert_ne!(persist(1)[64..], persist(2)[64..]);
    }

    #[test]
    fn persist_generation_rejects_garbage() {
        assert_eq!(persist_generation(&[0u8; 64]), None);
        assert_eq!(persist_generation(b"VUP-PERSIST gen=x\n"), None);
        assert_eq!(persist_generation(b"VUP-PERSIST gen=3"), None);
    }

    #[test]
    fn first_difference_cases() {
        assert_eq!(first_difference(b"abc", b"abc"), None);
        assert_eq!(first_difference(b"abc", b"abd"), Some(2));
        assert_eq!(first_difference(b"ab", b"abc"), Some(2));
    }

    #[test]
    fn below_stays_in_range() {
        let mut r = XorShift64::new(1);
        assert!((0..1000).all(|_| r.below(17) < 17));
    }
}
