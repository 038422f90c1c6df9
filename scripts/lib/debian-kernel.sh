# shellcheck shell=bash
# The Debian kernel shared by the scripts that boot Linux guests (scripts/nested.sh,
# scripts/linux-guest.sh). Sourced, not run: it only defines the function below.
#
#   debian_kernel TAG
#
# Makes sure the versioned kernel package that linux-image-amd64 depends on (e.g.
# linux-image-6.1.0-56-amd64) is unpacked under target/nested/<package>/ (the place
# scripts/nested.sh has always kept it, so an existing download is reused), downloading it
# with `apt-get download` on first use (no root needed: `dpkg -x`, not an install). Then
# sets, in the caller's shell:
#
#   debian_kernel_pkg      the package name            linux-image-6.1.0-56-amd64
#   debian_kernel_version  the kernel release (uname -r)    6.1.0-56-amd64
#   debian_kernel_image    the kernel (a bzImage)      .../boot/vmlinuz-6.1.0-56-amd64
#   debian_kernel_moddir   the modules' root           .../lib/modules/6.1.0-56-amd64
#                          (uncompressed .ko files under kernel/, modules.order; no
#                          modules.dep: the package's postinst makes that with depmod)
#
# Progress and errors go to stderr as "TAG: ..."; on failure it returns 1 (the caller
# decides how to exit). The unpacking goes to a temporary directory that is renamed into
# place once complete, so an interrupted download or two scripts racing leave no half tree.

# The versioned package linux-image-amd64 depends on (the package lists may need a refresh).
debian_kernel_package() {
    apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}'
}

debian_kernel() {
    local tag="$1"
    local root cache pkg ver kdir tmp
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
    cache="$root/target/nested"
    mkdir -p "$cache" || return 1

    pkg=$(debian_kernel_package)
    if [ -z "$pkg" ]; then
        apt-get update -qq >/dev/null 2>&1 || true
        pkg=$(debian_kernel_package)
    fi
    if [ -z "$pkg" ]; then
        echo "$tag: cannot find the package linux-image-amd64 depends on" >&2
        return 1
    fi
    ver="${pkg#linux-image-}"
    kdir="$cache/$pkg"

    # One download at a time (the harness and the guest builder may ask together).
    local lock
    exec {lock}>"$cache/.download.lock"
    flock "$lock"
    if [ ! -e "$kdir/boot/vmlinuz-$ver" ]; then
        echo "$tag: downloading $pkg" >&2
        tmp=$(mktemp -d "$cache/.download.XXXXXX") || return 1
        if ! (cd "$tmp" && apt-get download "$pkg" >/dev/null 2>&1); then
            echo "$tag: apt-get download $pkg failed" >&2
            rm -rf "$tmp"
            return 1
        fi
        if ! dpkg -x "$tmp"/"$pkg"_*.deb "$tmp/tree"; then
            echo "$tag: cannot unpack $pkg" >&2
            rm -rf "$tmp"
            return 1
        fi
        # Another script may have finished the same download meanwhile: either tree will do.
        if [ ! -e "$kdir/boot/vmlinuz-$ver" ]; then
            rm -rf "$kdir"    # a half-unpacked tree left by an older version of this code
            mv -T "$tmp/tree" "$kdir" 2>/dev/null || [ -e "$kdir/boot/vmlinuz-$ver" ] || {
                echo "$tag: cannot move $pkg into $kdir" >&2
                rm -rf "$tmp"
                return 1
            }
        fi
        rm -rf "$tmp"
    fi
    exec {lock}>&-

    # For the caller (shellcheck sees no use of them here).
    # shellcheck disable=SC2034
    {
        debian_kernel_pkg="$pkg"
        debian_kernel_version="$ver"
        debian_kernel_image="$kdir/boot/vmlinuz-$ver"
        debian_kernel_moddir="$kdir/lib/modules/$ver"
    }
}
