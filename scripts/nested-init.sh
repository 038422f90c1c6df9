#!/bin/busybox sh
# PID 1 of the nested-KVM harness's VM (scripts/nested.sh): load virtio-9p and kvm-amd
# (nested=1), mount the host's root read-only at /host with this VM's /dev, /proc, /sys and a
# writable /tmp (an overlay over the host's), run the command file named by ftvm.cmd= in a chroot of it, print its exit
# status on the console, and power off.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# Loopback up: the pair tests talk over 127.0.0.1.
ip link set lo up

report() {
    printf '\nftvm-nested: exit status %s\n' "$1"
    sync
    poweroff -f >/dev/null 2>&1
}

for m in $(cat /modules/order); do
    args=""
    [ "$m" = kvm-amd ] && args="nested=1"
    if ! insmod "/modules/$m.ko" $args; then
        echo "ftvm-nested: cannot load module $m" >&2
        report 125
    fi
done
[ -e /dev/kvm ] || { echo "ftvm-nested: no /dev/kvm after loading kvm-amd" >&2; report 125; }

if ! mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=524288,cache=loose host /host; then
    echo "ftvm-nested: cannot mount the host root over virtio-9p" >&2
    report 125
fi
cmd=""
for word in $(cat /proc/cmdline); do
    case "$word" in ftvm.cmd=*) cmd="${word#ftvm.cmd=}" ;; esac
done
[ -n "$cmd" ] && [ -r "/host$cmd" ] || { echo "ftvm-nested: no command file" >&2; report 125; }
cp "/host$cmd" /cmd.sh
mount -t devtmpfs devtmpfs /host/dev
mount -t proc proc /host/proc
mount -t sysfs sysfs /host/sys
# A writable /tmp that still shows the host's (a checkout under /tmp must stay visible):
# the host's /tmp as the lower layer of an overlay whose upper layer is a tmpfs.
mkdir -p /rw
mount -t tmpfs -o size=75% tmpfs /rw
mkdir -p /rw/upper /rw/work
if ! mount -t overlay overlay -o lowerdir=/host/tmp,upperdir=/rw/upper,workdir=/rw/work /host/tmp; then
    echo "ftvm-nested: cannot make /tmp writable" >&2
    report 125
fi
cp /cmd.sh /host/tmp/.ftvm-nested-cmd.sh
echo "ftvm-nested: running"
# The command file is written with bash quoting (printf %q), so bash runs it.
chroot /host /bin/bash /tmp/.ftvm-nested-cmd.sh
report $?
