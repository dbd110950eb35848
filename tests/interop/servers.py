"""Real plaintext mail servers for the interop suite: Dovecot (IMAP, POP3 and
the SASL service Postfix authenticates against) and Postfix (SMTP into a
Maildir), each with its whole world in one temporary directory: config,
state, sockets, queue, mail and log file. Nothing touches /etc or the
system instances; everything listens on 127.0.0.1 on free high ports.

Start-up readiness is a banner read on the port, polled with a deadline; the
log files are what tests read to learn what reached a server.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio

START_TIMEOUT = 30.0  # seconds for a server to answer its first banner
STOP_TIMEOUT = 20.0
POLL = 0.05  # seconds between two polls (log files, ports): never a synchronisation by itself

# Dovecot's default plus the remote port (the proxy's backend port).
LOGIN_LOG_FORMAT_ELEMENTS = "user=<%u> method=%m rip=%r rport=%{rport} lip=%l mpid=%e %c session=<%{session}>"

# Dovecot and Postfix drop privileges to these: real system users that the
# Debian packages create (mail delivery runs as "mail").
MAIL_USER = "mail"


def free_port() -> int:
    """A 127.0.0.1 port nothing listens on right now (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PortInUse(RuntimeError):
    """A port picked by free_port() was taken before the server bound it
    (other test runs share the machine): pick new ports and start again."""


def wait_for_banner(port: int, prefix: bytes, proc: subprocess.Popen, log: Path | None) -> bytes:
    """Poll until a connection to ``port`` gets a first line starting with
    ``prefix``; fail early if the server process died."""
    deadline = time.monotonic() + START_TIMEOUT
    last: object = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                data = b""
                while b"\r\n" not in data:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                if data.startswith(prefix):
                    return data
                last = data
        except OSError as exc:
            last = exc
        time.sleep(POLL)
    tail = log.read_text(errors="replace")[-4000:] if log is not None and log.exists() else ""
    stdout = log.with_name("stdout.log") if log is not None else None
    if stdout is not None and stdout.exists():
        tail += stdout.read_text(errors="replace")[-2000:]
    if "Address already in use" in tail:
        raise PortInUse(f"port {port}: {tail[-500:]}")
    raise RuntimeError(
        f"server on port {port} not ready (exit code {proc.poll()}, last: {last!r})\nlog tail:\n{tail}"
    )


def stop_process(proc: subprocess.Popen, stop_command: list[str] | None = None) -> None:
    """Stop a server we started: its own stop command (or SIGTERM to the
    process we spawned), then SIGKILL to that same process if it lingers."""
    if proc.poll() is not None:
        return
    if stop_command is not None:
        subprocess.run(stop_command, capture_output=True, timeout=STOP_TIMEOUT, check=False)
    else:
        proc.terminate()
    try:
        proc.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=STOP_TIMEOUT)


class ServerLog:
    """A server's log file, read from a mark (a byte offset) onwards."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def mark(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def since(self, mark: int = 0) -> str:
        try:
            with self.path.open("rb") as f:
                f.seek(mark)
                return f.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    async def wait_for(self, pattern: str, mark: int = 0, timeout: float = 15.0) -> re.Match[str]:
        """The first match of the regex ``pattern`` in what was logged after
        ``mark``, polling the file until it shows up (bounded)."""
        regex = re.compile(pattern, re.M)
        with trio.move_on_after(timeout):
            while True:
                m = regex.search(self.since(mark))
                if m is not None:
                    return m
                await trio.sleep(POLL)
        raise AssertionError(
            f"{self.path.name}: no line matching {pattern!r} within {timeout}s; logged:\n"
            f"{self.since(mark)[-6000:]}"
        )


@dataclass
class Session:
    """One connection as a server logged it, keyed by the client's port (the
    proxy's backend port): its log lines and how it ended."""

    port: int
    lines: list[str]
    outcome: str  # Postfix: the "disconnect from" counters; Dovecot: the login line's message

    @property
    def counters(self) -> dict[str, str]:
        """Postfix's per-command counters, e.g. {"ehlo": "1", "auth": "0/1"}."""
        return dict(item.split("=", 1) for item in self.outcome.split() if "=" in item)


async def wait_sessions(
    log: ServerLog,
    mark: int,
    end: str,
    *,
    ports: list[int] | None = None,
    start: str | None = None,
    count: int = 1,
    timeout: float = 15.0,
) -> list[Session]:
    """Sessions once each has logged its end (a line matching the regex
    ``end``, groups "port" and "outcome") after ``mark``. Which sessions:
    ``ports`` (the proxy's backend ports), or else the ``count`` sessions
    whose start (regex ``start``, group "port") was logged after ``mark``;
    more than ``count`` is an error."""
    end_re = re.compile(end, re.M)
    start_re = re.compile(start, re.M) if start is not None else None
    with trio.move_on_after(timeout):
        while True:
            text = log.since(mark)
            want = ports
            if want is None:
                assert start_re is not None
                want = [int(m["port"]) for m in start_re.finditer(text)]
                if len(want) > count:
                    raise AssertionError(
                        f"{log.path.name}: {len(want)} sessions, expected {count}:\n{text[-6000:]}"
                    )
            ends = {int(m["port"]): m["outcome"] for m in end_re.finditer(text)}
            if len(want) == (len(ports) if ports is not None else count) and all(p in ends for p in want):
                return [
                    Session(p, [ln for ln in text.splitlines() if re.search(rf"\D{p}\b", ln)], ends[p])
                    for p in want
                ]
            await trio.sleep(POLL)
    raise AssertionError(
        f"{log.path.name}: session(s) {ports or count} not logged complete within {timeout}s:\n"
        f"{log.since(mark)[-6000:]}"
    )


def start_with_retries(server: "Dovecot | Postfix", attempts: int = 5) -> None:
    for attempt in range(attempts):
        try:
            server._start()  # noqa: SLF001
            return
        except PortInUse:
            server.stop()
            if attempt == attempts - 1:
                raise
            for name in server.port_fields:
                setattr(server, name, free_port())


def _chown(path: Path, user: str) -> None:
    shutil.chown(path, user=user, group=user)


# ---------------------------------------------------------------- Dovecot


@dataclass
class Dovecot:
    """A Dovecot serving IMAP and POP3 in clear (ssl = no) from ``root``.

    Users live in a passwd-file (PLAIN passwords, re-read by Dovecot whenever
    it changes); their Maildirs under ``root/mail``. ``auth_socket`` is the
    SASL socket Postfix authenticates against. The log has auth_debug and
    auth_debug_passwords on, so every credential that reaches Dovecot, right
    or wrong, shows up in it (as the password or as the base64 SASL response).
    """

    root: Path
    imap_port: int = field(default_factory=free_port)
    pop3_port: int = field(default_factory=free_port)
    # Listeners that expect a PROXY protocol header (v1 or v2) from 127.0.0.1
    # first: Dovecot then logs the header's source as rip=/rport=.
    imap_haproxy_port: int = field(default_factory=free_port)
    pop3_haproxy_port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    port_fields = ("imap_port", "pop3_port", "imap_haproxy_port", "pop3_haproxy_port")

    @property
    def conf(self) -> Path:
        return self.root / "dovecot.conf"

    @property
    def base_dir(self) -> Path:
        return self.root / "run"

    @property
    def auth_socket(self) -> Path:
        return self.base_dir / "auth-postfix"

    @property
    def passwd_file(self) -> Path:
        return self.root / "users"

    @property
    def log(self) -> ServerLog:
        return ServerLog(self.root / "dovecot.log")

    def maildir(self, user: str) -> Path:
        return self.root / "mail" / user

    async def sessions(self, mark: int, ports: list[int]) -> list[Session]:
        """The login-process sessions (IMAP or POP3 connections) from these
        client ports, once each has ended with a "Login:" line (authenticated,
        handed to the mail process) or a "Disconnected"/"Aborted login" line
        that says whether any auth attempt was made. Dovecot logs no connect
        line, so the ports say which connections (see backend_ports)."""
        return await wait_sessions(
            self.log,
            mark,
            ports=ports,
            end=r"(?:imap|pop3)-login: \S+: "
            r"(?P<outcome>(?:Login|Disconnected|Aborted login).*?)rport=(?P<port>\d+)",
        )

    def add_user(self, name: str, password: str) -> None:
        assert re.fullmatch(r"[a-z0-9._-]+", name) and ":" not in password and "\n" not in password
        with self.passwd_file.open("a") as f:
            f.write(f"{name}:{{PLAIN}}{password}\n")

    def write_config(self) -> None:
        for d in (self.base_dir, self.root / "state"):
            d.mkdir(parents=True, exist_ok=True)
        (self.root / "mail").mkdir(exist_ok=True)
        _chown(self.root / "mail", MAIL_USER)
        self.passwd_file.touch()
        r = self.root
        self.conf.write_text(f"""\
# tlsproxy interop suite: Dovecot in clear behind the proxy. Generated.
protocols = imap pop3
listen = 127.0.0.1
instance_name = tlsproxy-interop-{os.getpid()}
base_dir = {self.base_dir}
state_dir = {r}/state
log_path = {r}/dovecot.log
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_verbose = yes
auth_debug = yes
auth_debug_passwords = yes
auth_verbose_passwords = plain
auth_failure_delay = 0
# "mail" (uid 8) owns the Maildirs; Dovecot refuses uids below first_valid_uid.
first_valid_uid = 8
first_valid_gid = 8
mail_uid = {MAIL_USER}
mail_gid = {MAIL_USER}
mail_location = maildir:{r}/mail/%u
# The remote port makes each connection's lines findable (the proxy's backend port).
login_log_format_elements = {LOGIN_LOG_FORMAT_ELEMENTS}
haproxy_trusted_networks = 127.0.0.1
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {self.passwd_file}
}}
userdb {{
  driver = static
  args = uid={MAIL_USER} gid={MAIL_USER} home={r}/mail/%u
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {self.imap_port}
  }}
  inet_listener imap_haproxy {{
    address = 127.0.0.1
    port = {self.imap_haproxy_port}
    haproxy = yes
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {self.pop3_port}
  }}
  inet_listener pop3_haproxy {{
    address = 127.0.0.1
    port = {self.pop3_haproxy_port}
    haproxy = yes
  }}
  inet_listener pop3s {{
    port = 0
  }}
}}
service auth {{
  unix_listener auth-postfix {{
    mode = 0666
  }}
}}
""")

    def start(self) -> None:
        start_with_retries(self)

    def _start(self) -> None:
        self.write_config()
        out = (self.root / "stdout.log").open("wb")
        self.proc = subprocess.Popen(
            ["dovecot", "-F", "-c", str(self.conf)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        out.close()
        wait_for_banner(self.imap_port, b"* OK", self.proc, self.log.path)
        wait_for_banner(self.pop3_port, b"+OK", self.proc, self.log.path)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)


# ---------------------------------------------------------------- Postfix

_MASTER_CF_SERVICES = """\
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
proxymap  unix  -       -       n       -       -       proxymap
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

# Mail for any rcpt+TAG@example.com lands in example.com/rcpt/ (the tag is
# an address extension); tests find their message by its X-Original-To.
MAIL_DOMAIN = "example.com"

# The PROXY protocol smtpd service: its own syslog name (lines are easy to
# find), and no reverse lookup of the documentation addresses the tests claim.
PROXY_PROTOCOL_SMTPD = (
    "-o syslog_name=postfix-interop/proxied -o smtpd_upstream_proxy_protocol=haproxy "
    "-o smtpd_peername_lookup=no"
)
MAILBOX = "rcpt"


@dataclass
class Postfix:
    """A Postfix accepting mail for example.com into a Maildir, in clear.

    Two smtpd services share the instance: ``port`` has TLS off entirely
    (``smtpd_tls_security_level = none``), ``tls_port`` advertises its own
    STARTTLS with its own certificate (the proxy must hide it). Both offer
    SMTP AUTH through Dovecot's SASL socket. ``maillog`` gets every line;
    ``smtpd_client_port_logging`` puts the client port in them, and each
    session's "disconnect from" line counts the commands it received.
    """

    root: Path
    sasl_socket: Path
    tls_cert: Path
    tls_key: Path
    port: int = field(default_factory=free_port)
    tls_port: int = field(default_factory=free_port)
    # smtpd_upstream_proxy_protocol = haproxy: a PROXY header (v1 or v2) comes
    # first, and Postfix logs and polices the client it names.
    proxy_port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    port_fields = ("port", "tls_port", "proxy_port")

    @property
    def conf_dir(self) -> Path:
        return self.root / "conf"

    @property
    def log(self) -> ServerLog:
        return ServerLog(self.root / "maillog")

    @property
    def maildir(self) -> Path:
        return self.root / "mail" / MAIL_DOMAIN / MAILBOX

    def write_config(self) -> None:
        r = self.root
        for d in ("conf", "queue", "data", "mail"):
            (r / d).mkdir(parents=True, exist_ok=True)
        _chown(r / "data", "postfix")
        _chown(r / "mail", MAIL_USER)
        (r / "conf" / "vmailbox").write_text(f"{MAILBOX}@{MAIL_DOMAIN} {MAIL_DOMAIN}/{MAILBOX}/\n")
        (r / "conf" / "main.cf").write_text(f"""\
# tlsproxy interop suite: Postfix in clear behind the proxy. Generated.
compatibility_level = 3.6
queue_directory = {r}/queue
data_directory = {r}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = mx.interop.test
mydomain = interop.test
myorigin = $myhostname
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relayhost =
relay_domains =
alias_maps =
alias_database =
local_recipient_maps =
default_transport = error:outbound mail is disabled in the interop suite
recipient_delimiter = +
virtual_mailbox_domains = {MAIL_DOMAIN}
virtual_mailbox_base = {r}/mail
virtual_mailbox_maps = texthash:{r}/conf/vmailbox
virtual_uid_maps = static:8
virtual_gid_maps = static:8
virtual_minimum_uid = 8
virtual_mailbox_limit = 0
mailbox_size_limit = 0
message_size_limit = 52428800
smtpd_banner = $myhostname ESMTP interop
smtpd_tls_security_level = none
smtpd_sasl_auth_enable = yes
smtpd_sasl_type = dovecot
smtpd_sasl_path = {self.sasl_socket}
smtpd_sasl_security_options = noanonymous
smtpd_relay_restrictions = permit_sasl_authenticated reject_unauth_destination
smtpd_client_port_logging = yes
maillog_file = {r}/maillog
maillog_file_prefixes = {r}
syslog_name = postfix-interop
biff = no
""")
        tls = (
            f"-o syslog_name=postfix-interop/tls -o smtpd_tls_security_level=may "
            f"-o smtpd_tls_cert_file={self.tls_cert} -o smtpd_tls_key_file={self.tls_key}"
        )
        (r / "conf" / "master.cf").write_text(
            f"127.0.0.1:{self.port} inet n - n - - smtpd\n"
            f"127.0.0.1:{self.tls_port} inet n - n - - smtpd {tls}\n"
            f"127.0.0.1:{self.proxy_port} inet n - n - - smtpd {PROXY_PROTOCOL_SMTPD}\n" + _MASTER_CF_SERVICES
        )

    def _postfix(self, *args: str) -> list[str]:
        return ["postfix", "-c", str(self.conf_dir), *args]

    def start(self) -> None:
        start_with_retries(self)

    def _start(self) -> None:
        self.write_config()
        check = subprocess.run(self._postfix("check"), capture_output=True, text=True, timeout=60)
        if check.returncode != 0:
            raise RuntimeError(f"postfix check failed: {check.stdout}{check.stderr}")
        out = (self.root / "stdout.log").open("wb")
        self.proc = subprocess.Popen(
            self._postfix("start-fg"),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        out.close()
        wait_for_banner(self.port, b"220 mx.interop.test", self.proc, self.log.path)
        wait_for_banner(self.tls_port, b"220 mx.interop.test", self.proc, self.log.path)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, self._postfix("stop"))

    async def mark(self) -> int:
        """A log mark after which only new sessions start. Postfix logs
        through postlogd, asynchronously, so a session's "connect from" line
        may land after a mark taken with a plain file size: first make one
        session straight to Postfix and wait for its last line (postlogd
        writes in arrival order, so every earlier line is in the file)."""
        probe = await trio.open_tcp_stream("127.0.0.1", self.port)
        port = probe.socket.getsockname()[1]
        async with probe:
            await probe.send_all(b"QUIT\r\n")
            while await probe.receive_some(4096):
                pass
        await self.log.wait_for(rf"disconnect from localhost\[127\.0\.0\.1\]:{port} ")
        return self.log.mark()

    async def sessions(self, mark: int, count: int = 1, ports: list[int] | None = None) -> list[Session]:
        """SMTP sessions begun after ``mark`` (both smtpd services; or those
        from the client ``ports``), once
        Postfix has logged their "disconnect from" line, which counts every
        command the session received: ``ehlo=2 auth=1 mail=1 ... commands=N``."""
        client = r"localhost\[127\.0\.0\.1\]:(?P<port>\d+)"
        return await wait_sessions(
            self.log,
            mark,
            start=rf"/smtpd\[\d+\]: connect from {client}$",
            end=rf"/smtpd\[\d+\]: disconnect from {client} (?P<outcome>.*)$",
            count=count,
            ports=ports,
        )

    def delivered(self, tag: str) -> list[bytes]:
        """Every message delivered to rcpt+TAG@example.com, as stored."""
        found = []
        new = self.maildir / "new"
        if not new.is_dir():
            return found
        needle = f"X-Original-To: {MAILBOX}+{tag}@{MAIL_DOMAIN}\n".encode()
        for path in sorted(new.iterdir()):
            with path.open("rb") as f:
                head = f.read(8192)
            if needle in head.split(b"\n\n", 1)[0] + b"\n":
                found.append(path.read_bytes())
        return found

    async def wait_delivered(self, tag: str, count: int = 1, timeout: float = 30.0) -> list[bytes]:
        with trio.move_on_after(timeout):
            while True:
                found = self.delivered(tag)
                if len(found) >= count:
                    return found
                await trio.sleep(POLL)
        raise AssertionError(
            f"{count} message(s) for {MAILBOX}+{tag}@{MAIL_DOMAIN} not delivered in {timeout}s; maillog:\n"
            f"{self.log.since()[-6000:]}"
        )
