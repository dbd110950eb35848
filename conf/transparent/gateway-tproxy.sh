#!/bin/sh
# tlsproxy on a gateway (router) in front of legacy mail servers, with TPROXY.
# Connections from clients on $IN_IFACE to any address on the legacy ports are
# handed to tlsproxy's transparent listeners (transparent = "tproxy"); with
# backend_source = "client", the backends' replies to tlsproxy's client-sourced
# connections are delivered to tlsproxy instead of being forwarded.
#
#   gateway-tproxy.sh [iptables|nftables] [up|down]      (as root)
#
# Settings (environment): IN_IFACE (client-facing interface, default eth0),
# PORTS ("original:listener" pairs, default "25:10025 143:10143 110:10110"),
# DIVERT_MARK (default 1), ROUTE_TABLE (default 100). tlsproxy's own outbound
# connections leave through OUTPUT, which these PREROUTING rules never see, so
# they cannot loop; see docs/transparent.md.
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
        nft delete table inet tlsproxy 2>/dev/null || true
    else
        iptables -t mangle -D PREROUTING -j TLSPROXY 2>/dev/null || true
        iptables -t mangle -F TLSPROXY 2>/dev/null || true
        iptables -t mangle -X TLSPROXY 2>/dev/null || true
    fi
    exit 0
fi

# Packets marked DIVERT_MARK are for a local socket, whatever their address.
ip rule add fwmark "$DIVERT_MARK" lookup "$ROUTE_TABLE"
ip route add local 0.0.0.0/0 dev lo table "$ROUTE_TABLE"

if [ "$TOOL" = nftables ]; then
    rules=""
    for pair in $PORTS; do
        rules="$rules
        iifname \"$IN_IFACE\" tcp dport ${pair%%:*} tproxy ip to :${pair##*:} meta mark set $DIVERT_MARK accept"
    done
    nft -f - <<NFT
table inet tlsproxy {
    chain prerouting {
        type filter hook prerouting priority mangle; policy accept;
        # Packets of connections a transparent tlsproxy socket already holds:
        # diverted clients, and backend replies to client-sourced connections.
        meta l4proto tcp socket transparent 1 meta mark set $DIVERT_MARK accept$rules
    }
}
NFT
else
    iptables -t mangle -N TLSPROXY
    iptables -t mangle -A TLSPROXY -p tcp -m socket --transparent -j MARK --set-mark "$DIVERT_MARK"
    iptables -t mangle -A TLSPROXY -p tcp -m socket --transparent -j ACCEPT
    for pair in $PORTS; do
        iptables -t mangle -A TLSPROXY -i "$IN_IFACE" -p tcp --dport "${pair%%:*}" \
            -j TPROXY --on-port "${pair##*:}" --tproxy-mark "$DIVERT_MARK"
    done
    iptables -t mangle -A PREROUTING -j TLSPROXY
fi
