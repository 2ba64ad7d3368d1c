#!/usr/bin/env bash
# Build the guest initramfs. See --help.
set -euo pipefail
# shellcheck disable=SC2034  # read by lib.sh
VUP_PROG=build-initramfs
# shellcheck source=scripts/lib.sh
. "$(dirname "$0")/lib.sh"

# Top-level modules; their dependencies (modules.dep) and soft dependencies
# (modules.softdep, resolved through modules.alias) are added in load order.
# "ondemand" modules are packed but not loaded at boot (xfs alone takes ~2.6 s to load
# under TCG): `modprobe xfs` loads them, and so does the kernel itself on `mount -t xfs`.
REQUIRED_MODULES=(virtio_pmem nd_pmem ext4)
OPTIONAL_MODULES=(nd_btt)
ONDEMAND_MODULES=(xfs)

usage() {
    cat <<USAGE
Usage: scripts/build-initramfs.sh --guest-bin PATH --out FILE.cpio.gz [--add SRC:DEST]...

Builds a gzip'd newc initramfs with:
  /init                     guest-tests/init.sh
  /bin/pmem-guest-tests     the --guest-bin binary (must be static)
  /bin/busybox + applets    busybox-static
  /sbin/mke2fs (mkfs.ext4), e2fsck, tune2fs, filefrag, mkfs.xfs, xfs_io, xfs_repair, xfs_db
  /lib/x86_64-linux-gnu     their shared libraries and the loader
  /lib/modules/<version>    ${REQUIRED_MODULES[*]} ${OPTIONAL_MODULES[*]} ${ONDEMAND_MODULES[*]}
                            and their dependencies, decompressed, with a modules.dep and
                            modules.alias for busybox modprobe; the boot set is listed in
                            load order in /lib/modules/load-order (init.sh insmods it);
                            ${ONDEMAND_MODULES[*]} load on demand (modprobe, or mount -t)
The kernel, its modules and the tools come from the cache (fetched on first use), or from
KERNEL=/KERNEL_MODULES= (with KERNEL and no KERNEL_MODULES no modules are packed: the
drivers must be built in).

The output is rebuilt only when an input changed (hash kept in FILE.inputs).

  --guest-bin PATH   the guest test binary (default: build it with scripts/build-guest.sh)
  --out FILE         output file (default: $VUP_BUILD/initramfs.cpio.gz)
  --add SRC:DEST     also pack file SRC as DEST (repeatable)
  --force            rebuild even if the inputs did not change
  -h, --help         this text
USAGE
}

guest_bin=""
out=""
adds=()
force=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --guest-bin) [[ $# -ge 2 ]] || die "--guest-bin needs a path"; guest_bin="$2"; shift ;;
        --out) [[ $# -ge 2 ]] || die "--out needs a path"; out="$2"; shift ;;
        --add) [[ $# -ge 2 && $2 == *:* ]] || die "--add needs SRC:DEST"; adds+=("$2"); shift ;;
        --force) force=1 ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown option '$1' (see --help)" ;;
    esac
    shift
done

t0=$(now_ms)
if [[ -z $guest_bin ]]; then
    guest_bin="$("$VUP_ROOT/scripts/build-guest.sh")" || die "building the guest binary failed"
fi
[[ -f $guest_bin ]] || die "guest binary '$guest_bin' not found"
if readelf -d "$guest_bin" 2>/dev/null | grep -q '(NEEDED)'; then
    die "guest binary '$guest_bin' is dynamically linked; build it with scripts/build-guest.sh"
fi
out="${out:-$VUP_BUILD/initramfs.cpio.gz}"
mkdir -p "$(dirname "$out")"
out="$(cd "$(dirname "$out")" && pwd)/$(basename "$out")"

resolve_kernel
resolve_guest_tools
INIT="$VUP_ROOT/guest-tests/init.sh"
[[ -f $INIT ]] || die "$INIT is missing"

# ---- input hash -----------------------------------------------------------------
inputs_hash() {
    {
        echo "kernel=$KERNEL_IMAGE moddir=$KERNEL_MODDIR"
        [[ -n $KERNEL_MODDIR ]] && stat -c '%n %s %Y' "$KERNEL_MODDIR/modules.dep"
        cat "$VUP_CACHE/guest-tools/versions"
        stat -c '%n %s %Y' "$VUP_CACHE/guest-tools/.complete"
        sha256sum "$guest_bin" "$INIT" "$0" "$VUP_ROOT/scripts/lib.sh"
        local a
        for a in "${adds[@]+"${adds[@]}"}"; do echo "add=$a"; sha256sum "${a%%:*}"; done
    } | sha256sum | cut -d' ' -f1
}
hash="$(inputs_hash)"
if [[ $force == 0 && -f $out && -f $out.inputs && "$(cat "$out.inputs")" == "$hash" ]]; then
    info "up to date: $out"
    printf '%s\n' "$out"
    exit 0
fi

# ---- staging tree ---------------------------------------------------------------
need_cmd gzip find sort
stage="$(mktemp -d "${TMPDIR:-/tmp}/vup-initramfs.XXXXXX")"
trap 'rm -rf "$stage"' EXIT
cd "$stage"
mkdir -p bin sbin usr/bin usr/sbin lib/x86_64-linux-gnu lib64 etc proc sys dev tmp mnt run root \
         lib/modules
ln -s lib/x86_64-linux-gnu usr/lib   # lets /usr/lib/x86_64-linux-gnu resolve too

T="$GUEST_TOOLS"
cp "$T/bin/busybox" bin/busybox
# busybox applets, except those for which a real tool is packed
while read -r applet; do
    [[ -n $applet && $applet != bin/busybox ]] || continue
    name="${applet##*/}"
    [[ -e $T/bin/$name ]] && continue
    mkdir -p "$(dirname "$applet")"
    [[ -e $applet ]] || ln -s /bin/busybox "$applet"
done < <("$T/bin/busybox" --list-full)
for b in "$T"/bin/*; do
    n="${b##*/}"
    [[ $n == busybox ]] && continue
    cp "$b" "sbin/$n"
done
ln -sf mke2fs sbin/mkfs.ext4
ln -sf mke2fs sbin/mkfs.ext2
ln -sf e2fsck sbin/fsck.ext4
cp "$T"/lib/* lib/x86_64-linux-gnu/
ln -s /lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 lib64/ld-linux-x86-64.so.2
[[ -f $T/etc/mke2fs.conf ]] && cp "$T/etc/mke2fs.conf" etc/
printf 'root:x:0:0:root:/root:/bin/sh\n' > etc/passwd
printf 'root:x:0:\n' > etc/group
: > etc/fstab
# the kernel's built-in initramfs already has /dev/console; add it anyway when we can
mknod -m 600 dev/console c 5 1 2>/dev/null || true

cp "$INIT" init
chmod 755 init
if command -v strip >/dev/null 2>&1; then
    strip --strip-debug -o bin/pmem-guest-tests "$guest_bin" 2>/dev/null || cp "$guest_bin" bin/pmem-guest-tests
else
    cp "$guest_bin" bin/pmem-guest-tests
fi
chmod 755 bin/pmem-guest-tests

for a in "${adds[@]+"${adds[@]}"}"; do
    src="${a%%:*}"; dst="${a#*:}"; dst="${dst#/}"
    [[ -e $src ]] || die "--add: '$src' not found"
    mkdir -p "$(dirname "$dst")"
    cp -a "$src" "$dst"
done

# ---- modules ----------------------------------------------------------------------
nmods=0
if [[ -n $KERNEL_MODDIR ]]; then
    M="$KERNEL_MODDIR"
    kver="$(basename "$M")"
    [[ -f $M/modules.dep ]] || die "$M/modules.dep is missing (run depmod for $kver)"
    declare -A DEP=() BYNAME=() BUILTIN=() ALIAS=() SOFTPRE=() SEEN=()
    modname() { local n="${1##*/}"; n="${n%%.ko*}"; printf '%s' "${n//-/_}"; }
    while IFS= read -r line; do
        key="${line%%:*}"
        DEP[$key]="${line#*:}"
        n="${key##*/}"; n="${n%%.ko*}"
        BYNAME[${n//-/_}]="$key"
    done < "$M/modules.dep"
    if [[ -f $M/modules.builtin ]]; then
        while IFS= read -r line; do
            n="${line##*/}"; n="${n%%.ko*}"
            BUILTIN[${n//-/_}]=1
        done < "$M/modules.builtin"
    fi
    if [[ -f $M/modules.softdep ]]; then
        while read -r _ m rest; do
            [[ $rest == pre:* ]] || continue
            pre="${rest#pre:}"; pre="${pre%%post:*}"
            SOFTPRE[$(modname "$m")]="$pre"
        done < <(grep '^softdep ' "$M/modules.softdep")
    fi
    # aliases, only for the names soft dependencies use (e.g. crypto-crc32c)
    if [[ -f $M/modules.alias && ${#SOFTPRE[@]} -gt 0 ]]; then
        while read -r _ a m; do
            ALIAS[$a]+="$m "
        done < <(printf '%s\n' "${SOFTPRE[@]}" | tr ' ' '\n' | grep -v '^$' | sort -u | sed 's/^/alias /; s/$/ /' \
                 | grep -F -f - "$M/modules.alias" || true)
    fi

    order=()
    # add_mod NAME FLAG: append NAME and what it needs (dependencies first)
    add_mod() {
        local name flag="$2" path d s a found
        name="$(modname "$1")"
        [[ -n ${SEEN[$name]:-} ]] && return 0
        SEEN[$name]=1
        if [[ -n ${BUILTIN[$name]:-} ]]; then return 0; fi
        path="${BYNAME[$name]:-}"
        if [[ -z $path ]]; then
            # maybe an alias (softdeps name crypto-crc32c and the like)
            found=0
            for a in ${ALIAS[$1]:-}; do add_mod "$a" optional; found=1; done
            [[ $found == 1 ]] && return 0
            [[ $flag != required ]] && { warn "module $1 not found in $kver (optional, skipped)"; return 0; }
            die "module $1 is neither built into $kver nor in $M"
        fi
        for s in ${SOFTPRE[$name]:-}; do add_mod "$s" optional; done
        local deplist i
        read -r -a deplist <<<"${DEP[$path]}"
        for (( i = ${#deplist[@]} - 1; i >= 0; i-- )); do add_mod "${deplist[i]}" "$flag"; done
        order+=("$path $flag")
    }
    for m in "${REQUIRED_MODULES[@]}"; do add_mod "$m" required; done
    for m in "${OPTIONAL_MODULES[@]}"; do add_mod "$m" optional; done
    for m in "${ONDEMAND_MODULES[@]}"; do add_mod "$m" ondemand; done

    mkdir -p "lib/modules/$kver"
    : > lib/modules/load-order
    : > "lib/modules/$kver/modules.dep"
    declare -A PACKED=()
    for e in "${order[@]}"; do PACKED[${e% *}]=1; done
    for e in "${order[@]}"; do
        path="${e% *}"; flag="${e##* }"
        base="${path%.xz}"; base="${base%.zst}"; base="${base%.gz}"
        mkdir -p "lib/modules/$kver/$(dirname "$base")"
        case "$path" in
            *.xz)  xz -dc "$M/$path" ;;
            *.zst) zstd -qdc "$M/$path" ;;
            *.gz)  gzip -dc "$M/$path" ;;
            *)     cat "$M/$path" ;;
        esac > "lib/modules/$kver/$base" || die "cannot decompress $M/$path"
        printf '%s %s\n' "$base" "$flag" >> lib/modules/load-order
        # modules.dep for busybox modprobe, with the decompressed names
        mdeps=""
        for d in ${DEP[$path]}; do
            [[ -n ${PACKED[$d]:-} ]] || continue
            d="${d%.xz}"; d="${d%.zst}"; d="${d%.gz}"
            mdeps+=" $d"
        done
        printf '%s:%s\n' "$base" "$mdeps" >> "lib/modules/$kver/modules.dep"
        nmods=$((nmods + 1))
    done
    # aliases of the packed modules (fs-xfs -> xfs, crypto-crc32c -> ..., ...)
    if [[ -f $M/modules.alias ]]; then
        for e in "${order[@]}"; do n="${e% *}"; n="${n##*/}"; n="${n%%.ko*}"; echo " ${n//-/_}"; done \
            | sort -u | grep -F -f - "$M/modules.alias" | grep -v '[*?]' \
            > "lib/modules/$kver/modules.alias" || true
    fi
    [[ -f $M/modules.builtin ]] && cp "$M/modules.builtin" "lib/modules/$kver/"
fi

# ---- archive ----------------------------------------------------------------------
tmp="$out.tmp.$$"
find . -mindepth 1 | LC_ALL=C sort | "$T/bin/busybox" cpio -o -H newc 2>/dev/null | gzip -1 > "$tmp" \
    || { rm -f "$tmp"; die "creating the cpio archive failed"; }
mv -f "$tmp" "$out"
printf '%s\n' "$hash" > "$out.inputs"
cp lib/modules/load-order "$out.modules" 2>/dev/null || : > "$out.modules"
info "built $out ($(du -h "$out" | cut -f1), $nmods modules, $(( $(now_ms) - t0 )) ms)"
printf '%s\n' "$out"
