#!/usr/bin/env bash
# Guest benchmark (guest-test catalogue section F): boots the same guest once on the
# vhost-user-pmem daemon and once on QEMU's built-in virtio-pmem, each with a fresh image of
# the same size, runs flush_latency (F20: every flush kind at each concurrency) and
# fault_latency (F19: the 12-cell write-fault matrix), and prints the two devices side by
# side with ratios, then the host CPU per guest flush of each (daemon against QEMU's pool
# workers). Results go to OUT: rounds.tsv (one row per round, device and measurement),
# results.tsv (the same with each figure's median over the rounds), results.json (the rows
# plus the ratios), comparison.txt (the printed tables), comparison.md (the same in Markdown,
# plus each round's ratios), guest-bench.svg (a plot of the medians), and each round's vmrun
# logs (round*/*/guest-out.txt: the cover-letter blocks and log2 buckets; cpu.txt: the CPU).
# VUP_KERNEL_SUITE=sid benchmarks sid's kernel instead of 6.12 (scripts/fetch-kernel.sh).
# Usage: scripts/bench-guest.sh [options]
#   --samples N      timed ops per flush kind and concurrency, split over its threads
#                    (default 1000)
#   --threads LIST   concurrencies, comma-separated (default 1,4,16,64)
#   --suites LIST    latency, faultlat or both, comma-separated (default both)
#   --size SIZE      pmem size for both devices (default 1G)
#   --rounds N       boot both devices N times, alternating which goes first; the tables
#                    show each figure's median over the rounds (default 3)
#   --order ORDER    vhost-user,builtin (default) or builtin,vhost-user: which boots first
#                    in the first round
#   --out DIR        results directory (default .cache/bench-guest)
#   --timeout SEC    per boot (default 900)
#   --report-only    boot nothing: rebuild the tables and files from OUT's earlier run
# About 3-4 minutes per round under TCG on 2 cores (10-12 with the default 3 rounds). The
# figures are measurements, not pass/fail; the script fails only if a guest run fails (an I/O
# error, a lost store).
set -euo pipefail
# shellcheck disable=SC2034  # read by lib.sh
VUP_PROG=bench-guest
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"
cd "$VUP_ROOT"

samples=1000 threads=1,4,16,64 suites=latency,faultlat size=1G order=vhost-user,builtin rounds=3
out="$VUP_BUILD/bench-guest" timeout=900 report_only=0
while (($#)); do
    case "$1" in
        --samples) [[ ${2:-} =~ ^[1-9][0-9]*$ ]] || die "--samples needs a positive number"; samples="$2"; shift ;;
        --threads) [[ ${2:-} =~ ^[1-9][0-9]*(,[1-9][0-9]*)*$ ]] || die "--threads needs a list like 1,4,16,64"; threads="$2"; shift ;;
        --suites) [[ ${2:-} =~ ^(latency|faultlat)(,(latency|faultlat))?$ ]] || die "--suites takes latency, faultlat or latency,faultlat"; suites="$2"; shift ;;
        --size) [[ $# -ge 2 ]] || die "--size needs a value"; size="$2"; shift ;;
        --rounds) [[ ${2:-} =~ ^[1-9]$ ]] || die "--rounds needs a number from 1 to 9"; rounds="$2"; shift ;;
        --order) case "${2:-}" in vhost-user,builtin|builtin,vhost-user) order="$2" ;;
                     *) die "--order must be vhost-user,builtin or builtin,vhost-user" ;; esac; shift ;;
        --out) [[ $# -ge 2 ]] || die "--out needs a directory"; out="$2"; shift ;;
        --timeout) [[ ${2:-} =~ ^[1-9][0-9]*$ ]] || die "--timeout needs seconds"; timeout="$2"; shift ;;
        --report-only) report_only=1 ;;
        -h|--help) sed -n '2,28p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
    shift
done

out=$(realpath -m "$out")

if [[ $report_only == 0 ]]; then
    guest_bench_start "$out" "--samples $samples --threads $threads, suites $suites, $size image, $rounds round(s), first order $order"

    for ((r = 1; r <= rounds; r++)); do
        # Alternate which device boots first, so that a load that rises or falls during the
        # run does not always favour the same one.
        devs=${order//,/ }
        if ((r % 2 == 0)); then devs=$(echo "$devs" | awk '{ print $2, $1 }'); fi
        rdir="$out/round$r"
        mkdir -p "$rdir"
        for dev in $devs; do
            info "round $r/$rounds: booting a guest on $dev with a fresh $size image (load average $(cut -d' ' -f1 /proc/loadavg))"
            t0=$(now_ms)
            if ! "$VUP_RUNNER" --device "$dev" --image "$rdir/$dev.img" --size "$size" \
                --initrd "$out/initrd.cpio.gz" --log-dir "$rdir/$dev" --timeout "$timeout" \
                --args "--mkfs --samples $samples --threads ${threads//,/:} ${suites//,/ }" \
                >"$rdir/$dev.run.txt" 2>&1; then
                tail -n 30 "$rdir/$dev.run.txt" >&2
                die "the $dev guest failed; logs in $rdir/$dev"
            fi
            rm -f "$rdir/$dev.img"
            secs=$(( ($(now_ms) - t0) / 1000 ))
            echo "round $r, $dev: $secs s, load average $(cut -d' ' -f1 /proc/loadavg) after, $(tail -n 1 "$rdir/$dev.run.txt")" >>"$out/machine.txt"
            info "round $r/$rounds: $dev done in $secs s"
        done
    done
    echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$out/machine.txt"
fi
metrics=()
for rdir in "$out"/round*/; do
    for dev in vhost-user builtin; do
        [[ -s $rdir$dev/metrics.txt ]] || die "no $rdir$dev/metrics.txt: run without --report-only first"
        metrics+=("$rdir$dev/metrics.txt")
    done
done
((${#metrics[@]})) || die "no rounds in $out: run without --report-only first"

# One TSV row per round, device and measurement (rounds.tsv). A row's key is every field of
# its VUP-METRIC line that is not a figure (op, the fault cell's labels, threads), so new
# labels need no change here.
awk -v OFS='\t' '
    BEGIN {
        split("n min_us avg_us p50_us p99_us max_us ops_per_s status reason", f, " ")
        for (i in f) figure[f[i]] = 1
        print "round", "device", "key", "n", "min_us", "avg_us", "p50_us", "p99_us", "max_us", "ops_per_s", "status"
    }
    FNR == 1 {
        dev = FILENAME; sub(/\/metrics\.txt$/, "", dev); round = dev
        sub(/.*\//, "", dev); sub(/\/[^\/]*$/, "", round); sub(/.*round/, "", round)
    }
    /^VUP-METRIC / {
        delete kv; key = ""
        for (i = 2; i <= NF; i++) {
            eq = index($i, "="); k = substr($i, 1, eq - 1); v = substr($i, eq + 1); kv[k] = v
            if (!(k in figure)) key = key (key == "" ? "" : " ") k "=" v
        }
        status = ("status" in kv) ? kv["status"] ":" kv["reason"] : "ok"
        print round, dev, key, kv["n"], kv["min_us"], kv["avg_us"], kv["p50_us"], kv["p99_us"], kv["max_us"], kv["ops_per_s"], status
    }' "${metrics[@]}" >"$out/rounds.tsv"

# results.tsv: each figure's median over the rounds (the lower middle one for an even
# number), per device and measurement; n/a if any round said so.
awk -F'\t' -v OFS='\t' '
    NR == 1 { print "device", "key", "n", "min_us", "avg_us", "p50_us", "p99_us", "max_us", "ops_per_s", "status"; next }
    {
        id = $2 SUBSEP $3
        if (!(id in seen)) { seen[id] = 1; ids[++nid] = id }
        c = ++cnt[id]
        for (i = 4; i <= 10; i++) v[id, i, c] = $i
        if ($11 != "ok") st[id] = $11
    }
    function median(id, i,   n, a, j, k, t) {
        n = cnt[id]
        for (j = 1; j <= n; j++) a[j] = v[id, i, j]
        for (j = 2; j <= n; j++) for (k = j; k > 1 && a[k - 1] + 0 > a[k] + 0; k--) { t = a[k]; a[k] = a[k - 1]; a[k - 1] = t }
        return a[int((n + 1) / 2)]
    }
    END {
        for (x = 1; x <= nid; x++) {
            id = ids[x]; split(id, p, SUBSEP)
            line = p[1] OFS p[2]
            for (i = 4; i <= 10; i++) line = line OFS ((id in st) ? "" : median(id, i))
            print line, ((id in st) ? st[id] : "ok")
        }
    }' "$out/rounds.tsv" >"$out/results.tsv"

# The side-by-side tables, and results.json with the same rows and ratios
# (ratio = vhost-user-pmem / built-in: above 1 is more ops/s, below 1 is lower latency).
awk -F'\t' -v json="$out/results.json" -v machine="$out/machine.txt" -v dms="$(printf '%s\n' "$out"/round*/vhost-user/daemon-metrics.json)" -v rounds="$out/rounds.tsv" -v nrounds="${#metrics[@]}" '
    function ratio(a, b) { return (a != "" && b != "" && b + 0 > 0) ? sprintf("%.2f", a / b) : "-" }
    function fmt(v) { return v == "" ? "-" : sprintf("%.0f", v) }
    function jstr(s) { gsub(/\\/, "\\\\", s); gsub(/"/, "\\\"", s); return "\"" s "\"" }
    function jnum(s) { return s == "" ? "null" : s + 0 }
    NR == 1 { next }
    {
        dev = $1; key = $2
        if (!(key in seen)) { seen[key] = 1; keys[++nk] = key }
        for (i = 3; i <= 10; i++) val[dev, key, i] = $i
        rows[++nr] = $0
    }
    END {
        # flush_latency: op ... threads=N; fault_latency: op=fault_latency file= load= map= threads=1
        nrounds /= 2
        printf "== flush_latency (catalogue F20): ops/s and p50 / p99 in us%s\n", (nrounds > 1 ? ", medians of " nrounds " rounds" : "")
        printf "%-30s %26s %26s %8s %8s %8s\n", "op x threads", "vhost-user-pmem", "QEMU built-in", "ops/s", "p50", "p99"
        printf "%-30s %26s %26s %8s %8s %8s\n", "", "ops/s  p50 / p99", "ops/s  p50 / p99", "ratio", "ratio", "ratio"
        for (k = 1; k <= nk; k++) {
            key = keys[k]; if (key ~ /^op=fault_latency/) continue
            label = key; sub(/^op=/, "", label); sub(/ threads=/, " x", label)
            print_row(label, key)
        }
        printf "\n== fault_latency (catalogue F19): 512 write faults per cell, avg and p50 / p99 in us\n"
        printf "%-44s %22s %22s %8s %8s\n", "cell", "vhost-user-pmem", "QEMU built-in", "p50", "avg"
        printf "%-44s %22s %22s %8s %8s\n", "", "avg  p50 / p99", "avg  p50 / p99", "ratio", "ratio"
        for (k = 1; k <= nk; k++) {
            key = keys[k]; if (key !~ /^op=fault_latency/) continue
            label = key; sub(/^op=fault_latency /, "", label); sub(/ threads=1$/, "", label)
            gsub(/file=|load=|map=/, "", label)
            a = cellfig("vhost-user", key); b = cellfig("builtin", key)
            printf "%-44s %22s %22s %8s %8s\n", label, a, b, \
                ratio(val["vhost-user", key, 6], val["builtin", key, 6]), ratio(val["vhost-user", key, 5], val["builtin", key, 5])
        }
        printf "(ratio = vhost-user-pmem / built-in: ops/s above 1 and latency below 1 favour vhost-user-pmem)\n"

        # The issue targets that these runs can judge.
        t16 = "op=pwrite_fsync threads=16"
        r = ratio(val["vhost-user", t16, 9], val["builtin", t16, 9])
        printf "\n== targets\n"
        # Per round too: a median of ratios that disagree says little.
        while ((getline line < rounds) > 0) {
            split(line, c, "\t"); if (c[1] == "round") continue
            if (!(c[1] in rseen)) { rseen[c[1]] = 1; rs[++nrs] = c[1] }
            rv[c[1], c[2], c[3], "ops"] = c[10]; rv[c[1], c[2], c[3], "p50"] = c[7]
        }
        printf "16 threads, 4 KiB pwrite + fsync: ops/s >= 2 x built-in: %s x%s -> %s\n", r, per_round(t16, "ops"), (r != "-" && r + 0 >= 2) ? "met" : "NOT met"
        for (k = 1; k <= nk; k++) {
            key = keys[k]; if (key !~ / threads=1$/ || key ~ /^op=fault_latency/) continue
            r = ratio(val["vhost-user", key, 6], val["builtin", key, 6]); if (r == "-") continue
            label = key; sub(/^op=/, "", label); sub(/ threads=1$/, "", label)
            printf "1 thread, %s: p50 <= 1.10 x built-in: %s x%s -> %s\n", label, r, per_round(key, "p50"), (r + 0 <= 1.10) ? "met" : "NOT met"
        }

        printf "{\n  \"machine\": [" > json
        n = 0
        while ((getline line < machine) > 0) printf "%s%s", (n++ ? ", " : ""), jstr(line) > json
        printf "],\n  \"rows\": [\n" > json
        split("n min_us avg_us p50_us p99_us max_us ops_per_s status", names, " ")
        for (i = 1; i <= nr; i++) {
            split(rows[i], c, "\t")
            printf "    {\"device\": %s, \"key\": %s", jstr(c[1]), jstr(c[2]) > json
            for (j = 1; j <= 7; j++) printf ", \"%s\": %s", names[j], jnum(c[j + 2]) > json
            printf ", \"status\": %s}%s\n", jstr(c[10]), (i < nr ? "," : "") > json
        }
        printf "  ],\n  \"ratios_vhost_user_over_builtin\": [\n" > json
        m = 0
        for (k = 1; k <= nk; k++) {
            key = keys[k]
            printf "%s    {\"key\": %s, \"ops_per_s\": %s, \"avg\": %s, \"p50\": %s, \"p99\": %s}", (m++ ? ",\n" : ""), jstr(key), \
                jratio(9, key), jratio(5, key), jratio(6, key), jratio(7, key) > json
        }
        # The metrics file the daemon wrote at its exit, one per round.
        printf "\n  ],\n  \"daemon_metrics_per_round\": [" > json
        nf = split(dms, files, "\n"); m = 0
        for (f = 1; f <= nf; f++) {
            if (files[f] == "") continue
            d = ""
            while ((getline line < files[f]) > 0) d = d line
            printf "%s\n    %s", (m++ ? "," : ""), (d == "" ? "null" : d) > json
        }
        printf "\n  ]\n}\n" > json
    }
    function per_round(key, what,   i, out) {
        if (nrs < 2) return ""
        out = " (rounds:"
        for (i = 1; i <= nrs; i++) out = out " " ratio(rv[rs[i], "vhost-user", key, what], rv[rs[i], "builtin", key, what])
        return out ")"
    }
    function jratio(i, key,   r) { r = ratio(val["vhost-user", key, i], val["builtin", key, i]); return r == "-" ? "null" : r }
    function cellfig(dev, key) {
        if (!((dev, key, 3) in val)) return "-"
        if (val[dev, key, 10] != "ok") return "n/a (" substr(val[dev, key, 10], 5) ")"
        return sprintf("%s  %s / %s", fmt(val[dev, key, 5]), fmt(val[dev, key, 6]), fmt(val[dev, key, 7]))
    }
    function print_row(label, key,   a, b) {
        a = flushfig("vhost-user", key); b = flushfig("builtin", key)
        printf "%-30s %26s %26s %8s %8s %8s\n", label, a, b, \
            ratio(val["vhost-user", key, 9], val["builtin", key, 9]), \
            ratio(val["vhost-user", key, 6], val["builtin", key, 6]), \
            ratio(val["vhost-user", key, 7], val["builtin", key, 7])
    }
    function flushfig(dev, key) {
        if (!((dev, key, 3) in val)) return "-"
        if (val[dev, key, 10] != "ok") return "n/a"
        return sprintf("%s  %s / %s", fmt(val[dev, key, 9]), fmt(val[dev, key, 6]), fmt(val[dev, key, 7]))
    }' "$out/results.tsv" | tee "$out/comparison.txt"

# The same tables in Markdown, for docs/benchmarks.md.
awk -F'\t' '
    function ratio(a, b) { return (a != "" && b != "" && b + 0 > 0) ? sprintf("%.2f", a / b) : "-" }
    function n0(v) { return v == "" ? "-" : sprintf("%.0f", v) }
    NR == 1 { next }
    {
        d = ($1 == "vhost-user") ? 1 : 2; key = $2
        if (!(key in seen)) { seen[key] = 1; keys[++nk] = key }
        ok[key, d] = ($10 == "ok"); na[key, d] = $10
        avg[key, d] = $5; p50[key, d] = $6; p99[key, d] = $7; ops[key, d] = $9
    }
    function fig(key, d, what) {
        if (!((key, d) in ok)) return "-"
        if (!ok[key, d]) return "n/a"
        if (what == "flush") return n0(ops[key, d]) " | " n0(p50[key, d]) " / " n0(p99[key, d])
        return n0(avg[key, d]) " | " n0(p50[key, d]) " / " n0(p99[key, d])
    }
    END {
        print "| op | threads | vhost-user-pmem ops/s | p50 / p99 us | QEMU built-in ops/s | p50 / p99 us | ops/s ratio | p50 ratio | p99 ratio |"
        print "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
        for (k = 1; k <= nk; k++) {
            key = keys[k]; if (key ~ /^op=fault_latency/) continue
            op = key; sub(/^op=/, "", op); th = op; sub(/ threads=.*/, "", op); sub(/.* threads=/, "", th)
            if (na[key, 1] != "ok" && na[key, 2] != "ok") {
                printf "| %s | %s | n/a | | n/a | | | | |\n", op, th; continue
            }
            printf "| %s | %s | %s | %s | %s | %s | %s |\n", op, th, fig(key, 1, "flush"), fig(key, 2, "flush"), \
                ratio(ops[key, 1], ops[key, 2]), ratio(p50[key, 1], p50[key, 2]), ratio(p99[key, 1], p99[key, 2])
        }
        print ""
        print "| file | load | mapping | vhost-user-pmem avg | p50 / p99 us | QEMU built-in avg | p50 / p99 us | p50 ratio | avg ratio |"
        print "|---|---|---|---:|---:|---:|---:|---:|---:|"
        for (k = 1; k <= nk; k++) {
            key = keys[k]; if (key !~ /^op=fault_latency/) continue
            split(key, f, " "); sub(/.*=/, "", f[2]); sub(/.*=/, "", f[3]); sub(/.*=/, "", f[4])
            if (na[key, 1] != "ok" && na[key, 2] != "ok") {
                printf "| %s | %s | %s | n/a (%s) | | n/a (%s) | | | |\n", f[2], f[3], f[4], substr(na[key, 1], 5), substr(na[key, 2], 5); continue
            }
            printf "| %s | %s | %s | %s | %s | %s | %s |\n", f[2], f[3], f[4], fig(key, 1, "fault"), fig(key, 2, "fault"), \
                ratio(p50[key, 1], p50[key, 2]), ratio(avg[key, 1], avg[key, 2])
        }
    }' "$out/results.tsv" >"$out/comparison.md"
# With several rounds: each round's ratios, to show how far single runs scatter.
awk -F'\t' '
    function ratio(a, b) { return (a != "" && b + 0 > 0) ? sprintf("%.2f", a / b) : "-" }
    NR == 1 || $3 ~ /^op=fault_latency/ || $11 != "ok" { next }
    {
        if (!($1 in rseen)) { rseen[$1] = 1; rs[++nr] = $1 }
        if (!($3 in kseen)) { kseen[$3] = 1; ks[++nk] = $3 }
        ops[$1, $2, $3] = $10; p50[$1, $2, $3] = $7
    }
    END {
        if (nr < 2) exit
        printf "\n| op | threads |"; for (r = 1; r <= nr; r++) printf " round %s ops/s ratio | p50 ratio |", rs[r]
        printf "\n|---|---:|"; for (r = 1; r <= nr; r++) printf "---:|---:|"
        printf "\n"
        for (k = 1; k <= nk; k++) {
            op = ks[k]; sub(/^op=/, "", op); th = op; sub(/ threads=.*/, "", op); sub(/.* threads=/, "", th)
            printf "| %s | %s |", op, th
            for (r = 1; r <= nr; r++)
                printf " %s | %s |", ratio(ops[rs[r], "vhost-user", ks[k]], ops[rs[r], "builtin", ks[k]]), ratio(p50[rs[r], "vhost-user", ks[k]], p50[rs[r], "builtin", ks[k]])
            printf "\n"
        }
    }' "$out/rounds.tsv" >>"$out/comparison.md"

# The plot: ops/s per flush kind and concurrency (top row), and the p50 of each fault
# cell on a log scale (bottom row), both devices side by side.
awk -F'\t' -v title="Guest flush throughput and fault latency: vhost-user-pmem vs QEMU built-in (TCG)" '
    function esc(s) { gsub(/&/, "\\&amp;", s); gsub(/</, "\\&lt;", s); return s }
    function bar(x, y, w, h, color, label) {
        printf "<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" fill=\"%s\"/>\n", x, y, w, h, color
        printf "<text x=\"%.1f\" y=\"%.1f\" font-size=\"9\" text-anchor=\"middle\">%s</text>\n", x + w / 2, y - 3, label
    }
    NR == 1 { next }
    $10 != "ok" { next }
    {
        dev = ($1 == "vhost-user") ? 1 : 2; key = $2
        if (key ~ /^op=fault_latency/) {
            cell = key; sub(/^op=fault_latency /, "", cell); sub(/ threads=1$/, "", cell); gsub(/file=|load=|map=/, "", cell)
            if (!(cell in fseen)) { fseen[cell] = 1; cells[++ncell] = cell }
            fp50[cell, dev] = $6
        } else {
            op = key; sub(/^op=/, "", op); th = op; sub(/ threads=.*/, "", op); sub(/.* threads=/, "", th)
            if (!(op in oseen)) { oseen[op] = 1; ops[++nop] = op }
            if (!((op, th) in tseen)) { tseen[op, th] = 1; ths[op, ++nth[op]] = th }
            ops_s[op, th, dev] = $9; if ($9 + 0 > omax[op]) omax[op] = $9 + 0
        }
    }
    END {
        color[1] = "#1f77b4"; color[2] = "#999999"
        pw = 300; ph = 220; W = pw * (nop > 0 ? nop : 1); fh = 300
        H = 70 + ph + 40 + fh + 40
        if (W < 60 + 62 * ncell) W = 60 + 62 * ncell
        printf "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" height=\"%d\" font-family=\"sans-serif\" font-size=\"11\">\n", W, H
        printf "<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n"
        printf "<text x=\"%d\" y=\"20\" font-size=\"14\" font-weight=\"bold\" text-anchor=\"middle\">%s</text>\n", W / 2, esc(title)
        printf "<rect x=\"%d\" y=\"32\" width=\"12\" height=\"12\" fill=\"%s\"/><text x=\"%d\" y=\"42\">vhost-user-pmem</text>\n", W / 2 - 150, color[1], W / 2 - 134
        printf "<rect x=\"%d\" y=\"32\" width=\"12\" height=\"12\" fill=\"%s\"/><text x=\"%d\" y=\"42\">QEMU built-in virtio-pmem</text>\n", W / 2 + 10, color[2], W / 2 + 26
        top = 70
        for (o = 1; o <= nop; o++) {
            op = ops[o]; x0 = (o - 1) * pw + 40; base = top + ph - 30; inner = ph - 60
            printf "<text x=\"%d\" y=\"%d\" font-weight=\"bold\" text-anchor=\"middle\">%s: ops/s by threads</text>\n", x0 + (pw - 50) / 2, top, op
            printf "<line x1=\"%d\" y1=\"%d\" x2=\"%d\" y2=\"%d\" stroke=\"black\"/>\n", x0, base, x0 + pw - 50, base
            gw = (pw - 50) / nth[op]
            for (t = 1; t <= nth[op]; t++) {
                th = ths[op, t]; gx = x0 + (t - 1) * gw
                for (d = 1; d <= 2; d++) {
                    if (!((op, th, d) in ops_s)) continue
                    h = (omax[op] > 0) ? inner * ops_s[op, th, d] / omax[op] : 0
                    bar(gx + 6 + (d - 1) * (gw - 12) / 2, base - h, (gw - 12) / 2 - 2, h, color[d], sprintf("%.0f", ops_s[op, th, d]))
                }
                printf "<text x=\"%.1f\" y=\"%d\" text-anchor=\"middle\">%s</text>\n", gx + gw / 2, base + 14, th
            }
        }
        # Fault cells: p50 on a log axis from 10 us to 100 ms.
        ftop = top + ph + 40; fbase = ftop + fh - 20; finner = fh - 50; lo = 1; hi = 5
        printf "<text x=\"%d\" y=\"%d\" font-weight=\"bold\" text-anchor=\"middle\">write fault p50 per cell (us, log scale; MAP_SYNC cells are n/a on virtio-pmem)</text>\n", W / 2, ftop
        for (e = lo; e <= hi; e++) {
            y = fbase - finner * (e - lo) / (hi - lo)
            printf "<line x1=\"50\" y1=\"%.1f\" x2=\"%d\" y2=\"%.1f\" stroke=\"#ddd\"/><text x=\"46\" y=\"%.1f\" text-anchor=\"end\">%d</text>\n", y, W - 10, y, y + 4, 10 ^ e
        }
        cw = (W - 70) / (ncell > 0 ? ncell : 1)
        for (c = 1; c <= ncell; c++) {
            cell = cells[c]; gx = 55 + (c - 1) * cw
            for (d = 1; d <= 2; d++) {
                if (!((cell, d) in fp50)) continue
                v = fp50[cell, d] + 0; if (v < 10) v = 10
                h = finner * (log(v) / log(10) - lo) / (hi - lo); if (h > finner) h = finner
                bar(gx + 4 + (d - 1) * (cw - 8) / 2, fbase - h, (cw - 8) / 2 - 2, h, color[d], sprintf("%.0f", fp50[cell, d]))
            }
            n = split(cell, part, " ")
            for (i = 1; i <= n; i++) printf "<text x=\"%.1f\" y=\"%d\" font-size=\"9\" text-anchor=\"middle\">%s</text>\n", gx + cw / 2, fbase + 12 * i, part[i]
        }
        printf "</svg>\n"
    }' "$out/results.tsv" >"$out/guest-bench.svg"

echo | tee -a "$out/comparison.txt"
for rt in "$out"/round*/vhost-user/result.txt; do
    [[ -s $rt ]] || continue
    # requests, fdatasyncs and coalesced as the daemon counted them over the whole boot
    # (vmrun's summary of the daemon's metrics at exit).
    counters=$(sed -n 's/^daemon: //p' "$rt")
    r=${rt%/vhost-user/*}; r=${r##*/}
    echo "daemon counters over the whole vhost-user boot of $r: ${counters:-not found}" | tee -a "$out/comparison.txt"
done
# Host CPU per guest flush (vmrun's LOGDIR/cpu.txt: schedstat per process and thread name over
# the whole boot, docs/benchmarks.md "Host CPU per guest flush"). The flushes are the device
# requests the daemon answered in the vhost-user boot; the built-in device's boot of the same
# round ran the same guest workload, so its figures are divided by that count too.
awk -v nrounds="$rounds" '
    function med(list,   n, a, j, k, t) {
        n = split(list, a, " ")
        for (j = 2; j <= n; j++) for (k = j; k > 1 && a[k - 1] + 0 > a[k] + 0; k--) { t = a[k]; a[k] = a[k - 1]; a[k - 1] = t }
        return n ? a[int((n + 1) / 2)] : ""
    }
    function per(us, n) { return (us != "" && n + 0 > 0) ? sprintf("%.1f", us / n) : "-" }
    FNR == 1 {
        f = FILENAME; dev = f; sub(/\/[^\/]*$/, "", dev); round = dev
        sub(/.*\//, "", dev); sub(/\/[^\/]*$/, "", round); sub(/.*round/, "", round)
        if (!(round in rseen)) { rseen[round] = 1; rs[++nr] = round }
    }
    /^daemon: / && FILENAME ~ /result\.txt$/ {
        for (i = 2; i <= NF; i++) if ($i ~ /^requests=/) { sub(/requests=/, "", $i); flushes[round] = $i }
    }
    /^VUP-CPU / {
        delete kv
        for (i = 2; i <= NF; i++) { eq = index($i, "="); kv[substr($i, 1, eq - 1)] = substr($i, eq + 1) }
        cpu[round, dev, kv["proc"], kv["comm"]] = kv["cpu_us"]
        if (kv["proc"] == "qemu" && kv["comm"] == "worker") workers[round, dev] = kv["threads"]
        if (kv["proc"] == "daemon" && kv["comm"] != "*") {
            if (!(kv["comm"] in dseen)) { dseen[kv["comm"]] = 1; dcomm[++nd] = kv["comm"] }
        }
    }
    END {
        printf "== host CPU per guest flush, us (whole boot; flushes = requests the daemon answered in the round'"'"'s vhost-user boot)\n"
        printf "%-6s %-11s %8s %12s %14s %10s %11s\n", "round", "device", "flushes", "daemon", "QEMU workers", "QEMU main", "QEMU total"
        for (x = 1; x <= nr; x++) {
            r = rs[x]; n = flushes[r]
            for (d = 1; d <= 2; d++) {
                dev = (d == 1) ? "vhost-user" : "builtin"
                if (!((r, dev, "qemu", "*") in cpu)) continue
                dm = (dev == "vhost-user") ? per(cpu[r, dev, "daemon", "*"], n) : "-"
                wk = ((r, dev, "qemu", "worker") in cpu) ? per(cpu[r, dev, "qemu", "worker"], n) " (" workers[r, dev] ")" : "0"
                mn = per(cpu[r, dev, "qemu", "main"], n); tt = per(cpu[r, dev, "qemu", "*"], n)
                printf "%-6s %-11s %8s %12s %14s %10s %11s\n", r, dev, n, dm, wk, mn, tt
                if (dm != "-") l_dm = l_dm " " dm
                if (dev == "builtin" && wk != "0") { sub(/ .*/, "", wk); l_wk = l_wk " " wk }
                l_main[dev] = l_main[dev] " " mn; l_tot[dev] = l_tot[dev] " " tt
            }
        }
        # Where the daemon spends it: its flush thread runs the fdatasync (what a pool worker does
        # for the built-in device), the vring thread pops chains and signals completions.
        for (x = 1; x <= nr; x++) {
            r = rs[x]; line = ""
            for (k = 1; k <= nd; k++)
                if ((r, "vhost-user", "daemon", dcomm[k]) in cpu)
                    line = line sprintf(" %s %s,", dcomm[k], per(cpu[r, "vhost-user", "daemon", dcomm[k]], flushes[r]))
            if (line != "") { sub(/,$/, "", line); printf "round %s daemon threads per flush, us:%s\n", r, line }
        }
        a = med(l_dm); b = med(l_wk)
        printf "device cost per flush (median of %d round(s)): vhost-user-pmem daemon %s us, QEMU built-in pool workers %s us%s\n", \
            nr, (a == "" ? "-" : a), (b == "" ? "-" : b), (a != "" && b + 0 > 0 ? sprintf(" (%.2f x)", a / b) : "")
        printf "QEMU main loop per flush: %s us (vhost-user), %s us (built-in); QEMU in all: %s us, %s us (TCG: the guest itself)\n", \
            med(l_main["vhost-user"]), med(l_main["builtin"]), med(l_tot["vhost-user"]), med(l_tot["builtin"])
    }' "$out"/round*/vhost-user/result.txt "$out"/round*/*/cpu.txt 2>/dev/null | tee -a "$out/comparison.txt" \
    || warn "no cpu.txt in $out/round*/: this run predates vmrun's CPU sampling"

echo
cat "$out/machine.txt"
info "results in $out (comparison.txt and .md, results.tsv, rounds.tsv, results.json, guest-bench.svg; guest output in round*/*/guest-out.txt)"
