"""SNI: one listener, several certificates chosen by the server name the client
sends; the [tls] cert/key pair answers clients without SNI or with a name no
certificate has. Checked with Python's ssl (verifying chain and name, as a
careful client does) and with openssl s_client -servername."""

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


@dataclasses.dataclass
class Pki:
    default: GeneratedFiles  # mail.example.com
    org: GeneratedFiles  # example.org, *.example.org
    net: GeneratedFiles  # mail.example.net
    ca_bundle: Path  # trusts all three

    def tls(self, **extra) -> TlsSettings:
        pairs = tuple(CertificatePair(f.cert, f.key) for f in (self.org, self.net))
        return TlsSettings(cert=self.default.cert, key=self.default.key, certificates=pairs, **extra)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("sni")
    # Different lifetimes, so each certificate's expiry metric is its own.
    files = Pki(
        default=generate(root / "default", "mail.example.com", days=300),
        org=generate(root / "org", ["example.org", "*.example.org"], days=100),
        net=generate(root / "net", "mail.example.net", key_type="rsa", days=200),
        ca_bundle=root / "bundle.pem",
    )
    cas = (f.ca_cert.read_bytes() for f in (files.default, files.org, files.net))
    files.ca_bundle.write_bytes(b"".join(cas))
    return files


def leaf(files: GeneratedFiles) -> x509.Certificate:
    return x509.load_pem_x509_certificates(files.cert.read_bytes())[0]


async def sni_proxy(nursery, backend_port: int, pki: Pki, mode: str = "implicit"):
    lc = dataclasses.replace(listener("sni", "smtp", mode, backend_port, pki.default), tls=pki.tls())
    return await start_proxy(nursery, lc)


async def served_leaf(port: int, server_name: str | None, ca_bundle: Path, check_name: bool = True):
    """Handshake as a verifying client (the chain, and the name unless told
    not to) sending ``server_name`` as SNI; return the leaf it was shown."""
    ctx = ssl.create_default_context(cafile=str(ca_bundle))
    ctx.check_hostname = check_name and server_name is not None
    stream = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", port), ctx, server_hostname=server_name)
    await stream.do_handshake()
    der = stream.getpeercert(binary_form=True)
    await trio.aclose_forcefully(stream)
    return x509.load_der_x509_certificate(der)


@pytest.mark.parametrize(
    ("server_name", "expected"),
    [
        ("mail.example.net", "net"),
        ("MAIL.Example.NET", "net"),  # names are case-insensitive
        ("example.org", "org"),
        ("www.example.org", "org"),  # *.example.org
        ("mail.example.com", "default"),  # the default's own name
        ("a.b.example.org", "fallback"),  # a wildcard covers one label only
        ("unknown.example", "fallback"),
        (None, "fallback"),  # no SNI at all
    ],
)
async def test_certificate_chosen_by_server_name(nursery, smtp_backend, pki, server_name, expected):
    proxy = await sni_proxy(nursery, smtp_backend.port, pki)
    fallback = expected == "fallback"
    # The fallback cannot carry the asked-for name: check the chain only.
    got = await served_leaf(port_of(proxy, "sni"), server_name, pki.ca_bundle, check_name=not fallback)
    want = leaf(pki.default if fallback else getattr(pki, expected))
    assert got.serial_number == want.serial_number


async def _openssl_subject(port: int, args: list[str], ca_bundle: Path) -> tuple[int, str]:
    result = await trio.run_process(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-CAfile", str(ca_bundle),
         "-verify_return_error", *args],
        stdin=b"", capture_stdout=True, capture_stderr=True, check=False,
    )
    out = result.stdout.decode(errors="replace")
    subject = next(line for line in out.splitlines() if line.startswith("subject="))
    return result.returncode, subject.replace(" ", "")


async def test_openssl_s_client_servername(nursery, smtp_backend, pki):
    proxy = await sni_proxy(nursery, smtp_backend.port, pki)
    port = port_of(proxy, "sni")
    for name, cn in [("mail.example.net", "mail.example.net"), ("x.example.org", "example.org")]:
        args = ["-servername", name, "-verify_hostname", name]
        rc, subject = await _openssl_subject(port, args, pki.ca_bundle)
        assert (rc, subject) == (0, f"subject=CN={cn}")
    rc, subject = await _openssl_subject(port, ["-noservername"], pki.ca_bundle)
    assert (rc, subject) == (0, "subject=CN=mail.example.com")


async def test_sni_after_starttls(nursery, smtp_backend, pki):
    proxy = await sni_proxy(nursery, smtp_backend.port, pki, mode="starttls")
    client = await WireClient.connect(port_of(proxy, "sni"))
    assert (await client.smtp_reply()).startswith(b"220")
    await client.send(b"EHLO client\r\n")
    assert b"STARTTLS" in await client.smtp_reply()
    await client.send(b"STARTTLS\r\n")
    assert (await client.smtp_reply()).startswith(b"220")
    ctx = ssl.create_default_context(cafile=str(pki.ca_bundle))
    await client.starttls(ctx, server_hostname="www.example.org")
    der = client.stream.getpeercert(binary_form=True)
    assert x509.load_der_x509_certificate(der).serial_number == leaf(pki.org).serial_number
    await client.send(b"EHLO client\r\n")
    assert (await client.smtp_reply()).startswith(b"250")
    (session,) = proxy.listener("sni").sessions
    assert session.sni == "www.example.org"
    await client.aclose()


@pytest.mark.parametrize(("server_name", "recorded"), [("WWW.Example.ORG", "www.example.org"), (None, None)])
async def test_session_records_the_requested_name(nursery, smtp_backend, pki, server_name, recorded):
    proxy = await sni_proxy(nursery, smtp_backend.port, pki)
    ctx = ssl.create_default_context(cafile=str(pki.ca_bundle))
    ctx.check_hostname = server_name is not None
    stream = trio.SSLStream(
        await trio.open_tcp_stream("127.0.0.1", port_of(proxy, "sni")), ctx, server_hostname=server_name
    )
    client = WireClient(stream)
    await stream.do_handshake()
    assert (await client.smtp_reply()).startswith(b"220")  # the proxy's handshake is done too
    (session,) = proxy.listener("sni").sessions
    assert session.sni == recorded
    await client.aclose()


async def test_expiry_metric_per_certificate(nursery, smtp_backend, pki):
    proxy = await sni_proxy(nursery, smtp_backend.port, pki)
    m = proxy.metrics
    assert sample(m.certificate_expiry, listener="sni") == leaf(pki.default).not_valid_after_utc.timestamp()
    assert sample(m.sni_certificate_expiry, listener="sni", name="example.org") == (
        leaf(pki.org).not_valid_after_utc.timestamp()
    )
    assert sample(m.sni_certificate_expiry, listener="sni", name="mail.example.net") == (
        leaf(pki.net).not_valid_after_utc.timestamp()
    )
    families = {s.labels.get("name") for f in m.registry.collect() for s in f.samples
                if s.name == "tlsproxy_sni_certificate_expiry_timestamp_seconds"}
    assert families == {"example.org", "mail.example.net"}
