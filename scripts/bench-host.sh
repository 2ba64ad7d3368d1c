#!/usr/bin/env bash
# Host benchmark of the daemon's flush modes (group, serial, parallel) against a raw fdatasync of
# the same file, with no VM: builds release binaries, runs crates/pmem-bench, and leaves
# results.json, summary.md (the tables, also printed), latency.svg and the daemons' logs in
# .cache/bench/ (git-ignored). The backing file lives in .cache/bench/work, so the file system
# measured is the clone's; give --dir to measure another.
#
# Usage: scripts/bench-host.sh [--quick] [--update-docs] [--out DIR] [--sweep-pages LIST]
#                              [--against REV] [--many] [PMEM-BENCH ARGS...]
#   --quick        a run of a few seconds, to check that everything works
#   --update-docs  copy latency.svg to docs/bench-host-latency.svg and pages-1/latency.svg to
#                  docs/bench-host-latency-1page.svg (with --many: daemons.svg to
#                  docs/bench-host-daemons.svg)
# A plain run is followed by the same run with 1 dirty page per flush at depths 1 and 16 (the
# daemon's fixed cost shows only when the fdatasync is cheap), into OUT/pages-1.
#   --out DIR      results there instead of .cache/bench (.cache/bench-many with --many)
#   --sweep-pages LIST  instead of one run: one run per number of pages dirtied per flush
#                  (e.g. 1,4,16,64,128,256), at depth 16 unless --depths is given, into
#                  OUT/pages-N, then a table of how group commit's gain depends on it
#                  (about 2 minutes for 6 counts with --rounds 2 --flushes 300)
#   --against REV  also run the daemon as built from git revision REV (e.g. main~3), in the
#                  same interleaved rounds (rows labelled "compare"): before/after a change
#                  on one noisy machine. REV is built once into .cache/bench-against/SHA.
#   --many         instead of the modes run: 1, 4 and 16 daemons at once against as many raw
#                  fdatasync loops at once (pmem-bench --daemons 1,4,16, unless --daemons is
#                  given; 256 MiB files with an 8 MiB working set unless --size-mib or
#                  --working-set-mib say otherwise: each daemon allocates all of its file);
#                  about 2.5 minutes
#   other arguments go to pmem-bench (see target/release/pmem-bench --help), e.g.
#   --depths 1,16 --pages 1 --rounds 3 --dir /mnt/other-fs
# After the build it waits up to a minute for the load average to fall to 1.5, and warns if it
# does not: the figures are then noisy, rerun when the machine is quiet.
set -euo pipefail
# shellcheck disable=SC2034  # read by lib.sh
VUP_PROG=bench-host
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"
cd "$VUP_ROOT"

update_docs=0 args=() out="" sweep="" many=0 against=""
while (($#)); do
    case "$1" in
        --update-docs) update_docs=1 ;;
        --out) [[ $# -ge 2 ]] || die "--out needs a directory"; out="$2"; shift ;;
        --many) many=1 ;;
        --sweep-pages) [[ ${2:-} =~ ^[1-9][0-9]*(,[1-9][0-9]*)*$ ]] || die "--sweep-pages needs a list like 1,16,64"; sweep="$2"; shift ;;
        --against) [[ $# -ge 2 ]] || die "--against needs a git revision"; against="$2"; shift ;;
        -h|--help) sed -n '2,32p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) args+=("$1") ;;
    esac
    shift
done
if [[ $many == 1 ]]; then
    [[ -z $sweep ]] || die "--many and --sweep-pages are different runs; give one"
    [[ -n $out ]] || out="$VUP_BUILD/bench-many"
    [[ " ${args[*]-} " == *" --daemons "* ]] || args=(--daemons "1,4,16" ${args[@]+"${args[@]}"})
    # Each daemon allocates all of its file at start: 16 of the default 4 GiB would take 64 GiB.
    [[ " ${args[*]-} " == *" --size-mib "* ]] || args=(--size-mib 256 "${args[@]}")
    [[ " ${args[*]-} " == *" --working-set-mib "* ]] || args=(--working-set-mib 8 "${args[@]}")
fi
[[ -n $out ]] || out="$VUP_BUILD/bench"

need_cmd cargo
info "building release binaries"
cargo build --release --quiet -p vhost-user-pmem -p pmem-bench
if [[ -n $against ]]; then
    sha=$(git rev-parse --verify --quiet "$against^{commit}") || die "--against: no commit $against"
    tree="$VUP_BUILD/bench-against/$sha"
    if [[ ! -x $tree/target/release/vhost-user-pmem ]]; then
        rm -rf "$tree" && mkdir -p "$tree"
        git archive "$sha" | tar -x -C "$tree"
        # Cargo.lock is not committed: today's lock keeps the dependencies the same where it can.
        [[ -f Cargo.lock ]] && cp Cargo.lock "$tree/"
        info "building the daemon of $against ($sha) in $tree"
        (cd "$tree" && cargo build --release --quiet -p vhost-user-pmem)
    fi
    args+=(--compare-daemon "$tree/target/release/vhost-user-pmem")
fi
# The build itself raises the load average; give it a minute to decay before judging the machine.
high_load() { awk -v l="$(cut -d' ' -f1 /proc/loadavg)" 'BEGIN { exit !(l > 1.5) }'; }
for _ in $(seq 12); do high_load || break; sleep 5; done
if high_load; then
    warn "load average is $(cut -d' ' -f1 /proc/loadavg) (> 1.5): other work will show in the figures; rerun when quiet"
fi
if [[ -n $sweep ]]; then
    [[ $update_docs == 0 ]] || die "--update-docs plots a single run; not with --sweep-pages"
    depth_args=(--depths 16)
    [[ " ${args[*]-} " == *" --depths "* ]] && depth_args=()
    for p in ${sweep//,/ }; do
        info "pages per flush: $p"
        target/release/pmem-bench --daemon target/release/vhost-user-pmem --out "$out/pages-$p" \
            --pages "$p" "${depth_args[@]+"${depth_args[@]}"}" ${args[@]+"${args[@]}"} >/dev/null
    done
    # From each run's summary.md: the raw fdatasync's p50, and flushes/s and fdatasyncs per
    # request of every mode at each depth.
    {
        echo "| pages per flush | raw fdatasync p50 us | depth | serial flushes/s | parallel flushes/s | group flushes/s | group / serial | group / parallel | group fdatasyncs per request |"
        echo "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        for p in ${sweep//,/ }; do
            awk -F'|' -v p="$p" '
                function t(s) { gsub(/^ +| +$/, "", s); return s }
                t($2) == "raw fdatasync" { raw = t($7) }
                t($2) ~ /^(group|serial|parallel)$/ && t($3) ~ /^[0-9]+$/ && NF > 13 {
                    d = t($3); if (!(d in seen)) { seen[d] = 1; ds[++nd] = d }
                    rate[t($2), d] = t($12); per[t($2), d] = t($13)
                }
                function r(a, b) { return (a != "" && b + 0 > 0) ? sprintf("%.2f", a / b) : "-" }
                function v(x) { return x == "" ? "-" : x }
                END {
                    for (i = 1; i <= nd; i++) {
                        d = ds[i]
                        printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", p, raw, d, v(rate["serial", d]), \
                            v(rate["parallel", d]), v(rate["group", d]), r(rate["group", d], rate["serial", d]), \
                            r(rate["group", d], rate["parallel", d]), v(per["group", d])
                    }
                }' "$out/pages-$p/summary.md"
        done
    } | tee "$out/sweep.md"
    info "results in $out/pages-*/ and $out/sweep.md"
    exit 0
fi
target/release/pmem-bench --daemon target/release/vhost-user-pmem --out "$out" ${args[@]+"${args[@]}"}
if [[ $many == 1 ]]; then
    if [[ $update_docs == 1 ]]; then
        cp "$out/daemons.svg" docs/bench-host-daemons.svg
        info "copied $out/daemons.svg to docs/bench-host-daemons.svg"
    fi
    info "results in $out (results.json, summary.md, daemons.svg)"
    exit 0
fi
# The daemon's fixed cost shows only when the fdatasync is cheap: the same run again with 1
# dirty page per flush, at depths 1 and 16, into OUT/pages-1 (unless the run above was that).
one_page=() skip="" pages_given=""
for a in ${args[@]+"${args[@]}"}; do
    if [[ -n $skip ]]; then
        [[ $skip == pages ]] && pages_given="$a"
        skip=""
        continue
    fi
    case "$a" in
        --pages) skip=pages ;;
        --depths) skip=depths ;;
        *) one_page+=("$a") ;;
    esac
done
if [[ $pages_given != 1 ]]; then
    info "the same with 1 dirty page per flush (depths 1 and 16), into $out/pages-1"
    target/release/pmem-bench --daemon target/release/vhost-user-pmem --out "$out/pages-1" \
        --pages 1 --depths 1,16 ${one_page[@]+"${one_page[@]}"}
fi
if [[ $update_docs == 1 ]]; then
    cp "$out/latency.svg" docs/bench-host-latency.svg
    info "copied $out/latency.svg to docs/bench-host-latency.svg"
    if [[ -f $out/pages-1/latency.svg && $pages_given != 1 ]]; then
        cp "$out/pages-1/latency.svg" docs/bench-host-latency-1page.svg
        info "copied $out/pages-1/latency.svg to docs/bench-host-latency-1page.svg"
    fi
fi
info "results in $out (results.json, summary.md, latency.svg; pages-1/ the same with 1 page)"
