"""require_tls against the real servers: credentials a client sends before
STARTTLS are refused by the proxy and never reach Dovecot or Postfix; after
STARTTLS the same user logs in.

What reached a server is read from its log: Dovecot logs every credential it
gets (auth_debug_passwords: the SASL response in base64, and the password of
a failed login), Postfix counts every command of a session on its
"disconnect from" line. Absence is only checked after something the same
session did later (the login over TLS) has been logged. Each test ends with
a control: a login sent in clear straight to the server does show up in its
log in the form looked for, so the absence checks can fail. (Controls use
right passwords: failed logins would make Dovecot slow down every later
login from 127.0.0.1.)
"""

from __future__ import annotations

import base64
import uuid

from tests.conftest import sample
from tests.helpers import WireClient

from .clients import curl_base, describe, run


def plain_b64(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def leaked_to_dovecot(log: str, user: str, password: str) -> bool:
    """Did these credentials reach Dovecot in any form it logs? (The SASL
    response in base64 for every attempt; the password itself on a mismatch.)"""
    return password in log or plain_b64(user, password) in log


async def control_seen(dovecot, mark: int, user) -> None:
    """A login sent in clear straight to the server is in Dovecot's log in
    the form leaked_to_dovecot looks for."""
    await dovecot.log.wait_for(rf"resp={plain_b64(user.name, user.password)}", mark)
    assert leaked_to_dovecot(dovecot.log.since(mark), user.name, user.password)


def leak_password() -> str:
    return f"sent-in-clear-{uuid.uuid4().hex[:10]}"


async def test_smtp_auth_before_starttls_never_reaches_postfix_or_dovecot(
    interop_proxy, postfix, dovecot, client_ctx, mail_user, control_user
):
    leak = leak_password()
    pf_mark, dc_mark = await postfix.mark(), dovecot.log.mark()
    client = await WireClient.connect(interop_proxy.port("smtp-require"))
    assert (await client.smtp_reply()).startswith(b"220 mx.interop.test")
    await client.send(b"EHLO clear\r\n")
    ehlo = await client.smtp_reply()
    assert b"AUTH" not in ehlo and ehlo.endswith(b"250 STARTTLS\r\n"), ehlo
    for command in (
        f"AUTH PLAIN {plain_b64(mail_user.name, leak)}",
        "AUTH LOGIN",
        "MAIL FROM:<sender@example.com>",
    ):
        await client.send(command.encode() + b"\r\n")
        assert await client.smtp_reply() == b"530 5.7.0 Must issue a STARTTLS command first\r\n"
    await client.send(b"STARTTLS\r\n")
    assert await client.smtp_reply() == b"220 2.0.0 Ready to start TLS\r\n"
    await client.starttls(client_ctx)
    await client.send(b"EHLO tls\r\n")
    assert b"250-AUTH PLAIN LOGIN\r\n" in await client.smtp_reply()
    await client.send(f"AUTH PLAIN {plain_b64(mail_user.name, mail_user.password)}\r\n".encode())
    assert (await client.smtp_reply()).startswith(b"235 2.7.0")
    await client.send(b"QUIT\r\n")
    assert (await client.smtp_reply()).startswith(b"221")
    await client.aclose()

    (session,) = await postfix.sessions(pf_mark)
    # Postfix got the two EHLOs, the AUTH over TLS and QUIT: nothing refused.
    assert session.counters == {"ehlo": "2", "auth": "1", "quit": "1", "commands": "4"}, session.outcome
    await dovecot.log.wait_for(
        rf"service=smtp.*resp={plain_b64(mail_user.name, mail_user.password)}", dc_mark
    )
    assert not leaked_to_dovecot(dovecot.log.since(dc_mark), mail_user.name, leak)
    assert sample(interop_proxy.proxy.metrics.plaintext_refused, listener="smtp-require") == 3

    # Control: an AUTH in clear straight to Postfix does reach Dovecot's log.
    direct = await WireClient.connect(postfix.port)
    await direct.smtp_reply()
    await direct.send(b"EHLO control\r\n")
    await direct.smtp_reply()
    await direct.send(f"AUTH PLAIN {plain_b64(control_user.name, control_user.password)}\r\n".encode())
    assert (await direct.smtp_reply()).startswith(b"235")
    await direct.aclose()
    await control_seen(dovecot, dc_mark, control_user)


async def test_imap_login_before_starttls_never_reaches_dovecot(
    interop_proxy, dovecot, client_ctx, mail_user, control_user
):
    leak = leak_password()
    mark = dovecot.log.mark()
    client = await WireClient.connect(interop_proxy.port("imap-require"))
    greeting = await client.line()
    assert greeting.startswith(b"* OK [CAPABILITY IMAP4rev1 ") and b"LOGINDISABLED" in greeting, greeting
    assert b"STARTTLS" in greeting and b"AUTH=" not in greeting, greeting
    (backend_port,) = interop_proxy.backend_ports("imap-require")
    await client.send(f"a LOGIN {mail_user.name} {leak}\r\n".encode())
    assert await client.line() == b"a NO [PRIVACYREQUIRED] TLS is required before authentication\r\n"
    await client.send(f"b AUTHENTICATE PLAIN {plain_b64(mail_user.name, leak)}\r\n".encode())
    assert (await client.line()).startswith(b"b NO [PRIVACYREQUIRED]")
    await client.send(b"c STARTTLS\r\n")
    assert (await client.line()).startswith(b"c OK")
    await client.starttls(client_ctx)
    await client.send(f"d LOGIN {mail_user.name} {mail_user.password}\r\n".encode())
    assert (await client.line()).startswith(b"d OK [CAPABILITY IMAP4rev1 ")
    await client.send(b"e LOGOUT\r\n")
    assert b"e OK" in await client.until(b"e OK")
    await client.aclose()

    (session,) = await dovecot.sessions(mark, [backend_port])
    assert session.outcome.startswith(f"Login: user=<{mail_user.name}>, method=PLAIN"), session.outcome
    log = dovecot.log.since(mark)
    assert not leaked_to_dovecot(log, mail_user.name, leak)
    assert log.count(f"rport={backend_port}\tresp=") == 1  # one auth request: the one over TLS
    assert sample(interop_proxy.proxy.metrics.plaintext_refused, listener="imap-require") == 2

    direct = await WireClient.connect(dovecot.imap_port)
    await direct.line()
    await direct.send(f"a LOGIN {control_user.name} {control_user.password}\r\n".encode())
    assert (await direct.line()).startswith(b"a OK")
    await direct.aclose()
    await control_seen(dovecot, mark, control_user)


async def test_pop3_user_pass_auth_before_stls_never_reach_dovecot(
    interop_proxy, dovecot, client_ctx, mail_user, control_user
):
    leak = leak_password()
    mark = dovecot.log.mark()
    client = await WireClient.connect(interop_proxy.port("pop3-require"))
    assert (await client.line()).startswith(b"+OK")
    (backend_port,) = interop_proxy.backend_ports("pop3-require")
    await client.send(b"CAPA\r\n")
    capa = await client.until(b"\r\n.\r\n")
    assert b"\r\nSTLS\r\n" in capa and b"USER" not in capa and b"SASL" not in capa, capa
    refused = b"-ERR Plaintext login disallowed, use STLS first\r\n"
    for command in (
        f"USER {mail_user.name}",
        f"PASS {leak}",
        f"AUTH PLAIN {plain_b64(mail_user.name, leak)}",
    ):
        await client.send(command.encode() + b"\r\n")
        assert await client.line() == refused
    await client.send(b"STLS\r\n")
    assert (await client.line()).startswith(b"+OK")
    await client.starttls(client_ctx)
    await client.send(f"USER {mail_user.name}\r\nPASS {mail_user.password}\r\n".encode())
    assert (await client.line()).startswith(b"+OK")
    assert (await client.line()).startswith(b"+OK Logged in")
    await client.send(b"QUIT\r\n")
    assert (await client.line()).startswith(b"+OK")
    await client.aclose()

    (session,) = await dovecot.sessions(mark, [backend_port])
    assert session.outcome.startswith(f"Login: user=<{mail_user.name}>, method=PLAIN"), session.outcome
    log = dovecot.log.since(mark)
    assert not leaked_to_dovecot(log, mail_user.name, leak)
    assert log.count(f"rport={backend_port}\tresp=") == 1
    assert sample(interop_proxy.proxy.metrics.plaintext_refused, listener="pop3-require") == 3

    direct = await WireClient.connect(dovecot.pop3_port)
    await direct.line()
    await direct.send(f"USER {control_user.name}\r\nPASS {control_user.password}\r\n".encode())
    await direct.line()
    assert (await direct.line()).startswith(b"+OK")
    await direct.aclose()
    await control_seen(dovecot, mark, control_user)


async def test_swaks_auth_without_tls_fails_on_require_tls_listener(
    interop_proxy, postfix, mail_user, rcpt_tag
):
    mark = await postfix.mark()
    result = await run(
        [
            "swaks",
            "--server",
            "127.0.0.1",
            "--port",
            str(interop_proxy.port("smtp-require")),
            "--from",
            "sender@example.com",
            "--to",
            f"rcpt+{rcpt_tag}@example.com",
            "--auth",
            "PLAIN",
            "--auth-user",
            mail_user.name,
            "--auth-password",
            mail_user.password,
        ]
    )
    out = result.stdout.decode(errors="replace") + result.stderr.decode(errors="replace")
    assert result.returncode == 28, describe(result)  # swaks: authentication required but not offered
    assert "Host did not advertise authentication" in out, out
    (session,) = await postfix.sessions(mark)
    assert "auth" not in session.counters and "mail" not in session.counters, session.outcome
    assert postfix.delivered(rcpt_tag) == []


async def test_curl_imap_and_pop3_without_tls_fail_on_require_tls_listeners(
    interop_proxy, dovecot, certs, mail_user
):
    mark = dovecot.log.mark()
    user = ["--user", f"{mail_user.name}:{mail_user.password}"]
    imap = await run(
        [
            "curl",
            "--silent",
            "--show-error",
            "--max-time",
            "60",
            *user,
            f"imap://127.0.0.1:{interop_proxy.port('imap-require')}/INBOX",
        ]
    )
    pop3 = await run(
        [
            "curl",
            "--silent",
            "--show-error",
            "--max-time",
            "60",
            *user,
            f"pop3://127.0.0.1:{interop_proxy.port('pop3-require')}/",
        ]
    )
    # curl finds no usable login before TLS (LOGINDISABLED and no AUTH= in
    # IMAP, neither USER nor SASL in POP3's CAPA) and gives up: CURLE_LOGIN_DENIED.
    assert imap.returncode == 67, describe(imap)
    assert pop3.returncode == 67, describe(pop3)
    # Then the same logins with TLS work; once both are logged, the user's
    # only lines are those two logins: no attempt from the sessions in clear.
    for name, scheme in (("imap-require", "imap"), ("pop3-require", "pop3")):
        ok = await run(
            curl_base(certs.ca_cert)
            + user
            + ["--ssl-reqd", f"{scheme}://127.0.0.1:{interop_proxy.port(name)}/"]
        )
        assert ok.returncode == 0, describe(ok)
    await dovecot.log.wait_for(
        rf"(?s)imap-login: Info: Login: user=<{mail_user.name}>"
        rf".*pop3-login: Info: Login: user=<{mail_user.name}>",
        mark,
    )
    mentions = [
        ln
        for ln in dovecot.log.since(mark).splitlines()
        if "-login: " in ln and f"user=<{mail_user.name}>" in ln
    ]
    assert len(mentions) == 2 and all(": Login: " in ln for ln in mentions), mentions
