"""PROXY protocol interop: real clients (smtplib, imaplib, poplib) send a PROXY
header claiming a documentation address, then talk TLS through the proxy,
which passes the address on in its own v1 or v2 header to the real Postfix
(smtpd_upstream_proxy_protocol = haproxy) and Dovecot (haproxy = yes,
haproxy_trusted_networks). The servers' logs, and the Received header Postfix
writes, must name the claimed client, never 127.0.0.1 (the proxy's own
address, which is all they would see without the header).
"""

from __future__ import annotations

import imaplib
import poplib
import random
import re
import smtplib
import socket
import ssl

import trio

from tests.helpers import WireClient

from .servers import MAIL_DOMAIN, MAILBOX

MESSAGE = b"From: a@example.com\r\nTo: b@example.com\r\nSubject: proxy protocol\r\n\r\nhello\r\n"


def claimed_port() -> int:
    """A source port for the claimed client: random, so that this test's log
    lines are the only ones with it."""
    return random.randint(20000, 60000)


def v1(src: str, dst: str, sport: int, dport: int) -> bytes:
    family = "TCP6" if ":" in src else "TCP4"
    return f"PROXY {family} {src} {dst} {sport} {dport}\r\n".encode()


def v2_tcp4(src: str, dst: str, sport: int, dport: int) -> bytes:
    addresses = socket.inet_aton(src) + socket.inet_aton(dst) + sport.to_bytes(2, "big") + dport.to_bytes(2, "big")
    return b"\r\n\r\n\x00\r\nQUIT\n\x21\x11" + len(addresses).to_bytes(2, "big") + addresses


def header_first(cls, header: bytes):
    """``cls`` (an smtplib, imaplib or poplib client class) writing ``header``
    on its TCP socket before anything else, as a load balancer in front would.
    The override sits below the TLS subclasses' own, which still wrap the socket."""
    base = next(b for b in (smtplib.SMTP, imaplib.IMAP4, poplib.POP3) if issubclass(cls, b))
    method = "_get_socket" if base is smtplib.SMTP else "_create_socket"

    def create(self, *args):
        sock = getattr(base, method)(self, *args)
        sock.sendall(header)
        if cls is imaplib.IMAP4_SSL:  # it wraps IMAP4's socket by name, not via super()
            return self.ssl_context.wrap_socket(sock, server_hostname=self.host)
        return sock

    if cls is imaplib.IMAP4_SSL:
        return type("ProxiedIMAP4_SSL", (cls,), {method: create})
    mixin = type("HeaderFirst", (base,), {method: create})
    return type("Proxied" + cls.__name__, (mixin,) if cls is base else (cls, mixin), {})


# ---------------------------------------------------------------- Postfix


def _smtplib_send(port: int, ctx: ssl.SSLContext, header: bytes, implicit: bool, to: str) -> None:
    if implicit:
        smtp = header_first(smtplib.SMTP_SSL, header)("localhost", port, context=ctx, timeout=60)
    else:
        smtp = header_first(smtplib.SMTP, header)("localhost", port, timeout=60)
        smtp.starttls(context=ctx)
    try:
        smtp.ehlo("client.interop.test")
        smtp.sendmail("sender@example.com", [to], MESSAGE)
    finally:
        smtp.quit()


async def _postfix_saw(postfix, interop_proxy, listener, client_ctx, header, rcpt_tag, implicit, address, sport):
    mark = await postfix.mark()
    to = f"{MAILBOX}+{rcpt_tag}@{MAIL_DOMAIN}"
    await trio.to_thread.run_sync(_smtplib_send, interop_proxy.port(listener), client_ctx, header, implicit, to)
    (stored,) = await postfix.wait_delivered(rcpt_tag)
    client = rf"unknown\[{re.escape(address)}\]:{sport}"
    await postfix.log.wait_for(rf"postfix-interop/proxied/smtpd\[\d+\]: connect from {client}$", mark)
    await postfix.log.wait_for(rf"postfix-interop/proxied/smtpd\[\d+\]: disconnect from {client} ", mark)
    headers = stored.split(b"\n\n", 1)[0].decode()
    received = re.search(r"^Received: .*?\n(?=\S)", headers + "\n", re.M | re.S).group(0)
    assert f"from client.interop.test (unknown [{address}])" in received, received
    assert "127.0.0.1" not in headers, headers
    proxied = [ln for ln in postfix.log.since(mark).splitlines() if "postfix-interop/proxied/" in ln]
    assert proxied and not any("127.0.0.1" in ln for ln in proxied), proxied


async def test_postfix_logs_the_client_of_a_v1_header_through_starttls_v1_out(
    proxy_protocol_proxy, postfix, client_ctx, rcpt_tag
):
    sport = claimed_port()
    header = v1("203.0.113.10", "192.0.2.25", sport, 587)
    await _postfix_saw(
        postfix, proxy_protocol_proxy, "pp-smtp-starttls", client_ctx, header, rcpt_tag, False, "203.0.113.10", sport
    )


async def test_postfix_logs_the_client_of_a_v2_header_through_implicit_tls_v2_out(
    proxy_protocol_proxy, postfix, client_ctx, rcpt_tag
):
    sport = claimed_port()
    header = v2_tcp4("198.51.100.11", "192.0.2.25", sport, 465)
    await _postfix_saw(
        postfix, proxy_protocol_proxy, "pp-smtp-implicit", client_ctx, header, rcpt_tag, True, "198.51.100.11", sport
    )


async def test_postfix_sees_the_proxys_client_socket_without_an_inbound_header(
    proxy_protocol_proxy, postfix, client_ctx
):
    """No load balancer: the proxy's v2 header names the TCP client itself,
    so Postfix logs the client's own port, not the proxy's backend port."""
    mark = await postfix.mark()
    client = await WireClient.connect(proxy_protocol_proxy.port("pp-smtp-outbound-only"))
    client_port = client.stream.socket.getsockname()[1]
    assert (await client.smtp_reply()).startswith(b"220 mx.interop.test")
    [backend_port] = proxy_protocol_proxy.backend_ports("pp-smtp-outbound-only")
    assert backend_port != client_port
    await client.send(b"QUIT\r\n")
    assert (await client.smtp_reply()).startswith(b"221 ")
    await client.aclose()
    await postfix.log.wait_for(
        rf"postfix-interop/proxied/smtpd\[\d+\]: disconnect from unknown\[127\.0\.0\.1\]:{client_port} quit=1 commands=1$",
        mark,
    )
    assert f":{backend_port}" not in postfix.log.since(mark)


# ---------------------------------------------------------------- Dovecot


def _imap_login(port: int, ctx: ssl.SSLContext, header: bytes, implicit: bool, user) -> None:
    if implicit:
        imap = header_first(imaplib.IMAP4_SSL, header)("localhost", port, ssl_context=ctx, timeout=60)
    else:
        imap = header_first(imaplib.IMAP4, header)("localhost", port, timeout=60)
        imap.starttls(ssl_context=ctx)
    try:
        imap.login(user.name, user.password)
    finally:
        imap.logout()


def _pop3_login(port: int, ctx: ssl.SSLContext, header: bytes, user) -> None:
    pop = header_first(poplib.POP3, header)("localhost", port, timeout=60)
    pop.stls(context=ctx)
    try:
        pop.user(user.name)
        pop.pass_(user.password)
    finally:
        pop.quit()


async def _dovecot_login_line(dovecot, mark, sport) -> str:
    """Dovecot's login line of the connection it logged with rport=sport."""
    (session,) = await dovecot.sessions(mark, ports=[sport])
    assert session.outcome.startswith("Login: "), session.lines
    [line] = [ln for ln in session.lines if ": Login: " in ln]
    return line


async def test_dovecot_imap_starttls_logs_the_client_of_a_v1_header_v2_out(
    proxy_protocol_proxy, dovecot, client_ctx, mail_user
):
    sport = claimed_port()
    mark = dovecot.log.mark()
    header = v1("203.0.113.20", "192.0.2.143", sport, 143)
    await trio.to_thread.run_sync(
        _imap_login, proxy_protocol_proxy.port("pp-imap-starttls"), client_ctx, header, False, mail_user
    )
    login = await _dovecot_login_line(dovecot, mark, sport)
    assert f"user=<{mail_user.name}>" in login
    assert f"rip=203.0.113.20, rport={sport}, lip=192.0.2.143," in login, login


async def test_dovecot_imap_implicit_logs_an_ipv6_client_v1_out(proxy_protocol_proxy, dovecot, client_ctx, mail_user):
    sport = claimed_port()
    mark = dovecot.log.mark()
    header = v1("2001:db8::20", "2001:db8::993", sport, 993)
    await trio.to_thread.run_sync(
        _imap_login, proxy_protocol_proxy.port("pp-imap-implicit"), client_ctx, header, True, mail_user
    )
    login = await _dovecot_login_line(dovecot, mark, sport)
    assert f"rip=2001:db8::20, rport={sport}, lip=2001:db8::993," in login, login


async def test_dovecot_pop3_starttls_logs_the_client_of_a_v2_header_v1_out(
    proxy_protocol_proxy, dovecot, client_ctx, mail_user
):
    sport = claimed_port()
    mark = dovecot.log.mark()
    header = v2_tcp4("198.51.100.21", "192.0.2.110", sport, 110)
    await trio.to_thread.run_sync(_pop3_login, proxy_protocol_proxy.port("pp-pop3-starttls"), client_ctx, header, mail_user)
    login = await _dovecot_login_line(dovecot, mark, sport)
    assert f"user=<{mail_user.name}>" in login
    assert f"rip=198.51.100.21, rport={sport}, lip=192.0.2.110," in login, login
