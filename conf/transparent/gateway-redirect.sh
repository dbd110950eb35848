#!/bin/sh
# tlsproxy on a gateway (router) in front of legacy mail servers, with REDIRECT
# (NAT; tlsproxy reads the original destination from conntrack with
# SO_ORIGINAL_DST, listeners with transparent = "redirect"). The mangle part
# delivers backends' replies to tlsproxy's client-sourced connections
# (backend_source = "client") locally instead of forwarding them.
#
#   gateway-redirect.sh [iptables|nftables] [up|down]    (as root)
#
# Settings (environment): IN_IFACE (client-facing interface, default eth0),
# PORTS ("original:listener" pairs, default "25:10025 143:10143 110:10110"),
# DIVERT_MARK (default 1), ROUTE_TABLE (default 100).
set -eu
TOOL=${1:-iptables}
ACTION=${2:-up}
IN_IFACE=${IN_IFACE:-eth0}
PORTS=${PORTS:-"25:10025 143:10143 110:10110"}
DIVERT_MARK=${DIVERT_MARK:-1}
ROUTE_TABLE=${ROUTE_TABLE:-100}

if [ "$ACTION" = down ]; then
    ip rule del fwmark "$DIVERT_MARK" lookup "$ROUTE_TABLE" 2>/dev/null || true
    ip route flush table "$ROUTE_TABLE" 2>/dev/null || true
    if [ "$TOOL" = nftables ]; then
        nft delete table ip tlsproxy 2>/dev/null || true
    else
        iptables -t nat -D PREROUTING -j TLSPROXY 2>/dev/null || true
        iptables -t mangle -D PREROUTING -j TLSPROXY 2>/dev/null || true
        for table in nat mangle; do
            iptables -t "$table" -F TLSPROXY 2>/dev/null || true
            iptables -t "$table" -X TLSPROXY 2>/dev/null || true
        done
    fi
    exit 0
fi

ip rule add fwmark "$DIVERT_MARK" lookup "$ROUTE_TABLE"
ip route add local 0.0.0.0/0 dev lo table "$ROUTE_TABLE"

if [ "$TOOL" = nftables ]; then
    rules=""
    for pair in $PORTS; do
        rules="$rules
        iifname \"$IN_IFACE\" tcp dport ${pair%%:*} redirect to :${pair##*:}"
    done
    nft -f - <<NFT
table ip tlsproxy {
    chain replies {
        type filter hook prerouting priority mangle; policy accept;
        meta l4proto tcp socket transparent 1 meta mark set $DIVERT_MARK accept
    }
    chain legacy_ports {
        type nat hook prerouting priority dstnat; policy accept;$rules
    }
}
NFT
else
    iptables -t mangle -N TLSPROXY
    iptables -t mangle -A TLSPROXY -p tcp -m socket --transparent -j MARK --set-mark "$DIVERT_MARK"
    iptables -t mangle -A PREROUTING -j TLSPROXY
    iptables -t nat -N TLSPROXY
    for pair in $PORTS; do
        iptables -t nat -A TLSPROXY -i "$IN_IFACE" -p tcp --dport "${pair%%:*}" \
            -j REDIRECT --to-ports "${pair##*:}"
    done
    iptables -t nat -A PREROUTING -j TLSPROXY
fi
