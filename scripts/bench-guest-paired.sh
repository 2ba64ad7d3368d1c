#!/usr/bin/env bash
# Paired guest benchmark: one guest with both devices, the vhost-user-pmem daemon's and QEMU's
# built-in virtio-pmem (vmrun --pair-builtin), timing the same flush kinds on each in
# alternating blocks (the guest suite `paired`: dev_fdatasync, pwrite_fdatasync, mmap_msync at
# 1 thread). A block's ratio compares two measurements made seconds apart in the same boot,
# so the boot-to-boot spread of scripts/bench-guest.sh (which boots each device on its own)
# drops out. Prints per flush kind: each device's p50 over all its ops, vhost-user / built-in
# pooled and as the median of the blocks' ratios, the blocks' geometric mean ratio with its 95 %
# confidence interval, in how many blocks vhost-user was faster and a two-sided sign test of
# that count; then the host CPU of each device over the boot.
# Results go to OUT: blocks.tsv (one row per boot, block, flush kind and device),
# comparison.txt and .md, paired.svg (every block's ratio), and each boot's vmrun logs.
# Usage: scripts/bench-guest-paired.sh [options]
#   --iters N        timed ops per block, device and flush kind (default 200)
#   --blocks N       blocks per boot (default 20)
#   --boots N        guests to boot one after the other (default 2)
#   --size SIZE      size of each of the two devices (default 1G)
#   --out DIR        results directory (default .cache/bench-guest-paired)
#   --timeout SEC    per boot (default 900)
#   --report-only    boot nothing: rebuild the tables and files from OUT's earlier run
# About 4 minutes per boot under TCG on 2 cores with the defaults. The figures are
# measurements, not pass/fail; the script fails only if a guest run fails.
set -euo pipefail
# shellcheck disable=SC2034  # read by lib.sh
VUP_PROG=bench-guest-paired
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"
cd "$VUP_ROOT"

iters=200 blocks=20 boots=2 size=1G out="$VUP_BUILD/bench-guest-paired" timeout=900 report_only=0
while (($#)); do
    case "$1" in
        --iters) [[ ${2:-} =~ ^[1-9][0-9]*$ ]] || die "--iters needs a positive number"; iters="$2"; shift ;;
        --blocks) [[ ${2:-} =~ ^[1-9][0-9]*$ ]] && ((${2} <= 1000)) || die "--blocks needs a number from 1 to 1000"; blocks="$2"; shift ;;
        --boots) [[ ${2:-} =~ ^[1-9]$ ]] || die "--boots needs a number from 1 to 9"; boots="$2"; shift ;;
        --size) [[ $# -ge 2 ]] || die "--size needs a value"; size="$2"; shift ;;
        --out) [[ $# -ge 2 ]] || die "--out needs a directory"; out="$2"; shift ;;
        --timeout) [[ ${2:-} =~ ^[1-9][0-9]*$ ]] || die "--timeout needs seconds"; timeout="$2"; shift ;;
        --report-only) report_only=1 ;;
        -h|--help) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
    shift
done
out=$(realpath -m "$out")

if [[ $report_only == 0 ]]; then
    guest_bench_start "$out" "--iters $iters --blocks $blocks, $boots boot(s), two $size devices"
    for ((b = 1; b <= boots; b++)); do
        info "boot $b/$boots: both devices, fresh $size images (load average $(cut -d' ' -f1 /proc/loadavg))"
        t0=$(now_ms)
        if ! "$VUP_RUNNER" --device vhost-user --pair-builtin --size "$size" \
            --initrd "$out/initrd.cpio.gz" --log-dir "$out/boot$b" --timeout "$timeout" \
            --args "--mkfs --iters $iters --blocks $blocks paired" >"$out/boot$b.run.txt" 2>&1; then
            tail -n 30 "$out/boot$b.run.txt" >&2
            die "the paired guest failed; logs in $out/boot$b"
        fi
        rm -f "$out/boot$b/pmem0.img" "$out/boot$b/pair.img"
        secs=$(( ($(now_ms) - t0) / 1000 ))
        echo "boot $b: $secs s, load average $(cut -d' ' -f1 /proc/loadavg) after, $(tail -n 1 "$out/boot$b.run.txt")" >>"$out/machine.txt"
        info "boot $b/$boots done in $secs s"
    done
    echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$out/machine.txt"
fi

shopt -s nullglob
metrics=("$out"/boot*/metrics.txt)
((${#metrics[@]})) || die "no boot*/metrics.txt in $out: run without --report-only first"

# One row per boot, block, flush kind and device: the p50 of that block's ops.
awk '
    FNR == 1 { boot = FILENAME; sub(/\/metrics\.txt$/, "", boot); sub(/.*boot/, "", boot) }
    /^VUP-METRIC / {
        delete kv
        for (i = 2; i <= NF; i++) { eq = index($i, "="); kv[substr($i, 1, eq - 1)] = substr($i, eq + 1) }
        if (!("device" in kv) || !("block" in kv)) next
        printf "%s\t%s\t%s\t%s\t%s\t%s\n", boot, kv["block"], kv["op"], kv["device"], kv["n"], kv["p50_us"]
    }' "${metrics[@]}" >"$out/blocks.tsv"
[[ -s $out/blocks.tsv ]] || die "no paired VUP-METRIC lines in $out/boot*/metrics.txt"

awk -F'\t' -v md="$out/comparison.md" -v svg="$out/paired.svg" '
    function med(list,   n, a, j, k, t) {
        n = split(list, a, " ")
        for (j = 2; j <= n; j++) for (k = j; k > 1 && a[k - 1] + 0 > a[k] + 0; k--) { t = a[k]; a[k] = a[k - 1]; a[k - 1] = t }
        if (n == 0) return ""
        return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
    }
    # Two-sided sign test: the chance of a split at least this uneven if neither device
    # were faster (each block a fair coin).
    function sign_p(k, n,   i, lc, p, tail) {
        if (n == 0) return 1
        if (k > n - k) k = n - k
        lc = 0; tail = 0
        for (i = 0; i <= k; i++) {
            if (i > 0) lc += log(n - i + 1) - log(i)
            tail += exp(lc - n * log(2))
        }
        p = 2 * tail
        return p > 1 ? 1 : p
    }
    {
        boot = $1; block = $2; op = $3; dev = $4; p50 = $6
        if (!(op in oseen)) { oseen[op] = 1; ops[++nop] = op }
        if (!(boot in bseen)) { bseen[boot] = 1; boots[++nb] = boot }
        if (block == "all") { pooled[op, dev, boot] = p50; next }
        v[op, boot, block, dev] = p50
        if (!((op, boot, block) in kseen)) { kseen[op, boot, block] = 1; keys[op, ++nk[op]] = boot SUBSEP block }
    }
    END {
        printf "== paired guest flush p50, vhost-user against built-in in one guest (us)\n"
        printf "%-17s %6s %10s %9s %-20s %7s %21s %12s %7s\n", "flush kind", "blocks", "vhost-user", "built-in", "pooled, per boot", "median", "geo mean (95% CI)", "vu faster", "sign p"
        printf "| flush kind | blocks | vhost-user p50 us | built-in p50 us | ratio, pooled per boot | ratio, median of blocks (range) | ratio, geometric mean of blocks (95 %% CI) | vhost-user faster in | sign test p |\n|---|---:|---:|---:|---|---|---|---:|---:|\n" > md
        for (o = 1; o <= nop; o++) {
            op = ops[o]; rl = ""; faster = 0; n = 0; lo = 1e9; hi = 0; vl = ""; bl = ""; pr = ""; sl = 0; sl2 = 0
            for (x = 1; x <= nk[op]; x++) {
                split(keys[op, x], kb, SUBSEP)
                a = v[op, kb[1], kb[2], "vhost-user"]; b = v[op, kb[1], kb[2], "builtin"]
                if (a == "" || b + 0 <= 0) continue
                r = a / b; n++; rl = rl " " r; if (r < 1) faster++
                sl += log(r); sl2 += log(r) ^ 2
                if (r < lo) lo = r; if (r > hi) hi = r
                ratio[op, n] = r
            }
            nr[op] = n
            for (y = 1; y <= nb; y++) {
                a = pooled[op, "vhost-user", boots[y]]; b = pooled[op, "builtin", boots[y]]
                if (a == "" || b + 0 <= 0) continue
                vl = vl " " a; bl = bl " " b; pr = pr (pr == "" ? "" : "/") sprintf("%.3f", a / b)
            }
            m = med(rl); p = sign_p(faster, n)
            # The log ratios of the blocks: mean and standard error, a normal interval (n >= 30 here).
            gm = exp(sl / n); se = (n > 1) ? sqrt((sl2 - sl * sl / n) / (n - 1) / n) : 0
            ci = sprintf("%.3f (%.3f-%.3f)", gm, exp(sl / n - 1.96 * se), exp(sl / n + 1.96 * se))
            gmv[op] = gm; cilo[op] = exp(sl / n - 1.96 * se); cihi[op] = exp(sl / n + 1.96 * se)
            printf "%-17s %6d %10.1f %9.1f %-20s %7.3f %21s %12s %7.3f\n", op, n, med(vl), med(bl), pr, m, ci, faster " of " n, p
            printf "| %s | %d | %.1f | %.1f | %s | %.3f (%.3f-%.3f) | %s | %d of %d | %.3f |\n", op, n, med(vl), med(bl), pr, m, lo, hi, ci, faster, n, p > md
        }
        printf "(vhost-user and built-in: the median over the boots of each device'"'"'s p50 over all its ops in the boot; ratio = vhost-user / built-in, below 1: vhost-user faster; sign p: two-sided, blocks as fair coins)\n"

        # Every block'"'"'s ratio, one row of dots per flush kind, on a log scale.
        W = 800; rowh = 90; top = 40; H = top + nop * rowh + 30; L = 200; R = W - 20
        lmin = log(0.5); lmax = log(2)
        printf "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" height=\"%d\" font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n", W, H > svg
        printf "<text x=\"%d\" y=\"20\" font-weight=\"bold\" text-anchor=\"middle\">p50 vhost-user / built-in per block, one guest with both devices (log scale; left of 1: vhost-user faster; red: geometric mean and its 95%% CI)</text>\n", W / 2 > svg
        for (t = 0; t < 5; t++) {
            tv = 0.5 * 2 ^ (t / 2); x = L + (R - L) * (log(tv) - lmin) / (lmax - lmin)
            printf "<line x1=\"%.1f\" y1=\"%d\" x2=\"%.1f\" y2=\"%d\" stroke=\"%s\"/><text x=\"%.1f\" y=\"%d\" text-anchor=\"middle\">%.2f</text>\n", x, top, x, top + nop * rowh, (t == 2 ? "#444" : "#ddd"), x, top + nop * rowh + 14, tv > svg
        }
        for (o = 1; o <= nop; o++) {
            op = ops[o]; y0 = top + (o - 1) * rowh
            printf "<text x=\"%d\" y=\"%d\" text-anchor=\"end\">%s</text>\n", L - 8, y0 + rowh / 2 + 4, op > svg
            if (op in gmv) {
                x1 = L + (R - L) * (log(cilo[op]) - lmin) / (lmax - lmin); x2 = L + (R - L) * (log(cihi[op]) - lmin) / (lmax - lmin)
                x = L + (R - L) * (log(gmv[op]) - lmin) / (lmax - lmin)
                printf "<rect x=\"%.1f\" y=\"%d\" width=\"%.1f\" height=\"%d\" fill=\"#d62728\" fill-opacity=\"0.2\"/>\n", x1, y0 + 8, x2 - x1, rowh - 16 > svg
                printf "<line x1=\"%.1f\" y1=\"%d\" x2=\"%.1f\" y2=\"%d\" stroke=\"#d62728\" stroke-width=\"2\"/>\n", x, y0 + 8, x, y0 + rowh - 8 > svg
                printf "<text x=\"%d\" y=\"%d\" font-size=\"9\" text-anchor=\"end\">geo mean %.3f (%.3f-%.3f)</text>\n", L - 8, y0 + rowh / 2 + 16, gmv[op], cilo[op], cihi[op] > svg
            }
            for (i = 1; i <= nr[op]; i++) {
                r = ratio[op, i]; if (r < 0.5) r = 0.5; if (r > 2) r = 2
                x = L + (R - L) * (log(r) - lmin) / (lmax - lmin)
                y = y0 + 15 + (rowh - 30) * ((i * 37) % 100) / 100
                printf "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"3\" fill=\"#1f77b4\" fill-opacity=\"0.6\"/>\n", x, y > svg
            }
        }
        printf "</svg>\n" > svg
    }' "$out/blocks.tsv" | tee "$out/comparison.txt"

# Host CPU of each device over each boot (vmrun's cpu.txt): the daemon serves the vhost-user
# device; QEMU's thread-pool workers run the built-in device's fsyncs (the guest has no
# other QEMU block device). Both devices ran the same ops, so both are divided by the requests
# the daemon answered.
awk '
    FNR == 1 { boot = FILENAME; sub(/\/[^\/]*$/, "", boot); sub(/.*boot/, "", boot); if (!(boot in s)) { s[boot] = 1; bs[++nb] = boot } }
    /^daemon: / { for (i = 2; i <= NF; i++) if ($i ~ /^requests=/) { sub(/requests=/, "", $i); req[boot] = $i } }
    /^VUP-CPU / {
        delete kv
        for (i = 2; i <= NF; i++) { eq = index($i, "="); kv[substr($i, 1, eq - 1)] = substr($i, eq + 1) }
        if (kv["comm"] == "*" && kv["proc"] == "daemon") d[boot] = kv["cpu_us"]
        if (kv["proc"] == "daemon" && (kv["comm"] == "vring_worker" || kv["comm"] == "pmem-flush")) path[boot] += kv["cpu_us"]
        if (kv["comm"] == "worker" && kv["proc"] == "qemu") w[boot] = kv["cpu_us"]
    }
    END {
        for (x = 1; x <= nb; x++) {
            b = bs[x]; n = req[b]
            if (n + 0 <= 0) continue
            printf "boot %s: %d flush requests per device; host CPU per request: daemon %.1f us (vring and flush threads %.1f), QEMU pool workers %.1f us: %.2f x\n", \
                b, n, d[b] / n, path[b] / n, w[b] / n, (w[b] > 0 ? d[b] / w[b] : 0)
        }
    }' "$out"/boot*/result.txt "$out"/boot*/cpu.txt | tee -a "$out/comparison.txt"

echo
cat "$out/machine.txt"
info "results in $out (comparison.txt and .md, blocks.tsv, paired.svg; guest output in boot*/guest-out.txt)"
