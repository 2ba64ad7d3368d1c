#!/usr/bin/env bash
# Boots QEMU again and again on one image behind ONE long-running daemon, and checks that every
# boot finds the mapped region: the file system mounts and holds exactly what the previous boot
# wrote and fsync'ed, and the bytes are in the host file where the guest's FIEMAP says.
#
# This is the evidence for QEMU pitfall 3 (docs/qemu.md): the daemon sends SHMEM_MAP from another
# thread after SET_FEATURES, so there is a window in which a guest could see an unmapped region of
# zeros. Each boot is also a new vhost-user connection, so the loop exercises reconnects too.
#
# Usage: scripts/boot-loop.sh [--boots N] [--size SIZE] [--out DIR]
#   --boots N    number of boots (default 20)
#   --size SIZE  pmem size (default 1G)
#   --out DIR    where logs go (default .cache/boot-loop)
set -euo pipefail
VUP_PROG=boot-loop
source "$(dirname "$0")/lib.sh"
cd "$VUP_ROOT"

boots=20 size=1G out="$VUP_BUILD/boot-loop"
while (($#)); do
    case "$1" in
        --boots) [[ ${2:-} =~ ^[1-9][0-9]*$ ]] || die "--boots needs a positive number"; boots="$2"; shift ;;
        --size) [[ $# -ge 2 ]] || die "--size needs a value"; size="$2"; shift ;;
        --out) [[ $# -ge 2 ]] || die "--out needs a value"; out="$2"; shift ;;
        -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
    shift
done

rm -rf "$out"; mkdir -p "$out"
out="$(cd "$out" && pwd)"
build_vm_inputs "$out/initrd.cpio.gz"

start_daemon "$out" "$size"
trap 'kill -TERM $dpid 2>/dev/null || true; rm -rf "$sockdir"' EXIT
wait_daemon_socket "$out/daemon.log"

passed=0 failed=0
t0=$(now_ms)
for ((b = 1; b <= boots; b++)); do
    if ((b == 1)); then args="--mkfs e2e"; else args="--expect-gen $((b - 1)) persist"; fi
    if "$VUP_ROOT/scripts/run-vm.sh" --device vhost-user --socket "$sock" --image "$out/pmem0.img" \
        --size "$size" --initrd "$out/initrd.cpio.gz" --log-dir "$out/boot$b" --args "$args" \
        >"$out/boot$b.txt" 2>&1; then
        passed=$((passed + 1))
        info "boot $b/$boots: ok ($(tail -n 1 "$out/boot$b.txt"))"
    else
        failed=$((failed + 1))
        info "boot $b/$boots: FAILED"; tail -n 30 "$out/boot$b.txt" >&2
    fi
    kill -0 "$dpid" 2>/dev/null || { failed=$((failed + boots - b)); info "the daemon died"; break; }
done
elapsed=$(( ($(now_ms) - t0) / 1000 ))

kill -TERM "$dpid" 2>/dev/null || true
wait "$dpid" && st=0 || st=$?
trap - EXIT; rm -rf "$sockdir"
if ((st != 0)); then failed=$((failed + 1)); info "the daemon exited with status $st after SIGTERM"; fi

maps=$(grep -c 'into shared-memory region' "$out/daemon.log" || true)
conns=$(grep -c 'frontend connected' "$out/daemon.log" || true)
map_us=$(grep -o 'into shared-memory region 0 in [0-9]* us' "$out/daemon.log" | awk '{print $(NF-1)}' | sort -n |
    awk '{a[NR] = $1} END { if (NR) printf "min %d us, median %d us, max %d us", a[1], a[int((NR + 1) / 2)], a[NR] }')
info "$boots boots in ${elapsed} s on one daemon: $conns connections, $maps SHMEM_MAPs ($map_us after SET_FEATURES)"
if ((maps < passed)); then failed=$((failed + 1)); info "fewer maps ($maps) than good boots ($passed)"; fi
echo "boot-loop: $passed passed, $failed failed"
((failed == 0))
