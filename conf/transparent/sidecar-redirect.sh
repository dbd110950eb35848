#!/bin/sh
# tlsproxy as a sidecar: same host (network namespace) as the legacy server,
# which keeps its address and ports. Clients' connections arriving on
# $IN_IFACE for the legacy ports are redirected to tlsproxy (listeners with
# transparent = "redirect", backend = "original"); tlsproxy connects to the
# legacy server from the client's address (backend_source = "client") with
# backend_mark = $BACKEND_MARK, and the server's replies to those connections,
# which would otherwise be routed towards the real client, are delivered to
# tlsproxy through lo.
#
#   sidecar-redirect.sh [iptables|nftables] [up|down]    (as root)
#
# Settings (environment): IN_IFACE (default eth0), PORTS ("original:listener"
# pairs, default "25:10025 143:10143 110:10110"), BACKEND_MARK (tlsproxy's
# backend_mark, default 7), ROUTE_TABLE (default 107), LOCAL_CLIENTS=1 to
# also redirect connections made on this host itself (every connection but
# tlsproxy's own, recognised by its mark: without that exception tlsproxy's
# backend connections would be redirected to itself, a loop).
set -eu
TOOL=${1:-iptables}
ACTION=${2:-up}
IN_IFACE=${IN_IFACE:-eth0}
PORTS=${PORTS:-"25:10025 143:10143 110:10110"}
BACKEND_MARK=${BACKEND_MARK:-7}
ROUTE_TABLE=${ROUTE_TABLE:-107}
LOCAL_CLIENTS=${LOCAL_CLIENTS:-0}

if [ "$ACTION" = down ]; then
    ip rule del fwmark "$BACKEND_MARK" lookup "$ROUTE_TABLE" 2>/dev/null || true
    ip route flush table "$ROUTE_TABLE" 2>/dev/null || true
    if [ "$TOOL" = nftables ]; then
        nft delete table ip tlsproxy 2>/dev/null || true
    else
        iptables -t nat -D PREROUTING -j TLSPROXY 2>/dev/null || true
        iptables -t nat -D OUTPUT -j TLSPROXY_LOCAL 2>/dev/null || true
        iptables -t mangle -D OUTPUT -j TLSPROXY 2>/dev/null || true
        for chain in nat:TLSPROXY nat:TLSPROXY_LOCAL mangle:TLSPROXY; do
            iptables -t "${chain%%:*}" -F "${chain##*:}" 2>/dev/null || true
            iptables -t "${chain%%:*}" -X "${chain##*:}" 2>/dev/null || true
        done
    fi
    exit 0
fi

# Marked packets are for a local socket, whatever their destination address.
ip rule add fwmark "$BACKEND_MARK" lookup "$ROUTE_TABLE"
ip route add local 0.0.0.0/0 dev lo table "$ROUTE_TABLE"

if [ "$TOOL" = nftables ]; then
    rules="" local_rules=""
    for pair in $PORTS; do
        rules="$rules
        iifname \"$IN_IFACE\" tcp dport ${pair%%:*} redirect to :${pair##*:}"
        local_rules="$local_rules
        meta mark != $BACKEND_MARK tcp dport ${pair%%:*} redirect to :${pair##*:}"
    done
    local_chain=""
    if [ "$LOCAL_CLIENTS" = 1 ]; then
        local_chain="
    chain local_clients {
        type nat hook output priority -100; policy accept;$local_rules
    }"
    fi
    nft -f - <<NFT
table ip tlsproxy {
    chain clients {
        type nat hook prerouting priority dstnat; policy accept;$rules
    }$local_chain
    chain replies {
        # tlsproxy's backend connections carry its mark; the conntrack entry
        # remembers it, and the server's replies get it back, which re-routes
        # them through the table above to tlsproxy's socket.
        type route hook output priority mangle; policy accept;
        meta mark $BACKEND_MARK ct mark set meta mark
        ct mark $BACKEND_MARK meta mark set ct mark
    }
}
NFT
else
    iptables -t nat -N TLSPROXY
    for pair in $PORTS; do
        iptables -t nat -A TLSPROXY -i "$IN_IFACE" -p tcp --dport "${pair%%:*}" \
            -j REDIRECT --to-ports "${pair##*:}"
    done
    iptables -t nat -A PREROUTING -j TLSPROXY
    if [ "$LOCAL_CLIENTS" = 1 ]; then
        iptables -t nat -N TLSPROXY_LOCAL
        for pair in $PORTS; do
            iptables -t nat -A TLSPROXY_LOCAL -p tcp --dport "${pair%%:*}" \
                -m mark ! --mark "$BACKEND_MARK" -j REDIRECT --to-ports "${pair##*:}"
        done
        iptables -t nat -A OUTPUT -j TLSPROXY_LOCAL
    fi
    iptables -t mangle -N TLSPROXY
    iptables -t mangle -A TLSPROXY -m mark --mark "$BACKEND_MARK" -j CONNMARK --save-mark
    iptables -t mangle -A TLSPROXY -m connmark --mark "$BACKEND_MARK" -j CONNMARK --restore-mark
    iptables -t mangle -A OUTPUT -j TLSPROXY
fi
