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

  --force    download (the .deb files too) and unpack again, even if the cache is complete
  -h, --help this text

Environment: VUP_CACHE (now $VUP_CACHE), VUP_DEBIAN_MIRROR, VUP_QEMU_SUITE.
USAGE
}

fetch_build() {
    local stage="$1" debs="$2"
    info "downloading $VUP_QEMU_PKG from $VUP_QEMU_SUITE with its dependency closure"
    apt_priv_fetch trixie "$debs" "$stage/packages.list" -t "$VUP_QEMU_SUITE" "$VUP_QEMU_PKG"
    info "unpacking $(wc -l < "$stage/packages.list") packages ($(xargs du -ch < "$stage/packages.list" | tail -n1 | cut -f1) of .deb files)"
    unpack_debs "$stage/packages.list" "$stage/root"
    [[ -x $stage/root/usr/bin/qemu-system-x86_64 ]] || die "no usr/bin/qemu-system-x86_64 in the unpacked packages"
    [[ -e $stage/root/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 ]] || die "no dynamic loader in the unpacked packages"
}

# The launcher names the tree by its final path, so it is written here, after the publish
# (and again on every cache hit, which also repairs a launcher deleted by hand).
fetch_verify() {
    qemu_write_launcher "$1/root"
    qemu_version_ok "$VUP_QEMU_LAUNCHER" \
        || { warn "the unpacked QEMU is not QEMU $VUP_QEMU_MIN_MAJOR.x or later, or does not run"; return 1; }
}

fetch_main qemu "${VUP_QEMU_LAUNCHER#"$VUP_CACHE/qemu/"}" trixie trixie trixie-backports -- "$@"
