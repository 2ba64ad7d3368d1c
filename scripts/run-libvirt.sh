#!/usr/bin/env bash
# Boot the guest suite on vhost-user-pmem through libvirt's embedded QEMU driver. See --help.
set -euo pipefail
# shellcheck disable=SC2034  # read by lib.sh
VUP_PROG=run-libvirt
# shellcheck source=scripts/lib.sh
. "$(dirname "$0")/lib.sh"

usage() {
    cat <<USAGE
Usage: scripts/run-libvirt.sh [--args A,B,...] [--dir DIR]

Starts target/release/vhost-user-pmem on a fresh 1 GiB image, fills in
contrib/libvirt/vhost-user-pmem-domain.xml, runs
  virsh -c 'qemu:///embed?root=DIR' create domain.xml
with the unpacked libvirt (scripts/fetch-libvirt.sh) and the cached QEMU and kernel, waits
for the guest to power off and judges the run from the TAP on the serial console.
No libvirt daemon runs and nothing is installed. virsh runs in a private mount namespace
that shows it a passwd with a 'libvirt-qemu' user (libvirt 9 as root insists on one) and
libvirt's data files over /usr/share; nothing outside DIR changes.

  --args A,B  guest suite arguments (vup.args), default --mkfs,e2e
  --dir DIR   the embedded driver's root and the run's files (default $VUP_BUILD/libvirt)
USAGE
}

args="--mkfs,e2e"
dir="$VUP_BUILD/libvirt"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --args) args="$2"; shift ;;
        --dir) dir="$2"; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown option '$1' (see --help)" ;;
    esac
    shift
done

need_cmd unshare mount
virsh="$("$VUP_ROOT/scripts/fetch-libvirt.sh")"
lvroot="$VUP_CACHE/libvirt/root"
resolve_qemu
resolve_kernel
daemon="$VUP_ROOT/target/release/vhost-user-pmem"
[[ -x $daemon ]] || (cd "$VUP_ROOT" && env -u CARGO_TARGET_DIR cargo build --release -q -p vhost-user-pmem) \
    || die "building the daemon failed"

# The template repeats qemu.rs's device string (XML cannot include it); refuse a drifted copy.
dev="$(sed -n '/VHOST_USER_PMEM_DEVICE: &str =/{n;s/^ *"\([^"]*\)";$/\1/p}' "$VUP_ROOT/crates/vm-runner/src/qemu.rs")"
[[ -n $dev ]] || die "cannot read VHOST_USER_PMEM_DEVICE from crates/vm-runner/src/qemu.rs"
grep -qF "value='$dev,bus=" "$VUP_ROOT/contrib/libvirt/vhost-user-pmem-domain.xml" \
    || die "contrib/libvirt/vhost-user-pmem-domain.xml does not carry qemu.rs's device string '$dev'"

rm -rf "$dir"
mkdir -p "$dir/etc"
dir="$(cd "$dir" && pwd -P)"
guest_bin="$("$VUP_ROOT/scripts/build-guest.sh")"
"$VUP_ROOT/scripts/build-initramfs.sh" --guest-bin "$guest_bin" --out "$dir/initrd.cpio.gz" >/dev/null

# What root in a container without systemd needs: no SELinux/AppArmor/DAC relabelling, no
# mount namespace or cgroups of libvirt's own, QEMU's output in a file (no virtlogd).
cat > "$dir/etc/qemu.conf" <<CONF
security_driver = "none"
namespaces = [ ]
cgroup_controllers = [ ]
user = "root"
group = "root"
stdio_handler = "file"
CONF
cp /etc/passwd "$dir/passwd"
cp /etc/group "$dir/group"
echo 'libvirt-qemu:x:0:0:libvirt-qemu:/:/usr/sbin/nologin' >> "$dir/passwd"
echo 'libvirt-qemu:x:0:' >> "$dir/group"
grep -q '^kvm:' "$dir/group" || echo 'kvm:x:0:' >> "$dir/group"

truncate -s 1G "$dir/pmem.img"
"$daemon" --socket-path "$dir/pmem.sock" --file "$dir/pmem.img" --size 1G > "$dir/daemon.log" 2>&1 &
dpid=$!
trap 'kill "$dpid" 2>/dev/null || true' EXIT
for _ in $(seq 50); do [[ -S $dir/pmem.sock ]] && break; sleep 0.1; done
[[ -S $dir/pmem.sock ]] || { cat "$dir/daemon.log" >&2; die "the daemon did not listen"; }

sed -e "s|@NAME@|vup-libvirt|; s|@EMULATOR@|$QEMU_BIN|; s|@MEM_MIB@|1024|" \
    -e "s|@KERNEL@|$KERNEL_IMAGE|; s|@INITRD@|$dir/initrd.cpio.gz|" \
    -e "s|@CMDLINE@|console=ttyS0 panic=-1 loglevel=5 vup.end=poweroff vup.args=$args|" \
    -e "s|@CONSOLE@|$dir/console.log|; s|@SOCKET@|${dir//,/,,}/pmem.sock|" \
    "$VUP_ROOT/contrib/libvirt/vhost-user-pmem-domain.xml" > "$dir/domain.xml"

t0=$(now_ms)
# One virsh process both creates the domain and waits for it: libvirt starts QEMU with
# -no-shutdown and only a process holding the embedded driver acts on the guest's poweroff.
timeout 300 unshare --mount sh -c '
    mount --bind "$1/passwd" /etc/passwd && mount --bind "$1/group" /etc/group &&
    mount -t overlay overlay -o "lowerdir=/usr/share:$2/usr/share" /usr/share &&
    exec "$3" -c "qemu:///embed?root=$1" "create $1/domain.xml; event --domain vup-libvirt --event lifecycle --timeout 240"
' sh "$dir" "$lvroot" "$virsh" > "$dir/virsh.log" 2>&1 || { cat "$dir/virsh.log" >&2; die "virsh failed"; }
info "virsh create to guest stopped: $(( $(now_ms) - t0 )) ms"
grep -E '^(ok|not ok|1\.\.)|VUP-END' "$dir/console.log" >&2 || true
grep -q 'mapped .* into shared-memory region 0' "$dir/daemon.log" || die "the daemon log shows no SHMEM_MAP"
grep -q '^not ok' "$dir/console.log" && die "guest tests failed (see $dir/console.log)"
grep -q '^VUP-END rc=0' "$dir/console.log" || die "the guest suite did not finish (see $dir/console.log)"
info "PASS (console $dir/console.log, daemon log $dir/daemon.log)"
