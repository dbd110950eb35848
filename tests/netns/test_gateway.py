"""tlsproxy on a gateway between a client and a legacy server, each host a
network namespace:

    client 198.18.1.2 ── 198.18.1.1 gateway (tlsproxy) 198.18.2.1 ── 198.18.2.2 legacy

The client dials the legacy server's own address; the gateway's rules, set by
conf/transparent/gateway-{redirect,tproxy}.sh with iptables or nftables, hand
the connection to tlsproxy, which connects to the original destination from
the client's address (backend_source = "client").
"""

from __future__ import annotations

import pytest

from .conftest import SCRIPTS, proxy_config
from .lab import (
    BACKEND_IP, CLIENT_IP, GATEWAY_BACKEND_SIDE, GATEWAY_CLIENT_SIDE, Netns, Site,
    client, link, metric, start_backend, start_proxy,
)

PORTS = "25:10025 587:10025 143:10143 110:10110"


@pytest.fixture(
    scope="module",
    params=[(mode, tool) for mode in ("redirect", "tproxy") for tool in ("iptables", "nftables")],
    ids=lambda p: "-".join(p),
)
def gateway(request, kernel_support, lab_certs, tmp_path_factory):
    mode, tool = request.param
    made: list[Netns] = []
    try:
        cl, gw, legacy = (made.append(Netns(r)) or made[-1] for r in ("client", "gw", "legacy"))
        link(cl, "c0", CLIENT_IP, gw, "g0", GATEWAY_CLIENT_SIDE)
        link(gw, "g1", GATEWAY_BACKEND_SIDE, legacy, "l0", BACKEND_IP)
        cl.run("ip", "route", "add", "198.18.2.0/24", "via", GATEWAY_CLIENT_SIDE)
        legacy.run("ip", "route", "add", "198.18.1.0/24", "via", GATEWAY_BACKEND_SIDE)
        # A router: anything the rules do not divert is forwarded untouched, so
        # a rule that fails shows as a client talking to the legacy server.
        gw.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
        gw.run("sh", str(SCRIPTS / f"gateway-{mode}.sh"), tool, "up",
               env={"IN_IFACE": "g0", "PORTS": PORTS})
        backend = start_backend(legacy)
        proxy = start_proxy(gw, proxy_config(tmp_path_factory.mktemp(mode), lab_certs, mode))
        yield Site(cl, gw, legacy, backend, proxy, lab_certs.ca_cert)
    finally:
        for ns in made:
            ns.delete()


@pytest.mark.parametrize(("protocol", "port"), [("smtp", 25), ("imap", 143), ("pop3", 110)])
def test_client_gets_starttls_and_backend_sees_client_address(gateway: Site, protocol, port) -> None:
    result = client(gateway.client, protocol, BACKEND_IP, port, gateway.cafile)
    # The legacy servers never offer STARTTLS: the capability and the TLS
    # session (verified against the legacy server's address) are tlsproxy's.
    assert result["starttls_offered"] is True
    assert result["tls_version"] in ("TLSv1.2", "TLSv1.3")
    assert result["local"][0] == CLIENT_IP
    seen = gateway.backend.events("peer", f"{protocol} connection at the legacy server")
    assert seen["service"] == protocol
    assert seen["peer"][0] == CLIENT_IP  # not the gateway's 198.18.2.1
    assert seen["local"] == [BACKEND_IP, port]
    if protocol == "smtp":
        message = gateway.backend.events("message", "message at the legacy server")
        assert "<alice@client.test>" in message["from"]
        assert "hello" in message["content"]
    if protocol == "imap":
        assert result["login"] == "OK"
    if protocol == "pop3":
        assert result["login"].startswith("+OK") and result["messages"] == 1


def test_original_port_mapping_picks_the_backend(gateway: Site) -> None:
    """Port 587 is diverted to the SMTP listener, whose original_ports table
    sends it to the legacy server's port 25 (which also listens on 587)."""
    result = client(gateway.client, "smtp", BACKEND_IP, 587, gateway.cafile)
    assert result["starttls_offered"] is True
    seen = gateway.backend.events("peer", "mapped connection at the legacy server")
    assert (seen["service"], seen["local"], seen["peer"][0]) == ("smtp", [BACKEND_IP, 25], CLIENT_IP)
    gateway.backend.events("message", "message at the legacy server")


def test_direct_connection_to_the_listener_is_refused_as_a_loop(gateway: Site) -> None:
    """A connection that reaches the listener without being diverted has the
    listener itself as original destination: following it would loop."""
    before = metric(gateway.proxy_ns, "tlsproxy_refused_connections_total")
    key = 'tlsproxy_refused_connections_total{listener="smtp",reason="loop"}'
    result = client(gateway.client, "greeting", GATEWAY_CLIENT_SIDE, 10025, gateway.cafile)
    assert result["greeting"].startswith("421 ")
    after = metric(gateway.proxy_ns, "tlsproxy_refused_connections_total")
    assert after[key] == before.get(key, 0) + 1
    gateway.proxy.stderr.wait_for(lambda line: "is this listener" in line, "loop log line")
    # The next connection the legacy server sees is the next client's: the
    # refused one never reached it.
    result = client(gateway.client, "smtp", BACKEND_IP, 25, gateway.cafile)
    seen = gateway.backend.events("peer", "connection after the refused one")
    assert seen["local"] == [BACKEND_IP, 25] and seen["peer"][0] == CLIENT_IP
    assert seen["seq"] == gateway.peers_seen()


def test_missing_return_route_is_reported(gateway: Site) -> None:
    """When the legacy server's replies to the client's address do not come
    back to tlsproxy (here: the server has no route to clients through the
    gateway; without the gateway's policy route they would be forwarded to
    the real client instead), the connect times out and the error says where
    to look."""
    key = 'tlsproxy_refused_connections_total{listener="smtp",reason="source_no_reply"}'
    before = metric(gateway.proxy_ns, key).get(key, 0)
    gateway.legacy.run("ip", "route", "del", "198.18.1.0/24")
    try:
        result = client(gateway.client, "greeting", BACKEND_IP, 25, gateway.cafile)
    finally:
        gateway.legacy.run("ip", "route", "add", "198.18.1.0/24", "via", GATEWAY_BACKEND_SIDE)
    assert result["greeting"].startswith("421 ")
    assert metric(gateway.proxy_ns, key)[key] == before + 1
    line = gateway.proxy.stderr.wait_for(lambda text: "no answer from" in text, "missing-route log line")
    assert "ip rule/ip route" in line and f"{BACKEND_IP}:25" in line
    # The route is back: the next client is served again.
    assert client(gateway.client, "smtp", BACKEND_IP, 25, gateway.cafile)["starttls_offered"] is True
