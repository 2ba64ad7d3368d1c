#!/usr/bin/env bash
# Fetch QEMU 11 (Debian's qemu-system-x86 from trixie-backports) into the cache and
# unpack it without installing anything. See --help.
set -euo pipefail
# shellcheck disable=SC2034  # read by lib.sh
VUP_PROG=fetch-qemu
# shellcheck source=scripts/lib.sh
. "$(dirname "$0")/lib.sh"

usage() {
    cat <<USAGE
Usage: scripts/fetch-qemu.sh [--force]

Downloads Debian's $VUP_QEMU_PKG from $VUP_QEMU_SUITE together with its whole dependency
closure (taken from trixie, so nothing comes from the host), through a private apt
configuration under the cache, and unpacks it with dpkg -x. Nothing is installed and the
machine's apt configuration is not touched.

Result: $VUP_QEMU_LAUNCHER
(a launcher that runs the unpacked binary through the unpacked tree's own loader).
Prints the QEMU version line; fails unless it is QEMU $VUP_QEMU_MIN_MAJOR.x or later.

A second run with a full cache uses no network. With QEMU=/path/to/qemu-system-x86_64
set, the other scripts use that QEMU instead and never call this one.

  --force    download and unpack again even if the cache is complete
  -h, --help this text

Environment: VUP_CACHE (now $VUP_CACHE), VUP_DEBIAN_MIRROR, VUP_QEMU_SUITE.
USAGE
}

parse_fetch_args "$@"

fetch() {
    local dir="$VUP_CACHE/qemu" t0 ver
    if [[ $force == 0 && -f $dir/.complete && -d $dir/root ]]; then
        qemu_write_launcher "$dir/root"
        if ver="$(qemu_version_ok "$VUP_QEMU_LAUNCHER")"; then
            info "cached: $ver"
            printf '%s\n' "$VUP_QEMU_LAUNCHER"
            return 0
        fi
        warn "cached QEMU does not run; fetching it again"
    fi
    need_cmd apt-get dpkg-deb flock
    t0=$(now_ms)
    rm -f "$dir/.complete"
    apt_root_init trixie trixie trixie-backports
    apt_priv_update trixie
    info "downloading $VUP_QEMU_PKG from $VUP_QEMU_SUITE with its dependency closure"
    apt_priv_fetch trixie "$VUP_CACHE/debs/qemu" "$dir.list" -t "$VUP_QEMU_SUITE" "$VUP_QEMU_PKG"
    info "unpacking $(wc -l < "$dir.list") packages ($(xargs du -ch < "$dir.list" | tail -n1 | cut -f1) of .deb files)"
    rm -rf "$dir/root.new"
    unpack_debs "$dir.list" "$dir/root.new"
    rm -rf "$dir/root"
    mv "$dir/root.new" "$dir/root"
    mv -f "$dir.list" "$dir/packages.list"
    [[ -x $dir/root/usr/bin/qemu-system-x86_64 ]] || die "no usr/bin/qemu-system-x86_64 in the unpacked packages"
    [[ -e $dir/root/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 ]] || die "no dynamic loader in the unpacked packages"
    qemu_write_launcher "$dir/root"
    ver="$(qemu_version_ok "$VUP_QEMU_LAUNCHER")" \
        || die "the unpacked QEMU is not QEMU $VUP_QEMU_MIN_MAJOR.x or later, or does not run (see above)"
    touch "$dir/.complete"
    info "ready in $(( ($(now_ms) - t0) / 1000 )) s: $ver ($(du -sh "$dir/root" | cut -f1) unpacked)"
    printf '%s\n' "$VUP_QEMU_LAUNCHER"
}

mkdir -p "$VUP_CACHE/qemu"
with_lock qemu fetch
