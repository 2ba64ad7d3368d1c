#!/usr/bin/env bash
# A bounded soak: one daemon and one image for --minutes, while QEMU boots the guest again and
# again, each QEMU rebooting it (`reboot -f`) --reboots times, or, every --crash-every'th QEMU,
# booting it once and ending it hard: alternately a kernel crash (sysrq c) right after the load,
# with the file system still mounted, and a SIGKILL of QEMU in the middle of the load, with
# every writer busy. Every boot runs the guest suite
# `soak`: it first checks that every write the previous boot acknowledged (fsync, rename and
# directory fsync returned) is there, then runs --threads writers (pwrite or DAX-mapped stores,
# fsync each) and a file that is extended and truncated, for --load seconds, and tells the host
# where the final bytes lie (checked in the image by vmrun). A last boot checks the data of
# the one before it.
#
# Meanwhile the daemon's RSS, threads and fds are sampled every 5 s (LOGDIR/samples.tsv).
# Fails if a boot fails, a write is missing, the daemon logs a warning or an error, its RSS
# when idle at the end exceeds its RSS when idle after the first boot by more than
# --rss-limit-kib, its idle thread or fd count changed, or it does not exit 0 on SIGTERM.
# Not part of scripts/test.sh (it takes minutes); see docs/testing.md for measured runs.
#
# Usage: scripts/soak.sh [--minutes N] [--threads N] [--load SEC] [--reboots N]
#                        [--crash-every K] [--size SIZE] [--rss-limit-kib K] [--out DIR]
#   --minutes N        keep starting QEMUs until N minutes have passed (default 4)
#   --threads N        writer threads in the guest (default 8)
#   --load SEC         seconds of load per boot (default 20)
#   --reboots N        `reboot -f` per QEMU process (default 2: three boots per QEMU)
#   --crash-every K    every K-th QEMU after the first ends its one boot hard instead
#                      (kernel crash and QEMU SIGKILL in turn; default 3; 0: never)
#   --size SIZE        pmem size (default 1G)
#   --rss-limit-kib K  allowed growth of the idle RSS (default 4096)
#   --out DIR          where logs go (default .cache/soak)
set -euo pipefail
VUP_PROG=soak
source "$(dirname "$0")/lib.sh"
cd "$VUP_ROOT"

minutes=4 threads=8 load=20 reboots=2 crash_every=3 size=1G rss_limit=4096 out="$VUP_BUILD/soak"
num() { [[ ${2:-} =~ ^[0-9]+$ ]] || die "$1 needs a number"; }
while (($#)); do
    case "$1" in
        --minutes) num "$1" "${2:-}"; minutes="$2"; shift ;;
        --threads) num "$1" "${2:-}"; threads="$2"; shift ;;
        --load) num "$1" "${2:-}"; load="$2"; shift ;;
        --reboots) num "$1" "${2:-}"; reboots="$2"; shift ;;
        --crash-every) num "$1" "${2:-}"; crash_every="$2"; shift ;;
        --rss-limit-kib) num "$1" "${2:-}"; rss_limit="$2"; shift ;;
        --size) [[ $# -ge 2 ]] || die "--size needs a value"; size="$2"; shift ;;
        --out) [[ $# -ge 2 ]] || die "--out needs a value"; out="$2"; shift ;;
        -h|--help) sed -n '2,29p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
    shift
done
((minutes >= 1 && threads >= 1 && load >= 1)) || die "--minutes, --threads and --load must be at least 1"

rm -rf "$out"; mkdir -p "$out"
out="$(cd "$out" && pwd)"
build_vm_inputs "$out/initrd.cpio.gz"

# The daemon outlives every QEMU of the soak, so the soak starts it, not vmrun.
sockdir=$(mktemp -d /tmp/vup-soak.XXXXXX)
sock="$sockdir/pmem0.sock"
RUST_LOG="${RUST_LOG:-info}" "$VUP_ROOT/target/release/vhost-user-pmem" --socket-path "$sock" \
    --file "$out/pmem0.img" --size "$size" --metrics-path "$out/daemon-metrics.json" \
    --metrics-interval 0 </dev/null >"$out/daemon.log" 2>&1 &
dpid=$!
sampler=""
cleanup() {
    [[ -n $sampler ]] && kill "$sampler" 2>/dev/null
    kill -TERM "$dpid" 2>/dev/null || true
    rm -rf "$sockdir"
}
trap cleanup EXIT
for ((i = 0; i < 100; i++)); do [[ -S $sock ]] && break; sleep 0.1; done
[[ -S $sock ]] || { cat "$out/daemon.log" >&2; die "the daemon did not start"; }

# usage: "RSS_KiB threads fds" of the daemon
usage() {
    local rss thr fds
    rss=$(awk '/^VmRSS:/ { print $2 }' "/proc/$dpid/status")
    thr=$(awk '/^Threads:/ { print $2 }' "/proc/$dpid/status")
    fds=$(find "/proc/$dpid/fd" -mindepth 1 -maxdepth 1 | wc -l)
    echo "$rss $thr $fds"
}
# quiet_usage: usage once it reads the same twice in a row, 1 s apart (connection torn down)
quiet_usage() {
    local a b
    a=$(usage)
    for ((i = 0; i < 10; i++)); do
        sleep 1; b=$(usage)
        [[ ${a#* } == "${b#* }" ]] && break
        a=$b
    done
    echo "$b"
}
t0=$(now_ms)
printf 'seconds\trss_kib\tthreads\tfds\n' > "$out/samples.tsv"
(
    while kill -0 "$dpid" 2>/dev/null; do
        read -r r t f < <(usage 2>/dev/null) || break
        printf '%d\t%s\t%s\t%s\n' $(( ($(now_ms) - t0) / 1000 )) "$r" "$t" "$f" >> "$out/samples.tsv"
        sleep 5
    done
) &
sampler=$!

rv=("$VUP_RUNNER" --device vhost-user --socket "$sock" --image "$out/pmem0.img"
    --size "$size" --initrd "$out/initrd.cpio.gz")
passed=0 failed=0 boots=0 qemus=0 reboots_done=0 crashes=0 kills=0 hostchecks=0
# run_qemu NAME ARGS...: one QEMU process; counts its boots
run_qemu() {
    local name="$1"; shift
    qemus=$((qemus + 1))
    local timeout=$(( (load + 120) * (reboots + 1) + 120 ))
    if "${rv[@]}" --log-dir "$out/$name" --timeout "$timeout" "$@" >"$out/$name.txt" 2>&1; then
        passed=$((passed + 1))
        info "$name: ok ($(tail -n 1 "$out/$name.txt"); $(grep -h "^VUP-SOAK " "$out/$name/guest-out.txt" | sed 's/^VUP-SOAK //' | paste -sd' '))"
    else
        failed=$((failed + 1))
        info "$name: FAILED"; tail -n 40 "$out/$name.txt" >&2
    fi
    boots=$((boots + $(grep -c "^VUP-BEGIN" "$out/$name/guest-out.txt" 2>/dev/null || true)))
    # a QEMU killed in the middle printed no final state
    [[ $name == *-kill ]] || soakchecks "$name"
}
# soakchecks NAME: the bytes the last boot of that QEMU left (VUP-SOAKCHECK lines after the
# last VUP-BEGIN) must be in the image now, before the next QEMU changes it. Earlier boots'
# bytes were checked by the boot after them, in the guest.
soakchecks() {
    local n=0 bad=0 off len want got
    while read -r _ off len want; do
        off=${off#offset=} len=${len#len=} want=${want#sha256=}
        got=$(dd if="$out/pmem0.img" bs=1M iflag=skip_bytes,count_bytes skip="$off" count="$len" 2>/dev/null |
            sha256sum | cut -d' ' -f1)
        n=$((n + 1))
        [[ $got == "$want" ]] || { bad=$((bad + 1)); info "$1: image differs at offset $off len $len"; }
    done < <(awk '/^VUP-BEGIN/ { delete l; n = 0 } /^VUP-SOAKCHECK / { l[++n] = $0 }
                  END { for (i = 1; i <= n; i++) print l[i] }' "$out/$1/guest-out.txt" 2>/dev/null)
    hostchecks=$((hostchecks + n))
    if ((bad > 0 || n == 0)); then
        failed=$((failed + 1)); info "$1: $bad of $n extents of the last boot's files differ in the image"
    fi
}

gargs="--threads $threads --stress $load soak"
# Boot 1: a fresh file system, nothing to check yet.
run_qemu boot1 --args "--mkfs --expect-gen 0 $gargs"
idle_first=$(quiet_usage)
info "daemon idle after the first boot: RSS ${idle_first%% *} KiB, threads and fds: ${idle_first#* }"
gen=1   # the last boot that finished
deadline=$(( t0 + minutes * 60 * 1000 ))
while ((failed == 0 && $(now_ms) < deadline)); do
    if ((crash_every > 0 && qemus % crash_every == 0 && crashes % 2 == 0)); then
        # one boot, then a kernel crash with the file system mounted; the next boot replays
        # the journal (fsck_clean) before it checks
        run_qemu "qemu$((qemus + 1))-crash" --end crash \
            --args "--expect-gen $gen --crash-at-end $gargs"
        crashes=$((crashes + 1))
        gen=$((gen + 1))
    elif ((crash_every > 0 && qemus % crash_every == 0)); then
        # one boot, QEMU SIGKILLed halfway through the load: writes in flight, nothing unmounted
        run_qemu "qemu$((qemus + 1))-kill" --kill-after-marker VUP-SOAK-HALFWAY \
            --args "--expect-gen $gen $gargs"
        kills=$((kills + 1))
        crashes=$((crashes + 1))
        gen=$((gen + 1))
    else
        # boot+N: this QEMU's boot b (1-based) checks global boot gen+b-1
        run_qemu "qemu$((qemus + 1))" --end reboot --reboots "$reboots" \
            --args "--expect-gen boot+$((gen - 1)) $gargs"
        reboots_done=$((reboots_done + reboots))
        gen=$((gen + reboots + 1))
    fi
done
# The final check of everything the last boot acknowledged (and a short load of its own).
if ((failed == 0)); then
    run_qemu final --args "--expect-gen $gen --threads $threads --stress 1 soak"
fi
elapsed=$(( ($(now_ms) - t0) / 1000 ))
idle_last=$(quiet_usage)
kill "$sampler" 2>/dev/null || true; sampler=""

kill -TERM "$dpid" 2>/dev/null || true
wait "$dpid" && st=0 || st=$?
trap - EXIT; rm -rf "$sockdir"
if ((st != 0)); then failed=$((failed + 1)); info "the daemon exited with status $st after SIGTERM"; fi

read -r rss1 thr1 fds1 <<<"$idle_first"
read -r rss2 thr2 fds2 <<<"$idle_last"
growth=$((rss2 - rss1))
if ((growth > rss_limit)); then
    failed=$((failed + 1)); info "idle RSS grew by $growth KiB (limit $rss_limit KiB)"
fi
if ((thr1 != thr2 || fds1 != fds2)); then
    failed=$((failed + 1)); info "idle threads/fds changed: $thr1/$fds1 after boot 1, $thr2/$fds2 at the end"
fi
# The daemon's metrics as written at its exit, read through the schema (vmrun metrics).
metric() { awk -v k="$1" '$1 == k { print $2 }' "$out/metrics.flat"; }
"$VUP_RUNNER" metrics "$out/daemon-metrics.json" > "$out/metrics.flat" \
    || { failed=$((failed + 1)); info "no readable metrics from the daemon"; }
warnings=$(metric counters.log_warnings) errors=$(metric counters.log_errors)
if [[ ${warnings:-x} != 0 || ${errors:-x} != 0 ]]; then
    failed=$((failed + 1)); info "the daemon logged ${warnings:-?} warnings and ${errors:-?} errors (see daemon.log)"
fi
maps=$(metric counters.maps)
if ((maps != boots)); then
    failed=$((failed + 1)); info "$maps SHMEM_MAPs for $boots boots"
fi
writes=$(cat "$out"/*/guest-out.txt | sed -n 's/^VUP-SOAK .* writes=\([0-9]*\).*/\1/p' | awk '{ s += $1 } END { print s + 0 }')
mapped=$(cat "$out"/*/guest-out.txt | sed -n 's/^VUP-SOAK .* mapped=\([0-9]*\).*/\1/p' | awk '{ s += $1 } END { print s + 0 }')
peak=$(awk 'NR > 1 && $2 > m { m = $2 } END { print m + 0 }' "$out/samples.tsv")
maxthr=$(awk 'NR > 1 && $3 > m { m = $3 } END { print m + 0 }' "$out/samples.tsv")
{
    echo "soak: ${elapsed} s, $qemus QEMU processes (connections), $boots guest boots, $reboots_done reboots inside QEMU, $((crashes - kills)) kernel crashes, $kills QEMU SIGKILLs mid-load"
    echo "acknowledged writes: $writes ($mapped through DAX mappings), $threads writer threads + 1 truncator, ${load} s of load per boot"
    echo "daemon idle after boot 1: RSS $rss1 KiB, $thr1 threads, $fds1 fds; at the end: RSS $rss2 KiB, $thr2 threads, $fds2 fds (growth $growth KiB)"
    echo "host checks of the last boot of each QEMU: $hostchecks extents, compared with the image"
    echo "daemon peak while running: RSS $peak KiB, $maxthr threads; SHMEM_MAPs: $maps"
    echo "daemon: requests=$(metric counters.requests) fdatasyncs=$(metric counters.fdatasyncs) errors=$(metric counters.errors) order_violations=$(metric counters.order_violations) connections=$(metric counters.connections)"
} | tee "$out/summary.txt" >&2
echo "soak: $passed passed, $failed failed"
((failed == 0))
