"""IMAP interop: imaplib, curl and openssl s_client through the proxy
(STARTTLS and implicit TLS) to a real Dovecot with TLS off. Messages go in
with APPEND and come back with FETCH byte for byte; capability lists are
checked on both sides of the handshake.
"""

from __future__ import annotations

import imaplib
import re
import ssl

import trio

from tests.helpers import mail_message

from .clients import assert_same, curl_base, describe, run, s_client

BIG = mail_message()
SMALL = mail_message(64 * 1024)


def _imaplib_roundtrip(port: int, ctx: ssl.SSLContext, implicit: bool, user, message: bytes) -> dict:
    """Blocking imaplib session (worker thread): log in, APPEND, FETCH the
    message back by the UID Dovecot assigned (UIDPLUS)."""
    seen = {}
    if implicit:
        client = imaplib.IMAP4_SSL("127.0.0.1", port, ssl_context=ctx, timeout=60)
    else:
        client = imaplib.IMAP4("127.0.0.1", port, timeout=60)
        seen["before_tls"] = set(client.capabilities)
        client.starttls(ssl_context=ctx)
    try:
        seen["after_tls"] = set(client.capabilities)
        client.login(user.name, user.password)
        typ, data = client.append("INBOX", None, None, message)
        assert typ == "OK", data
        uid = re.search(rb"\[APPENDUID \d+ (\d+)\]", data[0]).group(1).decode()
        client.select("INBOX", readonly=True)
        typ, data = client.uid("FETCH", uid, "(BODY.PEEK[])")
        assert typ == "OK", data
        seen["fetched"] = data[0][1]
        client.close()
    finally:
        client.logout()
    return seen


async def test_imaplib_starttls_append_fetch_5mb_byte_exact(interop_proxy, client_ctx, mail_user):
    seen = await trio.to_thread.run_sync(
        _imaplib_roundtrip, interop_proxy.port("imap-starttls"), client_ctx, False, mail_user, BIG
    )
    assert_same(seen["fetched"], BIG, "message FETCHed from Dovecot")
    assert "STARTTLS" in seen["before_tls"] and "AUTH=PLAIN" in seen["before_tls"]
    assert "STARTTLS" not in seen["after_tls"] and "IMAP4REV1" in seen["after_tls"]


async def test_imaplib_implicit_append_fetch_5mb_byte_exact(interop_proxy, client_ctx, mail_user):
    seen = await trio.to_thread.run_sync(
        _imaplib_roundtrip, interop_proxy.port("imap-implicit"), client_ctx, True, mail_user, BIG
    )
    assert_same(seen["fetched"], BIG, "message FETCHed from Dovecot")
    assert "STARTTLS" not in seen["after_tls"] and "LITERAL+" in seen["after_tls"]


async def test_curl_imap_ssl_reqd_append_then_imaps_fetch(interop_proxy, certs, mail_user, tmp_path):
    user = ["--user", f"{mail_user.name}:{mail_user.password}"]
    message = tmp_path / "message.eml"
    message.write_bytes(BIG)  # curl's APPEND needs the size up front: a file, not stdin
    upload = await run(
        curl_base(certs.ca_cert)
        + user
        + [
            f"imap://127.0.0.1:{interop_proxy.port('imap-starttls')}/INBOX",
            "--ssl-reqd",
            "--upload-file",
            str(message),
        ],
    )
    assert upload.returncode == 0, describe(upload)
    fetch = await run(
        curl_base(certs.ca_cert)
        + user
        + [f"imaps://127.0.0.1:{interop_proxy.port('imap-implicit')}/INBOX/;UID=1"]
    )
    assert fetch.returncode == 0, describe(fetch)
    assert_same(fetch.stdout, BIG, "message fetched by curl")
    listing = await run(
        curl_base(certs.ca_cert)
        + user
        + [
            f"imap://127.0.0.1:{interop_proxy.port('imap-starttls')}/INBOX",
            "--ssl-reqd",
            "--request",
            "STATUS INBOX (MESSAGES)",
        ]
    )
    assert listing.returncode == 0, describe(listing)
    assert b"* STATUS INBOX (MESSAGES 1)" in listing.stdout, listing.stdout


async def test_curl_imap_ssl_reqd_fails_without_trusting_the_ca(interop_proxy, dovecot, mail_user):
    mark = dovecot.log.mark()
    result = await run(
        [
            "curl",
            "--silent",
            "--show-error",
            "--max-time",
            "60",
            "--ssl-reqd",
            "--user",
            f"{mail_user.name}:{mail_user.password}",
            f"imap://127.0.0.1:{interop_proxy.port('imap-starttls')}/INBOX",
        ]
    )
    assert result.returncode == 60, describe(result)  # CURLE_PEER_FAILED_VERIFICATION
    assert mail_user.name not in dovecot.log.since(mark)  # the credentials went nowhere


def _s_client_imap_script(user) -> bytes:
    # -crlf makes each LF a CRLF: the LITERAL+ literal is "Subject: hi\r\n\r\nbody".
    return (
        f"a CAPABILITY\nb LOGIN {user.name} {user.password}\n"
        "c APPEND INBOX {19+}\nSubject: hi\n\nbody\nd SELECT INBOX\ne FETCH 1 BODY[TEXT]\nf LOGOUT\n"
    ).encode()


async def test_openssl_s_client_starttls_imap(interop_proxy, certs, mail_user):
    result = await run(
        s_client(interop_proxy.port("imap-starttls"), certs.ca_cert, "imap"),
        stdin=_s_client_imap_script(mail_user),
    )
    out = result.stdout  # not the exit code: see test_tls_close.py
    assert b"verify return:1" in result.stderr, describe(result)
    caps = re.search(rb"^\* CAPABILITY .*$", out, re.M)
    assert caps and b"STARTTLS" not in caps.group(0) and b"IMAP4rev1" in caps.group(0), out
    assert b"b OK" in out and b"c OK [APPENDUID" in out, out
    assert b"BODY[TEXT] {4}\r\nbody)" in out, out
    assert b"* BYE" in out and b"f OK" in out, out


async def test_openssl_s_client_implicit_imap(interop_proxy, certs, mail_user):
    result = await run(
        s_client(interop_proxy.port("imap-implicit"), certs.ca_cert, None),
        stdin=_s_client_imap_script(mail_user),
    )
    out = result.stdout
    assert b"verify return:1" in result.stderr, describe(result)
    assert out.startswith(b"* OK [CAPABILITY IMAP4rev1 ") and b"STARTTLS" not in out, out
    assert b"BODY[TEXT] {4}\r\nbody)" in out and b"f OK" in out, out
