"""Fixtures for the network-namespace tests: the kernel features they need,
certificates for the legacy server's address, and labs (gateway, sidecar)
whose namespaces are deleted at teardown.

These tests need root (CAP_NET_ADMIN, CAP_SYS_ADMIN for ``ip netns``). CI
runs as root; they are never skipped: without privileges they fail and say so.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tlsproxy.certs import GeneratedFiles, generate

from .lab import BACKEND_IP, Netns, host

SCRIPTS = Path(__file__).resolve().parents[2] / "conf" / "transparent"

# Each probe: a rule set that needs one kernel feature, loaded into a
# throwaway namespace. A kernel without it fails the run with this name.
_KERNEL_PROBES = {
    "REDIRECT (nf_nat, xt_REDIRECT)": ["iptables", "-t", "nat", "-A", "PREROUTING", "-p", "tcp",
                                      "--dport", "25", "-j", "REDIRECT", "--to-ports", "10025"],
    "TPROXY (xt_TPROXY, nf_tproxy_ipv4)": ["iptables", "-t", "mangle", "-A", "PREROUTING", "-p", "tcp",
                                          "--dport", "25", "-j", "TPROXY", "--on-port", "10025",
                                          "--tproxy-mark", "1"],
    "socket match (xt_socket)": ["iptables", "-t", "mangle", "-A", "PREROUTING", "-p", "tcp",
                                 "-m", "socket", "--transparent", "-j", "MARK", "--set-mark", "1"],
    "CONNMARK (xt_connmark)": ["iptables", "-t", "mangle", "-A", "OUTPUT", "-m", "connmark",
                               "--mark", "7", "-j", "CONNMARK", "--restore-mark"],
    "nftables tproxy/socket (nft_tproxy, nft_socket)": [
        "nft",
        "add table inet probe; "
        "add chain inet probe p { type filter hook prerouting priority mangle; }; "
        "add rule inet probe p meta l4proto tcp socket transparent 1 meta mark set 1 accept; "
        "add rule inet probe p tcp dport 25 tproxy ip to :10025 meta mark set 1 accept"],
}
_MODULES = ["nf_conntrack", "nf_nat", "xt_REDIRECT", "xt_TPROXY", "nf_tproxy_ipv4", "xt_socket",
            "xt_connmark", "xt_mark", "nft_tproxy", "nft_socket", "nft_redir", "veth"]


@pytest.fixture(scope="session")
def kernel_support() -> None:
    """Fail early, naming the feature, when the kernel or tools lack one."""
    assert os.geteuid() == 0, "the namespace tests need root (ip netns, iptables); CI runs them as root"
    for module in _MODULES:  # built in on many kernels; loading may fail harmlessly then
        host("sh", "-c", f"modprobe -q {module} 2>/dev/null || true")
    ns = Netns("probe")
    try:
        for feature, cmd in _KERNEL_PROBES.items():
            try:
                if cmd[0] == "nft":
                    ns.run("nft", "-f", "-", input=cmd[1])
                else:
                    ns.run(*cmd)
            except RuntimeError as exc:
                pytest.fail(f"kernel or tools lack {feature}: {exc}")
    finally:
        ns.delete()


@pytest.fixture(scope="session")
def lab_certs(tmp_path_factory: pytest.TempPathFactory) -> GeneratedFiles:
    """A certificate for the legacy server's own address: clients verify it
    against the address they dialled, not knowing tlsproxy exists."""
    return generate(tmp_path_factory.mktemp("netns-certs"), ["legacy.test", BACKEND_IP])


def proxy_config(tmp: Path, certs: GeneratedFiles, transparent: str, **extra: str) -> Path:
    """smtp/imap/pop3 transparent listeners on 10025/10143/10110 that connect
    to the original destination from the client's address with mark 7; the
    SMTP listener maps original port 587 to the legacy server's port 25.
    A short connect_timeout keeps the missing-route test quick."""
    listeners = ""
    for name, port in (("smtp", 10025), ("imap", 10143), ("pop3", 10110)):
        listeners += f"""
[[listeners]]
name = "{name}"
protocol = "{name}"
mode = "starttls"
listen = "0.0.0.0:{port}"
backend = "original"
transparent = "{transparent}"
backend_source = "{extra.get('backend_source', 'client')}"
backend_mark = 7
connect_timeout = 3
"""
        if name == "smtp":
            listeners += f'[listeners.original_ports]\n"587" = "{BACKEND_IP}:25"\n'
    path = tmp / "tlsproxy.toml"
    path.write_text(
        f'[metrics]\nlisten = "127.0.0.1:9464"\n\n[tls]\ncert = "{certs.cert}"\nkey = "{certs.key}"\n'
        + listeners
    )
    return path
