"""tlsproxy without CAP_NET_ADMIN/CAP_NET_RAW (dropped with setpriv) in a
namespace of its own: transparent features fail with errors that say what is
missing, and clients get their protocol's try-later reply."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .lab import BACKEND_IP, Netns, client, metric, start_backend, start_proxy

NO_CAPS = ("setpriv", "--bounding-set", "-net_admin,-net_raw", "--")
TRANSPARENT = 'listen = "0.0.0.0:10025"\nbackend = "original"\n'


@pytest.fixture
def solo(kernel_support):
    ns = Netns("solo")
    try:
        ns.run("ip", "link", "add", "d0", "type", "veth", "peer", "name", "d1")  # no dummy driver needed
        ns.run("ip", "link", "set", "d1", "up")
        ns.run("ip", "addr", "add", f"{BACKEND_IP}/24", "dev", "d0")
        ns.run("ip", "link", "set", "d0", "up")
        yield ns
    finally:
        ns.delete()


def _config(tmp_path, lab_certs, listener: str):
    path = tmp_path / "tlsproxy.toml"
    path.write_text(
        f'[metrics]\nlisten = "127.0.0.1:9464"\n\n'
        f'[tls]\ncert = "{lab_certs.cert}"\nkey = "{lab_certs.key}"\n\n'
        f'[[listeners]]\nname = "smtp"\nprotocol = "smtp"\nmode = "starttls"\n{listener}'
    )
    return path


def test_client_source_without_capability_is_refused_with_421(solo: Netns, lab_certs, tmp_path) -> None:
    start_backend(solo)
    config = _config(tmp_path, lab_certs, f'listen = "{BACKEND_IP}:10025"\nbackend = "{BACKEND_IP}:25"\n'
                     'backend_source = "client"\n')
    proxy = start_proxy(solo, config, *NO_CAPS)
    result = client(solo, "greeting", BACKEND_IP, 10025, lab_certs.ca_cert)
    assert result["greeting"].startswith("421 ")
    line = proxy.stderr.wait_for(lambda text: "IP_TRANSPARENT" in text, "capability error log line")
    assert "CAP_NET_ADMIN" in line and BACKEND_IP in line
    key = 'tlsproxy_refused_connections_total{listener="smtp",reason="source_not_permitted"}'
    assert metric(solo, key)[key] == 1


def test_tproxy_listener_without_capability_does_not_start(solo: Netns, lab_certs, tmp_path) -> None:
    config = _config(tmp_path, lab_certs, TRANSPARENT + 'transparent = "tproxy"\n')
    result = subprocess.run(
        ["ip", "netns", "exec", solo.name, *NO_CAPS,
         sys.executable, "-m", "tlsproxy", "run", "--config", str(config)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1
    assert 'transparent = "tproxy" needs CAP_NET_ADMIN' in result.stderr


def test_check_config_names_the_capability(lab_certs, tmp_path) -> None:
    config = _config(tmp_path, lab_certs, TRANSPARENT + 'transparent = "redirect"\n'
                     'backend_source = "client"\nbackend_mark = 7\n')
    result = subprocess.run([sys.executable, "-m", "tlsproxy", "check-config", "--config", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "smtp: smtp starttls 0.0.0.0:10025 -> original destination" in result.stdout
    assert 'needs CAP_NET_ADMIN for backend_source = "client"' in result.stdout
    assert "backend_mark = 7 (SO_MARK)" in result.stdout
