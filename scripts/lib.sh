# shellcheck shell=bash disable=SC2034  # the resolvers set variables for the sourcing script
# Shared helpers for the vhost-user-pmem scripts. Source it; do not run it.
#
#   VUP_CACHE   download cache (outside the clone, shared by every clone on the machine):
#               ${VUP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vhost-user-pmem}
#   VUP_ROOT    the repository root
#   VUP_BUILD   build outputs of this clone (initramfs, images, logs): $VUP_ROOT/.cache
#
# Overrides honoured by the resolvers below:
#   QEMU=/path/to/qemu-system-x86_64   use this QEMU (must be 11.0 or later)
#   KERNEL=/path/to/bzImage            use this kernel
#   KERNEL_MODULES=/path/lib/modules/V use these modules (with KERNEL but without
#                                      KERNEL_MODULES, the drivers are assumed built in)
#   VUP_KERNEL_SUITE=sid               use that suite's current Debian kernel (fetched into
#                                      $VUP_CACHE/kernel-sid) instead of 6.12 from
#                                      bookworm-backports
#   VUP_DEBIAN_MIRROR=URI              Debian archive URI (default: taken from the machine's
#                                      own apt sources at run time)

if [[ -n "${VUP_LIB_SOURCED:-}" ]]; then return 0; fi
VUP_LIB_SOURCED=1

VUP_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VUP_CACHE="${VUP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vhost-user-pmem}"
VUP_BUILD="${VUP_BUILD:-$VUP_ROOT/.cache}"
VUP_PROG="${VUP_PROG:-$(basename "$0" .sh)}"
export VUP_CACHE

# Versions the project was measured with.
VUP_QEMU_PKG="${VUP_QEMU_PKG:-qemu-system-x86}"
VUP_QEMU_SUITE="${VUP_QEMU_SUITE:-trixie-backports}"
VUP_QEMU_MIN_MAJOR=11
# The guest kernel's suite: bookworm-backports (the default, VUP_KERNEL_DEFAULT_PKG) or another
# Debian suite, whose current kernel scripts/fetch-kernel.sh fetches into $VUP_CACHE/kernel-SUITE.
# VUP_KERNEL_PKG pins a package (empty: the suite's default).
VUP_KERNEL_DEFAULT_PKG=linux-image-6.12.95+deb12-amd64
VUP_KERNEL_PKG="${VUP_KERNEL_PKG:-}"
VUP_KERNEL_SUITE="${VUP_KERNEL_SUITE:-bookworm-backports}"
export VUP_KERNEL_SUITE
DEBIAN_KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg

info() { printf '%s: %s\n' "$VUP_PROG" "$*" >&2; }
warn() { printf '%s: warning: %s\n' "$VUP_PROG" "$*" >&2; }
die()  { printf '%s: error: %s\n' "$VUP_PROG" "$*" >&2; exit 1; }

need_cmd() {
    local c
    for c in "$@"; do
        command -v "$c" >/dev/null 2>&1 || die "required command '$c' not found in PATH"
    done
}

# parse_fetch_args ARGS...: the fetch scripts' shared options. Sets force=1 for --force, runs the
# caller's `usage` for -h/--help, and refuses anything else.
parse_fetch_args() {
    force=0
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --force) force=1 ;;
            -h|--help) usage; exit 0 ;;
            *) die "unknown option '$1' (see --help)" ;;
        esac
        shift
    done
}

# now_ms: milliseconds since the epoch (for timings)
now_ms() { date +%s%3N; }

# with_lock NAME CMD...: run CMD under an exclusive lock in the cache, so that two
# scripts fetching the same thing at once do not trip over each other.
with_lock() {
    local name="$1"; shift
    mkdir -p "$VUP_CACHE/locks"
    (
        exec 9>"$VUP_CACHE/locks/$name.lock"
        if ! flock -n 9; then
            info "waiting for another process holding the '$name' lock"
            flock 9
        fi
        "$@"
    )
}

# ---------------------------------------------------------------------------
# Private apt roots. Nothing here reads or writes the machine's apt state.
# ---------------------------------------------------------------------------

# debian_mirror: the Debian archive URI of this machine's own apt sources.
debian_mirror() {
    if [[ -n "${VUP_DEBIAN_MIRROR:-}" ]]; then printf '%s\n' "$VUP_DEBIAN_MIRROR"; return; fi
    local f uri=""
    f=/etc/apt/sources.list.d/debian.sources
    if [[ -r $f ]]; then
        # first URIs: value that is not the security archive
        uri="$(awk 'tolower($1)=="uris:" { for (i = 2; i <= NF; i++) if ($i !~ /security/) { print $i; exit } }' "$f")"
    fi
    if [[ -z $uri && -r /etc/apt/sources.list ]]; then
        uri="$(awk '$1=="deb" { for (i = 2; i <= NF; i++) { if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; continue } if ($i !~ /security/) { print $i; exit } } }' /etc/apt/sources.list)"
    fi
    [[ -n $uri ]] || die "cannot find a Debian archive URI in /etc/apt/sources.list.d/debian.sources or /etc/apt/sources.list; set VUP_DEBIAN_MIRROR"
    printf '%s\n' "${uri%/}"
}

# apt_root_init NAME SUITE...: create (or refresh) the private apt root NAME.
apt_root_init() {
    local name="$1"; shift
    local d="$VUP_CACHE/apt/$name" mirror s
    [[ -r $DEBIAN_KEYRING ]] || die "$DEBIAN_KEYRING is missing (package debian-archive-keyring)"
    mirror="$(debian_mirror)"
    mkdir -p "$d/etc/sources.list.d" "$d/etc/preferences.d" "$d/lists/partial" \
             "$d/cache/archives/partial"
    : > "$d/sources.list.new"
    for s in "$@"; do
        printf 'deb [signed-by=%s] %s %s main\n' "$DEBIAN_KEYRING" "$mirror" "$s" >> "$d/sources.list.new"
    done
    mv -f "$d/sources.list.new" "$d/etc/sources.list"
    [[ -e $d/status ]] || : > "$d/status"
}

# apt_priv NAME apt-get|apt-cache ARGS...: run an apt tool against the private root NAME.
apt_priv() {
    local name="$1" tool="$2"; shift 2
    local d="$VUP_CACHE/apt/$name"
    [[ -f $d/etc/sources.list ]] || die "private apt root '$name' is not initialised"
    "$tool" \
        -o Dir::Etc::SourceList="$d/etc/sources.list" \
        -o Dir::Etc::SourceParts="$d/etc/sources.list.d" \
        -o Dir::Etc::Preferences="$d/etc/preferences" \
        -o Dir::Etc::PreferencesParts="$d/etc/preferences.d" \
        -o Dir::State::Lists="$d/lists" \
        -o Dir::State::status="$d/status" \
        -o Dir::State::extended_states="$d/extended_states" \
        -o Dir::Cache="$d/cache" \
        -o APT::Sandbox::User=root \
        -o APT::Install-Recommends=false \
        -o APT::Install-Suggests=false \
        -o Acquire::Languages=none \
        -o Debug::NoLocking=true \
        "$@"
}

# apt_priv_update NAME: refresh the package lists of root NAME.
apt_priv_update() {
    info "apt-get update (private root '$1': $(awk '{print $4}' "$VUP_CACHE/apt/$1/etc/sources.list" | paste -sd' '))"
    apt_priv "$1" apt-get -q update >"$VUP_CACHE/apt/$1/update.log" 2>&1 \
        || { tail -n 20 "$VUP_CACHE/apt/$1/update.log" >&2; die "apt-get update failed for private root '$1'"; }
}

# apt_priv_fetch NAME ARCHIVEDIR LISTFILE [apt-get install options and packages...]:
# download a package and its whole dependency closure (the private dpkg status is empty,
# so nothing counts as installed) into ARCHIVEDIR, and write the .deb paths to LISTFILE.
apt_priv_fetch() {
    local name="$1" archives="$2" listfile="$3"; shift 3
    local sim
    mkdir -p "$archives/partial"
    sim="$(apt_priv "$name" apt-get -q -s -y install "$@" 2>&1)" \
        || { printf '%s\n' "$sim" | tail -n 20 >&2; die "apt-get cannot resolve: $*"; }
    apt_priv "$name" apt-get -q -y -o Dir::Cache::archives="$archives" install --download-only "$@" \
        >"$archives/download.log" 2>&1 \
        || { tail -n 20 "$archives/download.log" >&2; die "apt-get download failed: $*"; }
    # "Inst pkg (version suite [arch])" -> archives/pkg_version_arch.deb (':' is %3a)
    printf '%s\n' "$sim" | awk '$1=="Inst" { v=$3; sub(/^\(/, "", v); gsub(/:/, "%3a", v); a=""; if (match($0, /\[[a-z0-9]+\]/)) a=substr($0, RSTART+1, RLENGTH-2); print $2 "_" v "_" a ".deb" }' \
        | while read -r f; do
            [[ -f $archives/$f ]] || die "expected $archives/$f after download"
            printf '%s\n' "$archives/$f"
        done > "$listfile"
    [[ -s $listfile ]] || die "apt-get resolved no packages for: $*"
}

# unpack_debs LISTFILE DESTDIR: dpkg -x every .deb listed.
unpack_debs() {
    local f
    mkdir -p "$2"
    while read -r f; do
        dpkg-deb -x "$f" "$2" || die "dpkg -x $f failed"
    done < "$1"
}

# fetch_main NAME RESULT APT_ROOT SUITE... -- SCRIPT_ARGS...: the whole of a fetch script.
# Takes --force and --help (the caller's `usage`), then, under the lock NAME, either reuses a
# complete $VUP_CACHE/NAME or builds it again, and prints $VUP_CACHE/NAME/RESULT on stdout.
# The caller defines two functions:
#   fetch_build STAGE DEBS  download through the private apt root APT_ROOT (already updated,
#                           serving the SUITEs) into DEBS and build the result in the empty
#                           directory STAGE; die on any failure
#   fetch_verify DIR        check the published result in DIR and print one line saying what
#                           it holds; fail if it is not usable (a cached one is then rebuilt)
fetch_main() {
    local name="$1" result="$2" apt=()
    shift 2
    while [[ $# -gt 0 && $1 != -- ]]; do apt+=("$1"); shift; done
    [[ $# -gt 0 ]] && shift
    parse_fetch_args "$@"
    mkdir -p "$VUP_CACHE"
    with_lock "$name" fetch_locked "$name" "$result" "${apt[@]}"
}

# fetch_locked NAME RESULT APT_ROOT SUITE...: fetch_main's work, with the lock held.
# The result is built beside the cache entry and swapped in whole, and .complete is written
# only after it verified, so a reader never takes a half-built or mixed entry for complete.
fetch_locked() {
    local name="$1" result="$2"; shift 2
    local dir="$VUP_CACHE/$name" debs="$VUP_CACHE/debs/$name" t0 desc
    if [[ $force == 0 && -f $dir/.complete ]]; then
        if desc="$(fetch_verify "$dir")"; then
            info "cached: $desc"
            printf '%s\n' "$dir/$result"
            return 0
        fi
        warn "the cached $name in $dir is not usable; fetching it again"
    fi
    need_cmd apt-get dpkg-deb flock
    t0=$(now_ms)
    # --force promises a fresh download, and apt would reuse any .deb already there.
    if [[ $force == 1 ]]; then rm -rf "$debs"; fi
    mkdir -p "$debs"
    apt_root_init "$@"
    apt_priv_update "$1"
    rm -rf "$dir.new" "$dir.old"
    mkdir -p "$dir.new"
    fetch_build "$dir.new" "$debs"
    if [[ -e $dir ]]; then rm -f "$dir/.complete"; mv "$dir" "$dir.old"; fi
    mv "$dir.new" "$dir"
    rm -rf "$dir.old"
    desc="$(fetch_verify "$dir")" || die "the $name just built in $dir does not work (see above)"
    touch "$dir/.complete"
    info "ready in $(( ($(now_ms) - t0) / 1000 )) s: $desc ($(du -sh "$dir" | cut -f1))"
    printf '%s\n' "$dir/$result"
}

# ---------------------------------------------------------------------------
# Resolvers
# ---------------------------------------------------------------------------

VUP_QEMU_LAUNCHER="$VUP_CACHE/qemu/bin/qemu-system-x86_64"

# write_launcher LAUNCHER ROOT BY ENV LOADER LIBPATH PROGRAM [ARGS]: writes LAUNCHER, a sh
# script that runs ROOT/PROGRAM, unpacked with dpkg -x, through ROOT's own dynamic loader
# (ROOT/LOADER) with the library path LIBPATH, after the line ENV (empty for none), with ARGS
# before the caller's. ENV, LIBPATH and ARGS are script text in which $R stands for ROOT. BY
# names the fetch script, for the header. The launcher is renamed into place whole.
write_launcher() {
    local launcher="$1" r="$2" by="$3" env="$4" loader="$5" libpath="$6" program="$7" args="${8:-}" tmp
    mkdir -p "$(dirname "$launcher")"
    tmp="$launcher.tmp.$$"
    {
        printf '#!/bin/sh\n'
        printf '# Generated by %s: runs the %s unpacked under %s\n' "$by" "$(basename "$program")" "$r"
        printf "# through that tree's own dynamic loader. Nothing is installed on the machine.\n"
        printf "R='%s'\n" "$r"
        [[ -z $env ]] || printf '%s\n' "$env"
        printf 'exec "$R/%s" \\\n    --library-path "%s" \\\n    "$R/%s"%s "$@"\n' \
            "$loader" "$libpath" "$program" "${args:+ $args}"
    } > "$tmp"
    chmod +x "$tmp"
    mv -f "$tmp" "$launcher"
}

# qemu_write_launcher ROOT: write the launcher that runs the unpacked QEMU.
qemu_write_launcher() {
    write_launcher "$VUP_QEMU_LAUNCHER" "$1" scripts/fetch-qemu.sh \
        'export QEMU_MODULE_DIR="$R/usr/lib/x86_64-linux-gnu/qemu"' \
        usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 \
        '$R/usr/lib/x86_64-linux-gnu:$R/lib/x86_64-linux-gnu:$R/usr/lib/x86_64-linux-gnu/pulseaudio' \
        usr/bin/qemu-system-x86_64 '-L "$R/usr/share/qemu" -L "$R/usr/share/seabios"'
}

# qemu_version_ok QEMU: print the version line; fail unless major >= 11.
qemu_version_ok() {
    local out major
    # No `| head`: under pipefail a SIGPIPE'd writer would look like a broken QEMU.
    out="$("$1" --version 2>&1)" || { printf '%s\n' "$out" >&2; return 1; }
    out="${out%%$'\n'*}"
    major="$(printf '%s\n' "$out" | sed -n 's/^QEMU emulator version \([0-9]*\)\..*/\1/p')"
    if [[ -z $major || $major -lt $VUP_QEMU_MIN_MAJOR ]]; then
        printf '%s\n' "$out" >&2
        return 1
    fi
    printf '%s\n' "$out"
}

# resolve_qemu: set QEMU_BIN to a runnable qemu-system-x86_64 (11.0 or later).
# Honours QEMU=...; otherwise uses (fetching on first use) the cached Debian build.
resolve_qemu() {
    if [[ -n "${QEMU:-}" ]]; then
        local q="$QEMU"
        [[ $q == */* ]] || q="$(command -v "$q" 2>/dev/null)" || q="$QEMU"
        [[ -f $q && -x $q ]] || die "QEMU=$QEMU is not an executable file"
        QEMU="$q"
        qemu_version_ok "$QEMU" >/dev/null || die "QEMU=$QEMU is not QEMU $VUP_QEMU_MIN_MAJOR.0 or later (vhost-user-test-device-pci with shared memory needs 11.0+)"
        QEMU_BIN="$QEMU"
        return
    fi
    if [[ ! -f $VUP_CACHE/qemu/.complete || ! -x $VUP_QEMU_LAUNCHER ]]; then
        "$VUP_ROOT/scripts/fetch-qemu.sh" >&2 || die "fetching QEMU failed"
    fi
    QEMU_BIN="$VUP_QEMU_LAUNCHER"
}

# resolve_kernel: set KERNEL_IMAGE and KERNEL_MODDIR (empty when the drivers are built in).
resolve_kernel() {
    if [[ -n "${KERNEL:-}" ]]; then
        [[ -r $KERNEL ]] || die "KERNEL=$KERNEL is not a readable file"
        KERNEL_IMAGE="$KERNEL"
        KERNEL_MODDIR=""
        if [[ -n ${KERNEL_MODULES:-} ]]; then
            [[ -d $KERNEL_MODULES ]] || die "KERNEL_MODULES=$KERNEL_MODULES is not a directory (expected .../lib/modules/<version>)"
            KERNEL_MODDIR="$(cd "$KERNEL_MODULES" && pwd -P)"
        fi
        return
    fi
    local dir
    dir="$(kernel_cache_dir)"
    if [[ ! -f $dir/.complete ]]; then
        "$VUP_ROOT/scripts/fetch-kernel.sh" >&2 || die "fetching the kernel failed"
    fi
    KERNEL_IMAGE="$dir/vmlinuz"
    KERNEL_MODDIR="$(readlink -f "$dir/modules")"
}

# kernel_cache_dir: where scripts/fetch-kernel.sh puts the kernel of VUP_KERNEL_SUITE.
kernel_cache_dir() {
    if [[ $VUP_KERNEL_SUITE == bookworm-backports ]]; then
        printf '%s\n' "$VUP_CACHE/kernel"
    else
        printf '%s\n' "$VUP_CACHE/kernel-$VUP_KERNEL_SUITE"
    fi
}

# resolve_guest_tools: set GUEST_TOOLS to the directory holding bin/, lib/ and etc/ for the
# initramfs (busybox, mke2fs, mkfs.xfs and their libraries).
resolve_guest_tools() {
    if [[ ! -f $VUP_CACHE/guest-tools/.complete ]]; then
        "$VUP_ROOT/scripts/fetch-guest-tools.sh" >&2 || die "fetching the guest tools failed"
    fi
    GUEST_TOOLS="$VUP_CACHE/guest-tools/out"
}

# build_vm_inputs INITRD: everything a VM run needs, built or fetched (cached after the first
# run): the release daemon, QEMU, the guest kernel and tools, the guest binary, and an
# initramfs written to INITRD.
build_vm_inputs() {
    build_runner
    "$VUP_ROOT/scripts/fetch-qemu.sh" >/dev/null
    "$VUP_ROOT/scripts/fetch-kernel.sh" >/dev/null
    "$VUP_ROOT/scripts/fetch-guest-tools.sh" >/dev/null
    # The initramfs and vmrun must boot the same kernel: hand both the one resolved here
    # (vmrun alone would also follow KERNEL= and VUP_KERNEL_SUITE=, but not this script's view).
    resolve_kernel
    export KERNEL="$KERNEL_IMAGE"
    if [[ -n $KERNEL_MODDIR ]]; then export KERNEL_MODULES="$KERNEL_MODDIR"; fi
    local guest_bin
    guest_bin=$("$VUP_ROOT/scripts/build-guest.sh")
    "$VUP_ROOT/scripts/build-initramfs.sh" --guest-bin "$guest_bin" --out "$1" >/dev/null
}

# guest_bench_start OUT GUEST-LINE: a guest benchmark's fresh results directory OUT, with
# everything its VM runs need (build_vm_inputs, the initramfs in OUT/initrd.cpio.gz) and the head
# of OUT/machine.txt: when, which host, its load, what the guest runs (GUEST-LINE), which kernel.
guest_bench_start() {
    rm -rf "$1"; mkdir -p "$1"
    info "building the daemon and the guest, fetching QEMU and the kernel (cached after the first run)"
    build_vm_inputs "$1/initrd.cpio.gz"
    {
        echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
        echo "host: $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')), kernel $(uname -r)"
        echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
        echo "guest: $2"
        echo "guest kernel: ${KERNEL_MODULES:+$(basename "$KERNEL_MODULES") }($KERNEL; VUP_KERNEL_SUITE=$VUP_KERNEL_SUITE)"
    } >"$1/machine.txt"
}

# VUP_RUNNER: the VM runner (crates/vm-runner), next to the daemon and faultfs it starts.
VUP_RUNNER="$VUP_ROOT/target/release/vmrun"

# build_runner: build (or find up to date) the runner, the daemon and faultfs, in release mode
# in the clone's own target directory, whatever CARGO_TARGET_DIR says.
build_runner() {
    (cd "$VUP_ROOT" && env -u CARGO_TARGET_DIR cargo build --release -q \
        -p vm-runner -p vhost-user-pmem -p faultfs) >&2 || die "cargo build of the runner failed"
}
