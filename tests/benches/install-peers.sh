#!/usr/bin/env bash
# Installs the peer servers and load tools `cargo bench -p ctpf-e2e --bench boot_peers`
# compares ctpf against. Idempotent: already-installed pieces are skipped. Needs root and
# the Debian/Ubuntu package registry. The bench itself installs nothing.
#
#   kea-dhcp4-server, kea-admin (perfdhcp), dnsmasq-base   DHCP
#   tftpd-hpa, atftpd (unpacked into $ATFTPD_DIR)          TFTP
#   nginx, wrk                                             HTTP
#
# atftpd conflicts with tftpd-hpa as a package, so it is only unpacked (apt-get download +
# dpkg-deb -x) into ATFTPD_DIR (default /opt/ctpf-bench/atftpd); the bench finds
# ATFTPD_DIR/usr/sbin/atftpd. Every system service the packages start is stopped and
# disabled: the bench starts private instances in its own network namespaces.
set -euo pipefail

ATFTPD_DIR="${ATFTPD_DIR:-/opt/ctpf-bench/atftpd}"
export DEBIAN_FRONTEND=noninteractive

need=()
command -v kea-dhcp4 >/dev/null || need+=(kea-dhcp4-server)
command -v perfdhcp >/dev/null || need+=(kea-admin)
command -v dnsmasq >/dev/null || need+=(dnsmasq-base)
command -v in.tftpd >/dev/null || need+=(tftpd-hpa)
command -v nginx >/dev/null || need+=(nginx)
command -v wrk >/dev/null || need+=(wrk)
if [ "${#need[@]}" -gt 0 ]; then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if [ ! -x "$ATFTPD_DIR/usr/sbin/atftpd" ]; then
    tmp="$(mktemp -d)"
    chmod 755 "$tmp" # apt downloads as _apt
    trap 'rm -rf "$tmp"' EXIT
    (cd "$tmp" && apt-get download atftpd >/dev/null)
    mkdir -p "$ATFTPD_DIR"
    dpkg-deb -x "$tmp"/atftpd_*.deb "$ATFTPD_DIR"
fi

# The packages start system-wide servers; the bench runs its own.
for service in kea-dhcp4-server kea-ctrl-agent kea-dhcp6-server kea-dhcp-ddns-server \
    tftpd-hpa nginx dnsmasq; do
    (systemctl disable --now "$service" || service "$service" stop) >/dev/null 2>&1 || true
done
# Without systemd, `service ... stop` may leave these behind; only kill the package daemons
# by their pid files.
for pidfile in /run/nginx.pid /run/kea/kea-dhcp4.kea-dhcp4.pid /run/tftpd-hpa.pid; do
    if [ -f "$pidfile" ]; then
        kill "$(cat "$pidfile")" 2>/dev/null || true
    fi
done

echo "peers installed; atftpd in $ATFTPD_DIR/usr/sbin/atftpd"
