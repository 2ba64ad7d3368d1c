#!/usr/bin/env bash
# The main job: boots a Linux guest on the vhost-user-pmem daemon with a fresh 1 GiB image, shows
# that the guest's ext4 really runs with DAX on the device, and measures what a guest flush costs.
# By default it then boots the same guest on QEMU's built-in virtio-pmem and prints both devices'
# flush latencies side by side. Fetches QEMU, the kernel and the guest tools on first use.
#
# Usage: scripts/demo.sh [--device vhost-user|builtin|both] [--iters N] [--threads LIST] [--size SIZE]
#   --device   which device(s) to boot (default both: this daemon, then QEMU's own for comparison)
#   --iters    timed flushes per operation and thread count (default 200)
#   --threads  comma-separated concurrency levels (default 1)
#   --size     pmem size (default 1G)
set -euo pipefail
VUP_PROG=demo
source "$(dirname "$0")/lib.sh"
cd "$VUP_ROOT"

devices="vhost-user builtin" iters=200 threads=1 size=1G
while (($#)); do
    case "$1" in
        --device) [[ $# -ge 2 ]] || die "--device needs a value"
            case "$2" in both) devices="vhost-user builtin" ;; vhost-user|builtin) devices="$2" ;;
                *) die "--device must be vhost-user, builtin or both, not '$2'" ;; esac; shift ;;
        --iters) [[ ${2:-} =~ ^[0-9]+$ ]] || die "--iters needs a number"; iters="$2"; shift ;;
        --threads) [[ ${2:-} =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--threads needs a list like 1,4,16"; threads="$2"; shift ;;
        --size) [[ $# -ge 2 ]] || die "--size needs a value"; size="$2"; shift ;;
        -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
    shift
done

out="$VUP_BUILD/demo"
rm -rf "$out"; mkdir -p "$out"
info "building the daemon and the guest, fetching QEMU and the kernel (cached after the first run)"
build_vm_inputs "$out/initrd.cpio.gz"
export VUP_BUILD

for dev in $devices; do
    info "booting a guest on $dev with a fresh $size image"
    t0=$(now_ms)
    if ! "$VUP_RUNNER" --device "$dev" --image "$out/$dev.img" --size "$size" \
        --initrd "$out/initrd.cpio.gz" --log-dir "$out/$dev" \
        --args "--mkfs --iters $iters --threads ${threads//,/:} e2e latency" >"$out/$dev.run.txt" 2>&1; then
        cat "$out/$dev.run.txt" >&2
        die "the $dev guest failed; logs in $out/$dev"
    fi
    echo "$(( $(now_ms) - t0 ))" >"$out/$dev.ms"
    echo
    echo "== $dev: guest booted, ran the suite and powered off in $(awk '{printf "%.1f", $1/1000}' "$out/$dev.ms") s"
    grep -E '^# +ok +(queue_dax|mount_dax_always|statx_attr_dax)|^# MAP_SHARED_VALIDATE\|MAP_SYNC|^# Cached:' \
        "$out/$dev/guest-out.txt" | sed 's/^# */   /' || true
    grep -E '^(ok|not ok) ' "$out/$dev/tap.txt" | grep -v flush_latency | sed 's/^/   /'
    tail -n 1 "$out/$dev.run.txt"
done

echo
echo "== guest flush latency (µs, $iters timed operations each, ext4 -o dax on a $size device)"
awk '
    FNR == 1 { dev = FILENAME; sub(/.*\/demo\//, "", dev); sub(/\/metrics.txt$/, "", dev); devs[++nd] = dev }
    /^VUP-METRIC/ && !/ status=n\/a/ {
        delete kv
        for (i = 2; i <= NF; i++) { split($i, p, "="); kv[p[1]] = p[2] }
        key = kv["op"] " x" kv["threads"]
        if (!(key in seen)) { seen[key] = 1; keys[++nk] = key }
        p50[dev, key] = kv["p50_us"]; p99[dev, key] = kv["p99_us"]; ops[dev, key] = kv["ops_per_s"]
    }
    END {
        printf "%-24s", "operation"
        for (d = 1; d <= nd; d++) printf " %22s", devs[d] " p50/p99"
        if (nd == 2) printf " %14s", "p50 ratio"
        printf "\n"
        for (k = 1; k <= nk; k++) {
            key = keys[k]; printf "%-24s", key
            for (d = 1; d <= nd; d++) {
                if ((devs[d], key) in p50) printf " %22s", sprintf("%.0f / %.0f", p50[devs[d], key], p99[devs[d], key])
                else printf " %22s", "-"
            }
            if (nd == 2 && (devs[1], key) in p50 && (devs[2], key) in p50 && p50[devs[2], key] > 0)
                printf " %14.2f", p50[devs[1], key] / p50[devs[2], key]
            printf "\n"
        }
    }' $(for d in $devices; do echo "$out/$d/metrics.txt"; done)
if [[ $devices == "vhost-user builtin" ]]; then
    echo "(ratio = vhost-user-pmem / QEMU built-in; below 1 is faster)"
fi
echo
if [[ -f $out/vhost-user/result.txt ]]; then
    echo "daemon (its metrics at exit; log in $out/vhost-user/daemon.log):"
    grep '^daemon: ' "$out/vhost-user/result.txt" | sed 's/^daemon: /   /' || true
fi
