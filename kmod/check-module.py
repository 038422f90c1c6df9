#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0
"""Checks a built kernel module against the kernel it is meant for.

    check-module.py KVER MODULE.ko [STOCK.ko]

vermagic must start with KVER and carry modversions; with STOCK.ko (the distribution's own
build of the same module), vermagic must be identical and every symbol version (the
__versions section: 64-bit CRC, 56-byte name) that both record must be equal.
Exit status 0 when it matches, 1 otherwise (the reason on stderr).
"""
import subprocess
import sys
import tempfile


def section(path, name):
    with tempfile.NamedTemporaryFile() as tmp:
        subprocess.run(["objcopy", "-O", "binary", "--only-section=" + name, path, tmp.name],
                       check=True, stderr=subprocess.DEVNULL)
        return open(tmp.name, "rb").read()


def modinfo(path):
    info = {}
    for field in section(path, ".modinfo").split(b"\0"):
        if b"=" in field:
            key, value = field.split(b"=", 1)
            info[key.decode()] = value.decode(errors="replace")
    return info


def versions(path):
    raw = section(path, "__versions")
    table = {}
    for at in range(0, len(raw) - 63, 64):
        crc = int.from_bytes(raw[at:at + 8], "little")
        name = raw[at + 8:at + 64].split(b"\0", 1)[0].decode()
        table[name] = crc
    return table


def main():
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        return 1
    kver, module = sys.argv[1], sys.argv[2]
    stock = sys.argv[3] if len(sys.argv) > 3 else ""
    magic = modinfo(module).get("vermagic", "")
    if not magic.startswith(kver + " ") or "modversions" not in magic:
        print(f"{module}: vermagic {magic!r} is not {kver}'s", file=sys.stderr)
        return 1
    built = versions(module)
    if not built:
        print(f"{module}: no symbol versions", file=sys.stderr)
        return 1
    if stock:
        stock_magic = modinfo(stock).get("vermagic", "")
        if stock_magic != magic:
            print(f"{module}: vermagic {magic!r}, the kernel's own {stock_magic!r}", file=sys.stderr)
            return 1
        theirs = versions(stock)
        bad = [n for n in built if n in theirs and built[n] != theirs[n]]
        if bad:
            print(f"{module}: symbol versions differ from {stock}: {', '.join(bad[:10])}", file=sys.stderr)
            return 1
        print(f"kmod: {module.rsplit('/', 1)[-1]}: vermagic and {sum(n in theirs for n in built)} "
              f"symbol versions match the kernel's own", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
