"""``tlsproxy probe`` end to end: the probe against tlsproxy (in-process, in
front of the legacy SMTP server and the fake IMAP/POP3 servers), against the
plaintext-only backends directly, and against a deliberately sloppy implicit
TLS server (old versions, expiring certificate, STARTTLS after TLS).

Some cases run the CLI as a subprocess (``python -m tlsproxy probe``) for the
real exit codes and output; the others call ``probe()`` in-process."""

from __future__ import annotations

import argparse
import functools
import json
import ssl
import sys

import pytest
import trio

from tests.conftest import closed_port, listener, port_of, start_proxy
from tests.fakes.legacy_imap import LegacyImapServer
from tests.fakes.legacy_pop3 import LegacyPop3Server
from tlsproxy.certs import generate
from tlsproxy.cli import main
from tlsproxy.probe import OLD_VERSIONS, ProbeError, _old_context, add_arguments, probe
from tlsproxy.tls import TLS12_CIPHERS

TLS13_CIPHERS = {"TLS_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256", "TLS_CHACHA20_POLY1305_SHA256"}
# What a server that refuses TLS 1.0/1.1 must get from the probe here: the local
# OpenSSL either can offer these versions (then they must be refused) or not.
OLD_EXPECTED = {
    name: "not testable" if isinstance(_old_context(version), str) else "refused"
    for name, version in OLD_VERSIONS.items()
}


async def probe_cli(*args: str) -> tuple[int, str, str]:
    result = await trio.run_process(
        [sys.executable, "-m", "tlsproxy", "probe", *args],
        capture_stdout=True, capture_stderr=True, check=False,
    )
    return result.returncode, result.stdout.decode(), result.stderr.decode()


async def probe_here(*args: str) -> dict:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return await probe(parser.parse_args(list(args)))


async def _backends(nursery, smtp_backend):
    imap, pop3 = LegacyImapServer(), LegacyPop3Server()
    await nursery.start(imap.serve)
    await nursery.start(pop3.serve)
    return {"smtp": smtp_backend, "imap": imap, "pop3": pop3}


async def _proxy(nursery, backends, certs, require_tls=True):
    """Per protocol: a STARTTLS listener named after it and an implicit one ("…s")."""
    lst = []
    for proto, server in backends.items():
        lst.append(listener(proto, proto, "starttls", server.port, certs, require_tls=require_tls))
        lst.append(listener(proto + "s", proto, "implicit", server.port, certs))
    return await start_proxy(nursery, *lst)


def assert_good_tls(facts: dict, ca: str) -> None:
    assert facts["tls"]["version"] in ("TLSv1.2", "TLSv1.3")
    assert facts["tls"]["cipher"] in TLS13_CIPHERS | set(TLS12_CIPHERS.split(":"))
    cert = facts["certificate"]
    assert cert["subject"] == "CN=localhost"
    assert cert["issuer"] == "CN=tlsproxy private CA for localhost"
    assert "localhost" in cert["san"] and "127.0.0.1" in cert["san"]
    assert 360 <= cert["days_left"] <= 366
    assert facts["chain"] == {"valid": True, "error": None, "trust": ca}
    assert {name: r["result"] for name, r in facts["old_versions"].items()} == OLD_EXPECTED
    assert facts["starttls_after_tls"] is False
    assert facts["problems"] == [] and facts["ok"] is True


async def test_smtp_starttls_cli_json_all_well(nursery, smtp_backend, certs):
    backends = await _backends(nursery, smtp_backend)
    proxy = await _proxy(nursery, backends, certs)
    rc, out, err = await probe_cli(
        f"127.0.0.1:{port_of(proxy, 'smtp')}", "--starttls", "smtp", "--cafile", str(certs.ca_cert), "--json"
    )
    assert rc == 0, (out, err)
    facts = json.loads(out)
    assert facts["mode"] == "starttls" and facts["protocol"] == "smtp"
    assert facts["starttls_offered"] is True and facts["starttls_accepted"] is True
    creds = facts["credentials_before_tls"]
    assert creds["advertised"] is False and creds["accepted"] is False and creds["mail_accepted"] is False
    assert creds["tried"] == [
        "MAIL FROM:<> -> 530 5.7.0 Must issue a STARTTLS command first",
        "AUTH PLAIN -> 530 5.7.0 Must issue a STARTTLS command first",
    ]
    assert_good_tls(facts, str(certs.ca_cert))
    # Refused by the proxy: neither probe reached the legacy server.
    assert not [c for c in smtp_backend.commands if c.upper().startswith((b"MAIL", b"AUTH"))]


@pytest.mark.parametrize("proto", ["imap", "pop3"])
async def test_imap_pop3_starttls_all_well(nursery, smtp_backend, certs, proto):
    backends = await _backends(nursery, smtp_backend)
    proxy = await _proxy(nursery, backends, certs)
    facts = await probe_here(
        f"127.0.0.1:{port_of(proxy, proto)}", "--starttls", proto, "--cafile", str(certs.ca_cert)
    )
    assert facts["protocol"] == proto and facts["starttls_offered"] is True
    creds = facts["credentials_before_tls"]
    assert creds["advertised"] is False and creds["accepted"] is False and creds["mail_accepted"] is None
    expected = {
        "imap": "LOGIN probe probe -> p2 NO [PRIVACYREQUIRED] TLS is required before authentication",
        "pop3": "USER probe -> -ERR Plaintext login disallowed, use STLS first",
    }
    assert creds["tried"] == [expected[proto]]
    assert_good_tls(facts, str(certs.ca_cert))
    assert not {b"LOGIN", b"USER"} & set(backends[proto].verbs())


@pytest.mark.parametrize("proto", ["smtp", "imap", "pop3"])
async def test_implicit_tls_all_well(nursery, smtp_backend, certs, proto):
    backends = await _backends(nursery, smtp_backend)
    proxy = await _proxy(nursery, backends, certs)
    port = port_of(proxy, proto + "s")
    facts = await probe_here(f"127.0.0.1:{port}", "--tls", "--cafile", str(certs.ca_cert))
    assert facts["mode"] == "implicit" and facts["protocol"] == proto  # read from the greeting
    assert facts["starttls_offered"] is None and facts["credentials_before_tls"] is None
    assert_good_tls(facts, str(certs.ca_cert))


@pytest.mark.parametrize(
    "proto, evidence",
    [
        ("smtp", "AUTH PLAIN -> 334 ; * -> 501 5.5.2 Cannot decode response"),
        ("imap", "LOGIN probe probe -> p2 NO [AUTHENTICATIONFAILED] Invalid credentials"),
        ("pop3", "USER probe -> +OK send PASS"),
    ],
)
async def test_without_require_tls_plaintext_login_is_a_problem(
    nursery, smtp_backend, certs, proto, evidence
):
    backends = await _backends(nursery, smtp_backend)
    proxy = await _proxy(nursery, backends, certs, require_tls=False)
    facts = await probe_here(
        f"127.0.0.1:{port_of(proxy, proto)}", "--starttls", proto, "--cafile", str(certs.ca_cert)
    )
    creds = facts["credentials_before_tls"]
    assert creds["advertised"] is True and creds["accepted"] is True
    assert facts["problems"] == [
        "login is advertised before TLS (credentials could be sent in plaintext)",
        f"login is accepted before TLS: {evidence}",
    ]
    assert facts["ok"] is False and facts["starttls_offered"] is True and facts["chain"]["valid"] is True
    if proto == "pop3":
        assert b"PASS" not in backends[proto].verbs()  # no password, not even a fake one


async def test_plaintext_only_smtp_backend_cli_exit_1(smtp_backend):
    rc, out, err = await probe_cli(f"127.0.0.1:{smtp_backend.port}", "--starttls", "smtp")
    assert rc == 1, (out, err)
    lines = out.splitlines()
    assert "starttls offered: false" in lines and "starttls accepted: false" in lines
    assert "  - STARTTLS refused: 502 5.5.2 Error: command not recognized" in lines
    assert "  - STARTTLS is not offered before TLS" in lines
    assert "result: PROBLEMS" in lines and not [ln for ln in lines if ln.startswith("tls:")]


@pytest.mark.parametrize("proto", ["imap", "pop3"])
async def test_plaintext_only_imap_pop3_backends(nursery, smtp_backend, proto):
    backends = await _backends(nursery, smtp_backend)
    facts = await probe_here(f"127.0.0.1:{backends[proto].port}", "--starttls", proto)
    assert facts["starttls_offered"] is False and facts["starttls_accepted"] is False
    assert facts["tls"] is None and facts["chain"] is None
    assert facts["old_versions"]["TLSv1"]["result"] == "not tested"
    word = "STARTTLS" if proto == "imap" else "STLS"
    assert f"{word} is not offered before TLS" in facts["problems"] and facts["ok"] is False


async def test_invalid_chain_without_cafile_cli_exit_1(nursery, smtp_backend, certs):
    backends = await _backends(nursery, smtp_backend)
    proxy = await _proxy(nursery, backends, certs)
    rc, out, err = await probe_cli(f"127.0.0.1:{port_of(proxy, 'imaps')}", "--tls")
    assert rc == 1, (out, err)
    reason = "self-signed certificate in certificate chain"  # our private CA is in no system store
    assert f"chain for 127.0.0.1: INVALID: {reason} (trust: system store)" in out.splitlines()
    assert f"  - certificate chain is not valid for 127.0.0.1: {reason}" in out.splitlines()


async def test_hostname_mismatch_is_reported(nursery, smtp_backend, certs):
    backends = await _backends(nursery, smtp_backend)
    proxy = await _proxy(nursery, backends, certs)
    facts = await probe_here(
        f"127.0.0.1:{port_of(proxy, 'smtps')}", "--tls", "--cafile", str(certs.ca_cert),
        "--servername", "mail.example.org",
    )
    assert facts["chain"]["valid"] is False
    assert "Hostname mismatch" in facts["chain"]["error"] and "mail.example.org" in facts["chain"]["error"]
    error = facts["chain"]["error"]
    assert facts["problems"] == [f"certificate chain is not valid for mail.example.org: {error}"]


async def test_connect_refused_cli_exit_2():
    port = closed_port()
    rc, out, err = await probe_cli(f"127.0.0.1:{port}", "--starttls", "smtp", "--json")
    assert rc == 2
    assert f"cannot connect to 127.0.0.1:{port}" in err
    assert json.loads(out) == {"target": f"127.0.0.1:{port}", "error": json.loads(out)["error"], "ok": False}
    assert "cannot connect" in json.loads(out)["error"]


async def test_wrong_protocol_cannot_be_probed(smtp_backend):
    with pytest.raises(ProbeError, match="imap greeting expected, got '220 legacy.example ESMTP"):
        await probe_here(f"127.0.0.1:{smtp_backend.port}", "--starttls", "imap", "--timeout", "5")


@pytest.mark.parametrize(
    "argv",
    [
        ["probe", "localhost", "--tls"],  # no port
        ["probe", "127.0.0.1:25"],  # neither --tls nor --starttls
        ["probe", "127.0.0.1:25", "--tls", "--starttls", "smtp"],
        ["probe", "127.0.0.1:25", "--starttls", "ftp"],
    ],
)
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "usage: tlsproxy probe" in capsys.readouterr().err


@pytest.mark.parametrize(
    "option, message",
    [(["--cafile", "/nonexistent/ca.pem"], "/nonexistent/ca.pem: no such file"),
     (["--timeout", "0"], "invalid seconds value: '0'")],
)
def test_bad_option_values_exit_2(option, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["probe", "127.0.0.1:25", "--tls", *option])
    assert exc.value.code == 2 and message in capsys.readouterr().err


async def _sloppy_imaps(stream: trio.SSLStream) -> None:
    """Implicit IMAP that still offers STARTTLS once TLS is up."""
    try:
        await stream.send_all(b"* OK sloppy IMAP ready\r\n")
        line = b""
        while not line.endswith(b"\r\n"):
            data = await stream.receive_some(4096)
            if not data:
                return
            line += data
        tag = line.split(b" ")[0]
        await stream.send_all(b"* CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN\r\n" + tag + b" OK done\r\n")
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def test_sloppy_server_old_versions_expiry_starttls_after_tls(nursery, tmp_path):
    files = generate(tmp_path, ["localhost", "127.0.0.1"], days=5)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with pytest.warns(DeprecationWarning):
        ctx.minimum_version = ssl.TLSVersion.TLSv1
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    ctx.load_cert_chain(files.cert, files.key)
    serve = functools.partial(trio.serve_ssl_over_tcp, host="127.0.0.1")
    listeners = await nursery.start(serve, _sloppy_imaps, 0, ctx)
    port = listeners[0].transport_listener.socket.getsockname()[1]
    facts = await probe_here(f"127.0.0.1:{port}", "--tls", "--cafile", str(files.ca_cert))
    assert facts["protocol"] == "imap" and facts["chain"]["valid"] is True
    assert facts["certificate"]["days_left"] == 4
    expected = [f"certificate expires in 4 days ({facts['certificate']['not_after']})"]
    for name, result in OLD_EXPECTED.items():
        if result == "refused":  # testable here: this server must be caught accepting it
            assert facts["old_versions"][name] == {"result": "accepted", "detail": f"negotiated {name}"}
            expected.append(f"{name} is accepted")
        else:  # the local OpenSSL cannot offer it: said so, not claimed refused
            assert facts["old_versions"][name]["result"] == "not testable"
    expected.append("STARTTLS is still offered after TLS")
    assert facts["starttls_after_tls"] is True
    assert facts["problems"] == expected and facts["ok"] is False

