//! What the fuzzers in `fuzz/` found, kept as ordinary tests so that `cargo test` guards it
//! without a fuzzer (see docs/testing.md, "Protocol abuse and fuzzing").

use vhost_user_pmem::size::ByteSize;

/// Fuzz target `config`, input `1`: `ByteSize`'s `Display` promises that a printed size can be
/// pasted back into `--size`, and sizes in the daemon's messages are printed with it ("the
/// backing file ... is 3000 bytes, which is not a power of two"). A size that is not a whole
/// number of KiB prints as "N bytes", which `FromStr` refuses.
#[test]
fn every_printed_size_parses_back() {
    for n in [
        0u64,
        1,
        512,
        1023,
        1024,
        1025,
        3000,
        (2 << 20) + 1,
        u64::MAX,
    ] {
        let printed = ByteSize(n).to_string();
        assert_eq!(
            printed.parse::<ByteSize>(),
            Ok(ByteSize(n)),
            "{n} is printed as {printed:?}, which does not parse back"
        );
    }
}
