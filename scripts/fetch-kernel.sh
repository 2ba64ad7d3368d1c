#!/usr/bin/env bash
# Fetch the guest kernel (Debian's linux-image-6.12.x from bookworm-backports, or with
# --suite another suite's current kernel) into the cache and unpack it without installing
# it. See --help.
set -euo pipefail
# shellcheck disable=SC2034  # read by lib.sh
VUP_PROG=fetch-kernel
# shellcheck source=scripts/lib.sh
. "$(dirname "$0")/lib.sh"

usage() {
    cat <<USAGE
Usage: scripts/fetch-kernel.sh [--suite SUITE] [--force]

Downloads a Debian kernel through a private apt configuration under the cache, unpacks it
with dpkg -x (never installs it), and generates modules.dep with depmod from Debian's kmod
package (also only unpacked). The modules stay xz-compressed here;
scripts/build-initramfs.sh decompresses the few it packs so busybox insmod can load them.

  --suite SUITE  which Debian suite's kernel (default \$VUP_KERNEL_SUITE, now $VUP_KERNEL_SUITE):
                   bookworm-backports  $VUP_KERNEL_DEFAULT_PKG (the kernel the project was
                                       measured with)
                   sid, trixie, ...    the kernel that suite's linux-image-amd64 depends on
                                       (sid's 7.x kernels are split into linux-binary-*,
                                       linux-modules-* and linux-base-*; all three are fetched)
                 VUP_KERNEL_PKG=linux-image-<abi> pins another one. The other scripts use the
                 suite named by VUP_KERNEL_SUITE, so VUP_KERNEL_SUITE=sid scripts/bench-guest.sh
                 benchmarks the sid kernel.
  --force        download (the .deb files too) and unpack again, even if the cache is complete
  -h, --help     this text

Results (the default suite; another suite's go to $VUP_CACHE/kernel-SUITE):
  $VUP_CACHE/kernel/vmlinuz   the kernel image
  $VUP_CACHE/kernel/modules   its lib/modules/<version> directory
Fails unless the kernel is 6.8 or later (virtio-pmem shared-memory support).

If the default package is no longer in the archive, the newest linux-image-6.12.N+deb12-amd64
is taken instead, with a warning. A second run with a full cache uses no network.
With KERNEL=/path/to/bzImage (and optionally KERNEL_MODULES=/path/lib/modules/<version>)
the other scripts use your kernel instead and never call this one.

Environment: VUP_CACHE (now $VUP_CACHE), VUP_DEBIAN_MIRROR, VUP_KERNEL_PKG, VUP_KERNEL_SUITE.
USAGE
}

# kernel_version_ok VERSION: 6.8 or later
kernel_version_ok() {
    local maj min
    [[ $1 =~ ^([0-9]+)\.([0-9]+) ]] || return 1
    maj=${BASH_REMATCH[1]}; min=${BASH_REMATCH[2]}
    (( maj > 6 || (maj == 6 && min >= 8) ))
}

# kernel_packages APT_ROOT: print the packages that make up the kernel to fetch, one a line.
kernel_packages() {
    local root="$1" pkg cand abi
    if [[ $VUP_KERNEL_SUITE == bookworm-backports ]]; then
        pkg="${VUP_KERNEL_PKG:-$VUP_KERNEL_DEFAULT_PKG}"
        cand="$(apt_priv "$root" apt-cache policy "$pkg" 2>/dev/null | awk '/Candidate:/ {print $2}')"
        if [[ -z $cand || $cand == "(none)" ]]; then
            local alt
            alt="$(apt_priv "$root" apt-cache pkgnames linux-image-6.12. 2>/dev/null \
                   | grep -E '^linux-image-6\.12\.[0-9]+\+deb12-amd64$' | sort -V | tail -n 1 || true)"
            [[ -n $alt ]] || die "$pkg is not in the archive, and no other linux-image-6.12.N+deb12-amd64 is either; set VUP_KERNEL_PKG or KERNEL=..."
            warn "$pkg is no longer in the archive; using $alt instead"
            pkg="$alt"
        fi
    else
        pkg="${VUP_KERNEL_PKG:-}"
        if [[ -z $pkg ]]; then
            # The metapackage names the suite's current kernel: linux-image-<abi>-amd64.
            pkg="$(apt_priv "$root" apt-cache show linux-image-amd64 2>/dev/null \
                   | sed -n 's/^Depends:.*\(linux-image-[0-9][^ ,]*-amd64\).*/\1/p' | sort -V | tail -n 1)"
            [[ -n $pkg ]] || die "linux-image-amd64 in $VUP_KERNEL_SUITE names no linux-image-<version>-amd64; set VUP_KERNEL_PKG"
        fi
    fi
    abi="${pkg#linux-image-}"
    # Newer kernels split the image into the kernel, its modules and its System.map/config;
    # linux-image-<abi> is then only a metapackage that would pull in an initramfs tool.
    if [[ -n "$(apt_priv "$root" apt-cache policy "linux-binary-$abi" 2>/dev/null \
                | awk '/Candidate:/ && $2 != "(none)" {print $2}')" ]]; then
        printf '%s\n' "linux-binary-$abi" "linux-modules-$abi" "linux-base-$abi"
    else
        printf '%s\n' "$pkg"
    fi
}

fetch_build() {
    local stage="$1" debs="$2" pkgs=() p ver k deb found
    mapfile -t pkgs < <(kernel_packages "$apt_root")
    ((${#pkgs[@]})) || die "found no kernel package in $VUP_KERNEL_SUITE"

    info "downloading ${pkgs[*]}"
    ( cd "$debs" && apt_priv "$apt_root" apt-get -q download "${pkgs[@]}" ) >"$debs/download.log" 2>&1 \
        || { tail -n 20 "$debs/download.log" >&2; die "downloading ${pkgs[*]} failed"; }

    # depmod comes from bookworm's kmod, whatever the kernel's suite.
    if [[ $apt_root != bookworm ]]; then
        apt_root_init bookworm bookworm bookworm-backports
        apt_priv_update bookworm
    fi
    info "downloading kmod (for depmod)"
    apt_priv_fetch bookworm "$debs/kmod" "$stage/kmod.list" kmod

    for p in "${pkgs[@]}"; do
        # The package name carries its version, so this is the one file apt-get just wrote.
        found=("$debs/${p}_"*.deb)
        deb="${found[0]}"
        [[ -f $deb ]] || die "apt-get download left no ${p}_*.deb in $debs"
        info "unpacking $(basename "$deb")"
        dpkg-deb -x "$deb" "$stage/root" || die "dpkg -x $deb failed"
    done
    unpack_debs "$stage/kmod.list" "$stage/kmod"
    rm -f "$stage/kmod.list"

    # Split kernels ship under usr/lib/modules (merged /usr); bookworm's depmod looks in
    # BASE/lib/modules, so point lib at usr/lib.
    if [[ ! -e $stage/root/lib && -d $stage/root/usr/lib/modules ]]; then
        ln -s usr/lib "$stage/root/lib"
    fi
    local mods=("$stage/root/lib/modules"/*)
    ver="${mods[0]##*/}"
    [[ $ver != '*' && -d $stage/root/lib/modules/$ver ]] || die "no lib/modules/<version> in ${pkgs[*]}"
    if [[ -f $stage/root/boot/vmlinuz-$ver ]]; then
        k="boot/vmlinuz-$ver"
    elif [[ -f $stage/root/lib/modules/$ver/vmlinuz ]]; then
        k="lib/modules/$ver/vmlinuz"
    else
        die "no boot/vmlinuz-$ver or lib/modules/$ver/vmlinuz in ${pkgs[*]}"
    fi
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
    ln -sfn "root/$k" "$stage/vmlinuz"
    ln -sfn "root/lib/modules/$ver" "$stage/modules"
    printf '%s\n' "$ver" > "$stage/version"
    printf '%s\n' "${pkgs[@]}" > "$stage/package"
}

fetch_verify() {
    [[ -f $1/vmlinuz && -d $1/modules && -s $1/version ]] || return 1
    printf 'kernel %s\n' "$(cat "$1/version")"
}

# --suite is this script's own; the rest goes to fetch_main (--force, --help).
args=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --suite) [[ $# -ge 2 && -n $2 ]] || die "--suite needs a Debian suite (bookworm-backports, sid, ...)"
                 VUP_KERNEL_SUITE="$2"; shift ;;
        --suite=*) VUP_KERNEL_SUITE="${1#--suite=}" ;;
        *) args+=("$1") ;;
    esac
    shift
done
[[ $VUP_KERNEL_SUITE =~ ^[a-z][a-z0-9-]*$ ]] || die "'$VUP_KERNEL_SUITE' is not a Debian suite name"
if [[ $VUP_KERNEL_SUITE == bookworm-backports ]]; then
    apt_root=bookworm
    fetch_main kernel vmlinuz bookworm bookworm bookworm-backports -- "${args[@]+"${args[@]}"}"
else
    apt_root="kernel-$VUP_KERNEL_SUITE"
    fetch_main "kernel-$VUP_KERNEL_SUITE" vmlinuz "$apt_root" "$VUP_KERNEL_SUITE" -- "${args[@]+"${args[@]}"}"
fi
