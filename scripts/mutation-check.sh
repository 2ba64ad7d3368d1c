#!/usr/bin/env bash
# Shows that guest test cases can fail: builds the project with each patch in scripts/mutations/
# applied (to a copy, never to the working tree), runs the one case the patch targets in a VM,
# and reports whether that case failed. See --help.
set -euo pipefail
# shellcheck disable=SC2034  # read by lib.sh
VUP_PROG=mutation-check
# shellcheck source=scripts/lib.sh
. "$(dirname "$0")/lib.sh"

usage() {
    cat <<USAGE
Usage: scripts/mutation-check.sh [--timeout SEC] [--keep] [NAME...]

For every patch scripts/mutations/NAME.patch (all of them without NAME arguments):
  1. apply it to a copy of this working tree (tracked and untracked files, as they are now) in
     \$VUP_BUILD/mutation/src, never to the working tree itself;
  2. build what it changes there (the daemon, or the guest binary and its initramfs), with its
     own target directory (\$VUP_BUILD/mutation/target, seeded from target/ on first use);
  3. boot a VM with scripts/run-vm.sh that runs only the case named on the patch's "Target:"
     line (--only), with the unpatched other half (guest or daemon);
  4. undo the patch.
A patch is KILLED when its target case failed (a "not ok" line for it, for fsync_persists a
failed VUP-HOSTCHECK, for fill_to_enospc QEMU killed by a signal; for the target shared_image,
which runs `vmrun shared-image` instead of one case, any check after its golden run; for a
target cargo:TEST, the host-harness test TEST of the daemon crate, run in the patched copy
without a VM, a failed test), SURVIVED when it passed, and ERROR when no guest ran (a refused
argument, a failed build). Other failures are listed too. The table goes to stdout and to \$VUP_BUILD/mutation/results.md; each run's logs stay in \$VUP_BUILD/mutation/NAME/.
Exit status 0 iff every patch was killed.

  --timeout SEC   per VM run (default 420; a lost completion hangs the guest until then)
  --keep          keep the source copy (default: removed at the end)
  -h, --help      this text

Not part of scripts/test.sh: it boots one VM per patch and takes about 15 minutes.
USAGE
}

timeout_s=420
keep=0
names=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --timeout) [[ $# -ge 2 ]] || die "--timeout needs a value"; timeout_s="$2"; shift ;;
        --keep) keep=1 ;;
        -h|--help) usage; exit 0 ;;
        -*) die "unknown option '$1' (see --help)" ;;
        *) names+=("$1") ;;
    esac
    shift
done
[[ $timeout_s =~ ^[0-9]+$ && $timeout_s -gt 0 ]] || die "--timeout must be a positive number of seconds"

mdir="$VUP_ROOT/scripts/mutations"
if (( ${#names[@]} == 0 )); then
    for p in "$mdir"/*.patch; do names+=("$(basename "$p" .patch)"); done
fi
for n in "${names[@]}"; do [[ -f $mdir/$n.patch ]] || die "no patch $mdir/$n.patch"; done

work="$VUP_BUILD/mutation"
src="$work/src"
export CARGO_TARGET_DIR="$work/target"
mkdir -p "$work"

# ---- a copy of the working tree -----------------------------------------------------------
info "copying the working tree to $src"
rm -rf "$src"; mkdir -p "$src"
( cd "$VUP_ROOT" && git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - ) \
    | tar -x -C "$src"
[[ -f $VUP_ROOT/Cargo.lock ]] && cp "$VUP_ROOT/Cargo.lock" "$src/"
# Its own repository, so that git apply works inside it and never on the enclosing clone.
git -C "$src" init -q
cleanup() { if (( keep == 0 )); then rm -rf "$src"; fi; }
trap cleanup EXIT
if [[ ! -d $CARGO_TARGET_DIR ]]; then
    # The dependencies are the same as in target/: start from there rather than from scratch.
    info "seeding $CARGO_TARGET_DIR from target/"
    mkdir -p "$CARGO_TARGET_DIR"
    for d in release x86_64-unknown-linux-gnu; do
        [[ -d $VUP_ROOT/target/$d ]] && cp -a --reflink=auto "$VUP_ROOT/target/$d" "$CARGO_TARGET_DIR/"
    done
fi

build_daemon() {   # the daemon and faultfs from the copy, as it is now
    ( cd "$src" && cargo build --release -p vhost-user-pmem -p faultfs ) >"$1" 2>&1
}
build_initrd() {   # build_initrd OUT LOG: the guest binary from the copy, packed into OUT
    local bin
    bin=$("$src/scripts/build-guest.sh" 2>>"$2") || return 1
    VUP_BUILD="$work" "$VUP_ROOT/scripts/build-initramfs.sh" --guest-bin "$bin" --out "$1" >>"$2" 2>&1
}

info "building the unpatched daemon and guest (the other half of every run)"
build_daemon "$work/base-build.log" || die "the unpatched daemon does not build; see $work/base-build.log"
mkdir -p "$work/base"
cp "$CARGO_TARGET_DIR/release/vhost-user-pmem" "$CARGO_TARGET_DIR/release/faultfs" "$work/base/"
build_initrd "$work/base/initrd.cpio.gz" "$work/base-build.log" \
    || die "the unpatched guest does not build; see $work/base-build.log"

# run_args TARGET: the run-vm.sh arguments that run only TARGET (the flush cases on faultfs,
# the unpatched one)
ffs=(--faultfs --faultfs-bin "$work/base/faultfs")
run_args() {
    case "$1" in
        fsync_persists) ra=(--args "--mkfs e2e") ;;
        flush_reaches_host) ra=("${ffs[@]}" --args "--mkfs flush --only flush_reaches_host") ;;
        flush_error_eio) ra=("${ffs[@]}" --expect-daemon-exit 1 --args "--mkfs flush --only flush_error_eio") ;;
        flush_queue_full) ra=("${ffs[@]}" --args "--mkfs flush --only flush_queue_full") ;;
        hole_then_write) ra=(--args "--mkfs faults --only hole_then_write") ;;
        map_sync_fallback) ra=(--args "--mkfs mapsync") ;;
        sigbus_rules) ra=(--args "--mkfs truncate --only sigbus_rules") ;;
        pmd_fault) ra=(--args "--mkfs pmd --only pmd_fault") ;;
        # The image on a tmpfs the runner fills once the daemon has prepared it.
        fill_to_enospc) ra=(--size 64M --host-fs-size 80M --fill-host-fs --args "--mkfs fill") ;;
        # Not one case but `vmrun shared-image` (two VMs on one golden image).
        shared_image) ra=(shared-image) ;;
        # A host-harness integration test of the daemon crate, run in the patched copy.
        cargo:*) ra=(cargo "${1#cargo:}") ;;
        *) return 1 ;;
    esac
}

results=()
killed_all=1
for n in "${names[@]}"; do
    patch="$mdir/$n.patch"
    target=$(sed -n 's/^Target: \([a-z_0-9:]*\).*/\1/p' "$patch" | head -n 1)
    out="$work/$n"
    rm -rf "$out"; mkdir -p "$out"
    ra=()
    if ! run_args "$target"; then
        results+=("| $n | $target | ERROR | no run configured for target '$target' |"); killed_all=0; continue
    fi
    info "=== $n (target $target)"
    ( cd "$src" && git apply "$patch" ) || { results+=("| $n | $target | ERROR | patch does not apply |"); killed_all=0; continue; }
    if [[ ${ra[0]} == cargo ]]; then
        t0=$(now_ms)
        ( cd "$src" && cargo test -p vhost-user-pmem --test "${ra[1]}" ) >"$out/cargo-test.log" 2>&1 && rc=0 || rc=$?
        ( cd "$src" && git apply -R "$patch" ) || die "cannot undo $n in $src"
        secs=$(( ($(now_ms) - t0) / 1000 ))
        if grep -q '^test result: FAILED' "$out/cargo-test.log"; then
            verdict=KILLED
            why=$(grep -m1 -E "panicked at|assertion" -A2 "$out/cargo-test.log" | tr '\n' ' ' | sed 's/|/\\|/g')
        elif (( rc == 0 )); then verdict=SURVIVED; killed_all=0; why="the test passed"
        else verdict=ERROR; killed_all=0; why="no test result (build failed? see $out/cargo-test.log)"
        fi
        info "$n: $verdict"
        results+=("| $n | $target | $verdict | ${why:0:300} | ${secs} s |")
        continue
    fi
    daemon="$work/base/vhost-user-pmem"; initrd="$work/base/initrd.cpio.gz"; built=1
    if grep -q '^+++ b/crates/' "$patch"; then
        build_daemon "$out/build.log" && daemon="$CARGO_TARGET_DIR/release/vhost-user-pmem" || built=0
    fi
    if grep -q '^+++ b/guest-tests/' "$patch"; then
        build_initrd "$out/initrd.cpio.gz" "$out/build.log" && initrd="$out/initrd.cpio.gz" || built=0
    fi
    ( cd "$src" && git apply -R "$patch" ) || die "cannot undo $n in $src"
    if (( ! built )); then
        results+=("| $n | $target | ERROR | the mutated build failed (see $out/build.log) |"); killed_all=0; continue
    fi
    t0=$(now_ms)
    if [[ ${ra[0]} == shared-image ]]; then
        build_runner
        "$VUP_RUNNER" shared-image --daemon "$daemon" --initrd "$initrd" --out "$out/vm" >"$out/run-vm.log" 2>&1 \
            && rc=0 || rc=$?
        secs=$(( ($(now_ms) - t0) / 1000 ))
        # KILLED when a check after the golden run failed; ERROR when the golden run did.
        if grep -q '^shared-image: golden .*: ok' "$out/run-vm.log"; then
            why=$(grep -E '^shared-image: .*FAILED' "$out/run-vm.log" | head -n 3 | sed 's/^shared-image: //' | paste -sd ';' - || true)
        else
            why=""
        fi
        why=${why//|/\\|}
        if [[ -n $why ]]; then verdict=KILLED; info "$n: $why"
        elif (( rc == 0 )); then verdict=SURVIVED; killed_all=0; why="every check passed"; info "$n: SURVIVED"
        else verdict=ERROR; killed_all=0; why="the golden run failed (see $out/run-vm.log)"; info "$n: ERROR"
        fi
        results+=("| $n | $target | $verdict | ${why:0:400} | ${secs} s |")
        continue
    fi
    # --seccomp=off: a mutated daemon may make calls outside the allow-list (e15 opens a file),
    # and the case must fail on the property the patch breaks, not on the sandbox.
    "$VUP_ROOT/scripts/run-vm.sh" --daemon "$daemon" \
        --daemon-arg --seccomp=off --initrd "$initrd" --log-dir "$out/vm" --timeout "$timeout_s" "${ra[@]}" >"$out/run-vm.log" 2>&1 \
        && rc=0 || rc=$?
    secs=$(( ($(now_ms) - t0) / 1000 ))
    why=$(grep -E "^not ok [0-9]+ - $target( |$)" "$out/vm/tap.txt" 2>/dev/null | head -n 1 | sed 's/^not ok [0-9]* - //' || true)
    if [[ -z $why && $target == fsync_persists ]]; then
        why=$(grep -E '^FAIL: VUP-HOSTCHECK' "$out/vm/result.txt" 2>/dev/null | head -n 1 | sed 's/^FAIL: //' || true)
    fi
    if [[ -z $why && $target == fill_to_enospc ]]; then
        # The guest cannot report this one: QEMU dies under it.
        why=$(grep -E '^FAIL: QEMU was killed by signal' "$out/vm/result.txt" 2>/dev/null | head -n 1 | sed 's/^FAIL: //' || true)
    fi
    others=$(grep -E '^not ok' "$out/vm/tap.txt" 2>/dev/null | grep -vE "^not ok [0-9]+ - $target( |$)" \
             | sed 's/^not ok [0-9]* - \([^ ]*\).*/\1/' | paste -sd, - || true)
    why=${why//|/\\|}
    if [[ -n $why ]]; then
        verdict=KILLED
        info "$n: $target failed: $why"
    elif [[ ! -s $out/vm/tap.txt ]]; then
        # No guest ran (the runner refused its arguments, or QEMU did not boot): that says
        # nothing about the patch, so it is an error, never a survivor or a kill.
        verdict=ERROR; killed_all=0
        why="no guest output (run-vm exit $rc): $(grep -m1 -iE 'error' "$out/run-vm.log" || tail -n 1 "$out/run-vm.log")"
        info "$n: ERROR: $why"
    else
        verdict=SURVIVED; killed_all=0
        why="run-vm exit $rc; $target did not fail"
        info "$n: SURVIVED ($target passed)"
    fi
    results+=("| $n | $target | $verdict | ${why:0:300}${others:+ (also failed: $others)} | ${secs} s |")
done

{
    echo "| mutation | target case | result | how the target failed | VM run |"
    echo "|---|---|---|---|---|"
    printf '%s\n' "${results[@]}"
} | tee "$work/results.md"
(( killed_all ))
