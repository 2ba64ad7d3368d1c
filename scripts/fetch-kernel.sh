#!/usr/bin/env bash
# Fetch the guest kernel (Debian's linux-image-6.12.x from bookworm-backports) into the
# cache and unpack it without installing it. See --help.
set -euo pipefail
# shellcheck disable=SC2034  # read by lib.sh
VUP_PROG=fetch-kernel
# shellcheck source=scripts/lib.sh
. "$(dirname "$0")/lib.sh"

usage() {
    cat <<USAGE
Usage: scripts/fetch-kernel.sh [--force]

Downloads Debian's $VUP_KERNEL_PKG (suite $VUP_KERNEL_SUITE) through a private apt
configuration under the cache, unpacks it with dpkg -x (never installs it), and generates
modules.dep with depmod from Debian's kmod package (also only unpacked). The modules stay
xz-compressed here; scripts/build-initramfs.sh decompresses the few it packs so busybox
insmod can load them.

Results:
  $VUP_CACHE/kernel/vmlinuz   the kernel image
  $VUP_CACHE/kernel/modules   its lib/modules/<version> directory
Fails unless the kernel is 6.8 or later (virtio-pmem shared-memory support).

If that exact package is no longer in the archive, the newest linux-image-6.12.N+deb12-amd64
is taken instead, with a warning. A second run with a full cache uses no network.
With KERNEL=/path/to/bzImage (and optionally KERNEL_MODULES=/path/lib/modules/<version>)
the other scripts use your kernel instead and never call this one.

  --force    download and unpack again even if the cache is complete
  -h, --help this text

Environment: VUP_CACHE (now $VUP_CACHE), VUP_DEBIAN_MIRROR, VUP_KERNEL_PKG.
USAGE
}

parse_fetch_args "$@"

# kernel_version_ok VERSION: 6.8 or later
kernel_version_ok() {
    local maj min
    [[ $1 =~ ^([0-9]+)\.([0-9]+) ]] || return 1
    maj=${BASH_REMATCH[1]}; min=${BASH_REMATCH[2]}
    (( maj > 6 || (maj == 6 && min >= 8) ))
}

fetch() {
    local dir="$VUP_CACHE/kernel" t0 pkg ver cand k
    if [[ $force == 0 && -f $dir/.complete ]]; then
        info "cached: kernel $(cat "$dir/version")"
        printf '%s\n' "$dir/vmlinuz"
        return 0
    fi
    need_cmd apt-get dpkg-deb flock
    t0=$(now_ms)
    rm -f "$dir/.complete"
    apt_root_init bookworm bookworm bookworm-backports
    apt_priv_update bookworm

    pkg="$VUP_KERNEL_PKG"
    cand="$(apt_priv bookworm apt-cache policy "$pkg" 2>/dev/null | awk '/Candidate:/ {print $2}')"
    if [[ -z $cand || $cand == "(none)" ]]; then
        local alt
        alt="$(apt_priv bookworm apt-cache pkgnames linux-image-6.12. 2>/dev/null \
               | grep -E '^linux-image-6\.12\.[0-9]+\+deb12-amd64$' | sort -V | tail -n 1 || true)"
        [[ -n $alt ]] || die "$pkg is not in the archive, and no other linux-image-6.12.N+deb12-amd64 is either; set VUP_KERNEL_PKG or KERNEL=..."
        warn "$pkg is no longer in the archive; using $alt instead"
        pkg="$alt"
    fi

    info "downloading $pkg"
    mkdir -p "$VUP_CACHE/debs/kernel"
    ( cd "$VUP_CACHE/debs/kernel" && apt_priv bookworm apt-get -q download "$pkg" ) \
        >"$VUP_CACHE/debs/kernel/download.log" 2>&1 \
        || { tail -n 20 "$VUP_CACHE/debs/kernel/download.log" >&2; die "downloading $pkg failed"; }
    local deb
    deb="$(ls -t "$VUP_CACHE/debs/kernel/${pkg}_"*.deb | head -n 1)"

    info "downloading kmod (for depmod)"
    apt_priv_fetch bookworm "$VUP_CACHE/debs/kmod" "$dir.kmod.list" kmod

    info "unpacking $(basename "$deb")"
    rm -rf "$dir/root" "$dir/kmod"
    dpkg-deb -x "$deb" "$dir/root" || die "dpkg -x $deb failed"
    unpack_debs "$dir.kmod.list" "$dir/kmod"
    rm -f "$dir.kmod.list"

    ver="$(ls "$dir/root/lib/modules" | head -n 1)"
    [[ -n $ver && -d $dir/root/lib/modules/$ver ]] || die "no lib/modules/<version> in $deb"
    k="$dir/root/boot/vmlinuz-$ver"
    [[ -f $k ]] || die "no boot/vmlinuz-$ver in $deb"
    kernel_version_ok "$ver" || die "kernel $ver is older than 6.8 (virtio-pmem shared memory needs 6.8+)"

    info "depmod $ver"
    local T="$dir/kmod"
    "$T/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" \
        --library-path "$T/lib/x86_64-linux-gnu:$T/usr/lib/x86_64-linux-gnu" \
        --argv0 depmod "$T/bin/kmod" -b "$dir/root" "$ver" \
        || die "depmod failed"
    [[ -s $dir/root/lib/modules/$ver/modules.dep ]] || die "depmod wrote no modules.dep"
    grep -q 'virtio_pmem' "$dir/root/lib/modules/$ver/modules.dep" \
        || die "kernel $ver has no virtio_pmem module"

    ln -sfn "root/boot/vmlinuz-$ver" "$dir/vmlinuz"
    ln -sfn "root/lib/modules/$ver" "$dir/modules"
    printf '%s\n' "$ver" > "$dir/version"
    printf '%s\n' "$pkg" > "$dir/package"
    touch "$dir/.complete"
    info "ready in $(( ($(now_ms) - t0) / 1000 )) s: kernel $ver ($(du -sh "$deb" | cut -f1) download)"
    printf '%s\n' "$dir/vmlinuz"
}

mkdir -p "$VUP_CACHE/kernel"
with_lock kernel fetch
