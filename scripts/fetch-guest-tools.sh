#!/usr/bin/env bash
# Fetch the tools the guest initramfs needs (busybox-static, e2fsprogs, xfsprogs) with
# their shared libraries. See --help.
set -euo pipefail
# shellcheck disable=SC2034  # read by lib.sh
VUP_PROG=fetch-guest-tools
# shellcheck source=scripts/lib.sh
. "$(dirname "$0")/lib.sh"

TOOL_PKGS=(busybox-static e2fsprogs xfsprogs)
# binaries to collect (searched in sbin, usr/sbin, bin, usr/bin of the unpacked tree)
TOOL_BINS=(mke2fs e2fsck tune2fs filefrag mkfs.xfs xfs_io xfs_repair xfs_db)

usage() {
    cat <<USAGE
Usage: scripts/fetch-guest-tools.sh [--force]

Downloads Debian bookworm's ${TOOL_PKGS[*]} and their dependency closure
(libc6 included) through a private apt configuration under the cache, unpacks them with
dpkg -x, and collects into $VUP_CACHE/guest-tools/out:
  bin/busybox                    static
  bin/{${TOOL_BINS[*]}}
  lib/                           every shared library those need, and the dynamic loader
  etc/mke2fs.conf
Libraries are resolved with the unpacked tree's own loader (--list), falling back to the
host's copies. Each tool is run once (-V) as a check. Nothing is installed.
A second run with a full cache uses no network.

  --force    download (the .deb files too) and unpack again, even if the cache is complete
  -h, --help this text

Environment: VUP_CACHE (now $VUP_CACHE), VUP_DEBIAN_MIRROR.
USAGE
}

# find_in_tree ROOT NAME: path of an executable NAME under ROOT's usual bin dirs
find_in_tree() {
    local d
    for d in sbin usr/sbin bin usr/bin; do
        if [[ -f $1/$d/$2 ]]; then printf '%s\n' "$1/$d/$2"; return 0; fi
    done
    return 1
}

# collect_libs ROOT LOADER OUTLIB FILE...: copy the shared libraries FILEs need
collect_libs() {
    local root="$1" loader="$2" outlib="$3"; shift 3
    local lp="$root/lib/x86_64-linux-gnu:$root/usr/lib/x86_64-linux-gnu" f line lib path
    for f in "$@"; do
        "$loader" --library-path "$lp" --list "$f" > "$outlib/.list" 2>&1 \
            || { cat "$outlib/.list" >&2; die "cannot resolve the libraries of $f"; }
        while read -r line; do
            case "$line" in
                *"=> not found"*)
                    lib="${line%% *}"
                    path=""
                    for d in /lib/x86_64-linux-gnu /usr/lib/x86_64-linux-gnu /lib64 /usr/lib64; do
                        [[ -e $d/$lib ]] && { path="$d/$lib"; break; }
                    done
                    [[ -n $path ]] || die "library $lib needed by $(basename "$f") is neither in the packages nor on the host"
                    warn "taking $lib from the host ($path)"
                    ;;
                *"=> "*)
                    lib="${line%% *}"
                    path="${line#*=> }"; path="${path%% (*}"
                    ;;
                *) continue ;;
            esac
            lib="${lib##*/}"
            [[ -e $outlib/$lib ]] || cp -L "$path" "$outlib/$lib"
        done < "$outlib/.list"
    done
    rm -f "$outlib/.list"
}

fetch_build() {
    local stage="$1" debs="$2" root out loader b p
    info "downloading ${TOOL_PKGS[*]} with their dependency closure"
    apt_priv_fetch bookworm "$debs" "$stage/packages.list" "${TOOL_PKGS[@]}"

    root="$stage/root"; out="$stage/out"
    info "unpacking $(wc -l < "$stage/packages.list") packages"
    unpack_debs "$stage/packages.list" "$root"
    mkdir -p "$out/bin" "$out/lib" "$out/etc"

    loader="$root/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
    [[ -e $loader ]] || loader="$root/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
    [[ -e $loader ]] || die "no dynamic loader in the unpacked libc6"

    p="$(find_in_tree "$root" busybox)" || die "busybox not found in busybox-static"
    cp "$p" "$out/bin/busybox"
    if readelf -d "$out/bin/busybox" 2>/dev/null | grep -q NEEDED; then
        die "busybox from busybox-static is not static"
    fi
    for b in "${TOOL_BINS[@]}"; do
        p="$(find_in_tree "$root" "$b")" || die "$b not found in the unpacked packages"
        cp -L "$p" "$out/bin/$b"
    done
    collect_libs "$root" "$loader" "$out/lib" "${TOOL_BINS[@]/#/$out/bin/}"
    cp -L "$loader" "$out/lib/ld-linux-x86-64.so.2"
    [[ -f $root/etc/mke2fs.conf ]] && cp "$root/etc/mke2fs.conf" "$out/etc/"

    # check: every tool runs with only the collected libraries
    local v vers=()
    # Capture whole outputs and cut them afterwards: with pipefail, `| head -n 1` can fail a
    # healthy tool that dies of SIGPIPE after head has closed the pipe.
    v="$("$out/bin/busybox" 2>&1)" || true; v="${v%%$'\n'*}"
    [[ $v == BusyBox* ]] || die "busybox does not run: $v"
    vers+=("${v%% (*}")
    v="$("$out/lib/ld-linux-x86-64.so.2" --library-path "$out/lib" "$out/bin/mke2fs" -V 2>&1)" \
        || die "mke2fs does not run with the collected libraries: $v"
    v="${v%%$'\n'*}"
    vers+=("$v")
    v="$("$out/lib/ld-linux-x86-64.so.2" --library-path "$out/lib" "$out/bin/mkfs.xfs" -V 2>&1)" \
        || die "mkfs.xfs does not run with the collected libraries: $v"
    v="${v%%$'\n'*}"
    vers+=("$v")
    for b in "${TOOL_BINS[@]}"; do
        "$out/lib/ld-linux-x86-64.so.2" --library-path "$out/lib" --verify "$out/bin/$b" >/dev/null 2>&1 \
            || die "$b is not a valid dynamic executable"
    done
    printf '%s\n' "${vers[@]}" > "$stage/versions"
    rm -rf "$root"   # the .deb files stay in $debs
}

fetch_verify() {
    [[ -x $1/out/bin/busybox && -s $1/versions ]] || return 1
    paste -sd';' "$1/versions" | sed 's/;/; /g'
}

fetch_main guest-tools out bookworm bookworm bookworm-backports -- "$@"
