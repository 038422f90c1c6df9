#!/bin/sh
# SPDX-License-Identifier: GPL-2.0
# DKMS PRE_BUILD step (dkms.conf): lay out arch/x86/kvm of the kernel being built for next to
# Kbuild and apply ftvm-rdtsc-exits.patch. The sources come from Debian's linux-source-X.Y
# (/usr/src/linux-source-X.Y.tar.xz, or an unpacked /usr/src/linux-source-X.Y), which must
# be the same upload as the kernel (the patch is checked against 6.1 only: README.md).
set -eu
kver="$1"
series=$(echo "$kver" | cut -d. -f1-2)
here=$(cd "$(dirname "$0")" && pwd)
if [ -d "/usr/src/linux-source-$series/arch/x86/kvm" ]; then
    cp -r "/usr/src/linux-source-$series/arch/x86/kvm/." "$here/"
elif [ -e "/usr/src/linux-source-$series.tar.xz" ]; then
    tar -xJf "/usr/src/linux-source-$series.tar.xz" -C "$here" --strip-components=4 \
        "linux-source-$series/arch/x86/kvm"
else
    echo "dkms-prepare: install linux-source-$series (the kernel's own upload)" >&2
    exit 1
fi
rm -f "$here/Makefile"
patch -p4 --no-backup-if-mismatch -d "$here" <"$here/ftvm-rdtsc-exits.patch"
