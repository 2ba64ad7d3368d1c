#!/usr/bin/env bash
# shellcheck disable=SC2054  # commas inside QEMU option values are intended
# Boot a QEMU guest with a virtio-pmem device (vhost-user daemon or QEMU's built-in
# device), run the guest test binary, and check its results. See --help.
set -euo pipefail
# shellcheck disable=SC2034  # read by lib.sh
VUP_PROG=run-vm
# shellcheck source=scripts/lib.sh
. "$(dirname "$0")/lib.sh"

usage() {
    cat <<USAGE
Usage: scripts/run-vm.sh [options]

Boots the guest kernel with the initramfs under QEMU (TCG by default), with /dev/pmem0
backed by a host file, runs /bin/pmem-guest-tests inside, and checks the result.

Device:
  --device vhost-user|builtin  vhost-user: the vhost-user-pmem daemon behind QEMU's
                               vhost-user-test-device-pci (default); builtin: QEMU's own
                               virtio-pmem-pci on a memory-backend-file (the reference)
  --image FILE         host backing file (default: LOGDIR/pmem0.img); created sparse when
                       missing (by the daemon, or by truncate for builtin)
  --size SIZE          device size, e.g. 512M, 1G (default 1G)
  --daemon PATH        daemon binary (default $VUP_ROOT/target/release/vhost-user-pmem)
  --daemon-arg ARG     extra daemon argument (repeatable), e.g. --daemon-arg --read-only
  --daemon-mode server|client  server: the daemon listens (--socket-path) and QEMU connects
                       (default); client: QEMU listens (-chardev ...,server=on,wait=on) and
                       the daemon, started once QEMU's socket exists, connects (--connect)
  --socket PATH        attach QEMU to a daemon that is already running on PATH instead of
                       starting one (the caller owns that daemon and checks its log)
  --keep-daemon        leave the daemon running after QEMU exits (pid in LOGDIR/daemon.pid);
                       its exit status is then not checked
  --expect-daemon-exit N   the status the daemon must exit with on SIGTERM (default 0; 1
                       after an injected flush failure: its final fdatasync is refused)
  --faultfs            put the image on a faultfs mount (FUSE passthrough that fails fsync
                       on command): the image's directory (default LOGDIR/faultfs.src) is
                       mirrored at LOGDIR/faultfs.mnt and the daemon opens the image there.
                       Needs root and /dev/fuse. Unmounted on every exit path.
  --faultfs-bin PATH   faultfs binary (default $VUP_ROOT/target/release/faultfs)
  --chardev-opts OPTS  extra options for QEMU's -chardev socket (e.g. reconnect-ms=500)
  --trace-vhost        log every vhost-user message QEMU sends and every vhost device
                       start/stop (QEMU trace events) to qemu.log
  --kill-daemon-after-marker STRING   SIGKILL the daemon (not QEMU) as soon as the guest
                       prints STRING, then watch QEMU for --observe SEC more seconds and
                       kill it. Guest output after the kill goes to LOGDIR/after-kill.txt;
                       fails if more than 2 "VUP-FSYNC n=N ok" lines follow the kill (one
                       in flight and one on its way to the console may have been answered
                       before it); see the fsyncloop guest suite
  --observe SEC        with --kill-daemon-after-marker: how long to watch (default 60)
Guest:
  --args "A B C"       arguments for the guest binary (sent as vup.args=A,B,C; no commas)
  --end poweroff|reboot|crash  what the guest does after the binary (default poweroff)
  --reboots N          with --end reboot: reboot N times inside one QEMU, then power off
                       (default 1); each boot runs the binary (VUP_BOOT=1..N+1 in its env)
  --kill-after-marker STRING   SIGKILL QEMU as soon as the guest prints STRING
  --initrd FILE        initramfs to boot (default: build one with build-initramfs.sh)
  --guest-bin PATH     guest binary for that default initramfs (default: build-guest.sh)
  --append "ARGS"      extra kernel command line arguments
  --memory SIZE        guest RAM (default 1G)
  --smp N              guest CPUs (default 2)
  --accel tcg|kvm|auto accelerator (default \${VUP_ACCEL:-tcg}; the nested KVM of these
                       machines cannot boot Linux; auto probes /dev/kvm once, cached)
  --qemu-arg ARG       extra QEMU argument (repeatable)
Run:
  --timeout SEC        kill QEMU after SEC seconds, and fail (default 300)
  --log-dir DIR        where logs go (default $VUP_BUILD/runs/<time>-<device>)
  --allow-kernel-warnings   do not fail on WARNING:/BUG:/Oops in the guest console
  -v, --verbose        stream the guest console while it runs
  -h, --help           this text

Environment: QEMU=/path/to/qemu-system-x86_64 (11.0+), KERNEL=/path/to/bzImage,
KERNEL_MODULES=/path/lib/modules/<version>, RUST_LOG (daemon, default info,vhost_user_pmem::flush=debug), VUP_CACHE.

Host handshake: a guest line "VUP-SYNC ACTION ARGS" (on the binary's output) makes the runner
act on the host and answer "VUP-ACK ACTION TEXT" or "VUP-NAK ACTION REASON" on the guest's
console input (ttyS0; QEMU's stdin is a FIFO, LOGDIR/hostlink). Actions:
  snapshot LABEL           SIGUSR1 to the daemon; keep its metrics JSON as sync-LABEL.json and
                           faultfs's count of passed fdatasyncs of the image (sync-LABEL.faultfs)
  check-flushes LABEL N    snapshot LABEL-after, then check against LABEL: the daemon took and
                           answered >= N flush requests and made >= N fdatasyncs, 0 errors,
                           order_violations 0, and (with --faultfs) faultfs passed >= N fdatasyncs
                           of the image; a NAK fails the run too (catalogue E16)
  check-queue LABEL CAP    snapshot LABEL-after; no request answered with an error since LABEL;
                           reports the most requests one fdatasync answered (from the daemon's
                           flush debug log) against CAP, the requests a full ring holds (E18)
  faultfs fail-fsync|ok    switch faultfs (needs --faultfs)
  check-sticky             after "faultfs ok": faultfs injected EIO at least once and passed no
                           fdatasync of the image since; the daemon logged the failure at error
                           level and its metrics report it (catalogue E17); a NAK fails the run
Unknown actions are refused (NAK) and fail the run.

Files in LOGDIR: console.log (guest serial console), guest-out.txt (the binary's output,
copied by the guest to a second serial port, free of kernel messages), tap.txt, metrics.txt
(VUP-METRIC lines), hostchecks.txt, daemon.log, daemon-metrics.json, qemu.log (QEMU's own
stderr), qemu.cmd, hostlink.log (the handshake), faultfs.log.

Fails (exit 1) on: timeout; QEMU exiting non-zero; a daemon that died or did not exit with
--expect-daemon-exit's status on SIGTERM; a refused handshake action; no "VUP-END" (unless --end crash or --kill-after-marker); rc != 0; any "not ok";
a missing plan or a plan that does not match the number of results; a VUP-HOSTCHECK whose
sha256 does not match the host image; kernel warnings (see above). Prints
  DEVICE: N passed, M failed
(M counts "not ok" results plus failed runner checks). Every VUP-HOSTCHECK, from every
boot, is checked against the image after QEMU exits: print only data that must stay.
USAGE
}

device=vhost-user
image=""
size=1G
daemon="$VUP_ROOT/target/release/vhost-user-pmem"
daemon_args=()
daemon_mode=server
keep_daemon=0
expect_daemon_exit=0
use_faultfs=0
faultfs_bin="$VUP_ROOT/target/release/faultfs"
ext_sock=""
gargs=""
end=poweroff
reboots=1
marker=""
dkill_marker=""
observe_s=60
chardev_opts=""
trace_vhost=0
initrd=""
guest_bin=""
append=""
memory=1G
smp=2
accel="${VUP_ACCEL:-tcg}"
qemu_extra=()
timeout_s=300
logdir=""
allow_warn=0
verbose=0

needarg() { [[ $2 -ge 2 ]] || die "$1 needs a value (see --help)"; }
while [[ $# -gt 0 ]]; do
    case "$1" in
        --device) needarg "$1" $#; device="$2"; shift ;;
        --image) needarg "$1" $#; image="$2"; shift ;;
        --size) needarg "$1" $#; size="$2"; shift ;;
        --daemon) needarg "$1" $#; daemon="$2"; shift ;;
        --daemon-arg) needarg "$1" $#; daemon_args+=("$2"); shift ;;
        --daemon-mode) needarg "$1" $#; daemon_mode="$2"; shift ;;
        --keep-daemon) keep_daemon=1 ;;
        --expect-daemon-exit) needarg "$1" $#; expect_daemon_exit="$2"; shift ;;
        --faultfs) use_faultfs=1 ;;
        --faultfs-bin) needarg "$1" $#; faultfs_bin="$2"; shift ;;
        --socket) needarg "$1" $#; ext_sock="$2"; shift ;;
        --args) needarg "$1" $#; gargs="$2"; shift ;;
        --end) needarg "$1" $#; end="$2"; shift ;;
        --reboots) needarg "$1" $#; reboots="$2"; shift ;;
        --kill-after-marker) needarg "$1" $#; marker="$2"; shift ;;
        --kill-daemon-after-marker) needarg "$1" $#; dkill_marker="$2"; shift ;;
        --observe) needarg "$1" $#; observe_s="$2"; shift ;;
        --chardev-opts) needarg "$1" $#; chardev_opts="$2"; shift ;;
        --trace-vhost) trace_vhost=1 ;;
        --initrd) needarg "$1" $#; initrd="$2"; shift ;;
        --guest-bin) needarg "$1" $#; guest_bin="$2"; shift ;;
        --append) needarg "$1" $#; append="$2"; shift ;;
        --memory) needarg "$1" $#; memory="$2"; shift ;;
        --smp) needarg "$1" $#; smp="$2"; shift ;;
        --accel) needarg "$1" $#; accel="$2"; shift ;;
        --qemu-arg) needarg "$1" $#; qemu_extra+=("$2"); shift ;;
        --timeout) needarg "$1" $#; timeout_s="$2"; shift ;;
        --log-dir) needarg "$1" $#; logdir="$2"; shift ;;
        --allow-kernel-warnings) allow_warn=1 ;;
        -v|--verbose) verbose=1 ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown option '$1' (see --help)" ;;
    esac
    shift
done

case "$device" in vhost-user|builtin) ;; *) die "--device must be vhost-user or builtin, not '$device'" ;; esac
case "$daemon_mode" in server|client) ;; *) die "--daemon-mode must be server or client, not '$daemon_mode'" ;; esac
[[ $daemon_mode == server || ( $device == vhost-user && -z $ext_sock ) ]] \
    || die "--daemon-mode client needs --device vhost-user and a daemon started here (no --socket)"
case "$end" in poweroff|reboot|crash) ;; *) die "--end must be poweroff, reboot or crash, not '$end'" ;; esac
case "$accel" in tcg|kvm|auto) ;; *) die "--accel must be tcg, kvm or auto, not '$accel'" ;; esac
[[ $timeout_s =~ ^[0-9]+$ && $timeout_s -gt 0 ]] || die "--timeout must be a positive number of seconds"
[[ $reboots =~ ^[0-9]+$ ]] || die "--reboots must be a number"
[[ $observe_s =~ ^[0-9]+$ && $observe_s -gt 0 ]] || die "--observe must be a positive number of seconds"
if [[ -n $dkill_marker ]]; then
    [[ $device == vhost-user && -z $ext_sock ]] || die "--kill-daemon-after-marker needs the daemon this script starts (vhost-user, no --socket)"
    [[ -z $marker ]] || die "--kill-daemon-after-marker and --kill-after-marker exclude each other"
fi
[[ $smp =~ ^[0-9]+$ ]] || die "--smp must be a number"
[[ $expect_daemon_exit =~ ^[0-9]+$ ]] || die "--expect-daemon-exit must be a number"
if (( use_faultfs )); then
    [[ $device == vhost-user && -z $ext_sock ]] || die "--faultfs needs --device vhost-user and a daemon started by run-vm.sh (no --socket)"
    [[ -x $faultfs_bin ]] || die "faultfs '$faultfs_bin' not found or not executable (build it: cargo build --release -p faultfs, or pass --faultfs-bin)"
    [[ -c /dev/fuse ]] || die "--faultfs needs /dev/fuse"
fi
[[ $gargs != *,* ]] || die "--args cannot contain commas (they become vup.args=a,b,c on the kernel command line)"
size_b="$(parse_size "$size")"
mem_b="$(parse_size "$memory")"
vup_args="$(printf '%s' "$gargs" | xargs printf '%s,' 2>/dev/null | sed 's/,$//')" \
    || die "--args: cannot split '$gargs'"
[[ $vup_args != *[[:space:]\"]* ]] || die "--args: arguments cannot contain spaces or quotes"

# ---- inputs ---------------------------------------------------------------------------
resolve_qemu
resolve_kernel
if [[ $accel == auto ]]; then
    if kvm_usable; then accel=kvm; else accel=tcg; fi
    info "--accel auto: using $accel"
fi
if [[ -z $initrd ]]; then
    ib=()
    [[ -n $guest_bin ]] && ib=(--guest-bin "$guest_bin")
    initrd="$("$VUP_ROOT/scripts/build-initramfs.sh" "${ib[@]+"${ib[@]}"}" --out "$VUP_BUILD/initramfs.cpio.gz")" \
        || die "building the initramfs failed"
elif [[ -n $guest_bin ]]; then
    die "--guest-bin and --initrd exclude each other"
fi
[[ -r $initrd ]] || die "initrd '$initrd' not found"

if [[ -z $logdir ]]; then
    logdir="$VUP_BUILD/runs/$(date +%Y%m%d-%H%M%S)-$$-$device"
fi
mkdir -p "$logdir"
logdir="$(cd "$logdir" && pwd)"
rm -f "$logdir"/{console.log,guest-out.raw,guest-out.txt,tap.txt,metrics.txt,hostchecks.txt,hostchecks.current,hostchecks.superseded,hostchecks.result,daemon.log,qemu.log,qemu.cmd,daemon.pid,result.txt,after-kill.txt,kill.txt,hostlink,hostlink.log,faultfs.log,faultfs.control,daemon-metrics.json}
rm -f "$logdir"/sync-*
if (( use_faultfs )); then
    image="${image:-$logdir/faultfs.src/pmem0.img}"
else
    image="${image:-$logdir/pmem0.img}"
fi
mkdir -p "$(dirname "$image")"
image="$(cd "$(dirname "$image")" && pwd)/$(basename "$image")"

# QEMU option values: a comma must be doubled
qesc() { printf '%s' "${1//,/,,}"; }

# ---- cleanup ------------------------------------------------------------------------------
qpid=""; dpid=""; tailpid=""; sockdir=""; fpid=""; fmnt=""
# faultfs_stop: SIGTERM makes faultfs unmount; if it cannot (a file still open) it detaches the
# mount itself, and if faultfs is gone without unmounting, a lazy unmount frees the name.
faultfs_stop() {
    if [[ -n $fpid ]]; then
        kill -TERM "$fpid" 2>/dev/null
        for (( i = 0; i < 100; i++ )); do kill -0 "$fpid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$fpid" 2>/dev/null && warn "faultfs (pid $fpid) did not exit on SIGTERM; killed"
        wait "$fpid" 2>/dev/null
        fpid=""
    fi
    if [[ -n $fmnt ]]; then
        if grep -qF " $fmnt fuse" /proc/mounts; then
            umount -l "$fmnt" 2>/dev/null || warn "cannot unmount $fmnt"
        fi
        rmdir "$fmnt" 2>/dev/null
        fmnt=""
    fi
    return 0
}
cleanup() {
    [[ -n $tailpid ]] && kill "$tailpid" 2>/dev/null
    [[ -n $qpid ]] && kill -KILL "$qpid" 2>/dev/null
    if [[ -n $dpid && $keep_daemon == 0 ]]; then
        kill -TERM "$dpid" 2>/dev/null
        # the daemon holds the image open on faultfs: let it go before the unmount
        for (( i = 0; i < 50; i++ )); do kill -0 "$dpid" 2>/dev/null || break; sleep 0.1; done
    fi
    faultfs_stop
    [[ -n $sockdir ]] && rm -rf "$sockdir"
    return 0
}
trap cleanup EXIT
trap 'exit 130' INT TERM

failures=()     # runner checks that failed (each counts as one failure)
notok_msgs=()   # "not ok" results (counted by the tests themselves)
fail() { failures+=("$*"); }

# ---- device ---------------------------------------------------------------------------------
devargs=()
mem_opt="$(( mem_b >> 20 ))M"
if [[ $device == vhost-user && -n $ext_sock ]]; then
    [[ -S $ext_sock ]] || die "--socket $ext_sock is not a socket; start the daemon first"
    info "attaching to the running daemon on $ext_sock"
    devargs=(-chardev "socket,id=pmem0,path=$(qesc "$ext_sock")${chardev_opts:+,$chardev_opts}"
             -device vhost-user-test-device-pci,chardev=pmem0,virtio-id=27,num_vqs=1,vq_size=256,config_size=16)
elif [[ $device == vhost-user ]]; then
    [[ -x $daemon ]] || die "daemon '$daemon' not found or not executable (build it: cargo build --release -p vhost-user-pmem, or pass --daemon)"
    sock="$logdir/pmem0.sock"
    if (( ${#sock} > 100 )); then   # sun_path holds 108 bytes
        sockdir="$(mktemp -d /tmp/vup-sock.XXXXXX)"
        sock="$sockdir/pmem0.sock"
    fi
    rm -f "$sock"
    daemon_file="$image"
    if (( use_faultfs )); then
        fmnt="$logdir/faultfs.mnt"
        mkdir -p "$fmnt"
        grep -qF " $fmnt fuse" /proc/mounts && die "$fmnt is still mounted from an earlier run (umount -l it)"
        printf 'ok\n' > "$logdir/faultfs.control"
        info "mounting faultfs: $(dirname "$image") on $fmnt (control $logdir/faultfs.control)"
        RUST_LOG="${RUST_LOG:-info}" "$faultfs_bin" --source "$(dirname "$image")" --mountpoint "$fmnt" \
            --control "$logdir/faultfs.control" </dev/null >"$logdir/faultfs.log" 2>&1 &
        fpid=$!
        for (( i = 0; i < 100; i++ )); do
            grep -qF " $fmnt fuse" /proc/mounts && break
            kill -0 "$fpid" 2>/dev/null || { tail -n 20 "$logdir/faultfs.log" >&2; fpid=""; die "faultfs exited before mounting"; }
            sleep 0.1
        done
        grep -qF " $fmnt fuse" /proc/mounts || die "faultfs did not mount $fmnt within 10 s"
        daemon_file="$fmnt/$(basename "$image")"
    fi
    # The handshake's snapshot actions read the daemon's metrics file.
    metrics_file=""
    for (( i = 0; i < ${#daemon_args[@]}; i++ )); do
        case "${daemon_args[i]}" in
            --metrics-path) metrics_file="${daemon_args[i+1]-}" ;;
            --metrics-path=*) metrics_file="${daemon_args[i]#--metrics-path=}" ;;
        esac
    done
    if [[ -z $metrics_file ]]; then
        metrics_file="$logdir/daemon-metrics.json"
        daemon_args+=(--metrics-path "$metrics_file" --metrics-interval 0)
    fi
    # check-queue reads the flush engine's per-fdatasync debug lines
    dlog="${RUST_LOG:-info,vhost_user_pmem::flush=debug}"
    if [[ $daemon_mode == client ]]; then
        # QEMU listens; the daemon is started after QEMU below, once the socket exists.
        # wait=on: QEMU creates the device only once the daemon has connected.
        devargs=(-chardev "socket,id=pmem0,path=$(qesc "$sock"),server=on,wait=on${chardev_opts:+,$chardev_opts}"
                 -device vhost-user-test-device-pci,chardev=pmem0,virtio-id=27,num_vqs=1,vq_size=256,config_size=16)
    else
        info "starting daemon: RUST_LOG=$dlog $daemon --socket-path $sock --file $daemon_file --size $size ${daemon_args[*]-}"
        RUST_LOG="$dlog" "$daemon" --socket-path "$sock" --file "$daemon_file" --size "$size" \
            "${daemon_args[@]+"${daemon_args[@]}"}" </dev/null >"$logdir/daemon.log" 2>&1 &
        dpid=$!
        printf '%s\n' "$dpid" > "$logdir/daemon.pid"
        for (( i = 0; i < 100; i++ )); do
            [[ -S $sock ]] && break
            if ! kill -0 "$dpid" 2>/dev/null; then
                wait "$dpid" && st=0 || st=$?
                dpid=""
                tail -n 40 "$logdir/daemon.log" | sed 's/^/  daemon.log: /' >&2
                die "the daemon exited (status $st) before creating its socket"
            fi
            sleep 0.1
        done
        [[ -S $sock ]] || die "the daemon did not create $sock within 10 s"
        devargs=(-chardev "socket,id=pmem0,path=$(qesc "$sock")${chardev_opts:+,$chardev_opts}"
                 -device vhost-user-test-device-pci,chardev=pmem0,virtio-id=27,num_vqs=1,vq_size=256,config_size=16)
    fi
else
    if [[ ! -e $image ]]; then
        truncate -s "$size_b" "$image" || die "cannot create $image"
    else
        cur=$(stat -c %s "$image")
        (( cur <= size_b )) || die "$image is larger ($cur bytes) than --size $size"
        (( cur == size_b )) || truncate -s "$size_b" "$image"
    fi
    # the device lives in the memory hotplug area: leave room for it above RAM
    maxmem=$(( mem_b + size_b + (1 << 30) ))
    mem_opt="$(( mem_b >> 20 ))M,slots=2,maxmem=$(( maxmem >> 20 ))M"
    devargs=(-object "memory-backend-file,id=pmemmem,share=on,mem-path=$(qesc "$image"),size=$size_b"
             -device virtio-pmem-pci,memdev=pmemmem,id=vpmem0)
fi

# ---- host handshake (VUP-SYNC from the guest, VUP-ACK/VUP-NAK back; see --help) ----------------
hl_fd=""
hl_done=0            # VUP-SYNC lines handled so far
hl_ok_mark=-1        # faultfs.log line count when faultfs was last set to ok
hl_reply() {         # hl_reply ACK|NAK ACTION TEXT
    printf '%s host: VUP-%s %s %s\n' "$(date +%T.%3N)" "$1" "$2" "$3" >> "$logdir/hostlink.log"
    printf 'VUP-%s %s %s\n' "$1" "$2" "$3" >&"$hl_fd"
}
# counter NAME FILE: one counter of the daemon's metrics JSON
counter() { grep -o "\"$1\":[0-9]*" "$2" | head -n 1 | cut -d: -f2; }
# faultfs_count PATTERN [FROM_LINE]: faultfs.log lines about a sync of the image that end in
# PATTERN ("ok" passed through, "EIO injected"), from line FROM_LINE (default 1) on
faultfs_count() {
    tail -n +"${2:-1}" "$logdir/faultfs.log" | grep -F "/$(basename "$image") (" | grep -c "): $1\$" || true
}
# snapshot LABEL: the daemon's metrics now (SIGUSR1), kept as sync-LABEL.json
hl_snapshot() {
    [[ ${1-} =~ ^[A-Za-z0-9_-]+$ ]] || { echo "bad label '${1-}'"; return 1; }
    [[ -n $dpid && -n $metrics_file ]] || { echo "no daemon started by run-vm.sh"; return 1; }
    local before n
    before=$(grep -c 'SIGUSR1: metrics written' "$logdir/daemon.log" || true)
    kill -USR1 "$dpid" 2>/dev/null || { echo "cannot signal the daemon"; return 1; }
    for (( n = 0; n < 200; n++ )); do
        (( $(grep -c 'SIGUSR1: metrics written' "$logdir/daemon.log" || true) > before )) && break
        sleep 0.05
    done
    (( n < 200 )) || { echo "the daemon did not write its metrics within 10 s of SIGUSR1"; return 1; }
    cp "$metrics_file" "$logdir/sync-$1.json"
    wc -l < "$logdir/daemon.log" > "$logdir/sync-$1.logline"
    if (( use_faultfs )); then faultfs_count ok > "$logdir/sync-$1.faultfs"; fi
}
# check_flushes LABEL N: catalogue E16's host half (see --help)
hl_check_flushes() {
    local label=${1-} n=${2-} a b req fds err ov fa fb why=()
    [[ $label =~ ^[A-Za-z0-9_-]+$ && $n =~ ^[0-9]+$ && -f $logdir/sync-$label.json ]] || { echo "no snapshot '$label' or bad count '$n'"; return 1; }
    hl_snapshot "$label-after" || return 1
    a="$logdir/sync-$label.json"; b="$logdir/sync-$label-after.json"
    req=$(( $(counter requests "$b") - $(counter requests "$a") ))
    fds=$(( $(counter fdatasyncs "$b") - $(counter fdatasyncs "$a") ))
    err=$(( $(counter errors "$b") - $(counter errors "$a") ))
    ov=$(counter order_violations "$b")
    (( req >= n )) || why+=("the daemon took $req flush requests in the window, fewer than the $n guest flushes that returned")
    (( fds >= n )) || why+=("the daemon made $fds fdatasyncs in the window, fewer than the $n sequential guest flushes")
    (( err == 0 )) || why+=("$err requests answered with an error")
    (( ov == 0 )) || why+=("order_violations=$ov")
    local figures="requests=+$req fdatasyncs=+$fds errors=+$err order_violations=$ov"
    if (( use_faultfs )); then
        fa=$(cat "$logdir/sync-$label.faultfs"); fb=$(cat "$logdir/sync-$label-after.faultfs")
        (( fb - fa >= n )) || why+=("faultfs passed $((fb - fa)) fdatasyncs of the image in the window, fewer than $n")
        figures+=" faultfs_fdatasyncs=+$((fb - fa))"
    fi
    if (( ${#why[@]} )); then (IFS=';'; echo "${why[*]} ($figures)"); return 1; fi
    echo "$figures"
}
# check_queue LABEL CAP: catalogue E18's host half (see --help)
hl_check_queue() {
    local label=${1-} cap=${2-} la lb most req err
    [[ $label =~ ^[A-Za-z0-9_-]+$ && $cap =~ ^[0-9]+$ && -f $logdir/sync-$label.json ]] || { echo "no snapshot '$label' or bad capacity '$cap'"; return 1; }
    hl_snapshot "$label-after" || return 1
    la=$(cat "$logdir/sync-$label.logline"); lb=$(cat "$logdir/sync-$label-after.logline")
    most=$(sed -n "$((la + 1)),${lb}p" "$logdir/daemon.log" | grep -o 'answered [0-9]* request' | cut -d' ' -f2 | sort -n | tail -n 1)
    req=$(( $(counter requests "$logdir/sync-$label-after.json") - $(counter requests "$logdir/sync-$label.json") ))
    err=$(( $(counter errors "$logdir/sync-$label-after.json") - $(counter errors "$logdir/sync-$label.json") ))
    [[ -n $most ]] || { echo "no fdatasync lines in the daemon's log between the snapshots (RUST_LOG must enable vhost_user_pmem::flush=debug)"; return 1; }
    local figures="requests=+$req errors=+$err largest batch $most"
    (( err == 0 )) || { echo "$err requests answered with an error ($figures)"; return 1; }
    if (( most >= cap )); then figures+=" (a full ring: $cap)"; else figures+=" (a full ring holds $cap; it never filled)"; fi
    echo "$figures"
}
# check_sticky: catalogue E17's host half (see --help)
hl_check_sticky() {
    local why=() eio passed_since fail_line
    (( use_faultfs )) || { echo "needs --faultfs"; return 1; }
    (( hl_ok_mark >= 0 )) || { echo "faultfs was never set back to ok"; return 1; }
    eio=$(faultfs_count "EIO injected")
    passed_since=$(faultfs_count ok "$((hl_ok_mark + 1))")
    fail_line=$(grep -E ' ERROR .*fdatasync of .* failed' "$logdir/daemon.log" | head -n 1 || true)
    (( eio >= 1 )) || why+=("faultfs never injected EIO into an fdatasync of the image")
    (( passed_since == 0 )) || why+=("the daemon called fdatasync $passed_since time(s) after the failure and it passed: the failure is not sticky")
    [[ -n $fail_line ]] || why+=("no error-level line about the failed fdatasync in the daemon's log")
    if hl_snapshot sticky >/dev/null; then
        grep -q '"flush_failure":null' "$logdir/sync-sticky.json" && why+=("the daemon's metrics report no flush failure")
    else
        why+=("no metrics snapshot")
    fi
    if (( ${#why[@]} )); then (IFS=';'; echo "${why[*]}"); return 1; fi
    echo "faultfs injected EIO $eio time(s), passed 0 fdatasyncs since it recovered; daemon error logged, errors=$(counter errors "$logdir/sync-sticky.json")"
}
# hl_poll: handle every complete VUP-SYNC line the guest printed since the last call
hl_poll() {
    local f="$logdir/guest-out.raw" nl lines action args argv text i
    [[ -n $hl_fd && -s $f ]] || return 0
    nl=$(wc -l < "$f")     # complete lines only: the last one may still be arriving
    mapfile -t lines < <(head -n "$nl" "$f" | tr -d '\r' | grep -a '^VUP-SYNC ' || true)
    for (( i = hl_done; i < ${#lines[@]}; i++ )); do
        hl_done=$((i + 1))
        read -r _ action args <<< "${lines[i]}"
        read -r -a argv <<< "$args"
        printf '%s guest: %s\n' "$(date +%T.%3N)" "${lines[i]}" >> "$logdir/hostlink.log"
        case "$action" in
            snapshot) text=$(hl_snapshot "${argv[@]}") && text="saved sync-$args.json" ;;
            check-flushes) text=$(hl_check_flushes "${argv[@]}") ;;
            faultfs)
                if (( ! use_faultfs )); then text="no faultfs (run with --faultfs)"; false
                elif [[ $args == ok || $args == fail-fsync ]]; then
                    printf '%s\n' "$args" > "$logdir/faultfs.control.tmp" && mv -f "$logdir/faultfs.control.tmp" "$logdir/faultfs.control"
                    [[ $args == ok ]] && hl_ok_mark=$(wc -l < "$logdir/faultfs.log")
                    text="mode $args"
                else text="unknown faultfs mode '$args'"; false
                fi ;;
            check-queue) text=$(hl_check_queue "${argv[@]}") ;;
            check-sticky) text=$(hl_check_sticky) ;;
            *) text="unknown action '$action'"; false ;;
        esac && { hl_reply ACK "$action" "$text"; continue; }
        hl_reply NAK "$action" "$text"
        fail "host check '$action${args:+ $args}' failed: $text"
    done
}

# ---- QEMU -------------------------------------------------------------------------------------
cmdline="console=ttyS0 panic=-1 loglevel=5 vup.end=$end"
[[ $end == reboot ]] && cmdline+=" vup.reboots=$reboots"
[[ -n $vup_args ]] && cmdline+=" vup.args=$vup_args"
[[ -n $append ]] && cmdline+=" $append"
cpu=max; [[ $accel == kvm ]] && cpu=host
qargs=(-machine q35,memory-backend=mem0 -accel "$accel" -cpu "$cpu" -smp "$smp" -m "$mem_opt"
       -object "memory-backend-memfd,id=mem0,size=$mem_b,share=on"
       "${devargs[@]}"
       -kernel "$KERNEL_IMAGE" -initrd "$initrd" -append "$cmdline"
       -nographic -nodefaults -no-user-config
       -serial stdio -serial "file:$(qesc "$logdir/guest-out.raw")")
[[ $end == reboot ]] || qargs+=(-no-reboot)
# wall-clock time on QEMU's own messages, to line them up with a daemon kill
[[ $trace_vhost == 1 || -n $dkill_marker ]] && qargs+=(-msg timestamp=on)
if (( trace_vhost )); then
    for ev in vhost_user_write vhost_user_read 'vhost_dev_start*' 'vhost_dev_stop*'; do
        qargs+=(-trace "$ev")
    done
fi
qargs+=("${qemu_extra[@]+"${qemu_extra[@]}"}")
for a in "$QEMU_BIN" "${qargs[@]}"; do
    if [[ $a =~ ^[][A-Za-z0-9_./:=,+@%-]+$ ]]; then printf '%s ' "$a"; else printf "'%s' " "${a//\'/\'\\\'\'}"; fi
done > "$logdir/qemu.cmd"
echo >> "$logdir/qemu.cmd"

info "booting ($device, $accel, image $image, size $size); logs in $logdir"
t0=$(now_ms)
# QEMU's stdin (ttyS0's input) is a FIFO this script holds open read-write: the handshake's
# answers go there, and it never reaches EOF.
mkfifo "$logdir/hostlink"
exec {hl_fd}<>"$logdir/hostlink"
"$QEMU_BIN" "${qargs[@]}" <&"$hl_fd" >"$logdir/console.log" 2>"$logdir/qemu.log" &
qpid=$!
if [[ $device == vhost-user && $daemon_mode == client ]]; then
    for (( i = 0; i < 300; i++ )); do
        [[ -S $sock ]] && break
        kill -0 "$qpid" 2>/dev/null || break
        sleep 0.1
    done
    [[ -S $sock ]] || { tail -n 20 "$logdir/qemu.log" >&2; die "QEMU did not create $sock within 30 s"; }
    info "starting daemon: RUST_LOG=$dlog $daemon --connect $sock --file $daemon_file --size $size ${daemon_args[*]-}"
    RUST_LOG="$dlog" "$daemon" --connect "$sock" --file "$daemon_file" --size "$size" \
        "${daemon_args[@]+"${daemon_args[@]}"}" </dev/null >"$logdir/daemon.log" 2>&1 &
    dpid=$!
    printf '%s\n' "$dpid" > "$logdir/daemon.pid"
fi
if [[ $verbose == 1 ]]; then
    tail -n +1 -f --pid="$qpid" "$logdir/console.log" >&2 &
    tailpid=$!
fi

timed_out=0; marker_kill=0; daemon_died=0; kvm_failed=0; daemon_killed=0; observed=0
deadline=$(( t0 + timeout_s * 1000 ))
while kill -0 "$qpid" 2>/dev/null; do
    if [[ -n $dkill_marker && $daemon_killed == 0 ]] && grep -qF -- "$dkill_marker" "$logdir/guest-out.raw" 2>/dev/null; then
        kill -KILL "$dpid" 2>/dev/null || true
        daemon_killed=1
        kill_ms=$(( $(now_ms) - t0 ))
        printf 'daemon_killed_at_ms=%s wall=%s guest_out_offset=%s\n' "$kill_ms" "$(date -u +%FT%T.%3N)" \
            "$(stat -c %s "$logdir/guest-out.raw")" > "$logdir/kill.txt"
        info "marker '$dkill_marker' seen: daemon killed with SIGKILL after $kill_ms ms; watching QEMU for $observe_s s"
        deadline=$(( $(now_ms) + observe_s * 1000 ))
    fi
    # One clock reading per round: with two, the observation window could end between the
    # check just below and the timeout check, and a normal end would read as a timeout.
    now=$(now_ms)
    if (( daemon_killed )) && (( now > deadline )); then
        kill -KILL "$qpid" 2>/dev/null || true
        observed=1
        break
    fi
    if [[ -n $marker ]] && grep -qF -- "$marker" "$logdir/console.log" "$logdir/guest-out.raw" 2>/dev/null; then
        kill -KILL "$qpid" 2>/dev/null || true
        marker_kill=1
        info "marker '$marker' seen: QEMU killed with SIGKILL after $(( $(now_ms) - t0 )) ms"
        break
    fi
    if (( ! daemon_killed && now > deadline )); then
        kill -KILL "$qpid" 2>/dev/null || true
        timed_out=1
        break
    fi
    if [[ $accel == kvm ]] && grep -q 'KVM internal error' "$logdir/qemu.log" 2>/dev/null; then
        kill -KILL "$qpid" 2>/dev/null || true
        fail "KVM cannot run this guest (KVM internal error, see qemu.log); use --accel tcg"
        kvm_failed=1
        break
    fi
    if [[ -n $dpid && $daemon_killed == 0 ]] && ! kill -0 "$dpid" 2>/dev/null; then
        daemon_died=1
        sleep 1   # give QEMU a moment to report the disconnect
        kill -KILL "$qpid" 2>/dev/null || true
        break
    fi
    hl_poll
    if [[ -n $marker$dkill_marker ]]; then sleep 0.05; else sleep 0.1; fi
done
hl_poll
{ wait "$qpid"; } 2>/dev/null && qrc=0 || qrc=$?
qpid=""
elapsed_ms=$(( $(now_ms) - t0 ))
[[ -n $tailpid ]] && { kill "$tailpid" 2>/dev/null; wait "$tailpid" 2>/dev/null || true; tailpid=""; }

(( timed_out == 0 )) || fail "timeout: QEMU still running after ${timeout_s} s (killed)"
if (( timed_out == 0 && marker_kill == 0 && daemon_died == 0 && kvm_failed == 0 && daemon_killed == 0 && qrc != 0 )); then
    fail "QEMU exited with status $qrc"
fi
if [[ -n $dkill_marker ]]; then
    if (( daemon_killed == 0 )); then
        fail "marker '$dkill_marker' never appeared (the daemon was not killed)"
    elif (( observed )); then
        info "QEMU still running $observe_s s after the daemon was killed (then killed)"
    else
        info "QEMU exited by itself $(( elapsed_ms - kill_ms )) ms after the daemon was killed (status $qrc)"
    fi
fi
if [[ -n $marker && $marker_kill == 0 ]]; then
    fail "marker '$marker' never appeared"
fi

# ---- daemon ---------------------------------------------------------------------------------
if [[ -n $dpid ]]; then
    if (( daemon_killed )); then
        wait "$dpid" 2>/dev/null || true
        dpid=""
    elif (( daemon_died )); then
        wait "$dpid" && st=0 || st=$?
        fail "the daemon died while QEMU was running (status $st)"
        dpid=""
    elif (( keep_daemon )); then
        info "daemon left running (pid $dpid)"
        dpid=""
    else
        kill -TERM "$dpid" 2>/dev/null || true
        for (( i = 0; i < 150; i++ )); do kill -0 "$dpid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$dpid" 2>/dev/null; then
            kill -KILL "$dpid" 2>/dev/null || true
            fail "the daemon did not exit within 15 s of SIGTERM (killed)"
            wait "$dpid" 2>/dev/null || true
        else
            wait "$dpid" && st=0 || st=$?
            (( st == expect_daemon_exit )) || fail "the daemon exited with status $st after SIGTERM, expected $expect_daemon_exit"
            if (( st != 0 )); then info "the daemon exited with status $st after SIGTERM, as expected"; fi
        fi
        dpid=""
    fi
fi

faultfs_stop
[[ -n $hl_fd ]] && { exec {hl_fd}>&-; hl_fd=""; rm -f "$logdir/hostlink"; }

# ---- results ---------------------------------------------------------------------------------
tr -d '\r' < "$logdir/console.log" > "$logdir/console.txt.tmp" && mv -f "$logdir/console.txt.tmp" "$logdir/console.log"
src="$logdir/console.log"
if [[ -f $logdir/guest-out.raw && -f $logdir/kill.txt ]]; then
    off=$(sed -n 's/.*guest_out_offset=\([0-9]*\).*/\1/p' "$logdir/kill.txt")
    tail -c +$(( off + 1 )) "$logdir/guest-out.raw" | tr -d '\r' > "$logdir/after-kill.txt"
    late_ok=$(grep -cE '^VUP-FSYNC n=[0-9]+ ok' "$logdir/after-kill.txt" || true)
    late_err=$(grep -cE '^VUP-FSYNC n=[0-9]+ error' "$logdir/after-kill.txt" || true)
    printf 'fsync_ok_after_kill=%s fsync_errors_after_kill=%s\n' "$late_ok" "$late_err" >> "$logdir/kill.txt"
    info "after the kill the guest printed $late_ok fsync successes and $late_err fsync errors (LOGDIR/after-kill.txt)"
    (( late_ok <= 2 )) || fail "$late_ok fsyncs reported success after the daemon was killed"
fi
if [[ -f $logdir/guest-out.raw ]]; then
    tr -d '\r' < "$logdir/guest-out.raw" > "$logdir/guest-out.txt"
    rm -f "$logdir/guest-out.raw"
    grep -q '^VUP-BEGIN' "$logdir/guest-out.txt" && src="$logdir/guest-out.txt"
fi

# Split the output into boots: tap.txt gets every line between VUP-BEGIN and VUP-END.
awk -v tap="$logdir/tap.txt" -v met="$logdir/metrics.txt" -v hc="$logdir/hostchecks.txt" -v st="$logdir/boots.txt" '
    BEGIN { printf "" > tap; printf "" > met; printf "" > hc; printf "" > st; inb = 0; b = 0 }
    /^VUP-BEGIN/ { if (inb) print b, "noend", ok, nok, plan > st; b++; inb = 1; ok = 0; nok = 0; plan = -1; skip = 0
                   if (b > 1) print "# --- boot " b " ---" > tap; next }
    /^VUP-END rc=/ { if (inb) { rc = $2; sub(/^rc=/, "", rc); print b, rc, ok, nok, plan > st }; inb = 0; next }
    !inb { next }
    /^VUP-METRIC / { print > met; next }
    /^VUP-HOSTCHECK / { print > hc; next }
    { print > tap }
    /^ok( |$)/ { ok++ }
    /^not ok( |$)/ { if ($0 ~ /# *TODO/) ok++; else nok++ }
    /^1\.\.[0-9]+/ { p = $0; sub(/^1\.\./, "", p); sub(/[^0-9].*/, "", p); plan = p }
    END { if (inb) print b, "noend", ok, nok, plan > st }
' "$src"

passed=0; failed_tests=0; nboots=0
while read -r b rc ok nok plan; do
    nboots=$((nboots + 1))
    passed=$((passed + ok)); failed_tests=$((failed_tests + nok))
    tag=""; [[ $b -gt 1 || $end == reboot ]] && tag=" (boot $b)"
    if [[ $rc == noend ]]; then
        if [[ $end != crash && -z $marker$dkill_marker ]]; then fail "no VUP-END$tag: the guest did not finish"; fi
        continue
    fi
    (( rc == 0 )) || fail "the guest binary exited with rc=$rc$tag"
    if (( plan < 0 )); then
        fail "no TAP plan (1..N)$tag"
    elif (( plan != ok + nok )); then
        fail "TAP plan 1..$plan but $((ok + nok)) results$tag"
    fi
    (( nok == 0 )) || notok_msgs+=("$nok test(s) not ok$tag")
done < "$logdir/boots.txt"
rm -f "$logdir/boots.txt"
expect_boots=1; [[ $end == reboot ]] && expect_boots=$((reboots + 1))
if (( nboots == 0 )); then
    fail "no VUP-BEGIN: the guest never ran the test binary"
elif (( nboots < expect_boots )) && [[ -z $marker$dkill_marker ]]; then
    fail "expected $expect_boots boots, saw $nboots"
fi

# host-side checks of data the guest wrote. A later check whose range overlaps an earlier one
# supersedes it: a later boot may legitimately reuse the blocks (it verified the earlier data
# itself before overwriting it), so only the newest claim about each byte is compared.
awk '{
        o = $2; sub(/^offset=/, "", o); l = $3; sub(/^len=/, "", l)
        for (i = 1; i <= n; i++) if (keep[i] && o + 0 < off[i] + len[i] && off[i] + 0 < o + l) keep[i] = 0
        n++; line[n] = $0; off[n] = o + 0; len[n] = l + 0; keep[n] = 1
    }
    END { for (i = 1; i <= n; i++) if (keep[i]) print line[i]; else print "superseded " line[i] > "/dev/stderr" }' \
    "$logdir/hostchecks.txt" > "$logdir/hostchecks.current" 2>"$logdir/hostchecks.superseded"
nhc=0; nhc_bad=0
while read -r _ a b c; do
    off="${a#offset=}"; len="${b#len=}"; want="${c#sha256=}"
    if ! [[ $off =~ ^[0-9]+$ && $len =~ ^[0-9]+$ && $want =~ ^[0-9a-f]{64}$ ]]; then
        fail "malformed VUP-HOSTCHECK line: offset=$off len=$len sha256=$want"; continue
    fi
    got="$(dd if="$image" bs=1M iflag=skip_bytes,count_bytes skip="$off" count="$len" 2>/dev/null | sha256sum | cut -d' ' -f1)"
    nhc=$((nhc + 1))
    if [[ $got == "$want" ]]; then
        printf 'HOSTCHECK offset=%s len=%s ok\n' "$off" "$len" >> "$logdir/hostchecks.result"
    else
        nhc_bad=$((nhc_bad + 1))
        (( nhc_bad > 3 )) || fail "VUP-HOSTCHECK offset=$off len=$len: host image has sha256 $got, guest saw $want"
    fi
done < "$logdir/hostchecks.current"
(( nhc_bad <= 3 )) || fail "... and $((nhc_bad - 3)) more VUP-HOSTCHECK mismatches (of $nhc checks)"

# kernel trouble on the console
if (( allow_warn == 0 )); then
    kw="$(grep -E 'WARNING: |BUG: |Oops|general protection fault|Call Trace:|Kernel panic' "$logdir/console.log" \
          | grep -vE 'sysrq triggered crash|Kernel panic - not syncing: sysrq' || true)"
    if [[ $end == crash ]]; then
        # the sysrq crash prints a panic with a call trace; ignore what follows the crash
        kw="$(sed -n '1,/sysrq: Trigger a crash/p' "$logdir/console.log" \
              | grep -E 'WARNING: |BUG: |Oops|general protection fault|Call Trace:' || true)"
    fi
    [[ -z $kw ]] || fail "kernel warnings in the guest console: $(printf '%s\n' "$kw" | head -n 3 | paste -sd'|')"
fi

# ---- report ----------------------------------------------------------------------------------
nf=$(( failed_tests + ${#failures[@]} ))
failures+=("${notok_msgs[@]+"${notok_msgs[@]}"}")
{
    printf 'device=%s accel=%s end=%s elapsed_ms=%s qemu_rc=%s boots=%s hostchecks=%s\n' \
        "$device" "$accel" "$end" "$elapsed_ms" "$qrc" "$nboots" "$nhc"
    for f in "${failures[@]+"${failures[@]}"}"; do printf 'FAIL: %s\n' "$f"; done
} > "$logdir/result.txt"

if (( ${#failures[@]} > 0 )); then
    for f in "${failures[@]}"; do printf 'run-vm: FAIL: %s\n' "$f" >&2; done
    printf -- '--- console.log (last 40 lines) ---\n' >&2
    tail -n 40 "$logdir/console.log" >&2 || true
    if [[ -s $logdir/qemu.log ]]; then
        printf -- '--- qemu.log (last 20 lines) ---\n' >&2
        tail -n 20 "$logdir/qemu.log" >&2
    fi
    if [[ $device == vhost-user && -f $logdir/daemon.log ]]; then
        printf -- '--- daemon.log (last 40 lines) ---\n' >&2
        tail -n 40 "$logdir/daemon.log" >&2
    fi
    printf -- '--- not ok lines ---\n' >&2
    grep -E '^not ok' "$logdir/tap.txt" >&2 || true
fi
info "QEMU ran $(( elapsed_ms / 1000 )).$(( elapsed_ms % 1000 / 100 )) s; logs in $logdir"
# one word with a colon before "N passed, N failed": the form CI log readers recognise
printf '%s: %d passed, %d failed\n' "$device" "$passed" "$nf"
(( ${#failures[@]} == 0 ))
