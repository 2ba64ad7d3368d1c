#!/usr/bin/env bash
# Fetch libvirt 9 (Debian 12's libvirt-daemon-driver-qemu and virsh) into the cache and
# unpack it without installing anything. See --help.
set -euo pipefail
# shellcheck disable=SC2034  # read by lib.sh
VUP_PROG=fetch-libvirt
# shellcheck source=scripts/lib.sh
. "$(dirname "$0")/lib.sh"

VUP_LIBVIRT_PKGS=(libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients)
VUP_VIRSH_LAUNCHER="$VUP_CACHE/libvirt/bin/virsh"

usage() {
    cat <<USAGE
Usage: scripts/fetch-libvirt.sh [--force]

Downloads Debian 12's ${VUP_LIBVIRT_PKGS[*]} with their whole dependency closure
through the private apt root 'bookworm' under the cache, and unpacks them with dpkg -x.
Nothing is installed and the machine's apt configuration is not touched.

Result: $VUP_VIRSH_LAUNCHER
(a launcher that runs the unpacked virsh through the unpacked tree's own loader, with
LIBVIRT_DRIVER_DIR pointing at the unpacked connection drivers, so that the embedded
driver, virsh -c 'qemu:///embed?root=DIR', works without any libvirt daemon).

  --force    download and unpack again, even if the cache is complete
  -h, --help this text
USAGE
}

fetch_build() {
    local stage="$1" debs="$2"
    info "downloading ${VUP_LIBVIRT_PKGS[*]} from bookworm with their dependency closure"
    apt_priv_fetch bookworm "$debs" "$stage/packages.list" -t bookworm "${VUP_LIBVIRT_PKGS[@]}"
    info "unpacking $(wc -l < "$stage/packages.list") packages ($(xargs du -ch < "$stage/packages.list" | tail -n1 | cut -f1) of .deb files)"
    unpack_debs "$stage/packages.list" "$stage/root"
    [[ -x $stage/root/usr/bin/virsh ]] || die "no usr/bin/virsh in the unpacked packages"
}

# Written after the publish, because it names the tree by its final path. libvirt looks its
# loadable connection drivers up in LIBVIRT_DRIVER_DIR before its built-in directory.
write_virsh_launcher() {
    write_launcher "$VUP_VIRSH_LAUNCHER" "$1" scripts/fetch-libvirt.sh \
        'export LIBVIRT_DRIVER_DIR="$R/usr/lib/x86_64-linux-gnu/libvirt/connection-driver"' \
        lib64/ld-linux-x86-64.so.2 '$R/usr/lib/x86_64-linux-gnu:$R/lib/x86_64-linux-gnu' usr/bin/virsh
}

fetch_verify() {
    write_virsh_launcher "$1/root"
    local v
    v="$("$VUP_VIRSH_LAUNCHER" --version 2>&1)" || { printf '%s\n' "$v" >&2; return 1; }
    printf 'virsh %s\n' "$v"
}

fetch_main libvirt "${VUP_VIRSH_LAUNCHER#"$VUP_CACHE/libvirt/"}" bookworm bookworm bookworm-backports -- "$@"
