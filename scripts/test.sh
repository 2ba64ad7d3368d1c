#!/usr/bin/env bash
# Runs every test of the project: formatting and lints, unit and integration tests on the host,
# then the guest suite in real QEMU VMs, against this daemon and against QEMU's built-in
# virtio-pmem device. Fetches everything it needs on first use (see scripts/lib.sh).
#
# Usage: scripts/test.sh [--no-vm] [--no-lint]
#   --no-vm    host tests only (no QEMU, no kernel download); the bounded fuzz run still runs
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

# reboots_remap IMG LOGDIR: three boots inside one QEMU process (two `reboot -f`), each of which
# must find the previous boot's generation; the daemon must have mapped the region once per boot
# (QEMU drops the mapping on every device reset).
reboots_remap() {
    "$VUP_ROOT/scripts/run-vm.sh" --size 1G --initrd "$out/initrd.cpio.gz" --device vhost-user \
        --image "$1" --log-dir "$2" --end reboot --reboots 2 --args "--expect-gen boot+1 persist" \
        || return 1
    local maps
    maps=$(grep -c 'into shared-memory region' "$2/daemon.log" || true)
    if [[ $maps != 3 ]]; then
        info "expected 3 SHMEM_MAPs (one per boot), the daemon log shows $maps"
        return 1
    fi
}
# rebind_remap IMG LOGDIR: unbind and bind virtio_pmem through sysfs in a running guest; the
# data must be there afterwards, and QEMU must have started the vhost device twice (SET_FEATURES
# each time) and the daemon mapped the region twice.
rebind_remap() {
    "$VUP_ROOT/scripts/run-vm.sh" --size 1G --initrd "$out/initrd.cpio.gz" --device vhost-user \
        --image "$1" --log-dir "$2" --trace-vhost --args "--mkfs --expect-gen 0 rebind" || return 1
    local maps starts feats checks
    maps=$(grep -c 'into shared-memory region' "$2/daemon.log" || true)
    starts=$(grep -c 'vhost_dev_start_in' "$2/qemu.log" || true)
    feats=$(grep -c 'vhost_user_write req:2 (SET_FEATURES)' "$2/qemu.log" || true)
    checks=$(wc -l < "$2/hostchecks.result" 2>/dev/null || echo 0)
    info "rebind: $starts vhost device starts, $feats SET_FEATURES, $maps SHMEM_MAPs, $checks host checks ok"
    [[ $maps == 2 && $starts == 2 && $feats == 2 ]] || { info "expected 2 of each (boot, rebind)"; return 1; }
    ((checks >= 3)) || { info "expected at least 3 host checks (generations 1 and 2, rebind.dat)"; return 1; }
}
# readonly_unchanged IMG LOGDIR GEN: a --read-only daemon; the guest reads generation GEN and
# tries to write; the image must be byte-identical afterwards. QEMU 11.1.3 cannot map a
# read-only file (docs/qemu.md): then its message must be the known one and the guest must
# have seen a blank region; once QEMU maps it, the guest's read cases must have run.
readonly_unchanged() {
    local before after
    before=$(sha256sum < "$1")
    "$VUP_ROOT/scripts/run-vm.sh" --size 1G --initrd "$out/initrd.cpio.gz" --device vhost-user \
        --image "$1" --log-dir "$2" --daemon-arg --read-only --args "--expect-gen $3 readonly" \
        || return 1
    after=$(sha256sum < "$1")
    [[ $before == "$after" ]] || { info "the image changed under a read-only daemon"; return 1; }
    if grep -q 'into shared-memory region 0 .*read-only' "$2/daemon.log"; then
        grep -q '^ok [0-9]* - ro_mount_read$' "$2/tap.txt" || { info "mapped, but ro_mount_read did not pass"; return 1; }
    else
        grep -q 'unable to map backing store for guest RAM: Permission denied' "$2/qemu.log" ||
            { info "the read-only map failed for an unknown reason (see qemu.log)"; return 1; }
        grep -q '^ok [0-9]* - ro_region # SKIP the region reads as zeros' "$2/tap.txt" ||
            { info "the map failed, but the guest did not see a blank region"; return 1; }
        info "read-only: QEMU 11.1.3 refused the read-only map (known, docs/qemu.md); image unchanged"
    fi
}
# daemon_killed IMG LOGDIR: SIGKILL the daemon under a guest fsync loop; no fsync may succeed
# afterwards (run-vm.sh checks), and the guest must have seen its fsync hang or fail.
daemon_killed() {
    "$VUP_ROOT/scripts/run-vm.sh" --size 1G --initrd "$out/initrd.cpio.gz" --device vhost-user \
        --image "$1" --log-dir "$2" --args "fsyncloop" --kill-daemon-after-marker VUP-FSYNC-STEADY \
        --observe 30 || return 1
    grep -qE '^VUP-FSYNC-WAIT|^VUP-FSYNC n=[0-9]+ error' "$2/after-kill.txt" ||
        { info "the guest reported neither a pending nor a failed fsync after the kill"; return 1; }
}
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
step "fuzz: 20 s per target (request_parse, config, vhost_messages)" "$VUP_ROOT/scripts/fuzz.sh" --time 20

if [[ $vm == 1 ]]; then
    out="$VUP_BUILD/test"
    rm -rf "$out"; mkdir -p "$out"
    step "build daemon and faultfs (release)" cargo build --release -p vhost-user-pmem -p faultfs
    step "fetch QEMU, kernel, guest tools" bash -c \
        "'$VUP_ROOT/scripts/fetch-qemu.sh' && '$VUP_ROOT/scripts/fetch-kernel.sh' && '$VUP_ROOT/scripts/fetch-guest-tools.sh'"
    step "build guest initramfs" bash -c \
        "bin=\$('$VUP_ROOT/scripts/build-guest.sh') && '$VUP_ROOT/scripts/build-initramfs.sh' --guest-bin \"\$bin\" --out '$out/initrd.cpio.gz'"
    rv=("$VUP_ROOT/scripts/run-vm.sh" --size 1G --initrd "$out/initrd.cpio.gz")
    for dev in vhost-user builtin; do
        img="$out/$dev.img"
        step "VM [$dev] boot 1: DAX suite on a fresh image" "${rv[@]}" --device "$dev" \
            --image "$img" --log-dir "$out/$dev-boot1" --args "--mkfs e2e"
        step "VM [$dev] boot 2: data of boot 1 survived" "${rv[@]}" --device "$dev" \
            --image "$img" --log-dir "$out/$dev-boot2" --args "--expect-gen 1 persist"
    done
    img="$out/vhost-user.img"
    step "VM [vhost-user] 2 guest reboots in one QEMU: region mapped again, data kept" \
        reboots_remap "$img" "$out/reboot"
    step "VM [vhost-user] kernel crash (sysrq c) after fsync: data survives" "${rv[@]}" \
        --device vhost-user --image "$img" --log-dir "$out/crash" --end crash \
        --args "--expect-gen 5 --crash-at-end persist"
    step "VM [vhost-user] boot after the crash: journal replayed, data there" "${rv[@]}" \
        --device vhost-user --image "$img" --log-dir "$out/after-crash" --args "--expect-gen 6 persist"
    step "VM [vhost-user] QEMU killed with SIGKILL right after an fsync returned" "${rv[@]}" \
        --device vhost-user --image "$img" --log-dir "$out/sigkill" \
        --kill-after-marker "- fsync_persists" --args "--expect-gen 7 persist"
    step "VM [vhost-user] boot after the SIGKILL: data there" "${rv[@]}" \
        --device vhost-user --image "$img" --log-dir "$out/after-sigkill" --args "--expect-gen 8 persist"
    step "VM [vhost-user] QEMU listens (server=on), daemon --connect: DAX suite" "${rv[@]}" \
        --device vhost-user --daemon-mode client --image "$out/client.img" \
        --log-dir "$out/client" --args "--mkfs e2e"
    step "VM [vhost-user] virtio_pmem unbind/bind through sysfs: region mapped again, data kept" \
        rebind_remap "$out/rebind.img" "$out/rebind"
    step "VM [vhost-user] --read-only daemon: guest writes cannot change the host file" \
        readonly_unchanged "$out/rebind.img" "$out/readonly" 2
    step "VM [vhost-user] daemon SIGKILLed under a guest fsync loop: no fsync succeeds after" \
        daemon_killed "$out/rebind.img" "$out/daemon-killed"
    step "VM [vhost-user] catalogue A-D on ext4" "${rv[@]}" --device vhost-user \
        --image "$out/catalogue-ext4.img" --log-dir "$out/catalogue-ext4" --timeout 600 \
        --args "--mkfs selftest catalogue"
    step "VM [vhost-user] catalogue A-D on xfs" "${rv[@]}" --device vhost-user \
        --image "$out/catalogue-xfs.img" --log-dir "$out/catalogue-xfs" --timeout 600 \
        --args "--mkfs --fs xfs catalogue"
    # E17 injects fsync failures under the image, so the daemon's final fdatasync at SIGTERM is
    # refused (sticky failure) and it exits 1.
    step "VM [vhost-user] catalogue E16-E18 on a faultfs image (flush counts, EIO, full queue)" \
        "${rv[@]}" --device vhost-user --faultfs --log-dir "$out/catalogue-flush" --timeout 900 \
        --expect-daemon-exit 1 --args "--mkfs flush"
    step "20 boots in a row on one image behind one daemon" "$VUP_ROOT/scripts/boot-loop.sh" \
        --boots 20 --out "$out/boot-loop"
fi

if ((failed)); then
    info "failed steps:"; printf '  %s\n' "${failures[@]}" >&2
fi
echo "test: $passed passed, $failed failed"
((failed == 0))
