#!/bin/sh
# /init of the guest initramfs built by scripts/build-initramfs.sh (runs under busybox sh).
#
# Kernel command line (all optional):
#   vup.args=a,b,c        arguments for /bin/pmem-guest-tests (commas become spaces)
#   vup.end=poweroff|reboot|crash   what to do after the binary exits (default poweroff)
#   vup.reboots=N         with vup.end=reboot: reboot N times (default 1), then power off.
#                         The boot number is kept in CMOS RAM, which survives a guest
#                         reboot inside one QEMU process; the binary sees it as $VUP_BOOT.
#   vup.modules=a,b       also load these modules at boot (modprobe), e.g. xfs, which is
#                         otherwise loaded on demand (modprobe xfs, or mount -t xfs)
#   vup.wait=SEC          how long to wait for /dev/pmem0 (default 15)
#   vup.shell=1           start a shell on the console before the binary (manual debugging)
#
# Output: "VUP-BEGIN", the binary's output, "VUP-END rc=N" on the console (ttyS0) and,
# copied without kernel messages in between, on the second serial port (ttyS1) if present.

export PATH=/sbin:/usr/sbin:/bin:/usr/bin
export HOME=/root

say() { echo "vup-init: $*"; }

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm /run /tmp /mnt
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null || say "cannot mount tracefs"
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null || say "cannot mount debugfs"
exec </dev/console >/dev/console 2>&1

# --- command line -----------------------------------------------------------
args=""
end=poweroff
reboots=1
wait_s=15
extra_mods=""
shell=0
set -f
for w in $(cat /proc/cmdline); do
    case "$w" in
        vup.args=*)    args=$(echo "${w#vup.args=}" | tr ',' ' ') ;;
        vup.end=*)     end=${w#vup.end=} ;;
        vup.reboots=*) reboots=${w#vup.reboots=} ;;
        vup.wait=*)    wait_s=${w#vup.wait=} ;;
        vup.modules=*) extra_mods=$(echo "${w#vup.modules=}" | tr ',' ' ') ;;
        vup.shell=*)   shell=${w#vup.shell=} ;;
    esac
done
case "$end" in
    poweroff|reboot|crash) ;;
    *) say "unknown vup.end=$end, using poweroff"; end=poweroff ;;
esac

# --- modules ------------------------------------------------------------------
kver=$(uname -r)
if [ ! -d "/lib/modules/$kver" ] && [ -f /lib/modules/load-order ]; then
    set +f
    for d in /lib/modules/*/; do [ -d "$d" ] && pkver=$(basename "$d"); done
    set -f
    say "modules were packed for ${pkver:-?}, but the kernel is $kver; trying them anyway"
    kver=${pkver:-$kver}
fi
if [ -f /lib/modules/load-order ]; then
    while read -r m flag; do
        [ -n "$m" ] || continue
        [ "$flag" = ondemand ] && continue
        if ! err=$(insmod "/lib/modules/$kver/$m" 2>&1); then
            case "$err" in
                *"File exists"*) ;;
                *) if [ "$flag" = optional ]; then
                       say "insmod $m failed (optional): $err"
                   else
                       say "insmod $m FAILED: $err"
                   fi ;;
            esac
        fi
    done < /lib/modules/load-order
fi
for m in $extra_mods; do
    modprobe "$m" || say "modprobe $m FAILED"
done

# --- boot counter (CMOS RAM: magic 0xa5 at CMOS 0x7d, count at 0x7e) ----------
# rtc-cmos exposes the CMOS RAM from byte 14 on as an nvmem device (no checksum check,
# unlike /dev/nvram, which fails with EIO on QEMU's CMOS).
boot=1
cmos=""
set +f
for f in /sys/bus/nvmem/devices/cmos_nvram*/nvmem; do [ -f "$f" ] && cmos=$f && break; done
set -f
cmos_get() { dd if="$cmos" bs=1 skip=$(($1 - 14)) count=1 2>/dev/null | od -An -tu1 | tr -d ' \n'; }
# shellcheck disable=SC2059  # the format is the octal escape of the byte
cmos_put() { printf "\\$(printf %03o "$2")" | dd of="$cmos" bs=1 seek=$(($1 - 14)) count=1 conv=notrunc 2>/dev/null; }
if [ "$end" = reboot ]; then
    if [ -n "$cmos" ]; then
        if [ "$(cmos_get 125)" = 165 ]; then
            boot=$(( $(cmos_get 126) + 1 ))
        fi
        cmos_put 125 165
        cmos_put 126 "$boot"
        [ "$(cmos_get 126)" = "$boot" ] || say "cannot write the boot counter to $cmos"
    else
        say "no CMOS nvmem device: cannot count reboots, this boot powers off"
        reboots=0
    fi
fi
export VUP_BOOT=$boot

# --- wait for the device --------------------------------------------------------
i=0
while [ ! -b /dev/pmem0 ] && [ $i -lt $((wait_s * 10)) ]; do
    usleep 100000
    i=$((i + 1))
done
if [ -b /dev/pmem0 ]; then
    say "/dev/pmem0 present after $((i / 10)).$((i % 10)) s (boot $boot)"
else
    say "/dev/pmem0 DID NOT APPEAR within $wait_s s"
    ls /sys/bus/nd/devices 2>/dev/null | sed 's/^/vup-init: nd: /'
    dmesg | grep -iE 'pmem|nvdimm|nd_|virtio' | tail -n 20 | sed 's/^/vup-init: dmesg: /'
fi

# --- run --------------------------------------------------------------------------
out=/dev/null
[ -c /dev/ttyS1 ] && stty -F /dev/ttyS1 raw -echo 2>/dev/null && out=/dev/ttyS1
emit() { echo "$*"; echo "$*" > "$out"; }

if [ "$shell" = 1 ]; then
    say "vup.shell=1: starting a shell; exit it to continue"
    setsid cttyhack sh
fi

# shellcheck disable=SC3040  # busybox ash has pipefail
set -o pipefail
say "boot $boot: /bin/pmem-guest-tests $args"
emit "VUP-BEGIN"
if [ -x /bin/pmem-guest-tests ]; then
    # shellcheck disable=SC2086  # word splitting of args is intended
    /bin/pmem-guest-tests $args | tee "$out"
    rc=$?
else
    echo "not ok 1 - /bin/pmem-guest-tests is missing from the initramfs" | tee "$out"
    echo "1..1" | tee "$out"
    rc=127
fi
emit "VUP-END rc=$rc"

# --- end --------------------------------------------------------------------------
if [ "$end" = reboot ] && [ "$boot" -gt "$reboots" ]; then
    end=poweroff
fi
say "$end"
case "$end" in
    reboot) reboot -f ;;
    crash)  echo c > /proc/sysrq-trigger ;;
    *)      poweroff -f ;;
esac
sleep 2
echo o > /proc/sysrq-trigger
while :; do sleep 60; done
