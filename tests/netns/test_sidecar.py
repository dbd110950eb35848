"""tlsproxy as a sidecar in the legacy server's own namespace:

    client 198.18.1.2 ── 198.18.2.2 legacy server + tlsproxy

conf/transparent/sidecar-redirect.sh (iptables or nftables) redirects the
legacy ports to tlsproxy, for remote clients and (LOCAL_CLIENTS=1) for
clients on the host itself, except tlsproxy's own connections, which carry
backend_mark 7; the server's replies to tlsproxy's client-sourced connections
are routed back to it by that mark.
"""

from __future__ import annotations

import pytest

from .conftest import SCRIPTS, proxy_config
from .lab import BACKEND_IP, CLIENT_IP, Netns, Site, client, host, metric, start_backend, start_proxy

PORTS = "25:10025 587:10025 143:10143 110:10110"
LOOP = 'tlsproxy_refused_connections_total{listener="smtp",reason="loop"}'


@pytest.fixture(scope="module", params=["iptables", "nftables"])
def sidecar(request, kernel_support, lab_certs, tmp_path_factory):
    tool = request.param
    made: list[Netns] = []
    try:
        cl, legacy = (made.append(Netns(r)) or made[-1] for r in ("client", "legacy"))
        host("ip", "link", "add", "c0", "netns", cl.name,
             "type", "veth", "peer", "name", "s0", "netns", legacy.name)
        ends = ((cl, "c0", CLIENT_IP, "198.18.2.0/24"), (legacy, "s0", BACKEND_IP, "198.18.1.0/24"))
        for ns, ifname, ip, other in ends:
            ns.run("ip", "addr", "add", f"{ip}/24", "dev", ifname)
            ns.run("ip", "link", "set", ifname, "up")
            ns.run("ip", "route", "add", other, "dev", ifname)
        legacy.run("sh", str(SCRIPTS / "sidecar-redirect.sh"), tool, "up",
                   env={"IN_IFACE": "s0", "PORTS": PORTS, "BACKEND_MARK": "7", "LOCAL_CLIENTS": "1"})
        backend = start_backend(legacy)
        proxy = start_proxy(legacy, proxy_config(tmp_path_factory.mktemp("sidecar"), lab_certs, "redirect"))
        yield Site(cl, legacy, legacy, backend, proxy, lab_certs.ca_cert)
    finally:
        for ns in made:
            ns.delete()


@pytest.mark.parametrize(("protocol", "port"), [("smtp", 25), ("imap", 143), ("pop3", 110)])
def test_remote_client_gets_starttls_and_server_sees_its_address(sidecar: Site, protocol, port) -> None:
    result = client(sidecar.client, protocol, BACKEND_IP, port, sidecar.cafile)
    assert result["starttls_offered"] is True
    assert result["tls_version"] in ("TLSv1.2", "TLSv1.3")
    seen = sidecar.backend.events("peer", f"{protocol} connection at the legacy server")
    assert (seen["service"], seen["local"], seen["peer"][0]) == (protocol, [BACKEND_IP, port], CLIENT_IP)
    if protocol == "smtp":
        assert "<alice@client.test>" in sidecar.backend.events("message", "message")["from"]


def test_local_client_is_redirected_and_our_own_connection_is_not(sidecar: Site) -> None:
    """With LOCAL_CLIENTS=1 every local connection to port 25 is redirected
    except tlsproxy's own (backend_mark): one client connection makes exactly
    one connection at the server, and no loop is refused."""
    loops = metric(sidecar.proxy_ns, LOOP).get(LOOP, 0)
    result = client(sidecar.legacy, "smtp", BACKEND_IP, 25, sidecar.cafile)
    assert result["starttls_offered"] is True and result["local"][0] == BACKEND_IP
    seen = sidecar.backend.events("peer", "local client's connection at the legacy server")
    assert (seen["local"], seen["peer"][0]) == ([BACKEND_IP, 25], BACKEND_IP)
    assert seen["peer"][1] != result["local"][1]  # tlsproxy's socket, not the client's own
    sidecar.backend.events("message", "message")
    assert seen["seq"] == sidecar.peers_seen()
    assert metric(sidecar.proxy_ns, LOOP).get(LOOP, 0) == loops


def test_rules_that_catch_our_own_traffic_are_refused_as_a_loop(sidecar: Site) -> None:
    """A rule without the backend_mark exception sends tlsproxy's backend
    connection back to tlsproxy; it recognises its own socket, refuses after
    one hop (the client gets the 421), and the server sees nothing. (The rule
    DNATs to the host's address: a REDIRECT from OUTPUT rewrites to 127.0.0.1,
    and replies from 127.0.0.1 to a client's address are unroutable, so that
    mistake shows as backend connect timeouts instead of a loop.)"""
    loops = metric(sidecar.proxy_ns, LOOP).get(LOOP, 0)
    peers = sidecar.peers_seen()
    sidecar.legacy.run("nft", "-f", "-", input=(
        "table ip looptest { chain out { type nat hook output priority -150; policy accept;\n"
        f"tcp dport 25 dnat to {BACKEND_IP}:10025\n}}\n}}\n"
    ))
    try:
        result = client(sidecar.client, "greeting", BACKEND_IP, 25, sidecar.cafile)
    finally:
        sidecar.legacy.run("nft", "delete", "table", "ip", "looptest")
    assert result["greeting"].startswith("421 ")
    assert metric(sidecar.proxy_ns, LOOP)[LOOP] == loops + 1
    sidecar.proxy.stderr.wait_for(lambda line: "own backend socket" in line, "own-traffic loop log line")
    # The next connection the server sees is the next client's, numbered
    # right after the ones before the loop.
    client(sidecar.client, "smtp", BACKEND_IP, 25, sidecar.cafile)
    seen = sidecar.backend.events("peer", "connection after the loop")
    assert seen["seq"] == peers + 1 and seen["peer"][0] == CLIENT_IP
    sidecar.backend.events("message", "message")
