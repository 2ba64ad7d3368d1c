#!/usr/bin/env bash
# A bounded soak behind ONE daemon (`vmrun soak`): for --minutes, QEMU boots the guest again
# and again, rebooting it inside QEMU, or crashing its kernel with the file system mounted, or
# being SIGKILLed halfway through the load; every boot checks that everything the previous
# boot acknowledged is there, and the last boot's bytes of each QEMU are compared with the
# image. Fails on a missing write, a daemon warning or error (from its metrics), idle RSS
# growth, a changed idle thread or fd count, or an unclean exit on SIGTERM. Not part of
# scripts/test.sh (it takes minutes); see docs/testing.md for measured runs. Builds and
# fetches what it needs.
#
# Usage: scripts/soak.sh [--minutes N] [--threads N] [--load SEC] [--reboots N]
#                        [--crash-every K] [--size SIZE] [--rss-limit-kib K] [--out DIR]
#        (see `vmrun soak --help`)
set -euo pipefail
VUP_PROG=soak
source "$(dirname "$0")/lib.sh"
case "${1:-}" in -h|--help) build_runner; exec "$VUP_RUNNER" soak --help ;; esac
mkdir -p "$VUP_BUILD"
build_vm_inputs "$VUP_BUILD/soak.initrd.cpio.gz"
export VUP_BUILD
exec "$VUP_RUNNER" soak --initrd "$VUP_BUILD/soak.initrd.cpio.gz" "$@"
