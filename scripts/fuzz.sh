#!/usr/bin/env bash
# Builds and runs the libFuzzer targets in fuzz/ for a bounded time each, with cargo-fuzz on the
# stable toolchain: RUSTC_BOOTSTRAP=1 lets stable rustc take the -Z flags cargo-fuzz passes
# (sanitizer coverage, AddressSanitizer), so no nightly toolchain is needed. Installs cargo-fuzz
# (cargo install --locked, into ~/.cargo/bin) if it is missing.
#
# Usage: scripts/fuzz.sh [--time SECS] [--no-asan] [--skip-known] [TARGET...]
#   --time SECS    how long each target runs (default 20)
#   --no-asan      build without AddressSanitizer (faster; the targets' own checks still run)
#   --skip-known   vhost_messages steers clear of the findings already reported in
#                  docs/testing.md, so that a long run looks further instead of stopping there
#   TARGET         request_parse, config, vhost_messages (default: all three)
# Each target's corpus grows in fuzz/corpus/TARGET across runs. Prints the executions of every
# target; exits non-zero if any target crashed, hung or failed to build, leaving the input in
# fuzz/artifacts/TARGET/ (reproduce with `RUSTC_BOOTSTRAP=1 cargo fuzz run TARGET FILE`).
set -euo pipefail
VUP_PROG=fuzz
source "$(dirname "$0")/lib.sh"
cd "$VUP_ROOT"

secs=20 sanitizer=address targets=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --time) [[ $# -ge 2 && $2 =~ ^[0-9]+$ && $2 -gt 0 ]] || die "--time needs a number of seconds"
                secs="$2"; shift ;;
        --no-asan) sanitizer=none ;;
        --skip-known) export VHOST_FUZZ_SKIP_KNOWN=1 ;;
        -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) die "unknown option '$1' (see --help)" ;;
        *) targets+=("$1") ;;
    esac
    shift
done
all=(request_parse config vhost_messages)
[[ ${#targets[@]} -gt 0 ]] || targets=("${all[@]}")
for t in "${targets[@]}"; do
    [[ " ${all[*]} " == *" $t "* ]] || die "unknown target '$t' (targets: ${all[*]})"
done

if ! cargo fuzz --version >/dev/null 2>&1; then
    info "installing cargo-fuzz (cargo install --locked cargo-fuzz)"
    cargo install --locked cargo-fuzz
fi

export RUSTC_BOOTSTRAP=1
# cargo-fuzz builds optimised code with debug assertions and overflow checks by default, so that
# integer overflow and debug_assert! failures are findings too.
build=(--sanitizer "$sanitizer")
info "building ${targets[*]} (sanitizer: $sanitizer)"
for t in "${targets[@]}"; do
    cargo fuzz build "${build[@]}" "$t" >&2 || die "cannot build $t"
done

status=0 summary=()
for t in "${targets[@]}"; do
    corpus="fuzz/corpus/$t" artifacts="fuzz/artifacts/$t"
    mkdir -p "$corpus" "$artifacts"
    dirs=("$corpus")
    [[ -d fuzz/seeds/$t ]] && dirs+=("fuzz/seeds/$t")
    extra=()
    asan="${ASAN_OPTIONS:-}"
    # vhost_messages serves in other threads, which allocate for the next connection while
    # libFuzzer checks the current input for leaks, and are still running when the process
    # exits: LeakSanitizer then reports memory that is in use (no stack, and the input does not
    # reproduce it alone), per input and at exit. Fds are what the daemon can really leak per
    # connection, and tests/protocol_abuse.rs counts those.
    if [[ $t == vhost_messages ]]; then
        extra+=(-detect_leaks=0)
        asan="${asan:+$asan:}detect_leaks=0"
    fi
    log="$(mktemp)"
    info "running $t for $secs s"
    set +e
    # -timeout: one input taking this long is a hang (the targets report their own hangs
    # sooner); -rss_limit_mb: generous, ASan and the daemon's threads need room.
    ASAN_OPTIONS="$asan" cargo fuzz run "${build[@]}" "$t" "${dirs[@]}" -- \
        -max_total_time="$secs" -timeout=30 -rss_limit_mb=4096 -print_final_stats=1 \
        -artifact_prefix="$artifacts/" "${extra[@]}" >"$log" 2>&1
    rc=$?
    set -e
    runs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n1)"
    rate="$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n1)"
    cov="$(grep -o 'cov: [0-9]*' "$log" | tail -n1 | cut -d' ' -f2)"
    if [[ $rc -eq 0 ]]; then
        summary+=("$t: ${runs:-?} executions in $secs s (${rate:-?}/s), coverage ${cov:-?}: ok")
    else
        status=1
        summary+=("$t: FAILED (exit $rc) after ${runs:-?} executions; see below and $artifacts/")
        grep -E '^(==[0-9]+==|HANG|thread .* panicked|SUMMARY|Test unit written|artifact_prefix|Running|Executed)|deadly signal|ERROR' \
            "$log" | head -n 40 >&2 || true
        tail -n 30 "$log" >&2
    fi
    rm -f "$log"
    # vhost_messages keeps its device image and socket in a per-process scratch directory,
    # which libFuzzer's exit leaves behind.
    for d in /dev/shm/vhost-messages-fuzz-* "${TMPDIR:-/tmp}"/vhost-messages-fuzz-*; do
        [[ -d $d ]] && ! kill -0 "${d##*-}" 2>/dev/null && rm -rf "$d"
    done
done

for line in "${summary[@]}"; do info "$line"; done
exit "$status"
