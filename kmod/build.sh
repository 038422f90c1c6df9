#!/usr/bin/env bash
# Builds the ftvm-rdtsc-exits KVM vendor modules (kvm-amd.ko, kvm-intel.ko) for one Debian
# kernel, out of tree, and prints the directory that holds them on stdout.
#
#   kmod/build.sh [KVER]      KVER: a Debian kernel release (uname -r), e.g. 6.1.0-57-amd64;
#                             default: the nested harness's kernel (scripts/lib/debian-kernel.sh)
#
# Needs no root and installs nothing: `apt-get download` fetches linux-source-X.Y (for
# arch/x86/kvm), linux-headers-KVER, its -common package and linux-kbuild-X.Y, all at the
# version of the headers package (the source upload that built the image), and `dpkg -x`
# unpacks them under target/kmod/KVER/. The KVM sources are copied next to kmod/Kbuild,
# ftvm-rdtsc-exits.patch is applied, and `make -C <headers> M=<dir>` builds the two vendor
# modules against the headers' Module.symvers (kvm.ko itself is not rebuilt). The result is
# cached in target/kmod/KVER/out/ until the patch, Kbuild or this script change.
#
# Checks (a failure is an error, never a skip): the modules' vermagic names KVER, and where
# the stock kvm-amd.ko of that kernel is at hand (the harness's unpacked image), every symbol
# version it records equals the one in the built module.
#
# Needs: apt-get, dpkg, make, gcc (the kernel's compiler: linux-compiler-gcc-12-x86 on
# bookworm is gcc-12), patch, python3, objcopy (binutils), xz-utils, libelf-dev is NOT needed
# (no BTF/objtool rebuild: linux-kbuild ships the host tools).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/.." && pwd)"

fail() {
    echo "kmod: $*" >&2
    exit 1
}

kver="${1:-}"
if [ -z "$kver" ]; then
    # shellcheck source=scripts/lib/debian-kernel.sh
    . "$repo/scripts/lib/debian-kernel.sh"
    debian_kernel kmod || fail "cannot find the harness's kernel"
    kver="$debian_kernel_version"
fi
case "$kver" in
    *-amd64) ;;
    *) fail "$kver: only Debian amd64 kernels (…-amd64) are covered" ;;
esac
abi="${kver%-amd64}"                 # 6.1.0-57
series="$(echo "$kver" | cut -d. -f1-2)"  # 6.1

for tool in apt-get apt-cache dpkg make gcc patch python3 objcopy xz; do
    command -v "$tool" >/dev/null || fail "$tool is missing (scripts/setup.sh installs it)"
done

top="$repo/target/kmod/$kver"
out="$top/out"
stamp_want="$(cat "$here/ftvm-rdtsc-exits.patch" "$here/Kbuild" "$0" | sha256sum | cut -d' ' -f1)"
if [ -e "$out/kvm-amd.ko" ] && [ "$(cat "$out/stamp" 2>/dev/null)" = "$stamp_want" ]; then
    echo "$out"
    exit 0
fi

mkdir -p "$top"
exec {lock}>"$top/.build.lock"
flock "$lock"
if [ -e "$out/kvm-amd.ko" ] && [ "$(cat "$out/stamp" 2>/dev/null)" = "$stamp_want" ]; then
    echo "$out"
    exit 0
fi

# --- the packages, at the headers' version ---------------------------------------------
headers_pkg="linux-headers-$kver"
ver="$(apt-cache show "$headers_pkg" 2>/dev/null | awk '/^Version:/ {print $2; exit}')"
if [ -z "$ver" ]; then
    apt-get update -qq >/dev/null 2>&1 || true
    ver="$(apt-cache show "$headers_pkg" 2>/dev/null | awk '/^Version:/ {print $2; exit}')"
fi
[ -n "$ver" ] || fail "$headers_pkg is not in the package lists (is $kver a Debian kernel of this release?)"
pkgs=("linux-source-$series=$ver" "$headers_pkg=$ver" "linux-headers-$abi-common=$ver" "linux-kbuild-$series=$ver")
tree="$top/tree"
if [ ! -e "$tree/.complete-$ver" ]; then
    echo "kmod: downloading ${pkgs[*]}" >&2
    rm -rf "$tree" "$top/dl"
    mkdir -p "$top/dl" "$tree"
    (cd "$top/dl" && apt-get download "${pkgs[@]}" >/dev/null 2>&1) ||
        fail "apt-get download ${pkgs[*]} failed (the source upload matching $kver must still be in the archive)"
    for deb in "$top"/dl/*.deb; do
        dpkg -x "$deb" "$tree" || fail "cannot unpack $deb"
    done
    tarball="$tree/usr/src/linux-source-$series.tar.xz"
    [ -e "$tarball" ] || fail "linux-source-$series has no $tarball"
    mkdir -p "$tree/kvm-src"
    tar -xJf "$tarball" -C "$tree/kvm-src" --strip-components=1 \
        "linux-source-$series/arch/x86/kvm" || fail "cannot unpack arch/x86/kvm from $tarball"
    rm -f "$tarball"
    rm -rf "$top/dl"
    # The headers' Makefile includes the -common tree by its installed path: point it here.
    hmk="$tree/usr/src/linux-headers-$kver/Makefile"
    sed -i "s#/usr/src/#$tree/usr/src/#" "$hmk"
    touch "$tree/.complete-$ver"
fi
hdir="$tree/usr/src/linux-headers-$kver"

# --- patch and build -----------------------------------------------------------------------
build="$top/build"
rm -rf "$build"
mkdir -p "$build"
cp -r "$tree/kvm-src/arch/x86/kvm/." "$build/"
rm -f "$build/Makefile"
cp "$here/Kbuild" "$build/Kbuild"
(cd "$build" && patch -p4 --quiet --no-backup-if-mismatch <"$here/ftvm-rdtsc-exits.patch") ||
    fail "ftvm-rdtsc-exits.patch does not apply to the arch/x86/kvm of $kver ($ver)"
echo "kmod: building kvm-amd.ko and kvm-intel.ko for $kver" >&2
make -C "$hdir" M="$build" FTVM_KMOD_INTEL=m -j"$(nproc)" modules >"$top/build.log" 2>&1 ||
    { tail -30 "$top/build.log" >&2; fail "the module build failed (log: $top/build.log)"; }

# --- checks ----------------------------------------------------------------------------------
stock=""
if [ -n "${debian_kernel_moddir:-}" ] && [ "${debian_kernel_version:-}" = "$kver" ]; then
    stock="$debian_kernel_moddir/kernel/arch/x86/kvm/kvm-amd.ko"
fi
python3 "$here/check-module.py" "$kver" "$build/kvm-amd.ko" "$stock" ||
    fail "kvm-amd.ko does not match $kver"
python3 "$here/check-module.py" "$kver" "$build/kvm-intel.ko" "" ||
    fail "kvm-intel.ko does not match $kver"

rm -rf "$out.tmp"
mkdir -p "$out.tmp"
cp "$build/kvm-amd.ko" "$build/kvm-intel.ko" "$out.tmp/"
echo "$stamp_want" >"$out.tmp/stamp"
rm -rf "$out"
mv "$out.tmp" "$out"
echo "$out"
