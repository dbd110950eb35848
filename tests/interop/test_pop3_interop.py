"""POP3 interop: poplib, curl and openssl s_client through the proxy (STLS
and implicit TLS) to a real Dovecot with TLS off. The message is put in the
mailbox directly (IMAP APPEND to Dovecot, no proxy) and RETR through the
proxy must return it byte for byte.
"""

from __future__ import annotations

import imaplib
import poplib
import ssl

import trio

from tests.helpers import mail_message

from .clients import assert_same, curl_base, describe, run, s_client

BIG = mail_message()


def seed_mailbox(imap_port: int, user, *messages: bytes) -> None:
    """Blocking: APPEND straight to Dovecot (no proxy involved)."""
    client = imaplib.IMAP4("127.0.0.1", imap_port, timeout=60)
    try:
        client.login(user.name, user.password)
        for message in messages:
            typ, data = client.append("INBOX", None, None, message)
            assert typ == "OK", data
    finally:
        client.logout()


def _poplib_retr(port: int, ctx: ssl.SSLContext, implicit: bool, user) -> dict:
    seen = {}
    if implicit:
        client = poplib.POP3_SSL("127.0.0.1", port, context=ctx, timeout=60)
    else:
        client = poplib.POP3("127.0.0.1", port, timeout=60)
        seen["before_tls"] = client.capa()
        client.stls(context=ctx)
    try:
        seen["after_tls"] = client.capa()
        client.user(user.name)
        client.pass_(user.password)
        seen["stat"] = client.stat()
        _, lines, _ = client.retr(1)  # poplib removes the dot-stuffing
        seen["retr"] = b"".join(line + b"\r\n" for line in lines)
    finally:
        client.quit()
    return seen


async def test_poplib_stls_retr_5mb_byte_exact(interop_proxy, dovecot, client_ctx, mail_user):
    await trio.to_thread.run_sync(seed_mailbox, dovecot.imap_port, mail_user, BIG)
    seen = await trio.to_thread.run_sync(
        _poplib_retr, interop_proxy.port("pop3-starttls"), client_ctx, False, mail_user
    )
    assert_same(seen["retr"], BIG, "message RETRieved from Dovecot")
    assert seen["stat"] == (1, len(BIG))
    assert "STLS" in seen["before_tls"] and "USER" in seen["before_tls"]
    assert "STLS" not in seen["after_tls"] and "SASL" in seen["after_tls"]


async def test_poplib_implicit_retr_5mb_byte_exact(interop_proxy, dovecot, client_ctx, mail_user):
    await trio.to_thread.run_sync(seed_mailbox, dovecot.imap_port, mail_user, BIG)
    seen = await trio.to_thread.run_sync(
        _poplib_retr, interop_proxy.port("pop3-implicit"), client_ctx, True, mail_user
    )
    assert_same(seen["retr"], BIG, "message RETRieved from Dovecot")
    assert "STLS" not in seen["after_tls"]


async def test_curl_pop3_ssl_reqd_retr_and_pop3s_list(interop_proxy, dovecot, certs, mail_user):
    small = mail_message(64 * 1024)
    await trio.to_thread.run_sync(seed_mailbox, dovecot.imap_port, mail_user, BIG, small)
    user = ["--user", f"{mail_user.name}:{mail_user.password}"]
    retr = await run(
        curl_base(certs.ca_cert)
        + user
        + [f"pop3://127.0.0.1:{interop_proxy.port('pop3-starttls')}/1", "--ssl-reqd"]
    )
    assert retr.returncode == 0, describe(retr)
    assert_same(retr.stdout, BIG, "message RETRieved by curl")
    listing = await run(
        curl_base(certs.ca_cert) + user + [f"pop3s://127.0.0.1:{interop_proxy.port('pop3-implicit')}/"]
    )
    assert listing.returncode == 0, describe(listing)
    assert listing.stdout == f"1 {len(BIG)}\r\n2 {len(small)}\r\n".encode(), listing.stdout
    retr2 = await run(
        curl_base(certs.ca_cert) + user + [f"pop3s://127.0.0.1:{interop_proxy.port('pop3-implicit')}/2"]
    )
    assert retr2.returncode == 0, describe(retr2)
    assert_same(retr2.stdout, small, "message RETRieved by curl")


async def test_curl_pop3_ssl_reqd_fails_without_trusting_the_ca(interop_proxy, dovecot, mail_user):
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
            f"pop3://127.0.0.1:{interop_proxy.port('pop3-starttls')}/",
        ]
    )
    assert result.returncode == 60, describe(result)  # CURLE_PEER_FAILED_VERIFICATION
    assert mail_user.name not in dovecot.log.since(mark)


def _s_client_pop3_script(user) -> bytes:
    return f"CAPA\nUSER {user.name}\nPASS {user.password}\nSTAT\nTOP 1 0\nQUIT\n".encode()


async def test_openssl_s_client_starttls_pop3(interop_proxy, dovecot, certs, mail_user):
    await trio.to_thread.run_sync(seed_mailbox, dovecot.imap_port, mail_user, b"Subject: one\r\n\r\nbody\r\n")
    result = await run(
        s_client(interop_proxy.port("pop3-starttls"), certs.ca_cert, "pop3"),
        stdin=_s_client_pop3_script(mail_user),
    )
    out = result.stdout  # not the exit code: see test_tls_close.py
    assert b"verify return:1" in result.stderr, describe(result)
    capa = out.split(b"\r\n.\r\n", 1)[0]
    assert b"\r\nUSER\r\n" in capa and b"STLS" not in capa, out
    assert b"+OK 1 22\r\n" in out and b"Subject: one\r\n\r\n.\r\n" in out and b"+OK Logging out" in out, out


async def test_openssl_s_client_implicit_pop3(interop_proxy, dovecot, certs, mail_user):
    await trio.to_thread.run_sync(seed_mailbox, dovecot.imap_port, mail_user, b"Subject: one\r\n\r\nbody\r\n")
    result = await run(
        s_client(interop_proxy.port("pop3-implicit"), certs.ca_cert, None),
        stdin=_s_client_pop3_script(mail_user),
    )
    out = result.stdout
    assert b"verify return:1" in result.stderr, describe(result)
    assert out.startswith(b"+OK Dovecot") and b"STLS" not in out, out
    assert b"+OK 1 22\r\n" in out and b"+OK Logging out" in out, out
