"""Client certificates (mTLS): tls.client_ca with client_auth "required" or
"optional". A client without a certificate (where one is required) or with one
no configured CA vouches for fails the handshake, counted as reason
"client_certificate"; a verified client's subject is on the session."""

from __future__ import annotations

import dataclasses
import ssl
from pathlib import Path

import pytest
import trio
from cryptography import x509

from tests.conftest import listener, port_of, sample, start_proxy
from tests.helpers import WireClient
from tlsproxy.certs import GeneratedFiles, generate
from tlsproxy.config import CertificatePair, TlsSettings
from tlsproxy.metrics import HANDSHAKE_FAILURE_REASONS


@dataclasses.dataclass
class Pki:
    server: GeneratedFiles  # localhost
    sni: GeneratedFiles  # mail.example.org, chosen by SNI
    alice: GeneratedFiles  # client certificate from the CA the proxy trusts
    mallory: GeneratedFiles  # client certificate from a CA it does not
    server_cas: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("mtls")
    files = Pki(
        server=generate(root / "server", ["localhost", "127.0.0.1"]),
        sni=generate(root / "sni", "mail.example.org"),
        alice=generate(root / "alice", "alice", usage="client"),
        mallory=generate(root / "mallory", "mallory", usage="client"),
        server_cas=root / "server-cas.pem",
    )
    files.server_cas.write_bytes(files.server.ca_cert.read_bytes() + files.sni.ca_cert.read_bytes())
    return files


async def mtls_proxy(nursery, backend_port: int, pki: Pki, client_auth="required", mode="implicit"):
    tls = TlsSettings(
        cert=pki.server.cert, key=pki.server.key,
        certificates=(CertificatePair(pki.sni.cert, pki.sni.key),),
        client_ca=pki.alice.ca_cert, client_auth=client_auth,
    )
    lc = dataclasses.replace(listener("m", "smtp", mode, backend_port, pki.server), tls=tls)
    return await start_proxy(nursery, lc)


def client_context(pki: Pki, client: GeneratedFiles | None, version: str = "1.3") -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.server_cas))
    ctx.minimum_version = ctx.maximum_version = getattr(ssl.TLSVersion, f"TLSv1_{version[-1]}")
    if client is not None:
        ctx.load_cert_chain(str(client.cert), str(client.key))
    return ctx


async def greeting(port: int, ctx: ssl.SSLContext, server_name="localhost") -> tuple[WireClient, bytes]:
    """Handshake and read the SMTP greeting; b"" when the proxy refused us
    (TLS 1.2: the handshake fails; TLS 1.3: the client's handshake ends before
    the server has checked its certificate, so the alert comes on reading)."""
    client = WireClient(await trio.open_tcp_stream("127.0.0.1", port))
    try:
        await client.starttls(ctx, server_hostname=server_name)
    except trio.BrokenResourceError:
        return client, b""
    return client, await client.smtp_reply()


def failures(proxy) -> dict[str, float]:
    counter = proxy.metrics.handshake_failures
    return {r: sample(counter, listener="m", reason=r) for r in HANDSHAKE_FAILURE_REASONS}


NO_FAILURES = {r: 0 for r in HANDSHAKE_FAILURE_REASONS}


async def test_a_trusted_client_certificate_is_accepted_and_its_subject_recorded(nursery, smtp_backend, pki):
    proxy = await mtls_proxy(nursery, smtp_backend.port, pki)
    client, reply = await greeting(port_of(proxy, "m"), client_context(pki, pki.alice))
    assert reply.startswith(b"220")
    (session,) = proxy.listener("m").sessions
    assert session.client_cert_subject == "CN=alice"
    await client.send(b"QUIT\r\n")
    assert (await client.smtp_reply()).startswith(b"221")
    await client.aclose()
    await proxy.wait_idle(finished=1)
    assert failures(proxy) == NO_FAILURES


@pytest.mark.parametrize("version", ["1.2", "1.3"])
@pytest.mark.parametrize("who", ["nobody", "mallory"])
async def test_required_refuses_missing_or_untrusted_certificates(nursery, smtp_backend, pki, version, who):
    proxy = await mtls_proxy(nursery, smtp_backend.port, pki)
    cert = None if who == "nobody" else pki.mallory
    client, reply = await greeting(port_of(proxy, "m"), client_context(pki, cert, version))
    assert reply == b""
    await client.aclose()
    await proxy.wait_idle(finished=1)
    assert failures(proxy) == NO_FAILURES | {"client_certificate": 1}
    assert smtp_backend.commands == []  # the backend never saw the client


async def test_optional_lets_clients_without_a_certificate_in(nursery, smtp_backend, pki):
    proxy = await mtls_proxy(nursery, smtp_backend.port, pki, client_auth="optional")
    port = port_of(proxy, "m")
    client, reply = await greeting(port, client_context(pki, None))
    assert reply.startswith(b"220")
    (session,) = proxy.listener("m").sessions
    assert session.client_cert_subject is None
    await client.aclose()
    await proxy.wait_idle(finished=1)

    client, reply = await greeting(port, client_context(pki, pki.alice))
    assert reply.startswith(b"220")
    (session,) = proxy.listener("m").sessions
    assert session.client_cert_subject == "CN=alice"
    await client.aclose()
    await proxy.wait_idle(finished=2)

    # A certificate that is sent must still verify.
    client, reply = await greeting(port, client_context(pki, pki.mallory))
    assert reply == b""
    await client.aclose()
    await proxy.wait_idle(finished=3)
    assert failures(proxy) == NO_FAILURES | {"client_certificate": 1}


async def test_a_certificate_chosen_by_sni_still_requires_a_client_certificate(nursery, smtp_backend, pki):
    """The SNI callback swaps the connection's context; verification must
    survive the swap."""
    proxy = await mtls_proxy(nursery, smtp_backend.port, pki)
    port = port_of(proxy, "m")
    client, reply = await greeting(port, client_context(pki, None), server_name="mail.example.org")
    assert reply == b""
    await client.aclose()
    await proxy.wait_idle(finished=1)
    assert failures(proxy) == NO_FAILURES | {"client_certificate": 1}

    client, reply = await greeting(port, client_context(pki, pki.alice), server_name="mail.example.org")
    assert reply.startswith(b"220")
    served = x509.load_der_x509_certificate(client.stream.getpeercert(binary_form=True))
    assert served.subject.rfc4514_string() == "CN=mail.example.org"
    (session,) = proxy.listener("m").sessions
    assert (session.sni, session.client_cert_subject) == ("mail.example.org", "CN=alice")
    await client.aclose()


async def test_starttls_listener_refuses_a_client_without_certificate(nursery, smtp_backend, pki):
    proxy = await mtls_proxy(nursery, smtp_backend.port, pki, mode="starttls")
    client = await WireClient.connect(port_of(proxy, "m"))
    assert (await client.smtp_reply()).startswith(b"220")
    await client.send(b"STARTTLS\r\n")
    assert (await client.smtp_reply()).startswith(b"220")
    try:
        await client.starttls(client_context(pki, None, "1.2"))
    except trio.BrokenResourceError:
        pass  # TLS 1.2: the handshake itself fails
    await proxy.wait_idle(finished=1)
    assert failures(proxy) == NO_FAILURES | {"client_certificate": 1}


async def _s_client(port: int, pki: Pki, *args: str) -> bytes:
    result = await trio.run_process(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-CAfile", str(pki.server_cas),
         "-verify_return_error", "-quiet", "-crlf", *args],
        stdin=b"QUIT\n", capture_stdout=True, capture_stderr=True, check=False,
    )
    return result.stdout


async def test_openssl_s_client_with_and_without_a_certificate(nursery, smtp_backend, pki):
    proxy = await mtls_proxy(nursery, smtp_backend.port, pki)
    port = port_of(proxy, "m")
    out = await _s_client(port, pki, "-cert", str(pki.alice.cert), "-key", str(pki.alice.key))
    assert out.startswith(b"220 ") and b"\r\n221 " in out
    assert await _s_client(port, pki) == b""
    await proxy.wait_idle(finished=2)
    assert failures(proxy) == NO_FAILURES | {"client_certificate": 1}
