"""Certificate reload (SIGHUP): new handshakes get the new certificate,
sessions in flight continue, a broken file keeps the old one in service."""

from __future__ import annotations

import shutil
import signal
import ssl
import subprocess
import sys

import trio
from cryptography import x509

from tests.conftest import port_of, sample, start_proxy
from tests.helpers import WireClient
from tlsproxy.certs import generate
from tlsproxy.config import Address, Limits, ListenerConfig, TlsSettings


async def _served_serial(port: int, ca: str) -> int:
    client = await WireClient.connect(port, tls=ssl.create_default_context(cafile=ca))
    der = client.stream.getpeercert(binary_form=True)
    await client.aclose()
    return x509.load_der_x509_certificate(der).serial_number


def _serial(pem_path) -> int:
    return x509.load_pem_x509_certificates(pem_path.read_bytes())[0].serial_number


async def test_reload_swaps_certificate_for_new_handshakes_only(nursery, smtp_backend, tmp_path):
    old = generate(tmp_path / "old", ["localhost"])
    new = generate(tmp_path / "new", ["localhost"])
    live = tmp_path / "live"
    live.mkdir()
    for name in ("cert.pem", "key.pem"):
        shutil.copy(old.cert.parent / name, live / name)
    # One CA file trusting both issuers, as during a real CA-signed renewal.
    ca = tmp_path / "both-ca.pem"
    ca.write_bytes(old.ca_cert.read_bytes() + new.ca_cert.read_bytes())
    tls = TlsSettings(cert=live / "cert.pem", key=live / "key.pem")
    proxy = await start_proxy(nursery, ListenerConfig(
        "smtps", "smtp", "implicit", Address("127.0.0.1", 0), Address("127.0.0.1", smtp_backend.port),
        False, tls, Limits()))
    port = port_of(proxy, "smtps")
    assert await _served_serial(port, str(ca)) == _serial(old.cert)

    in_flight = await WireClient.connect(port, tls=ssl.create_default_context(cafile=str(ca)))
    assert (await in_flight.smtp_reply()).startswith(b"220")

    for name in ("cert.pem", "key.pem"):  # what certbot's deploy hook does
        shutil.copy(new.cert.parent / name, live / name)
    assert proxy.reload_certificates()
    assert await _served_serial(port, str(ca)) == _serial(new.cert)
    expiry = x509.load_pem_x509_certificates(new.cert.read_bytes())[0].not_valid_after_utc.timestamp()
    assert sample(proxy.metrics.certificate_expiry, listener="smtps") == expiry

    await in_flight.send(b"NOOP\r\n")  # the old session is untouched
    assert await in_flight.smtp_reply() == b"250 2.0.0 Ok\r\n"
    await in_flight.aclose()

    (live / "cert.pem").write_bytes(b"-----BEGIN CERTIFICATE-----\ngarbage\n")
    assert not proxy.reload_certificates()
    assert sample(proxy.metrics.certificate_reloads, listener="smtps", result="failure") == 1
    assert sample(proxy.metrics.certificate_reloads, listener="smtps", result="success") == 1
    assert await _served_serial(port, str(ca)) == _serial(new.cert)  # still serving


async def test_sighup_reloads_a_running_process(tmp_path, certs):
    live = tmp_path / "live"
    shutil.copytree(certs.cert.parent, live)
    with trio.socket.socket() as s:
        await s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / "tlsproxy.toml"
    config.write_text(
        f'[tls]\ncert = "live/cert.pem"\nkey = "live/key.pem"\n'
        f'[[listeners]]\nname = "t"\nprotocol = "tcp"\nmode = "implicit"\n'
        f'listen = "127.0.0.1:{port}"\nbackend = "127.0.0.1:9"\n'
    )
    proc = subprocess.Popen([sys.executable, "-m", "tlsproxy", "run", "--config", str(config)],
                            stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:
            if "ready" in line:
                break
        new = generate(tmp_path / "new", ["localhost"])
        for name in ("cert.pem", "key.pem"):
            shutil.copy(new.cert.parent / name, live / name)
        proc.send_signal(signal.SIGHUP)
        for line in proc.stderr:
            if "certificate reloaded" in line:
                break
        assert proc.poll() is None  # SIGHUP reloads; it does not stop the proxy
        assert await _served_serial(port, str(new.ca_cert)) == _serial(new.cert)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
