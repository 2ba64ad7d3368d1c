#!/usr/bin/env bash
# Boots one guest through the VM runner (crates/vm-runner, `vmrun`): builds the runner, the
# daemon and faultfs, fetches QEMU and the kernel on first use, builds the default initramfs
# unless --initrd is given, then hands every argument to vmrun. `scripts/run-vm.sh --help`
# shows vmrun's help, the reference for running one guest.
#
# Options of this wrapper only (before or among vmrun's):
#   --guest-bin PATH   guest test binary for the default initramfs (default: build-guest.sh)
# With vmrun's --libvirt (and no --virsh) it also fetches libvirt (scripts/fetch-libvirt.sh).
set -euo pipefail
# shellcheck disable=SC2034  # read by lib.sh
VUP_PROG=run-vm
# shellcheck source=scripts/lib.sh
. "$(dirname "$0")/lib.sh"

args=() guest_bin="" have_initrd=0 help=0 libvirt=0 have_virsh=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --libvirt) libvirt=1; args+=("$1") ;;
        --virsh|--virsh=*) have_virsh=1; args+=("$1") ;;
        --guest-bin) [[ $# -ge 2 ]] || die "--guest-bin needs a value"; guest_bin="$2"; shift ;;
        --guest-bin=*) guest_bin="${1#--guest-bin=}" ;;
        --initrd|--initrd=*) have_initrd=1; args+=("$1") ;;
        -h|--help) help=1; args+=("$1") ;;
        *) args+=("$1") ;;
    esac
    shift
done
[[ -z $guest_bin || $have_initrd == 0 ]] || die "--guest-bin and --initrd exclude each other"

build_runner
if (( ! help )); then
    resolve_qemu
    resolve_kernel
    export QEMU="$QEMU_BIN" KERNEL="$KERNEL_IMAGE"
    # build-initramfs.sh packs no modules for a KERNEL given without its KERNEL_MODULES.
    if [[ -n $KERNEL_MODDIR ]]; then export KERNEL_MODULES="$KERNEL_MODDIR"; fi
    if (( libvirt && ! have_virsh )); then
        virsh="$("$VUP_ROOT/scripts/fetch-libvirt.sh")" || die "fetching libvirt failed"
        args+=(--virsh "$virsh")
    fi
    if (( ! have_initrd )); then
        ib=()
        [[ -n $guest_bin ]] && ib=(--guest-bin "$guest_bin")
        initrd="$("$VUP_ROOT/scripts/build-initramfs.sh" "${ib[@]+"${ib[@]}"}" --out "$VUP_BUILD/initramfs.cpio.gz")" \
            || die "building the initramfs failed"
        args+=(--initrd "$initrd")
    fi
fi
export VUP_BUILD
exec "$VUP_RUNNER" "${args[@]+"${args[@]}"}"
