"""Certificate reload, on SIGHUP and when the files change on disk: new
handshakes get the new certificate, sessions in flight continue, a broken file
keeps the old one in service; under load no session fails."""

from __future__ import annotations

import os
import shutil
import signal
import ssl
import subprocess
import sys

import pytest
import trio
from cryptography import x509

from tests.conftest import closed_port, port_of, sample
from tests.helpers import WireClient
from tlsproxy.certs import generate
from tlsproxy.cli import _watch_signals
from tlsproxy.config import Address, CertificatePair, Config, Limits, ListenerConfig, TlsSettings, load
from tlsproxy.metrics import HANDSHAKE_FAILURE_REASONS
from tlsproxy.server.proxy import Proxy


async def start_proxy(nursery, *listeners: ListenerConfig, watch: float = 0) -> Proxy:
    """A proxy whose file watcher is off unless asked for, so that tests
    reloading by hand never race it."""
    proxy = Proxy(Config(listeners=listeners, shutdown_grace=5, tls_watch_interval=watch))
    await nursery.start(proxy.run)
    return proxy


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


# ---------------------------------------------------------------- file watcher

WATCH = 0.02  # seconds between polls; the tests wait on reload events, never on time
RELOAD_BOUND = 10  # seconds before a missing reload fails the test


def _listener(name: str, backend_port: int, tls: TlsSettings) -> ListenerConfig:
    return ListenerConfig(name, "smtp", "implicit", Address("127.0.0.1", 0),
                          Address("127.0.0.1", backend_port), False, tls, Limits())


def _install(source, live) -> None:
    """Overwrite in place, as a deploy hook copying cert and key does."""
    live.mkdir(exist_ok=True)
    for name in ("cert.pem", "key.pem"):
        shutil.copy(source.cert.parent / name, live / name)


def _relink(link, target) -> None:
    """Repoint a symlink atomically (a new link renamed over the old one)."""
    tmp = link.with_name(link.name + ".tmp")
    tmp.symlink_to(target)
    tmp.replace(link)


def _expiry(files) -> float:
    return x509.load_pem_x509_certificates(files.cert.read_bytes())[0].not_valid_after_utc.timestamp()


def _reloads(proxy, name: str) -> tuple[float, float]:
    m = proxy.metrics.certificate_reloads
    return sample(m, listener=name, result="success"), sample(m, listener=name, result="failure")


async def test_changed_files_reload_only_their_listener(nursery, smtp_backend, tmp_path):
    old = generate(tmp_path / "old", ["localhost"])
    new = generate(tmp_path / "new", ["localhost"])
    _install(old, tmp_path / "a")
    _install(old, tmp_path / "b")
    ca = tmp_path / "both-ca.pem"
    ca.write_bytes(old.ca_cert.read_bytes() + new.ca_cert.read_bytes())
    proxy = await start_proxy(nursery, *(
        _listener(n, smtp_backend.port, TlsSettings(tmp_path / n / "cert.pem", tmp_path / n / "key.pem"))
        for n in ("a", "b")), watch=WATCH)

    _install(new, tmp_path / "a")
    with trio.fail_after(RELOAD_BOUND):
        await proxy.next_certificate_reload()
    assert await _served_serial(port_of(proxy, "a"), str(ca)) == _serial(new.cert)
    assert await _served_serial(port_of(proxy, "b"), str(ca)) == _serial(old.cert)
    assert _reloads(proxy, "a") == (1, 0)
    assert _reloads(proxy, "b") == (0, 0)
    assert sample(proxy.metrics.certificate_expiry, listener="a") == _expiry(new)
    assert sample(proxy.metrics.certificate_expiry, listener="b") == _expiry(old)


async def test_certbot_repointed_symlinks_are_followed(nursery, smtp_backend, tmp_path):
    """certbot: live/fullchain.pem -> ../archive/fullchain1.pem; a renewal
    writes fullchain2.pem and repoints the link. Configured through a relative
    path, as config files do."""
    archive, live = tmp_path / "archive", tmp_path / "live"
    archive.mkdir()
    live.mkdir()
    gens = [generate(tmp_path / f"gen{i}", ["localhost"]) for i in (1, 2)]
    for i, g in enumerate(gens, 1):
        shutil.copy(g.cert, archive / f"fullchain{i}.pem")
        shutil.copy(g.key, archive / f"privkey{i}.pem")
    (live / "fullchain.pem").symlink_to("../archive/fullchain1.pem")
    (live / "privkey.pem").symlink_to("../archive/privkey1.pem")
    config_file = tmp_path / "tlsproxy.toml"
    config_file.write_text(
        f'[tls]\ncert = "live/fullchain.pem"\nkey = "live/privkey.pem"\nwatch_interval = {WATCH}\n'
        f'[[listeners]]\nname = "le"\nprotocol = "smtp"\nmode = "implicit"\n'
        f'listen = "127.0.0.1:{closed_port()}"\nbackend = "127.0.0.1:{smtp_backend.port}"\n'
    )
    proxy = Proxy(load(config_file))
    await nursery.start(proxy.run)
    port = port_of(proxy, "le")
    assert await _served_serial(port, str(gens[0].ca_cert)) == _serial(gens[0].cert)

    _relink(live / "fullchain.pem", "../archive/fullchain2.pem")
    _relink(live / "privkey.pem", "../archive/privkey2.pem")
    with trio.fail_after(RELOAD_BOUND):
        await proxy.next_certificate_reload()
    assert await _served_serial(port, str(gens[1].ca_cert)) == _serial(gens[1].cert)
    assert _reloads(proxy, "le") == (1, 0)


async def test_cert_manager_data_symlink_swap(nursery, smtp_backend, tmp_path):
    """A Kubernetes secret volume: tls.crt -> ..data/tls.crt, ..data -> a
    timestamped directory; an update writes a new directory, swaps ..data and
    deletes the old directory. The file names never change."""
    vol = tmp_path / "secret"
    vol.mkdir()
    gens = [generate(tmp_path / f"gen{i}", ["localhost"]) for i in (1, 2)]

    def publish(i: int) -> None:
        version = vol / f"..2026_11_23_{i}"
        version.mkdir()
        shutil.copy(gens[i].cert, version / "tls.crt")
        shutil.copy(gens[i].key, version / "tls.key")
        _relink(vol / "..data", version.name)
        if i:
            shutil.rmtree(vol / f"..2026_11_23_{i - 1}")

    publish(0)
    for name in ("tls.crt", "tls.key"):
        (vol / name).symlink_to(f"..data/{name}")
    proxy = await start_proxy(
        nursery, _listener("k8s", smtp_backend.port, TlsSettings(vol / "tls.crt", vol / "tls.key")),
        watch=WATCH,
    )
    publish(1)
    with trio.fail_after(RELOAD_BOUND):
        await proxy.next_certificate_reload()
    assert await _served_serial(port_of(proxy, "k8s"), str(gens[1].ca_cert)) == _serial(gens[1].cert)
    assert _reloads(proxy, "k8s") == (1, 0)


async def test_a_broken_file_is_refused_once_then_a_good_one_loads(nursery, smtp_backend, tmp_path):
    old = generate(tmp_path / "old", ["localhost"])
    new = generate(tmp_path / "new", ["localhost"])
    live = tmp_path / "live"
    _install(old, live)
    proxy = await start_proxy(
        nursery, _listener("w", smtp_backend.port, TlsSettings(live / "cert.pem", live / "key.pem")),
        watch=WATCH,
    )
    shutil.copy(new.cert, live / "cert.pem")  # a cert without its key: the pair does not match
    with trio.fail_after(RELOAD_BOUND):
        await proxy.next_certificate_reload()
    assert _reloads(proxy, "w") == (0, 1)
    port = port_of(proxy, "w")
    assert await _served_serial(port, str(old.ca_cert)) == _serial(old.cert)  # still serving
    assert sample(proxy.metrics.certificate_expiry, listener="w") == _expiry(old)

    shutil.copy(new.key, live / "key.pem")
    with trio.fail_after(RELOAD_BOUND):
        await proxy.next_certificate_reload()
    # The broken pair was not retried on every poll meanwhile: one failure.
    assert _reloads(proxy, "w") == (1, 1)
    assert await _served_serial(port, str(new.ca_cert)) == _serial(new.cert)
    assert sample(proxy.metrics.certificate_expiry, listener="w") == _expiry(new)


async def test_sni_certificates_are_watched_and_their_metrics_follow(nursery, smtp_backend, tmp_path):
    default = generate(tmp_path / "default", ["localhost"])
    org1 = generate(tmp_path / "org1", ["example.org"])
    org2 = generate(tmp_path / "org2", ["example.org"], days=30)
    net = generate(tmp_path / "net", ["example.net"], days=60)
    live = tmp_path / "live"
    _install(org1, live)
    slot = CertificatePair(live / "cert.pem", live / "key.pem")
    tls = TlsSettings(default.cert, default.key, certificates=(slot,))
    proxy = await start_proxy(nursery, _listener("sni", smtp_backend.port, tls), watch=WATCH)
    expiry = proxy.metrics.sni_certificate_expiry
    assert sample(expiry, listener="sni", name="example.org") == _expiry(org1)

    _install(org2, live)
    with trio.fail_after(RELOAD_BOUND):
        await proxy.next_certificate_reload()
    ctx = ssl.create_default_context(cafile=str(org2.ca_cert))
    client = WireClient(await trio.open_tcp_stream("127.0.0.1", port_of(proxy, "sni")))
    await client.starttls(ctx, server_hostname="example.org")
    assert x509.load_der_x509_certificate(client.stream.getpeercert(binary_form=True)).serial_number == (
        _serial(org2.cert)
    )
    await client.aclose()
    assert sample(expiry, listener="sni", name="example.org") == _expiry(org2)

    _install(net, live)  # the slot now serves another name: the old series goes
    with trio.fail_after(RELOAD_BOUND):
        await proxy.next_certificate_reload()
    names = {s.labels["name"] for f in proxy.metrics.registry.collect() for s in f.samples
             if s.name == "tlsproxy_sni_certificate_expiry_timestamp_seconds"}
    assert names == {"example.net"}
    assert sample(expiry, listener="sni", name="example.net") == _expiry(net)


# ---------------------------------------------------------------- under load

LOAD_CLIENTS = 8
LOAD_RELOADS = 4


class _Load:
    """Clients delivering one message per TLS session, in a loop."""

    def __init__(self, port: int, ca: str) -> None:
        self.port = port
        self.ctx = ssl.create_default_context(cafile=ca)
        self.delivered = 0
        self.serials: set[int] = set()
        self.stop = trio.Event()

    async def client(self, n: int) -> None:
        while not self.stop.is_set():
            c = await WireClient.connect(self.port, tls=self.ctx)
            der = c.stream.getpeercert(binary_form=True)
            self.serials.add(x509.load_der_x509_certificate(der).serial_number)
            assert (await c.smtp_reply()).startswith(b"220")
            for command, code in [(b"EHLO load\r\n", b"250"), (b"MAIL FROM:<a@example.com>\r\n", b"250"),
                                  (f"RCPT TO:<{n}@example.com>\r\n".encode(), b"250"), (b"DATA\r\n", b"354"),
                                  (b"Subject: load\r\n\r\nbody\r\n.\r\n", b"250"), (b"QUIT\r\n", b"221")]:
                await c.send(command)
                reply = await c.smtp_reply()
                assert reply.startswith(code), (command, reply)
            await c.aclose()
            self.delivered += 1


@pytest.mark.parametrize("trigger", ["sighup", "file_change"])
async def test_reload_under_load_fails_no_session(nursery, smtp_backend, tmp_path, trigger):
    """LOAD_CLIENTS clients keep handshaking and delivering mail while the
    certificate changes LOAD_RELOADS times, by SIGHUP (through the CLI's
    signal handler, as in production; watcher off) or by the file watcher:
    not one session fails, and right after each reload a new handshake gets
    the new certificate."""
    gens = [generate(tmp_path / f"gen{i}", ["localhost"]) for i in (0, 1)]
    live = tmp_path / "live"
    _install(gens[0], live)
    ca = tmp_path / "both-ca.pem"
    ca.write_bytes(gens[0].ca_cert.read_bytes() + gens[1].ca_cert.read_bytes())
    tls = TlsSettings(live / "cert.pem", live / "key.pem")
    watch = WATCH if trigger == "file_change" else 0
    proxy = await start_proxy(nursery, _listener("load", smtp_backend.port, tls), watch=watch)
    port = port_of(proxy, "load")
    load = _Load(port, str(ca))

    with trio.open_signal_receiver(signal.SIGHUP) as signals:
        async with trio.open_nursery() as signal_task:
            signal_task.start_soon(_watch_signals, signals, proxy, signal_task.cancel_scope)
            async with trio.open_nursery() as clients:
                for n in range(LOAD_CLIENTS):
                    clients.start_soon(load.client, n)
                for i in range(LOAD_RELOADS):
                    target = load.delivered + LOAD_CLIENTS  # sessions run on the current certificate
                    while load.delivered < target:
                        await proxy.next_session_end()
                    current = gens[(i + 1) % 2]
                    _install(current, live)
                    if trigger == "sighup":
                        os.kill(os.getpid(), signal.SIGHUP)
                    with trio.fail_after(RELOAD_BOUND):
                        await proxy.next_certificate_reload()
                    assert await _served_serial(port, str(ca)) == _serial(current.cert)
                load.stop.set()
            signal_task.cancel_scope.cancel()

    assert load.serials == {_serial(g.cert) for g in gens}  # the load saw both certificates
    assert len(smtp_backend.messages) == load.delivered >= LOAD_RELOADS * LOAD_CLIENTS
    await proxy.wait_idle()
    failures = {r: sample(proxy.metrics.handshake_failures, listener="load", reason=r)
                for r in HANDSHAKE_FAILURE_REASONS}
    assert failures == {r: 0 for r in HANDSHAKE_FAILURE_REASONS}
    assert _reloads(proxy, "load") == (LOAD_RELOADS, 0)
