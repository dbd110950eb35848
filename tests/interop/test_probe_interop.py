"""``tlsproxy probe`` against the real legacy servers, then against tlsproxy in
front of them: the operator's before/after picture.

The plaintext-only Postfix and Dovecot must be reported as offering no
STARTTLS and taking credentials in the clear (exit 1); the Postfix service with
its own STARTTLS as offering it, with a chain the probe cannot verify (its CA
is not given); tlsproxy with require_tls as all well (exit 0)."""

from __future__ import annotations

import json
import sys

import pytest
import trio


async def probe_json(*args: str) -> tuple[int, dict]:
    result = await trio.run_process(
        [sys.executable, "-m", "tlsproxy", "probe", *args, "--json"],
        capture_stdout=True, capture_stderr=True, check=False,
    )
    assert result.returncode in (0, 1), result.stderr.decode()
    return result.returncode, json.loads(result.stdout)


@pytest.mark.parametrize("proto", ["smtp", "imap", "pop3"])
async def test_plaintext_legacy_servers_are_reported_naked(postfix, dovecot, proto):
    port = {"smtp": postfix.port, "imap": dovecot.imap_port, "pop3": dovecot.pop3_port}[proto]
    rc, facts = await probe_json(f"127.0.0.1:{port}", "--starttls", proto)
    assert rc == 1 and facts["ok"] is False
    assert facts["protocol"] == proto
    assert facts["starttls_offered"] is False and facts["starttls_accepted"] is False
    assert facts["tls"] is None and facts["certificate"] is None
    # Both servers advertise a login mechanism in the clear (that is why they
    # need the proxy), and the probe says so.
    assert facts["credentials_before_tls"]["advertised"] is True
    assert any("STARTTLS" in p or "STLS" in p for p in facts["problems"]), facts["problems"]
    assert any("advertised before TLS" in p for p in facts["problems"]), facts["problems"]


async def test_postfix_own_starttls_is_seen_but_its_chain_is_not_trusted(postfix):
    rc, facts = await probe_json(f"127.0.0.1:{postfix.tls_port}", "--starttls", "smtp")
    assert rc == 1
    assert facts["starttls_offered"] is True and facts["starttls_accepted"] is True
    assert facts["tls"]["version"] in ("TLSv1.2", "TLSv1.3")
    assert facts["chain"]["valid"] is False and facts["chain"]["error"]


@pytest.mark.parametrize(
    "name, how",
    [
        ("smtp-require", ["--starttls", "smtp"]),
        ("imap-require", ["--starttls", "imap"]),
        ("pop3-require", ["--starttls", "pop3"]),
        ("smtp-implicit", ["--tls"]),
        ("imap-implicit", ["--tls"]),
        ("pop3-implicit", ["--tls"]),
    ],
)
async def test_tlsproxy_in_front_of_the_real_servers_is_all_well(interop_proxy, certs, name, how):
    rc, facts = await probe_json(
        f"127.0.0.1:{interop_proxy.port(name)}", *how, "--cafile", str(certs.ca_cert), "--servername", "localhost"
    )
    assert facts["problems"] == [] and rc == 0 and facts["ok"] is True
    assert facts["protocol"] == name.split("-")[0]
    assert facts["chain"]["valid"] is True
    assert facts["certificate"]["subject"] == "CN=localhost"
    assert facts["starttls_after_tls"] is False
    if how[0] == "--starttls":
        assert facts["starttls_offered"] is True
        creds = facts["credentials_before_tls"]
        assert creds["advertised"] is False and creds["accepted"] is False


async def test_without_require_tls_dovecot_login_in_clear_is_flagged(interop_proxy, certs):
    """A STARTTLS listener without require_tls passes Dovecot's LOGIN through
    in the clear: the probe must not call that well."""
    rc, facts = await probe_json(
        f"127.0.0.1:{interop_proxy.port('imap-starttls')}", "--starttls", "imap", "--cafile", str(certs.ca_cert)
    )
    assert rc == 1 and facts["starttls_offered"] is True and facts["chain"]["valid"] is True
    assert facts["credentials_before_tls"]["advertised"] is True
    assert any("before TLS" in p for p in facts["problems"])
