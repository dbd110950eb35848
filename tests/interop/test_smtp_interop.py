"""SMTP interop: swaks, curl, openssl s_client and smtplib through the proxy
(STARTTLS and implicit TLS) into a real Postfix that has no TLS, with SMTP
AUTH checked by Dovecot. Every message is looked up in Postfix's Maildir
and compared byte for byte; Postfix's own log says which commands reached it
(its "disconnect from" line counts them per session).
"""

from __future__ import annotations

import base64
import smtplib
import ssl

import trio

from tests.helpers import WireClient, mail_message

from .clients import assert_stored_by_postfix, curl_base, describe, run, s_client
from .servers import MAIL_DOMAIN, MAILBOX

BIG = mail_message()  # 5 MB attachment: dots, STARTTLS look-alikes, 8-bit bytes
SMALL = mail_message(64 * 1024)  # the same tricks, for the cells that only need to deliver


def rcpt(tag: str) -> str:
    return f"{MAILBOX}+{tag}@{MAIL_DOMAIN}"


def dot_stuffed_for_swaks(message: bytes) -> bytes:
    """DATA exactly as it goes on the wire, less the final CRLF that swaks
    adds itself: with --no-data-fixup swaks sends the bytes as given (its
    default fixup would add an empty line to a message ending in CRLF)."""
    assert message.endswith(b"\r\n")
    stuffed = (b"." if message.startswith(b".") else b"") + message.replace(b"\r\n.", b"\r\n..")
    return stuffed + b"."


# ---------------------------------------------------------------- swaks


async def test_swaks_starttls_auth_plain_delivers_5mb_byte_exact(
    interop_proxy, postfix, certs, mail_user, rcpt_tag, tmp_path
):
    data = tmp_path / "data.eml"
    data.write_bytes(dot_stuffed_for_swaks(BIG))
    mark = await postfix.mark()
    result = await run(
        [
            "swaks",
            "--server",
            "127.0.0.1",
            "--port",
            str(interop_proxy.port("smtp-starttls")),
            "--helo",
            "swaks.interop.test",
            "--from",
            "sender@example.com",
            "--to",
            rcpt(rcpt_tag),
            "--tls",
            "--tls-verify",
            "--tls-ca-path",
            str(certs.ca_cert),
            "--auth",
            "PLAIN",
            "--auth-user",
            mail_user.name,
            "--auth-password",
            mail_user.password,
            "--no-data-fixup",
            "--data",
            f"@{data}",
            "--suppress-data",
        ]
    )
    out = result.stdout.decode(errors="replace")
    assert result.returncode == 0, describe(result)
    assert "=== TLS started with cipher TLSv1.3" in out, out
    assert "250 STARTTLS" in out  # offered by the proxy: this Postfix has no TLS at all
    assert "235 2.7.0 Authentication successful" in out
    (stored,) = await postfix.wait_delivered(rcpt_tag)
    assert_stored_by_postfix(stored, BIG)
    (session,) = await postfix.sessions(mark)
    # STARTTLS was answered by the proxy and never reached Postfix; AUTH did, after it.
    assert session.counters == {
        "ehlo": "2",
        "auth": "1",
        "mail": "1",
        "rcpt": "1",
        "data": "1",
        "quit": "1",
        "commands": "7",
    }, session.outcome
    assert f"sasl_username={mail_user.name}" in "\n".join(session.lines)


async def test_swaks_tls_on_connect_auth_login(interop_proxy, postfix, certs, mail_user, rcpt_tag, tmp_path):
    data = tmp_path / "data.eml"
    data.write_bytes(dot_stuffed_for_swaks(SMALL))
    mark = await postfix.mark()
    result = await run(
        [
            "swaks",
            "--server",
            "127.0.0.1",
            "--port",
            str(interop_proxy.port("smtp-implicit")),
            "--from",
            "sender@example.com",
            "--to",
            rcpt(rcpt_tag),
            "--tlsc",
            "--tls-verify",
            "--tls-ca-path",
            str(certs.ca_cert),
            "--auth",
            "LOGIN",
            "--auth-user",
            mail_user.name,
            "--auth-password",
            mail_user.password,
            "--no-data-fixup",
            "--data",
            f"@{data}",
            "--suppress-data",
        ]
    )
    out = result.stdout.decode(errors="replace")
    assert result.returncode == 0, describe(result)
    assert "=== TLS started with cipher" in out
    assert "STARTTLS" not in out  # implicit TLS: never offered
    assert "235 2.7.0 Authentication successful" in out
    (stored,) = await postfix.wait_delivered(rcpt_tag)
    assert_stored_by_postfix(stored, SMALL)
    (session,) = await postfix.sessions(mark)
    assert session.counters["auth"] == "1" and session.counters["ehlo"] == "1", session.outcome


async def test_swaks_refuses_proxy_certificate_from_unknown_ca(interop_proxy, postfix, rcpt_tag, tmp_path):
    """The verification the other cells rely on is real: against the system
    CAs (which do not include the test CA) swaks' handshake fails."""
    mark = await postfix.mark()
    result = await run(
        [
            "swaks",
            "--server",
            "127.0.0.1",
            "--port",
            str(interop_proxy.port("smtp-starttls")),
            "--from",
            "sender@example.com",
            "--to",
            rcpt(rcpt_tag),
            "--tls",
            "--tls-verify",
            "--quit-after",
            "RCPT",
        ]
    )
    assert result.returncode == 29, describe(result)  # swaks: TLS required but failed
    assert "certificate verify failed" in result.stderr.decode(errors="replace"), describe(result)
    (session,) = await postfix.sessions(mark)
    assert "mail" not in session.counters and "rcpt" not in session.counters, session.outcome
    assert postfix.delivered(rcpt_tag) == []


# ---------------------------------------------------------------- curl


async def test_curl_smtp_ssl_reqd_starttls_auth(interop_proxy, postfix, certs, mail_user, rcpt_tag):
    result = await run(
        curl_base(certs.ca_cert)
        + [
            f"smtp://127.0.0.1:{interop_proxy.port('smtp-starttls')}",
            "--ssl-reqd",
            "--user",
            f"{mail_user.name}:{mail_user.password}",
            "--mail-from",
            "sender@example.com",
            "--mail-rcpt",
            rcpt(rcpt_tag),
            "--upload-file",
            "-",
        ],
        stdin=SMALL,
    )
    assert result.returncode == 0, describe(result)
    (stored,) = await postfix.wait_delivered(rcpt_tag)
    assert_stored_by_postfix(stored, SMALL)
    assert b"with ESMTPA" in stored  # Postfix saw the AUTH


async def test_curl_smtps_delivers_5mb_byte_exact(interop_proxy, postfix, certs, mail_user, rcpt_tag):
    mark = await postfix.mark()
    result = await run(
        curl_base(certs.ca_cert)
        + [
            f"smtps://127.0.0.1:{interop_proxy.port('smtp-implicit')}",
            "--user",
            f"{mail_user.name}:{mail_user.password}",
            "--mail-from",
            "sender@example.com",
            "--mail-rcpt",
            rcpt(rcpt_tag),
            "--upload-file",
            "-",
        ],
        stdin=BIG,
    )
    assert result.returncode == 0, describe(result)
    (stored,) = await postfix.wait_delivered(rcpt_tag)
    assert_stored_by_postfix(stored, BIG)
    (session,) = await postfix.sessions(mark)
    assert session.counters["auth"] == "1" and session.counters["data"] == "1", session.outcome


async def test_curl_smtp_ssl_reqd_fails_without_trusting_the_ca(interop_proxy, postfix, rcpt_tag):
    result = await run(
        [
            "curl",
            "--silent",
            "--show-error",
            "--max-time",
            "60",
            f"smtp://127.0.0.1:{interop_proxy.port('smtp-starttls')}",
            "--ssl-reqd",
            "--mail-from",
            "sender@example.com",
            "--mail-rcpt",
            rcpt(rcpt_tag),
            "--upload-file",
            "-",
        ],
        stdin=SMALL,
    )
    assert result.returncode == 60, describe(result)  # CURLE_PEER_FAILED_VERIFICATION
    assert postfix.delivered(rcpt_tag) == []


# ---------------------------------------------------------------- openssl s_client


def _s_client_script(user, tag: str) -> bytes:
    """An SMTP session typed at s_client (-crlf turns LF into CRLF). The
    EHLO is the one RFC 3207 asks for after TLS; s_client sent its own before."""
    plain = base64.b64encode(f"\0{user.name}\0{user.password}".encode()).decode()
    return (
        f"EHLO s-client.interop.test\nAUTH PLAIN {plain}\nMAIL FROM:<sender@example.com>\n"
        f"RCPT TO:<{rcpt(tag)}>\nDATA\nSubject: s_client {tag}\n\n..dot-stuffed line\nbody\n.\nQUIT\n"
    ).encode()


async def test_openssl_s_client_starttls_smtp(interop_proxy, postfix, certs, mail_user, rcpt_tag):
    mark = await postfix.mark()
    result = await run(
        s_client(interop_proxy.port("smtp-starttls"), certs.ca_cert, "smtp"),
        stdin=_s_client_script(mail_user, rcpt_tag),
    )
    # Not the exit code: s_client exits 1 on the proxy's missing close_notify
    # (test_tls_close.py); the transcript says what happened.
    out = result.stdout
    assert b"verify return:1" in result.stderr, describe(result)
    assert b"250-mx.interop.test" in out and b"STARTTLS" not in out  # the EHLO after TLS
    assert b"235 2.7.0" in out and b"250 2.0.0 Ok: queued as" in out and b"221 2.0.0 Bye" in out, out
    (stored,) = await postfix.wait_delivered(rcpt_tag)
    assert stored.endswith(b"\n\n.dot-stuffed line\nbody\n")
    (session,) = await postfix.sessions(mark)
    assert session.counters["ehlo"] == "2" and "starttls" not in session.counters, session.outcome


async def test_openssl_s_client_implicit_smtp(interop_proxy, postfix, certs, mail_user, rcpt_tag):
    result = await run(
        s_client(interop_proxy.port("smtp-implicit"), certs.ca_cert, None),
        stdin=_s_client_script(mail_user, rcpt_tag),
    )
    out = result.stdout
    assert b"verify return:1" in result.stderr, describe(result)
    assert out.startswith(b"220 mx.interop.test ESMTP"), out
    assert b"235 2.7.0" in out and b"221 2.0.0 Bye" in out and b"STARTTLS" not in out, out
    (stored,) = await postfix.wait_delivered(rcpt_tag)
    assert stored.endswith(b"\n\n.dot-stuffed line\nbody\n")


# ---------------------------------------------------------------- smtplib


def _smtplib_send(port: int, ctx: ssl.SSLContext, implicit: bool, user, to: str, message: bytes) -> list[str]:
    """Blocking smtplib session (worker thread); returns the EHLO keywords
    seen once TLS is up."""
    if implicit:
        client = smtplib.SMTP_SSL("127.0.0.1", port, context=ctx, timeout=60)
    else:
        client = smtplib.SMTP("127.0.0.1", port, timeout=60)
        client.ehlo()
        assert client.has_extn("starttls")
        client.starttls(context=ctx)
    try:
        client.ehlo()
        features = sorted(client.esmtp_features)
        client.login(user.name, user.password)
        assert client.sendmail("sender@example.com", [to], message) == {}
    finally:
        client.quit()
    return features


async def test_smtplib_starttls_and_implicit_deliver_5mb_byte_exact(
    interop_proxy, postfix, client_ctx, mail_user
):
    for name, implicit in (("smtp-starttls", False), ("smtp-implicit", True)):
        tag = f"smtplib-{name}-{mail_user.name}"
        features = await trio.to_thread.run_sync(
            _smtplib_send, interop_proxy.port(name), client_ctx, implicit, mail_user, rcpt(tag), BIG
        )
        assert "starttls" not in features and "auth" in features and "pipelining" in features, features
        (stored,) = await postfix.wait_delivered(tag)
        assert_stored_by_postfix(stored, BIG)


# ---------------------------------------------------------------- a backend with its own STARTTLS


async def test_backend_starttls_is_hidden_and_never_reaches_postfix(
    interop_proxy, postfix, backend_tls, certs, client_ctx
):
    # Control: this Postfix service does offer STARTTLS, with its own certificate.
    direct = await WireClient.connect(postfix.tls_port)
    await direct.smtp_reply()
    await direct.send(b"EHLO control\r\n")
    assert b"250-STARTTLS\r\n" in await direct.smtp_reply()
    await direct.send(b"STARTTLS\r\n")
    assert (await direct.smtp_reply()).startswith(b"220 2.0.0")
    backend_ctx = ssl.create_default_context(cafile=str(backend_tls.ca_cert))
    await direct.starttls(backend_ctx, server_hostname="backend.invalid")
    await direct.aclose()

    mark = await postfix.mark()
    client = await WireClient.connect(interop_proxy.port("smtp-tlsbackend-starttls"))
    assert (await client.smtp_reply()).startswith(b"220 mx.interop.test")
    await client.send(b"EHLO before\r\n")
    before = await client.smtp_reply()
    assert before.count(b"STARTTLS") == 1 and before.endswith(b"250 STARTTLS\r\n"), before
    await client.send(b"STARTTLS\r\n")
    assert await client.smtp_reply() == b"220 2.0.0 Ready to start TLS\r\n"
    await client.starttls(client_ctx)  # verified against the proxy's CA: not Postfix's certificate
    await client.send(b"EHLO after\r\n")
    after = await client.smtp_reply()
    assert after.startswith(b"250-mx.interop.test") and b"STARTTLS" not in after and b"AUTH" in after, after
    await client.send(b"STARTTLS\r\n")
    assert await client.smtp_reply() == b"554 5.5.1 Error: TLS already active\r\n"
    await client.send(b"QUIT\r\n")
    assert (await client.smtp_reply()).startswith(b"221")
    await client.aclose()

    implicit = await WireClient.connect(interop_proxy.port("smtp-tlsbackend-implicit"), tls=client_ctx)
    await implicit.smtp_reply()
    await implicit.send(b"EHLO implicit\r\n")
    assert b"STARTTLS" not in await implicit.smtp_reply()
    await implicit.send(b"QUIT\r\n")
    assert (await implicit.smtp_reply()).startswith(b"221")
    await implicit.aclose()

    sessions = await postfix.sessions(mark, count=2)
    for session in sessions:
        log = "\n".join(session.lines)
        # Postfix counts STARTTLS as "starttls=" when it gets one, and logs a
        # TLS connection when one is made: neither, so every STARTTLS was ours.
        assert "starttls" not in session.counters and "TLS connection established" not in log, log
    assert sorted(s.counters["ehlo"] for s in sessions) == ["1", "2"]


async def test_swaks_starttls_through_a_backend_offering_its_own(
    interop_proxy, postfix, certs, mail_user, rcpt_tag, tmp_path
):
    data = tmp_path / "data.eml"
    data.write_bytes(dot_stuffed_for_swaks(SMALL))
    result = await run(
        [
            "swaks",
            "--server",
            "127.0.0.1",
            "--port",
            str(interop_proxy.port("smtp-tlsbackend-starttls")),
            "--from",
            "sender@example.com",
            "--to",
            rcpt(rcpt_tag),
            "--tls",
            "--tls-verify",
            "--tls-ca-path",
            str(certs.ca_cert),
            "--auth",
            "PLAIN",
            "--auth-user",
            mail_user.name,
            "--auth-password",
            mail_user.password,
            "--no-data-fixup",
            "--data",
            f"@{data}",
            "--suppress-data",
        ]
    )
    assert result.returncode == 0, describe(result)
    (stored,) = await postfix.wait_delivered(rcpt_tag)
    assert_stored_by_postfix(stored, SMALL)
