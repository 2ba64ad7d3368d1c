#!/usr/bin/env bash
# Boots QEMU again and again on one image behind ONE long-running daemon (`vmrun boot-loop`):
# every boot must find the mapped region, the file system with exactly what the previous boot
# wrote and fsynced, and the bytes in the host file where the guest's FIEMAP says; the
# daemon's metrics must count one connection per QEMU and a SHMEM_MAP per good boot.
# This is the evidence for QEMU pitfall 3 (docs/qemu.md). Builds and fetches what it needs.
#
# Usage: scripts/boot-loop.sh [--boots N] [--size SIZE] [--out DIR]   (see `vmrun boot-loop --help`)
set -euo pipefail
VUP_PROG=boot-loop
source "$(dirname "$0")/lib.sh"
case "${1:-}" in -h|--help) build_runner; exec "$VUP_RUNNER" boot-loop --help ;; esac
mkdir -p "$VUP_BUILD"
build_vm_inputs "$VUP_BUILD/boot-loop.initrd.cpio.gz"
export VUP_BUILD
exec "$VUP_RUNNER" boot-loop --initrd "$VUP_BUILD/boot-loop.initrd.cpio.gz" "$@"
