#!/usr/bin/env bash
# The Linux test guest: a Debian kernel and a busybox initramfs whose init (guest/linux/init)
# mounts a virtio block disk, runs a scripted workload, prints checksums or timings and ends
# the VM with an exit status through the debug-exit port 0xf4. guest/linux/README.md
# describes the guest; this script builds it and the disks it works on.
#
#   scripts/linux-guest.sh                  build (if needed) and print the paths:
#                                             kernel=/abs/target/linux-guest/vmlinuz
#                                             initrd=/abs/target/linux-guest/initramfs.cpio.gz
#                                             initrd_redis=/abs/target/linux-guest/initramfs-redis.cpio.gz
#   scripts/linux-guest.sh disk PATH [MIB]  create PATH afresh: a raw image of MIB MiB
#                                           (default 64) holding an empty ext4 file system
#   scripts/linux-guest.sh expected         print the "checksum NAME SHA256" lines the
#                                           files workload must print
#
# The kernel is the package linux-image-amd64 depends on (scripts/lib/debian-kernel.sh,
# shared with scripts/nested.sh); the initramfs holds the host's busybox-static, the init and
# the modules the guest needs (virtio-mmio, virtio-blk, ext4, virtio-net and what they depend
# on), loaded in dependency order. A second initramfs, initramfs-redis.cpio.gz, holds the same
# and Debian's Redis server with the shared libraries it links (the `redis` workload): it is
# three times the size, and a protected guest pays for every page it unpacks, so the other
# workloads keep the small one. All are kept under target/linux-guest/ and rebuilt when
# guest/linux/init, this script, the Redis binary or the kernel package changes. First use
# installs busybox-static, cpio, binutils and redis-tools (e2fsprogs for `disk`) from Debian
# when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
out="$repo/target/linux-guest"
init_src="$repo/guest/linux/init"

fail() {
    echo "linux-guest: $*" >&2
    exit 1
}

usage() {
    echo "usage: scripts/linux-guest.sh [disk PATH [MIB] | expected]" >&2
    exit 2
}

# need PACKAGE...: installs from Debian those of the packages that are not installed yet.
need() {
    local missing=() p sudo=""
    for p in "$@"; do
        dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
    done
    [ ${#missing[@]} -gt 0 ] || return 0
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "linux-guest: installing ${missing[*]}" >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}

# --- disk PATH [MIB]: a fresh raw image with an empty ext4 file system ----------------------
make_disk() {
    local path="$1" mib="${2:-64}"
    if ! [[ "$mib" =~ ^[0-9]+$ ]] || [ "$mib" -lt 8 ]; then
        fail "disk size must be a number of MiB, at least 8"
    fi
    need e2fsprogs
    rm -f "$path"
    truncate -s "${mib}M" "$path"
    # No lazy initialisation: with it the guest kernel would zero the inode tables and the
    # journal itself, in a background thread, during the workloads (I/O nobody asked for).
    /sbin/mkfs.ext4 -F -q -b 4096 -E lazy_itable_init=0,lazy_journal_init=0 -L ftvm-guest "$path"
}

# --- expected: the files workload's checksum lines, computed here --------------------------
# Runs the part of the init between its "# >>> shared" and "# <<< shared" markers (the
# generator and the checksum printer) under the host's busybox sh, with only busybox applets
# on PATH: the same binary the initramfs carries, so the bytes are the same as in the guest.
expected() {
    need busybox-static
    local tmp
    tmp=$(mktemp -d)
    # shellcheck disable=SC2064 # $tmp is meant to be expanded now
    trap "rm -rf '$tmp'" EXIT
    mkdir "$tmp/bin" "$tmp/files"
    /bin/busybox --install -s "$tmp/bin"
    sed -n '/^# >>> shared/,/^# <<< shared/p' "$init_src" >"$tmp/shared.sh"
    grep -q '^checksums()' "$tmp/shared.sh" || fail "no shared section in $init_src"
    # shellcheck disable=SC2016 # expanded by busybox sh
    PATH="$tmp/bin" /bin/busybox sh -c '. "$1/shared.sh" && gen_files "$1/files" && checksums "$1/files"' \
        sh "$tmp"
}

# --- the modules -----------------------------------------------------------------------------
# What the guest loads, by module name; each comes with what it depends on. crc32c_generic is
# no hard dependency: ext4 and jbd2 ask the crypto API for "crc32c" (metadata checksums, on by
# default in mkfs.ext4) at mount time, which would need modprobe and modules.dep to load it
# (their soft dependency "pre: crypto-crc32c"). The build checks that every soft dependency
# of the modules taken is met by one of them.
root_modules=(virtio_mmio virtio_blk crc32c_generic ext4 virtio_net)

# modinfo KO FIELD: the values of FIELD in the module's .modinfo section, one a line. (The
# package has no modules.dep: its postinst makes that with depmod. The "depends=" field that
# modpost wrote into each module is what depmod would have read.)
modinfo() {
    local tmp
    tmp=$(mktemp)
    objcopy -O binary --only-section=.modinfo "$1" "$tmp" || { rm -f "$tmp"; return 1; }
    tr '\0' '\n' <"$tmp" | sed -n "s/^$2=//p"
    rm -f "$tmp"
}

declare -A mod_path=()  # module name -> path under lib/modules/<kver>/
declare -A mod_seen=()  # module name -> 1 once visited
mod_order=()            # names, each after those it depends on

# add_module NAME: appends NAME to mod_order after its dependencies (depth first).
add_module() {
    local name="${1//-/_}" path deps dep
    [ -z "${mod_seen[$name]:-}" ] || return 0
    mod_seen[$name]=1
    path="${mod_path[$name]:-}"
    [ -n "$path" ] || fail "module $name is not in $debian_kernel_pkg"
    deps=$(modinfo "$debian_kernel_moddir/$path" depends) || fail "cannot read $path"
    for dep in ${deps//,/ }; do
        add_module "$dep"
    done
    mod_order+=("$name")
}

resolve_modules() {
    local line name m soft alias ok
    while read -r line; do
        name="${line##*/}"
        name="${name%.ko}"
        mod_path[${name//-/_}]="$line"
    done <"$debian_kernel_moddir/modules.order"
    for m in "${root_modules[@]}"; do
        add_module "$m"
    done
    # Soft dependencies ("softdep=pre: ALIAS..."): some module taken must carry each alias.
    local aliases=""
    for m in "${mod_order[@]}"; do
        aliases+=" $m $(modinfo "$debian_kernel_moddir/${mod_path[$m]}" alias | tr '\n' ' ')"
    done
    for m in "${mod_order[@]}"; do
        soft=$(modinfo "$debian_kernel_moddir/${mod_path[$m]}" softdep)
        for alias in $soft; do
            case "$alias" in *:) continue ;; esac
            ok=""
            case " $aliases " in *" $alias "*) ok=1 ;; esac
            [ -n "$ok" ] || fail "module $m wants $alias first (softdep), which no module taken provides"
        done
    done
}

# --- Redis: the server and the shared libraries it needs ------------------------------------
# Debian's redis-server package holds no binary of its own: its /usr/bin/redis-server is a
# link to redis-tools' redis-check-rdb (one program that acts on the name it is run by), plus
# a system service this script does not want started. So the image takes redis-check-rdb
# from redis-tools, under the name redis-server.
redis_bin=/usr/bin/redis-check-rdb

# add_redis STAGING: copies the server to STAGING/usr/bin/redis-server and every shared
# library `ldd` lists for it (and the dynamic loader) to the same path under STAGING.
add_redis() {
    local staging="$1" lib
    [ -x "$redis_bin" ] || fail "$redis_bin missing (package redis-tools)"
    mkdir -p "$staging/usr/bin"
    cp "$redis_bin" "$staging/usr/bin/redis-server"
    # Lines "name => /path (addr)" and "/lib64/ld-linux-x86-64.so.2 (addr)"; not linux-vdso.
    for lib in $(ldd "$redis_bin" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}'); do
        mkdir -p "$staging$(dirname "$lib")"
        cp -L "$lib" "$staging$lib"
    done
    [ -e "$staging/lib64/ld-linux-x86-64.so.2" ] || fail "no dynamic loader in ldd $redis_bin"
}

# archive STAGING PATH: STAGING as a gzipped newc cpio archive at PATH.
archive() {
    # Reproducible: the same inputs give the same bytes (sorted names, one mtime, no
    # inode numbers, no gzip timestamp), owned by root whoever builds it.
    find "$1" -exec touch -h -d @0 {} +
    (cd "$1" && find . | LC_ALL=C sort |
        cpio -o -H newc -R 0:0 --reproducible --quiet | gzip -9n) >"$2.tmp.$$"
    mv "$2.tmp.$$" "$2"
}

# --- build: the kernel and the initramfs ------------------------------------------------------
build() {
    # One build at a time (tests run in parallel threads and each asks for the images).
    mkdir -p "$out"
    exec 9>"$out/.build.lock"
    flock 9
    need busybox-static cpio binutils redis-tools
    # shellcheck source=scripts/lib/debian-kernel.sh
    . "$repo/scripts/lib/debian-kernel.sh"
    debian_kernel linux-guest || exit 1
    mkdir -p "$out"

    # A copy, not a link: target/linux-guest/ stays whole when copied elsewhere.
    if ! cmp -s "$debian_kernel_image" "$out/vmlinuz"; then
        cp "$debian_kernel_image" "$out/vmlinuz.tmp.$$"
        mv "$out/vmlinuz.tmp.$$" "$out/vmlinuz"
    fi

    local initrd="$out/initramfs.cpio.gz" initrd_redis="$out/initramfs-redis.cpio.gz"
    local stamp="$out/kernel-version"
    if [ ! -e "$initrd" ] || [ ! -e "$initrd_redis" ] || [ "$initrd" -nt "$initrd_redis" ] ||
        [ "$init_src" -nt "$initrd" ] || [ "$repo/scripts/linux-guest.sh" -nt "$initrd" ] ||
        [ "$redis_bin" -nt "$initrd" ] ||
        [ "$(cat "$stamp" 2>/dev/null)" != "$debian_kernel_version" ]; then
        echo "linux-guest: building the initramfs" >&2
        resolve_modules
        local staging m
        staging=$(mktemp -d)
        # shellcheck disable=SC2064 # $staging is meant to be expanded now
        trap "rm -rf '$staging'" EXIT
        chmod 755 "$staging"    # the archive's "." becomes the mode of the guest's /
        mkdir -p "$staging"/{bin,dev,proc,sys,mnt,tmp,modules}
        cp /bin/busybox "$staging/bin/busybox"
        for m in "${mod_order[@]}"; do
            cp "$debian_kernel_moddir/${mod_path[$m]}" "$staging/modules/$m.ko"
            echo "$m" >>"$staging/modules/order"
        done
        cp "$init_src" "$staging/init"
        chmod 755 "$staging/init"
        archive "$staging" "$initrd"
        add_redis "$staging"
        archive "$staging" "$initrd_redis"
        echo "$debian_kernel_version" >"$stamp"
        echo "linux-guest: modules: ${mod_order[*]}" >&2
        rm -rf "$staging"
        trap - EXIT
    fi
    echo "kernel=$out/vmlinuz"
    echo "initrd=$initrd"
    echo "initrd_redis=$initrd_redis"
}

case "${1:-}" in
    "") build ;;
    disk)
        if [ $# -lt 2 ] || [ $# -gt 3 ]; then usage; fi
        make_disk "$2" "${3:-64}"
        ;;
    expected)
        [ $# -eq 1 ] || usage
        expected
        ;;
    *) usage ;;
esac
