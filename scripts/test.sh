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

passed=0 failed=0 skipped=0 failures=()

# can_fuse: whether faultfs can mount here (a FUSE device, and root or a fusermount helper);
# otherwise no_fuse says why, for the steps that then skip.
can_fuse() {
    if [[ ! -c /dev/fuse ]]; then no_fuse="no /dev/fuse for the faultfs image"; return 1; fi
    if ((EUID != 0)) && ! command -v fusermount3 >/dev/null && ! command -v fusermount >/dev/null; then
        no_fuse="not root and no fusermount to mount the faultfs image"; return 1
    fi
}

# can_libvirt: whether the libvirt step can run here; otherwise no_libvirt says why. virsh runs
# in a private mount namespace (root), and libvirt is fetched as Debian packages (apt-get).
can_libvirt() {
    if ((EUID != 0)); then no_libvirt="not root: virsh runs under unshare --mount (docs/libvirt.md)"; return 1; fi
    if ! command -v unshare >/dev/null; then no_libvirt="no unshare (util-linux) for virsh's mount namespace"; return 1; fi
    if ! command -v apt-get >/dev/null; then no_libvirt="no apt-get to fetch libvirt's Debian packages"; return 1; fi
}

# runner_killed LOGDIR SIGNAL: a runner that is killed mid-run (SIGKILL: the children's
# parent-death signals; SIGTERM: the runner's own clean-up) must leave no QEMU, daemon or
# faultfs process and no FUSE mount behind.
runner_killed() {
    local dir="$1" sig="$2" pid i name cpid left=()
    rm -rf "$dir"
    "${vr[@]}" --faultfs --expect-daemon-exit 1 --log-dir "$dir" --args "--mkfs flush" \
        >"$dir.txt" 2>&1 &
    pid=$!
    for ((i = 0; i < 600; i++)); do
        grep -qs '^VUP-BEGIN' "$dir/guest-out.raw" && break
        kill -0 "$pid" 2>/dev/null || { info "the runner ended before the guest started"; cat "$dir.txt" >&2; return 1; }
        sleep 0.1
    done
    (( i < 600 )) || { kill -KILL "$pid"; info "the guest never started"; return 1; }
    grep -q '^qemu ' "$dir/pids" && grep -q '^daemon ' "$dir/pids" && grep -q '^faultfs ' "$dir/pids" \
        || { info "LOGDIR/pids lacks a child: $(paste -sd' ' "$dir/pids")"; kill -KILL "$pid"; return 1; }
    kill "-$sig" "$pid"
    wait "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        left=()
        while read -r name cpid; do
            # A zombie is gone for this purpose: whoever inherited it has only to reap it.
            if [[ -e /proc/$cpid && $(awk '{print $3}' "/proc/$cpid/stat" 2>/dev/null) != Z ]]; then
                left+=("$name $cpid")
            fi
        done < "$dir/pids"
        ((${#left[@]} == 0)) && ! grep -qF " $dir/faultfs.mnt " /proc/mounts && break
        sleep 0.1
    done
    if ((${#left[@]})); then info "still running 10 s after SIG$sig to the runner: ${left[*]}"; return 1; fi
    if grep -qF " $dir/faultfs.mnt " /proc/mounts; then info "faultfs still mounted on $dir/faultfs.mnt"; return 1; fi
    info "SIG$sig to the runner: $(wc -l < "$dir/pids") children ($(cut -d' ' -f1 "$dir/pids" | paste -sd,)) gone, no FUSE mount left"
}
runner_killed_twice() { runner_killed "$1/killed-kill" KILL && runner_killed "$1/killed-term" TERM; }
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

# The downloads need the network, not the CPU: they start now, behind the builds, and their
# step waits for them (on a fresh machine this hides their ~40 s). fetch_locked serialises
# them against any other fetch of the same cache.
if [[ $vm == 1 ]]; then
    mkdir -p "$VUP_BUILD"
    fetch_log="$VUP_BUILD/test-fetch.log"
    ("$VUP_ROOT/scripts/fetch-qemu.sh" && "$VUP_ROOT/scripts/fetch-kernel.sh" &&
        "$VUP_ROOT/scripts/fetch-guest-tools.sh") >"$fetch_log" 2>&1 &
    fetch_pid=$!
    if can_libvirt; then
        libvirt_log="$VUP_BUILD/test-fetch-libvirt.log"
        "$VUP_ROOT/scripts/fetch-libvirt.sh" >"$libvirt_log" 2>&1 &
        libvirt_pid=$!
    fi
fi
# fetched [PID LOG]: a background download's result, with its output (default: QEMU, kernel,
# guest tools).
fetched() {
    local rc=0
    wait "${1:-$fetch_pid}" || rc=$?
    cat "${2:-$fetch_log}" >&2
    return "$rc"
}
# libvirt_boot: the guest suite through libvirt with the shipped domain XML.
libvirt_boot() {
    fetched "$libvirt_pid" "$libvirt_log" || return 1
    "${vr[@]}" --libvirt --virsh "$(tail -n1 "$libvirt_log")" --image "$out/libvirt.img" \
        --log-dir "$out/libvirt" --args "--mkfs e2e" --expect-maps 1 --expect-hostchecks 1
}

if [[ $lint == 1 ]]; then
    step "cargo fmt --check" cargo fmt --all -- --check
    step "cargo clippy" cargo clippy --workspace --all-targets -- -D warnings
fi
step "cargo test (unit + integration)" cargo test --workspace
step "fuzz: 20 s per target (request_parse, config, vhost_messages)" "$VUP_ROOT/scripts/fuzz.sh" --time 20
pkg_missing=()
for c in dpkg-deb systemd-analyze man jq; do command -v "$c" >/dev/null 2>&1 || pkg_missing+=("$c"); done
if ((${#pkg_missing[@]} == 0)); then
    step "package: .deb built, installed into a scratch root, files and --print-capabilities checked, systemd units verified" \
        "$VUP_ROOT/scripts/package.sh" --check
else
    info "=== package: SKIPPED (scripts/package.sh --check needs ${pkg_missing[*]}, not found here)"; skipped=$((skipped + 1))
fi
step "man page and completions match --help" cargo run -q -p pmem-docgen -- --check

if [[ $vm == 1 ]]; then
    out="$VUP_BUILD/test"
    rm -rf "$out"; mkdir -p "$out"
    step "build runner, daemon and faultfs (release)" cargo build --release -p vm-runner -p vhost-user-pmem -p faultfs
    step "fetch QEMU, kernel, guest tools (started in the background at the beginning)" fetched
    step "build guest initramfs" bash -c \
        "bin=\$('$VUP_ROOT/scripts/build-guest.sh') && '$VUP_ROOT/scripts/build-initramfs.sh' --guest-bin \"\$bin\" --out '$out/initrd.cpio.gz'"
    # Every VM step is one vmrun (crates/vm-runner); `vmrun --help` explains each option.
    vr0=("$VUP_RUNNER" --initrd "$out/initrd.cpio.gz")
    vr=("${vr0[@]}" --size 1G)
    for dev in vhost-user builtin; do
        img="$out/$dev.img"
        step "VM [$dev] boot 1: DAX suite on a fresh image" "${vr[@]}" --device "$dev" \
            --image "$img" --log-dir "$out/$dev-boot1" --args "--mkfs e2e"
        step "VM [$dev] boot 2: data of boot 1 survived" "${vr[@]}" --device "$dev" \
            --image "$img" --log-dir "$out/$dev-boot2" --args "--expect-gen 1 persist"
    done
    img="$out/vhost-user.img"
    # QEMU drops the mapping on every device reset: one SHMEM_MAP per boot.
    step "VM [vhost-user] 2 guest reboots in one QEMU: region mapped again, data kept" "${vr[@]}" \
        --image "$img" --log-dir "$out/reboot" --end reboot --reboots 2 \
        --args "--expect-gen boot+1 persist" --expect-maps 3
    step "VM [vhost-user] kernel crash (sysrq c) after fsync: data survives" "${vr[@]}" \
        --image "$img" --log-dir "$out/crash" --end crash --args "--expect-gen 5 --crash-at-end persist"
    step "VM [vhost-user] boot after the crash: journal replayed, data there" "${vr[@]}" \
        --image "$img" --log-dir "$out/after-crash" --args "--expect-gen 6 persist"
    step "VM [vhost-user] QEMU killed with SIGKILL right after an fsync returned" "${vr[@]}" \
        --image "$img" --log-dir "$out/sigkill" --kill-after-marker "- fsync_persists" \
        --args "--expect-gen 7 persist"
    step "VM [vhost-user] boot after the SIGKILL: data there" "${vr[@]}" \
        --image "$img" --log-dir "$out/after-sigkill" --args "--expect-gen 8 persist"
    step "VM [vhost-user] QEMU listens (server=on), daemon --connect: DAX suite" "${vr[@]}" \
        --daemon-mode client --image "$out/client.img" --log-dir "$out/client" --args "--mkfs e2e"
    # The paired benchmark's VM (scripts/bench-guest-paired.sh), briefly: the guest must find
    # the built-in device at its PCI address and the vhost-user one elsewhere, DAX on both.
    step "VM [vhost-user + builtin] both devices in one guest (--pair-builtin): told apart by PCI address, DAX on both, flushes timed on both" \
        "${vr[@]}" --pair-builtin --image "$out/paired.img" --log-dir "$out/paired" \
        --args "--mkfs --iters 10 --blocks 2 paired"
    # Two device starts (boot, rebind) seen by QEMU and by the daemon, and the data of
    # generations 1 and 2 and rebind.dat in the image.
    step "VM [vhost-user] virtio_pmem unbind/bind through sysfs: region mapped again, data kept" \
        "${vr[@]}" --image "$out/rebind.img" --log-dir "$out/rebind" \
        --args "--mkfs --expect-gen 0 rebind" --expect-maps 2 --expect-device-starts 2 --expect-hostchecks 3
    step "VM [vhost-user] --read-only daemon: guest writes cannot change the host file" "${vr[@]}" \
        --image "$out/rebind.img" --log-dir "$out/readonly" --daemon-arg=--read-only \
        --args "--expect-gen 2 readonly" --expect-image-unchanged --expect-readonly-outcome
    step "VM [vhost-user] daemon SIGKILLed under a guest fsync loop: no fsync succeeds after" \
        "${vr[@]}" --image "$out/rebind.img" --log-dir "$out/daemon-killed" --args "fsyncloop" \
        --kill-daemon-after-marker VUP-FSYNC-STEADY --observe 30
    step "VM [vhost-user] catalogue A-D on ext4" "${vr[@]}" \
        --image "$out/catalogue-ext4.img" --log-dir "$out/catalogue-ext4" --timeout 600 \
        --args "--mkfs selftest catalogue"
    step "VM [vhost-user] catalogue A-D on xfs" "${vr[@]}" \
        --image "$out/catalogue-xfs.img" --log-dir "$out/catalogue-xfs" --timeout 600 \
        --args "--mkfs --fs xfs catalogue"
    # E17 injects fsync failures under the image, so the daemon's final fdatasync at SIGTERM is
    # refused (sticky failure) and it exits 1.
    if can_fuse; then
        step "VM [vhost-user] catalogue E16-E18 on a faultfs image (flush counts, EIO, full queue)" \
            "${vr[@]}" --faultfs --log-dir "$out/catalogue-flush" --timeout 900 \
            --expect-daemon-exit 1 --args "--mkfs flush"
    else
        info "=== catalogue E16-E18: SKIPPED ($no_fuse)"; skipped=$((skipped + 1))
    fi
    # The image on a tmpfs of its own that vmrun mounts (root): a 64 MiB device on a host file
    # system that fills up after the start, and on one that is smaller than the device.
    if ((EUID == 0)); then
        step "VM [vhost-user] host file system full after start, --allocate full (default): guest gets ENOSPC, VM alive, fsynced files in the host file" \
            "${vr0[@]}" --size 64M --host-fs-size 80M --fill-host-fs --log-dir "$out/hostfs-full" \
            --args "--mkfs fill" --expect-hostchecks 10
        step "VM [vhost-user] host file system smaller than the device, --allocate sparse: QEMU dies of SIGBUS, fsynced files in the host file" \
            "${vr0[@]}" --size 64M --host-fs-size 32M --daemon-arg=--allocate=sparse --log-dir "$out/hostfs-sparse" \
            --args "--mkfs fill" --expect-qemu-signal SIGBUS --expect-hostchecks 10
    else
        info "=== host file system full (2 steps): SKIPPED (not root: vmrun mounts a tmpfs for the image)"; skipped=$((skipped + 2))
    fi
    # --snapshot needs reflink (xfs or btrfs); vmrun makes an xfs in a file and loop-mounts it.
    if ((EUID == 0)) && [[ -e /dev/loop-control ]]; then
        step "two VMs at once on one golden image (--snapshot, xfs loop mount): each sees only its own writes, a writer is refused, the image unchanged" \
            "$VUP_RUNNER" shared-image --initrd "$out/initrd.cpio.gz" --out "$out/shared-image"
    else
        info "=== shared golden image: SKIPPED (needs root and /dev/loop-control for the xfs loop mount)"; skipped=$((skipped + 1))
    fi
    step "20 boots in a row on one image behind one daemon" "$VUP_RUNNER" boot-loop \
        --boots 20 --initrd "$out/initrd.cpio.gz" --out "$out/boot-loop"
    # The shipped systemd units start the daemon by socket activation; systemd-socket-activate
    # does what the .socket unit does (listen, exec the daemon with fd 3 at the first connect)
    # without systemd as PID 1, which these machines do not have.
    if command -v systemd-socket-activate >/dev/null; then
        step "socket activation (systemd-socket-activate, as the shipped units): 2 QEMU runs on one activated daemon" \
            "$VUP_RUNNER" boot-loop --boots 2 --socket-activate --initrd "$out/initrd.cpio.gz" --out "$out/activated"
    else
        info "=== socket activation: SKIPPED (no systemd-socket-activate; it comes with Debian's systemd package)"; skipped=$((skipped + 1))
    fi
    if can_libvirt; then
        step "libvirt (embedded driver, the shipped domain XML): DAX suite, region mapped once, data in the host file" \
            libvirt_boot
    else
        info "=== libvirt boot: SKIPPED ($no_libvirt)"; skipped=$((skipped + 1))
    fi
    if can_fuse; then
        step "runner killed (SIGKILL, then SIGTERM) mid-run: no QEMU, daemon or FUSE mount left" \
            runner_killed_twice "$out"
    else
        info "=== runner killed mid-run: SKIPPED ($no_fuse)"; skipped=$((skipped + 1))
    fi
fi

if ((failed)); then
    info "failed steps:"; printf '  %s\n' "${failures[@]}" >&2
fi
if ((skipped)); then echo "test: $passed passed, $failed failed, $skipped skipped"; else echo "test: $passed passed, $failed failed"; fi
((failed == 0))
