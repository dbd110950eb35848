"""The command line, run for real: the installed ``tlsproxy`` console script
(and ``python -m tlsproxy``) as a subprocess.

check-config: exit 0 and one line per listener on a good file; exit 2 naming
the listener and the key on a bad one. gen-cert: the files, their modes, and
the certificates' contents, checked with cryptography and openssl. run: start,
serve, SIGTERM with and without open sessions, a port already in use.

Synchronisation with the subprocess is by events (its log lines on stderr,
its exit, a connection being accepted or refused), never by sleeping.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import signal
import socket
import stat
import subprocess
import sys
import urllib.request
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

import pytest
import trio
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import tlsproxy
from tlsproxy.certs import generate
from tlsproxy.legacy_smtp import LegacySmtpServer

TLSPROXY = str(Path(sys.executable).with_name("tlsproxy"))
EXIT_CONFIG = 2
PROCESS_TIMEOUT = 60  # seconds; a hung subprocess fails the test instead of the run


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TLSPROXY, *args], capture_output=True, text=True, timeout=PROCESS_TIMEOUT, cwd=cwd
    )


def free_port() -> int:
    """A 127.0.0.1 port nothing listens on (bound to 0, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    generate(directory / "certs", ["localhost", "127.0.0.1"])
    generate(directory / "other", ["other.example"])
    return directory


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return f'"{value}"'


def write_config(
    directory: Path, listeners: list[dict], server: dict | None = None, metrics: dict | None = None
) -> Path:
    """A config in ``directory`` using the pki fixture's certs by relative path."""
    parts = []
    if server:
        parts.append("[server]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in server.items()))
    if metrics:
        parts.append("[metrics]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in metrics.items()))
    parts.append('[tls]\ncert = "certs/cert.pem"\nkey = "certs/key.pem"\n')
    for lst in listeners:
        parts.append("[[listeners]]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in lst.items()))
    path = directory / "tlsproxy.toml"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


@pytest.fixture
def confdir(tmp_path: Path, pki: Path) -> Path:
    os.symlink(pki / "certs", tmp_path / "certs")
    os.symlink(pki / "other", tmp_path / "other")
    return tmp_path


def smtp(name: str, listen: str, backend: str, mode: str = "starttls", **extra: object) -> dict:
    return {"name": name, "protocol": "smtp", "mode": mode, "listen": listen, "backend": backend, **extra}


# ---------------------------------------------------------------- --version


def test_version_via_python_m() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "tlsproxy", "--version"],
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"tlsproxy {tlsproxy.__version__}"


def test_version_via_console_script() -> None:
    out = cli("--version")
    assert out.returncode == 0
    assert out.stdout.strip() == f"tlsproxy {tlsproxy.__version__}"


def test_no_command_is_a_usage_error() -> None:
    out = cli()
    assert out.returncode == 2
    assert "usage:" in out.stderr


# ---------------------------------------------------------------- check-config


GOOD_LISTENERS = [
    smtp("submission", "127.0.0.1:2587", "127.0.0.1:1587", require_tls=True),
    smtp("submissions", "127.0.0.1:2465", "127.0.0.1:1587", mode="implicit"),
    {"name": "imap", "protocol": "imap", "mode": "starttls", "listen": "[::1]:2143",
     "backend": "127.0.0.1:1143"},
]


def test_check_config_good_file(confdir: Path) -> None:
    out = cli("check-config", "--config", str(write_config(confdir, GOOD_LISTENERS)))

    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "submission: smtp starttls 127.0.0.1:2587 -> 127.0.0.1:1587 require_tls",
        "submissions: smtp implicit 127.0.0.1:2465 -> 127.0.0.1:1587",
        "imap: imap starttls [::1]:2143 -> 127.0.0.1:1143",
        "config OK",
    ]
    assert out.stderr == ""


def test_check_config_short_option_and_relative_path(confdir: Path) -> None:
    write_config(confdir, GOOD_LISTENERS)
    out = cli("check-config", "-c", "tlsproxy.toml", cwd=confdir)
    assert out.returncode == 0, out.stderr
    assert out.stdout.endswith("config OK\n")


IMAP = 'listeners[1] "imap"'


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"requre_tls": True}, f"{IMAP}: unknown key 'requre_tls'"),
        ({"require_tls": "yes"}, f"{IMAP}: key 'require_tls': expected true or false"),
        ({"backend": "::1:143"}, f"{IMAP}: key 'backend': write IPv6 addresses in brackets"),
        ({"listen": "127.0.0.1:70000"}, f"{IMAP}: key 'listen': port must be 1-65535"),
        ({"listen": "127.0.0.1:2587"},
         f"{IMAP}: key 'listen': 127.0.0.1:2587 overlaps listener \"submission\""),
        ({"protocol": "tcp"}, f"{IMAP}: key 'mode': 'starttls' needs a mail protocol"),
        ({"idle_timeout": -5}, f"{IMAP}: key 'idle_timeout': must be at least"),
        ({"tls": "x"}, f"{IMAP}: key 'tls': must be a table"),
    ],
)
def test_check_config_bad_listener(confdir: Path, change: dict, expected: str) -> None:
    listeners = [
        smtp("submission", "127.0.0.1:2587", "127.0.0.1:1587", require_tls=True),
        {"name": "imap", "protocol": "imap", "mode": "starttls", "listen": "127.0.0.1:2143",
         "backend": "127.0.0.1:1143", **change},
    ]
    out = cli("check-config", "--config", str(write_config(confdir, listeners)))

    assert out.returncode == EXIT_CONFIG
    assert out.stdout == ""
    assert out.stderr.startswith(f"tlsproxy: config error: {expected}")
    assert "Traceback" not in out.stderr


def test_check_config_key_not_matching_cert(confdir: Path) -> None:
    path = write_config(confdir, GOOD_LISTENERS)
    path.write_text(path.read_text().replace('key = "certs/key.pem"', 'key = "other/key.pem"'))

    out = cli("check-config", "--config", str(path))

    assert out.returncode == EXIT_CONFIG
    assert out.stderr.startswith("tlsproxy: config error: listeners[0] \"submission\": key 'key': ")
    assert "does not match" in out.stderr


def test_check_config_missing_cert_file(confdir: Path) -> None:
    path = write_config(confdir, GOOD_LISTENERS)
    path.write_text(path.read_text().replace("certs/cert.pem", "certs/nope.pem"))

    out = cli("check-config", "--config", str(path))

    assert out.returncode == EXIT_CONFIG
    assert out.stderr.startswith(
        "tlsproxy: config error: listeners[0] \"submission\": key 'cert': cannot read"
    )


def test_check_config_invalid_toml(confdir: Path) -> None:
    path = confdir / "broken.toml"
    path.write_text("[[listeners]\nname = \n")
    out = cli("check-config", "--config", str(path))
    assert out.returncode == EXIT_CONFIG
    assert out.stderr.startswith(f"tlsproxy: config error: {path}: invalid TOML")


def test_check_config_missing_file(tmp_path: Path) -> None:
    out = cli("check-config", "--config", str(tmp_path / "absent.toml"))
    assert out.returncode == EXIT_CONFIG
    assert "cannot read" in out.stderr and "absent.toml" in out.stderr


def test_run_refuses_a_bad_config_before_listening(confdir: Path) -> None:
    listeners = [smtp("submission", f"127.0.0.1:{free_port()}", "127.0.0.1:1587", requre_tls=True)]
    out = cli("run", "--config", str(write_config(confdir, listeners)))
    assert out.returncode == EXIT_CONFIG
    assert "listeners[0] \"submission\": unknown key 'requre_tls'" in out.stderr


# ---------------------------------------------------------------- gen-cert


def read_chain(path: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(path.read_bytes())


def verify_signed_by(cert: x509.Certificate, issuer_key) -> None:
    """Raises InvalidSignature unless ``issuer_key`` signed ``cert``."""
    if isinstance(issuer_key, ec.EllipticCurvePublicKey):
        issuer_key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
    else:
        issuer_key.verify(
            cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), cert.signature_hash_algorithm
        )


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def ecdsa_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out_dir = tmp_path_factory.mktemp("gen") / "out"  # does not exist yet: gen-cert creates it
    result = cli("gen-cert", "--hostname", "mail.example.com", "--out-dir", str(out_dir))
    assert result.returncode == 0, result.stderr
    assert str(out_dir / "ca.pem") in result.stdout
    return out_dir


def test_gen_cert_writes_the_four_files(ecdsa_dir: Path) -> None:
    assert sorted(p.name for p in ecdsa_dir.iterdir()) == ["ca-key.pem", "ca.pem", "cert.pem", "key.pem"]
    assert mode_of(ecdsa_dir / "key.pem") == 0o600
    assert mode_of(ecdsa_dir / "ca-key.pem") == 0o600


def test_gen_cert_chain_is_leaf_then_ca(ecdsa_dir: Path) -> None:
    chain = read_chain(ecdsa_dir / "cert.pem")
    (ca,) = read_chain(ecdsa_dir / "ca.pem")

    assert len(chain) == 2
    leaf, second = chain
    assert second == ca
    assert leaf.issuer == ca.subject
    assert ca.issuer == ca.subject  # self-signed root
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "mail.example.com"


def test_gen_cert_keys_match_and_default_to_ecdsa_p256(ecdsa_dir: Path) -> None:
    leaf, ca = read_chain(ecdsa_dir / "cert.pem")
    key = serialization.load_pem_private_key((ecdsa_dir / "key.pem").read_bytes(), None)
    ca_key = serialization.load_pem_private_key((ecdsa_dir / "ca-key.pem").read_bytes(), None)

    for k in (key, ca_key):
        assert isinstance(k, ec.EllipticCurvePrivateKey)
        assert isinstance(k.curve, ec.SECP256R1)
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert key.public_key().public_bytes(*spki) == leaf.public_key().public_bytes(*spki)
    assert ca_key.public_key().public_bytes(*spki) == ca.public_key().public_bytes(*spki)
    assert key.public_key().public_bytes(*spki) != ca_key.public_key().public_bytes(*spki)


def test_gen_cert_leaf_extensions(ecdsa_dir: Path) -> None:
    leaf, _ = read_chain(ecdsa_dir / "cert.pem")

    bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical is True
    assert bc.value.ca is False
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku.value
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mail.example.com"]
    assert san.get_values_for_type(x509.IPAddress) == []
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and not ku.key_cert_sign


def test_gen_cert_ca_extensions(ecdsa_dir: Path) -> None:
    (ca,) = read_chain(ecdsa_dir / "ca.pem")
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca is True
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign


def test_gen_cert_leaf_validity_is_at_most_366_days(ecdsa_dir: Path) -> None:
    leaf, _ = read_chain(ecdsa_dir / "cert.pem")
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert lifetime <= dt.timedelta(days=366)
    assert lifetime == dt.timedelta(days=365)  # the default
    now = dt.datetime.now(dt.timezone.utc)
    assert leaf.not_valid_before_utc <= now < leaf.not_valid_after_utc


def test_gen_cert_leaf_is_signed_by_the_ca(ecdsa_dir: Path, pki: Path) -> None:
    leaf, _ = read_chain(ecdsa_dir / "cert.pem")
    (ca,) = read_chain(ecdsa_dir / "ca.pem")

    verify_signed_by(leaf, ca.public_key())
    verify_signed_by(ca, ca.public_key())
    # The check can fail: another CA's key does not verify this leaf.
    (foreign_ca,) = read_chain(pki / "other" / "ca.pem")
    with pytest.raises(InvalidSignature):
        verify_signed_by(leaf, foreign_ca.public_key())


def split_leaf(cert_pem: Path, out: Path) -> Path:
    leaf = read_chain(cert_pem)[0]
    out.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    return out


def openssl_verify(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", "verify", *args], capture_output=True, text=True, timeout=PROCESS_TIMEOUT
    )


def test_gen_cert_openssl_verifies_the_leaf(ecdsa_dir: Path, tmp_path: Path, pki: Path) -> None:
    leaf = split_leaf(ecdsa_dir / "cert.pem", tmp_path / "leaf.pem")
    ca = str(ecdsa_dir / "ca.pem")

    ok = openssl_verify(
        "-CAfile", ca, "-purpose", "sslserver", "-verify_hostname", "mail.example.com", str(leaf)
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.strip() == f"{leaf}: OK"

    wrong_name = openssl_verify("-CAfile", ca, "-verify_hostname", "other.example.com", str(leaf))
    assert wrong_name.returncode != 0
    wrong_ca = openssl_verify("-CAfile", str(pki / "other" / "ca.pem"), str(leaf))
    assert wrong_ca.returncode != 0


def test_gen_cert_rsa(tmp_path: Path) -> None:
    out = cli("gen-cert", "--hostname", "mail.example.com", "--out-dir", str(tmp_path), "--key-type", "rsa")
    assert out.returncode == 0, out.stderr

    leaf, ca = read_chain(tmp_path / "cert.pem")
    key = serialization.load_pem_private_key((tmp_path / "key.pem").read_bytes(), None)
    assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 2048
    assert isinstance(leaf.public_key(), rsa.RSAPublicKey) and leaf.public_key().key_size == 2048
    assert isinstance(ca.public_key(), rsa.RSAPublicKey) and ca.public_key().key_size == 2048
    assert leaf.public_key().public_numbers() == key.public_key().public_numbers()
    assert leaf.signature_hash_algorithm.name == hashes.SHA256.name
    verify_signed_by(leaf, ca.public_key())
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert mode_of(tmp_path / "key.pem") == 0o600 and mode_of(tmp_path / "ca-key.pem") == 0o600

    split_leaf(tmp_path / "cert.pem", tmp_path / "leaf.pem")
    ok = openssl_verify("-CAfile", str(tmp_path / "ca.pem"), str(tmp_path / "leaf.pem"))
    assert ok.returncode == 0, ok.stdout + ok.stderr


def test_gen_cert_several_names_and_ip_addresses(tmp_path: Path) -> None:
    out = cli(
        "gen-cert", "--out-dir", str(tmp_path),
        "--hostname", "mail.example.com", "--hostname", "mx.example.com",
        "--hostname", "127.0.0.1", "--hostname", "::1",
    )
    assert out.returncode == 0, out.stderr

    leaf, _ = read_chain(tmp_path / "cert.pem")
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mail.example.com", "mx.example.com"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")
    ]
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "mail.example.com"

    leaf_pem = split_leaf(tmp_path / "cert.pem", tmp_path / "leaf.pem")
    ca = str(tmp_path / "ca.pem")
    assert openssl_verify("-CAfile", ca, "-verify_ip", "127.0.0.1", str(leaf_pem)).returncode == 0
    assert openssl_verify("-CAfile", ca, "-verify_hostname", "mx.example.com", str(leaf_pem)).returncode == 0
    assert openssl_verify("-CAfile", ca, "-verify_ip", "127.0.0.2", str(leaf_pem)).returncode != 0


def test_gen_cert_days(tmp_path: Path) -> None:
    out = cli("gen-cert", "--hostname", "h.example", "--out-dir", str(tmp_path / "a"), "--days", "366")
    assert out.returncode == 0, out.stderr
    leaf, _ = read_chain(tmp_path / "a" / "cert.pem")
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == dt.timedelta(days=366)


@pytest.mark.parametrize("days", ["400", "367", "0", "-1"])
def test_gen_cert_refuses_bad_days(tmp_path: Path, days: str) -> None:
    out_dir = tmp_path / "out"
    out = cli("gen-cert", "--hostname", "h.example", "--out-dir", str(out_dir), f"--days={days}")
    assert out.returncode == EXIT_CONFIG
    assert "366" in out.stderr
    assert "Traceback" not in out.stderr
    assert not out_dir.exists()  # nothing written


def test_gen_cert_narrows_an_existing_world_readable_key(tmp_path: Path) -> None:
    for name in ("key.pem", "ca-key.pem"):
        (tmp_path / name).write_text("old")
        os.chmod(tmp_path / name, 0o644)

    out = cli("gen-cert", "--hostname", "h.example", "--out-dir", str(tmp_path))

    assert out.returncode == 0, out.stderr
    assert mode_of(tmp_path / "key.pem") == 0o600
    assert mode_of(tmp_path / "ca-key.pem") == 0o600
    serialization.load_pem_private_key((tmp_path / "key.pem").read_bytes(), None)  # overwritten


def test_gen_cert_unwritable_out_dir_is_a_clean_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    out = cli("gen-cert", "--hostname", "h.example", "--out-dir", str(tmp_path / "file" / "certs"))
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    assert "cannot write" in out.stderr


# ---------------------------------------------------------------- run


class ProxyProcess:
    """``tlsproxy run`` as a child process, its stderr collected as it comes."""

    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self.stderr = bytearray()
        self.stderr_closed = False
        self._grew = trio.Event()

    async def pump_stderr(self) -> None:
        assert self.proc.stderr is not None
        while chunk := await self.proc.stderr.receive_some(65536):
            self.stderr += chunk
            self._grew.set()
            self._grew = trio.Event()
        self.stderr_closed = True
        self._grew.set()

    @property
    def log(self) -> str:
        return self.stderr.decode("utf-8", "replace")

    async def wait_for_log(self, text: str, timeout: float = 15) -> None:
        """Wait until ``text`` appears on the process's stderr."""
        with trio.fail_after(timeout):
            while text not in self.log:
                assert not self.stderr_closed, f"exited without logging {text!r}:\n{self.log}"
                await self._grew.wait()

    async def connect(self, port: int, attempts: int = 100) -> trio.SocketStream:
        """Poll until ``port`` accepts a connection (bounded); the accepted
        connection is returned for the test to use. Between attempts, wait
        for the process to die (at most 0.1 s): a crash fails at once."""
        for _ in range(attempts):
            try:
                return await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                with trio.move_on_after(0.1):
                    await self.proc.wait()
                assert self.proc.returncode is None, f"exited {self.proc.returncode}:\n{self.log}"
        raise AssertionError(f"port {port} never accepted a connection:\n{self.log}")

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    async def exit_code(self, timeout: float) -> int:
        with trio.fail_after(timeout):
            return await self.proc.wait()


@asynccontextmanager
async def running(config: Path, command: tuple[str, ...] = (TLSPROXY,)) -> AsyncIterator[ProxyProcess]:
    """``tlsproxy run --config config``; killed if still running at the end,
    its whole stderr in ``.log`` afterwards (a supervisor's workers share the
    pipe: until they are gone too)."""
    proc = await trio.lowlevel.open_process(
        [*command, "run", "--config", str(config)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    pp = ProxyProcess(proc)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pp.pump_stderr)
            try:
                yield pp
            finally:
                with trio.CancelScope(shield=True):
                    if proc.returncode is None:
                        proc.kill()
                    with trio.move_on_after(15):
                        await proc.wait()
                        while not pp.stderr_closed:  # read the last log lines
                            await pp._grew.wait()
                nursery.cancel_scope.cancel()
    finally:
        if proc.returncode is None:
            proc.kill()
        assert proc.stderr is not None
        await trio.aclose_forcefully(proc.stderr)


async def receive_all(stream: trio.abc.ReceiveStream, timeout: float = 15) -> bytes:
    """Everything until the peer closes."""
    data = b""
    with trio.fail_after(timeout):
        while chunk := await stream.receive_some(65536):
            data += chunk
    return data


async def receive_line(stream: trio.abc.ReceiveStream, buf: bytearray, timeout: float = 15) -> bytes:
    with trio.fail_after(timeout):
        while b"\r\n" not in buf:
            chunk = await stream.receive_some(65536)
            if not chunk:
                raise EOFError(f"closed; got {bytes(buf)!r}")
            buf += chunk
    i = buf.index(b"\r\n") + 2
    line = bytes(buf[:i])
    del buf[:i]
    return line


async def smtp_reply(stream: trio.abc.ReceiveStream, buf: bytearray) -> bytes:
    out = b""
    while True:
        line = await receive_line(stream, buf)
        out += line
        if line[3:4] != b"-":
            return out


async def test_run_serves_421_when_the_backend_refuses_then_stops_on_sigterm(confdir: Path) -> None:
    starttls, implicit, dead = free_port(), free_port(), free_port()
    config = write_config(
        confdir,
        [
            smtp("submission", f"127.0.0.1:{starttls}", f"127.0.0.1:{dead}", require_tls=True),
            smtp("submissions", f"127.0.0.1:{implicit}", f"127.0.0.1:{dead}", mode="implicit"),
        ],
        server={"shutdown_grace": 30},
    )
    async with running(config) as proxy:
        client = await proxy.connect(starttls)
        reply = await receive_all(client)
        await client.aclose()
        assert reply.startswith(b"421 "), reply
        assert reply.endswith(b"\r\n") and reply.count(b"\r\n") == 1
        await proxy.wait_for_log("outcome=backend_unavailable")

        # Both listeners are up.
        (await proxy.connect(implicit, attempts=1)).socket.close()
        assert f"listener submission: smtp starttls on 127.0.0.1:{starttls}" in proxy.log
        assert f"listener submissions: smtp implicit on 127.0.0.1:{implicit}" in proxy.log

        proxy.terminate()
        # No session is open: exit well within the 30 s grace.
        assert await proxy.exit_code(timeout=20) == 0
        await proxy.wait_for_log("stopped")
    assert "Traceback" not in proxy.log


GRACE = 1.5


async def test_sigterm_mid_session_refuses_new_clients_waits_for_grace_then_exits(
    confdir: Path, nursery: trio.Nursery
) -> None:
    backend = LegacySmtpServer()
    await nursery.start(backend.serve)
    port = free_port()
    config = write_config(
        confdir,
        [smtp("submission", f"127.0.0.1:{port}", f"127.0.0.1:{backend.port}")],
        server={"shutdown_grace": GRACE},
    )
    async with running(config) as proxy:
        client = await proxy.connect(port)
        buf = bytearray()
        assert (await smtp_reply(client, buf)).startswith(b"220 ")
        await client.send_all(b"EHLO client.example\r\n")
        ehlo = await smtp_reply(client, buf)
        assert ehlo.startswith(b"250-") and b"STARTTLS" in ehlo

        proxy.terminate()
        signalled = trio.current_time()
        # Logged once the listening sockets are closed.
        await proxy.wait_for_log("stopping: 1 open sessions")

        with pytest.raises(OSError):
            await trio.open_tcp_stream("127.0.0.1", port)
        # The open session still works during the grace period.
        await client.send_all(b"NOOP\r\n")
        assert (await smtp_reply(client, buf)).startswith(b"250")
        assert proxy.proc.returncode is None

        # At the end of the grace period: the protocol's goodbye, then close.
        rest = bytes(buf) + await receive_all(client, timeout=GRACE + 15)
        assert rest.startswith(b"421 "), rest
        assert b"shutting down" in rest
        assert await proxy.exit_code(timeout=15) == 0
        elapsed = trio.current_time() - signalled
        assert GRACE <= elapsed < GRACE + 15
        await client.aclose()
    assert "outcome=shutdown" in proxy.log
    assert b"NOOP" in backend.commands


async def test_sigterm_exits_as_soon_as_the_last_session_ends(confdir: Path, nursery: trio.Nursery) -> None:
    backend = LegacySmtpServer()
    await nursery.start(backend.serve)
    port = free_port()
    config = write_config(
        confdir,
        [smtp("submission", f"127.0.0.1:{port}", f"127.0.0.1:{backend.port}")],
        server={"shutdown_grace": 300},
    )
    async with running(config) as proxy:
        client = await proxy.connect(port)
        buf = bytearray()
        assert (await smtp_reply(client, buf)).startswith(b"220 ")

        proxy.terminate()
        await proxy.wait_for_log("stopping: 1 open sessions get 300s")
        await client.send_all(b"QUIT\r\n")
        assert (await smtp_reply(client, buf)).startswith(b"221")
        assert await receive_all(client) == b""

        # Far sooner than the 300 s grace.
        assert await proxy.exit_code(timeout=20) == 0
        await client.aclose()


async def test_second_sigterm_exits_at_once(confdir: Path, nursery: trio.Nursery) -> None:
    backend = LegacySmtpServer()
    await nursery.start(backend.serve)
    port = free_port()
    config = write_config(
        confdir,
        [smtp("submission", f"127.0.0.1:{port}", f"127.0.0.1:{backend.port}")],
        server={"shutdown_grace": 300},
    )
    async with running(config) as proxy:
        client = await proxy.connect(port)
        buf = bytearray()
        assert (await smtp_reply(client, buf)).startswith(b"220 ")

        proxy.terminate()
        await proxy.wait_for_log("stopping: 1 open sessions get 300s")
        proxy.terminate()
        await proxy.wait_for_log("exiting now")

        # Far sooner than the 300 s grace, and the client still hears why.
        assert await proxy.exit_code(timeout=20) == 0
        rest = await receive_all(client)
        assert rest.startswith(b"421 ") and b"shutting down" in rest, rest
        await client.aclose()


async def test_metrics_endpoint_is_served(confdir: Path) -> None:
    port, metrics_port, dead = free_port(), free_port(), free_port()
    config = write_config(
        confdir,
        [smtp("submission", f"127.0.0.1:{port}", f"127.0.0.1:{dead}")],
        metrics={"listen": f"127.0.0.1:{metrics_port}"},
    )
    async with running(config) as proxy:
        client = await proxy.connect(port)
        assert (await receive_all(client)).startswith(b"421 ")
        await client.aclose()
        await proxy.wait_for_log("outcome=backend_unavailable")

        def scrape() -> str:
            url = f"http://127.0.0.1:{metrics_port}/metrics"
            with urllib.request.urlopen(url, timeout=15) as response:
                return response.read().decode()

        body = await trio.to_thread.run_sync(scrape)
        assert 'tlsproxy_connections_total{listener="submission"} 1.0' in body
        assert 'tlsproxy_backend_connect_failures_total{listener="submission"} 1.0' in body

        proxy.terminate()
        assert await proxy.exit_code(timeout=20) == 0


def test_run_with_the_port_already_in_use(confdir: Path) -> None:
    free = free_port()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        config = write_config(
            confdir,
            [
                smtp("submission", f"127.0.0.1:{free}", "127.0.0.1:1587"),
                smtp("mx", f"127.0.0.1:{taken}", "127.0.0.1:1525"),
            ],
        )
        out = cli("run", "--config", str(config))

    assert out.returncode not in (0, None)
    assert f'tlsproxy: cannot listen on 127.0.0.1:{taken} (listener "mx"): ' in out.stderr
    assert "Address already in use" in out.stderr
    assert "Traceback" not in out.stderr
