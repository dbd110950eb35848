"""``tlsproxy demo``: the embedded default. A legacy plaintext SMTP server, a
throwaway certificate and tlsproxy in front of it, all on localhost."""

from __future__ import annotations

import signal
import tempfile
from pathlib import Path

import trio

from .certs import generate
from .config import Address, Config, Limits, ListenerConfig, MetricsConfig, TlsSettings
from .legacy_smtp import LegacySmtpServer, ReceivedMessage
from .server.proxy import Proxy


def _show(msg: ReceivedMessage) -> None:
    head = msg.content.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")
    print(
        f"\n--- legacy server received a message ({len(msg.wire_data)} bytes)\n"
        f"    MAIL {msg.mail_from.decode('utf-8', 'replace')}  "
        f"RCPT {', '.join(r.decode('utf-8', 'replace') for r in msg.rcpt_to)}"
        + (f"  AUTH {msg.authenticated_as.decode('utf-8', 'replace')}" if msg.authenticated_as else "")
        + "\n    "
        + head.replace("\n", "\n    "),
        flush=True,
    )


def demo_config(certs: Path, backend_port: int, port: int) -> Config:
    """STARTTLS on ``port``, implicit TLS on port+1, metrics on port+2 (all
    ephemeral when ``port`` is 0)."""
    files = generate(certs, ["localhost", "127.0.0.1", "::1"])
    tls = TlsSettings(cert=files.cert, key=files.key)
    backend = Address("127.0.0.1", backend_port)

    def local(offset: int) -> Address:
        return Address("127.0.0.1", port + offset if port else 0)

    return Config(
        listeners=(
            ListenerConfig("submission", "smtp", "starttls", local(0), backend, True, tls, Limits()),
            ListenerConfig("submissions", "smtp", "implicit", local(1), backend, False, tls, Limits()),
        ),
        metrics=MetricsConfig(listen=local(2)),
        shutdown_grace=2.0,
    )


async def run_demo(port: int) -> int:
    with tempfile.TemporaryDirectory(prefix="tlsproxy-demo-") as tmp:
        backend = LegacySmtpServer(on_message=_show)
        async with trio.open_nursery() as outer:
            await outer.start(backend.serve)
            config = demo_config(Path(tmp), backend.port, port)
            proxy = Proxy(config)
            async with trio.open_nursery() as nursery:
                await nursery.start(proxy.run)
                ca = Path(tmp) / "ca.pem"
                port, port_tls = (lst.bound_ports[0] for lst in proxy.listeners)
                port_http = proxy.http_port
                print(
                    f"""
tlsproxy demo: a plaintext-only SMTP server on 127.0.0.1:{backend.port}, and in front of it
  STARTTLS (require_tls) on 127.0.0.1:{port}   implicit TLS on 127.0.0.1:{port_tls}
Certificates (throwaway, CA {ca}).
Metrics: http://127.0.0.1:{port_http}/metrics

Try, in another terminal:
  openssl s_client -starttls smtp -connect 127.0.0.1:{port} -CAfile {ca} -crlf
  swaks --server 127.0.0.1:{port} --tls --to you@example.com --from me@example.com
  swaks --server 127.0.0.1:{port_tls} --tlsc --auth PLAIN --auth-user demo --auth-password secret
  python3 -c "import smtplib,ssl; s=smtplib.SMTP('127.0.0.1',{port}); \\
s.starttls(context=ssl.create_default_context(cafile='{ca}')); \\
s.sendmail('me@example.com',['you@example.com'],'Subject: hi\\r\\n\\r\\nhello'); s.quit()"
  nc 127.0.0.1 {port}   (then EHLO x, MAIL FROM:<a@b>: refused with 530 until STARTTLS)

Press Ctrl-C to stop.""",
                    flush=True,
                )
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for _ in signals:
                        break
                proxy.stop()
            outer.cancel_scope.cancel()
    print("demo stopped")
    return 0
