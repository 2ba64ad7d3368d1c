#!/usr/bin/env bash
# Runs every test of the project: formatting and lints, unit and integration tests on the host,
# then the guest suite in real QEMU VMs, against this daemon and against QEMU's built-in
# virtio-pmem device. Fetches everything it needs on first use (see scripts/lib.sh).
#
# Usage: scripts/test.sh [--no-vm] [--no-lint]
#   --no-vm    host tests only (no QEMU, no kernel download)
#   --no-lint  skip cargo fmt --check and cargo clippy
set -euo pipefail
VUP_PROG=test
source "$(dirname "$0")/lib.sh"
cd "$VUP_ROOT"

vm=1 lint=1
for a in "$@"; do
    case "$a" in
        --no-vm) vm=0 ;;
        --no-lint) lint=0 ;;
        -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument '$a' (see --help)" ;;
    esac
done

passed=0 failed=0 failures=()
# step NAME CMD...: runs one test step, records its result, and carries on so that one
# failure does not hide the others.
step() {
    local name="$1"; shift
    local t0; t0=$(now_ms)
    info "=== $name"
    if "$@"; then
        passed=$((passed + 1))
        info "=== $name: ok ($(( ($(now_ms) - t0) / 1000 )) s)"
    else
        failed=$((failed + 1)); failures+=("$name")
        info "=== $name: FAILED ($(( ($(now_ms) - t0) / 1000 )) s)"
    fi
}

if [[ $lint == 1 ]]; then
    step "cargo fmt --check" cargo fmt --all -- --check
    step "cargo clippy" cargo clippy --workspace --all-targets -- -D warnings
fi
step "cargo test (unit + integration)" cargo test --workspace

if [[ $vm == 1 ]]; then
    out="$VUP_BUILD/test"
    rm -rf "$out"; mkdir -p "$out"
    step "build daemon (release)" cargo build --release -p vhost-user-pmem
    step "fetch QEMU, kernel, guest tools" bash -c \
        "'$VUP_ROOT/scripts/fetch-qemu.sh' && '$VUP_ROOT/scripts/fetch-kernel.sh' && '$VUP_ROOT/scripts/fetch-guest-tools.sh'"
    step "build guest initramfs" bash -c \
        "bin=\$('$VUP_ROOT/scripts/build-guest.sh') && '$VUP_ROOT/scripts/build-initramfs.sh' --guest-bin \"\$bin\" --out '$out/initrd.cpio.gz'"
    for dev in vhost-user builtin; do
        img="$out/$dev.img"
        step "VM [$dev] boot 1: DAX suite on a fresh image" "$VUP_ROOT/scripts/run-vm.sh" \
            --device "$dev" --image "$img" --size 1G --initrd "$out/initrd.cpio.gz" \
            --log-dir "$out/$dev-boot1" --args "--mkfs e2e"
        step "VM [$dev] boot 2: data of boot 1 survived" "$VUP_ROOT/scripts/run-vm.sh" \
            --device "$dev" --image "$img" --size 1G --initrd "$out/initrd.cpio.gz" \
            --log-dir "$out/$dev-boot2" --args "--expect-gen 1 persist"
    done
    step "20 boots in a row on one image behind one daemon" "$VUP_ROOT/scripts/boot-loop.sh" \
        --boots 20 --out "$out/boot-loop"
fi

if ((failed)); then
    info "failed steps:"; printf '  %s\n' "${failures[@]}" >&2
fi
echo "test: $passed passed, $failed failed"
((failed == 0))
