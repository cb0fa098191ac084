#!/bin/sh
# ctpf discovery /init (PID 1 of the discovery initramfs): load the NIC drivers, get a DHCP
# lease on every NIC at once (a laptop may boot from one port while another is cabled), then
# run the agent, which reports the hardware and enrolls the machine. PID 1 must never exit
# (the kernel panics), so every path ends in a wait.
export PATH=/bin

log() { echo "ctpf-init: $*"; }

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null || mdev -s
mkdir -p /run /tmp /etc

log "loading NIC drivers"
while read -r module; do
    insmod "/lib/modules/$module" 2>/dev/null || log "insmod $module: not loaded"
done < /lib/modules/load-order

ip link set lo up
# Drivers probe asynchronously; give the NICs a moment to register.
for _ in 1 2 3 4 5 6 7 8 9 10; do
    ls /sys/class/net | grep -qv '^lo$' && break
    sleep 1
done

for path in /sys/class/net/*; do
    iface=${path##*/}
    [ "$iface" = lo ] && continue
    [ -e "$path/device" ] || continue
    ip link set "$iface" up
    log "DHCP on $iface ($(cat "$path/address"))"
    # -b: go to the background after the first tries and keep trying (and renewing).
    udhcpc -i "$iface" -s /etc/udhcpc.script -t 5 -T 2 -A 3 -b -p "/run/udhcpc.$iface.pid" \
        -x hostname:ctpf-discovery >/dev/null 2>&1
done

tries=0
until ip -4 addr show scope global | grep -q inet; do
    tries=$((tries + 1))
    if [ "$tries" -gt 120 ]; then
        log "no NIC got an address; check the cable and the DHCP server"
        tries=0
    fi
    sleep 1
done
ip -4 addr show scope global | grep inet | while read -r line; do log "address: $line"; done

if /bin/ctpf-agent; then
    log "agent finished"
else
    log "agent failed (see above); this machine waits here"
fi
while :; do sleep 3600; done
