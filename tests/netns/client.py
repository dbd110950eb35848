"""Real mail clients for the namespace tests, run in the client namespace.

``python -m tests.netns.client PROTOCOL HOST PORT CAFILE`` talks to what it
believes is the legacy server at HOST:PORT with the standard library's client
(smtplib, imaplib, poplib): checks the STARTTLS capability, upgrades with
certificate and address verification against CAFILE, logs in / sends a
message, and prints one JSON object. ``greeting`` as PROTOCOL only connects
and prints the first line the server sends.
"""

from __future__ import annotations

import imaplib
import json
import poplib
import smtplib
import socket
import ssl
import sys

TIMEOUT = 20


def smtp(host: str, port: int, ctx: ssl.SSLContext) -> dict:
    with smtplib.SMTP(host, port, timeout=TIMEOUT) as client:
        local = client.sock.getsockname()
        client.ehlo("client.test")
        offered = client.has_extn("starttls")
        client.starttls(context=ctx)
        client.ehlo("client.test")
        version = client.sock.version()
        client.sendmail("alice@client.test", ["bob@legacy.test"], f"Subject: via {port}\r\n\r\nhello\r\n")
    return {"starttls_offered": offered, "tls_version": version, "local": local}


def imap(host: str, port: int, ctx: ssl.SSLContext) -> dict:
    client = imaplib.IMAP4(host, port, timeout=TIMEOUT)
    local = client.sock.getsockname()
    offered = "STARTTLS" in client.capabilities
    client.starttls(ssl_context=ctx)
    version = client.sock.version()
    status, _ = client.login("alice", "secret")
    client.logout()
    return {"starttls_offered": offered, "tls_version": version, "local": local, "login": status}


def pop3(host: str, port: int, ctx: ssl.SSLContext) -> dict:
    client = poplib.POP3(host, port, timeout=TIMEOUT)
    local = client.sock.getsockname()
    offered = "STLS" in client.capa()
    client.stls(context=ctx)
    version = client.sock.version()
    client.user("alice")
    reply = client.pass_("secret")
    count, _size = client.stat()
    client.quit()
    return {"starttls_offered": offered, "tls_version": version, "local": local,
            "login": reply.decode(), "messages": count}


def greeting(host: str, port: int, ctx: ssl.SSLContext) -> dict:
    with socket.create_connection((host, port), timeout=TIMEOUT) as sock:
        line = sock.makefile("rb").readline()
    return {"greeting": line.decode(errors="replace").rstrip("\r\n")}


def main() -> None:
    protocol, host, port, cafile = sys.argv[1:5]
    ctx = ssl.create_default_context(cafile=cafile)  # checks the chain and the address
    result = {"smtp": smtp, "imap": imap, "pop3": pop3, "greeting": greeting}[protocol](host, int(port), ctx)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
