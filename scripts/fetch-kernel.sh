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

  --force    download (the .deb files too) and unpack again, even if the cache is complete
  -h, --help this text

Environment: VUP_CACHE (now $VUP_CACHE), VUP_DEBIAN_MIRROR, VUP_KERNEL_PKG.
USAGE
}

# kernel_version_ok VERSION: 6.8 or later
kernel_version_ok() {
    local maj min
    [[ $1 =~ ^([0-9]+)\.([0-9]+) ]] || return 1
    maj=${BASH_REMATCH[1]}; min=${BASH_REMATCH[2]}
    (( maj > 6 || (maj == 6 && min >= 8) ))
}

fetch_build() {
    local stage="$1" debs="$2" pkg ver cand k deb
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
    ( cd "$debs" && apt_priv bookworm apt-get -q download "$pkg" ) >"$debs/download.log" 2>&1 \
        || { tail -n 20 "$debs/download.log" >&2; die "downloading $pkg failed"; }
    # The package name carries its version, so this is the one file apt-get just wrote.
    local found=("$debs/${pkg}_"*.deb)
    deb="${found[0]}"
    [[ -f $deb ]] || die "apt-get download left no ${pkg}_*.deb in $debs"

    info "downloading kmod (for depmod)"
    apt_priv_fetch bookworm "$debs/kmod" "$stage/kmod.list" kmod

    info "unpacking $(basename "$deb")"
    dpkg-deb -x "$deb" "$stage/root" || die "dpkg -x $deb failed"
    unpack_debs "$stage/kmod.list" "$stage/kmod"
    rm -f "$stage/kmod.list"

    local mods=("$stage/root/lib/modules"/*)
    ver="${mods[0]##*/}"
    [[ $ver != '*' && -d $stage/root/lib/modules/$ver ]] || die "no lib/modules/<version> in $deb"
    k="$stage/root/boot/vmlinuz-$ver"
    [[ -f $k ]] || die "no boot/vmlinuz-$ver in $deb"
    kernel_version_ok "$ver" || die "kernel $ver is older than 6.8 (virtio-pmem shared memory needs 6.8+)"

    info "depmod $ver"
    local T="$stage/kmod"
    "$T/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" \
        --library-path "$T/lib/x86_64-linux-gnu:$T/usr/lib/x86_64-linux-gnu" \
        --argv0 depmod "$T/bin/kmod" -b "$stage/root" "$ver" \
        || die "depmod failed"
    [[ -s $stage/root/lib/modules/$ver/modules.dep ]] || die "depmod wrote no modules.dep"
    grep -q 'virtio_pmem' "$stage/root/lib/modules/$ver/modules.dep" \
        || die "kernel $ver has no virtio_pmem module"

    # Relative links, so they still hold once the stage is moved into place.
    ln -sfn "root/boot/vmlinuz-$ver" "$stage/vmlinuz"
    ln -sfn "root/lib/modules/$ver" "$stage/modules"
    printf '%s\n' "$ver" > "$stage/version"
    printf '%s\n' "$pkg" > "$stage/package"
}

fetch_verify() {
    [[ -f $1/vmlinuz && -d $1/modules && -s $1/version ]] || return 1
    printf 'kernel %s\n' "$(cat "$1/version")"
}

fetch_main kernel vmlinuz bookworm bookworm bookworm-backports -- "$@"
