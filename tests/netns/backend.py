"""The legacy servers of the namespace tests, run in the backend namespace:
plaintext-only SMTP (25 and 587), IMAP (143) and POP3 (110) on one address.

``python -m tests.netns.backend HOST`` prints one JSON object per line on
stdout: ``{"event": "ready"}`` once every port listens, then for each
accepted connection ``{"event": "peer", "service", "seq", "peer", "local"}``
(``seq`` counts connections over all services, so a test can tell that no
other connection arrived in between) and for each SMTP message
``{"event": "message", "from", "content"}``.
"""

from __future__ import annotations

import json
import sys

import trio

from tests.fakes.legacy_imap import LegacyImapServer
from tests.fakes.legacy_pop3 import LegacyPop3Server
from tlsproxy.legacy_smtp import LegacySmtpServer

PORTS = {"smtp": 25, "submission": 587, "imap": 143, "pop3": 110}


def emit(**event: object) -> None:
    print(json.dumps(event), flush=True)


def record_peers(server, service: str, seq: list[int]) -> None:
    """Report every accepted connection's peer before the server handles it."""
    handle = server._handle  # noqa: SLF001

    async def recorded(stream: trio.SocketStream) -> None:
        seq[0] += 1
        peer, local = stream.socket.getpeername(), stream.socket.getsockname()
        emit(event="peer", service=service, seq=seq[0], peer=list(peer[:2]), local=list(local[:2]))
        await handle(stream)

    server._handle = recorded  # noqa: SLF001


def on_message(msg) -> None:
    emit(event="message", **{"from": msg.mail_from.decode()}, content=msg.content.decode())


async def main(host: str) -> None:
    seq = [0]
    servers = {
        "smtp": LegacySmtpServer(port=PORTS["smtp"], on_message=on_message),
        "submission": LegacySmtpServer(port=PORTS["submission"], on_message=on_message),
        "imap": LegacyImapServer(port=PORTS["imap"]),
        "pop3": LegacyPop3Server(port=PORTS["pop3"], messages=[b"Subject: hi\r\n\r\nhello\r\n"]),
    }
    async with trio.open_nursery() as nursery:
        for service, server in servers.items():
            record_peers(server, service, seq)
            await nursery.start(server.serve, host)
        emit(event="ready")


if __name__ == "__main__":
    trio.run(main, sys.argv[1])
