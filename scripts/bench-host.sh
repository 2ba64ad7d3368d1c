#!/usr/bin/env bash
# Host benchmark of the daemon's flush modes (group, serial, parallel) against a raw fdatasync of
# the same file, with no VM: builds release binaries, runs crates/pmem-bench, and leaves
# results.json, summary.md (the tables, also printed), latency.svg and the daemons' logs in
# .cache/bench/ (git-ignored). The backing file lives in .cache/bench/work, so the file system
# measured is the clone's; give --dir to measure another.
#
# Usage: scripts/bench-host.sh [--quick] [--update-docs] [--out DIR] [PMEM-BENCH ARGS...]
#   --quick        a run of a few seconds, to check that everything works
#   --update-docs  copy latency.svg to docs/bench-host-latency.svg
#   --out DIR      results there instead of .cache/bench
#   other arguments go to pmem-bench (see target/release/pmem-bench --help), e.g.
#   --depths 1,16 --pages 1 --rounds 3 --dir /mnt/other-fs
# After the build it waits up to a minute for the load average to fall to 1.5, and warns if it
# does not: the figures are then noisy, rerun when the machine is quiet.
set -euo pipefail
VUP_PROG=bench-host
source "$(dirname "$0")/lib.sh"
cd "$VUP_ROOT"

update_docs=0 args=() out="$VUP_BUILD/bench"
while (($#)); do
    case "$1" in
        --update-docs) update_docs=1 ;;
        --out) [[ $# -ge 2 ]] || die "--out needs a directory"; out="$2"; shift ;;
        -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) args+=("$1") ;;
    esac
    shift
done

need_cmd cargo
info "building release binaries"
cargo build --release --quiet -p vhost-user-pmem -p pmem-bench
# The build itself raises the load average; give it a minute to decay before judging the machine.
high_load() { awk -v l="$(cut -d' ' -f1 /proc/loadavg)" 'BEGIN { exit !(l > 1.5) }'; }
for _ in $(seq 12); do high_load || break; sleep 5; done
if high_load; then
    warn "load average is $(cut -d' ' -f1 /proc/loadavg) (> 1.5): other work will show in the figures; rerun when quiet"
fi
target/release/pmem-bench --daemon target/release/vhost-user-pmem --out "$out" ${args[@]+"${args[@]}"}
if [[ $update_docs == 1 ]]; then
    cp "$out/latency.svg" docs/bench-host-latency.svg
    info "copied $out/latency.svg to docs/bench-host-latency.svg"
fi
info "results in $out (results.json, summary.md, latency.svg)"
