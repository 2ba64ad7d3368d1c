#!/usr/bin/env bash
# Build the guest test binary (package pmem-guest-tests) as a static executable.
set -euo pipefail
# shellcheck disable=SC2034  # read by lib.sh
VUP_PROG=build-guest
# shellcheck source=scripts/lib.sh
. "$(dirname "$0")/lib.sh"

TARGET=x86_64-unknown-linux-gnu

usage() {
    cat <<USAGE
Usage: scripts/build-guest.sh [--debug]

Builds the guest test suite statically and prints the binary's path:
  CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static" \\
    cargo build --release -p pmem-guest-tests --target $TARGET
The flag is scoped to the explicit target, so build scripts and proc-macros (built for
the host) are not affected; RUSTFLAGS is not used. No musl target is needed.

Output: $VUP_ROOT/target/$TARGET/release/pmem-guest-tests

  --debug    build the debug profile instead (target/$TARGET/debug/...)
  -h, --help this text
USAGE
}

profile=release
while [[ $# -gt 0 ]]; do
    case "$1" in
        --debug) profile=debug ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown option '$1' (see --help)" ;;
    esac
    shift
done

need_cmd cargo
if [[ -n "${RUSTFLAGS:-}" ]]; then
    warn "RUSTFLAGS is set in the environment ('$RUSTFLAGS'); it applies to every crate, build scripts included"
fi
args=(build -p pmem-guest-tests --target "$TARGET")
[[ $profile == release ]] && args+=(--release)
info "cargo ${args[*]}"
( cd "$VUP_ROOT" && \
  CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="${CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS:+$CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS }-C target-feature=+crt-static" \
  cargo "${args[@]}" ) >&2 || die "cargo build of pmem-guest-tests failed"

bin="${CARGO_TARGET_DIR:-$VUP_ROOT/target}/$TARGET/$profile/pmem-guest-tests"
[[ -x $bin ]] || die "cargo succeeded but $bin is missing"
if readelf -d "$bin" 2>/dev/null | grep -q '(NEEDED)'; then
    die "$bin is dynamically linked (needs: $(readelf -d "$bin" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p' | paste -sd' ')); the guest has no Rust runtime libraries"
fi
info "static binary: $bin ($(du -h "$bin" | cut -f1))"
printf '%s\n' "$bin"
