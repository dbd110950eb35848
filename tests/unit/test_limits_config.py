"""Configuration of the hardening keys: connection limits ([server]
max_connections, max_connections_per_ip), command_timeout, the protocol's RFC
idle minimums, smtp_bare_newline; plus the pieces the shell relies on
(client_group, the engines' partial_line)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tlsproxy.cli import main
from tlsproxy.config import ConfigError, idle_timeout_warnings, load
from tlsproxy.engines.base import EnginePolicy
from tlsproxy.engines.imap import ImapEngine
from tlsproxy.engines.pop3 import Pop3Engine
from tlsproxy.engines.smtp import SmtpEngine
from tlsproxy.server.proxy import client_group


def _listener(name: str, protocol: str, port: int, extra: str = "") -> str:
    mode = "implicit" if protocol == "tcp" else "starttls"
    return (
        f'\n[[listeners]]\nname = "{name}"\nprotocol = "{protocol}"\nmode = "{mode}"\n'
        f'listen = "127.0.0.1:{port}"\nbackend = "127.0.0.1:1{port}"\n{extra}'
    )


FOUR = (
    _listener("smtp", "smtp", 2525) + _listener("pop3", "pop3", 2110)
    + _listener("imap", "imap", 2143) + _listener("ldaps", "tcp", 2636)
)


def _write(tmp_path: Path, certs, text: str) -> Path:
    path = tmp_path / "tlsproxy.toml"
    path.write_text(f'[tls]\ncert = "{certs.cert}"\nkey = "{certs.key}"\n' + text, encoding="utf-8")
    return path


def _error(tmp_path: Path, certs, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(_write(tmp_path, certs, text))
    return str(info.value)


def test_idle_timeout_defaults_to_each_protocols_rfc_minimum(tmp_path, certs):
    config = load(_write(tmp_path, certs, FOUR))
    idle = {lst.name: lst.limits.idle_timeout for lst in config.listeners}
    assert idle == {"smtp": 300, "pop3": 600, "imap": 1800, "ldaps": 300}
    assert idle_timeout_warnings(config) == []


def test_idle_timeout_below_rfc_minimum_is_accepted_with_a_warning(tmp_path, certs):
    config = load(_write(tmp_path, certs, "[limits]\nidle_timeout = 120\n" + FOUR))
    assert {lst.limits.idle_timeout for lst in config.listeners} == {120}
    warnings = idle_timeout_warnings(config)
    assert warnings == [
        'listener "smtp": idle_timeout 120s is below the SMTP minimum of 300s (RFC 5321 4.5.3.2.7)',
        'listener "pop3": idle_timeout 120s is below the POP3 minimum of 600s (RFC 1939 section 3)',
        'listener "imap": idle_timeout 120s is below the IMAP minimum of 1800s (RFC 9051 5.4)',
    ]  # tcp has no RFC timer


def test_check_config_prints_the_warnings_and_still_succeeds(tmp_path, certs, capsys):
    text = _listener("pop3", "pop3", 2110, "idle_timeout = 599\n")
    assert main(["check-config", "--config", str(_write(tmp_path, certs, text))]) == 0
    out = capsys.readouterr().out
    assert 'warning: listener "pop3": idle_timeout 599s is below the POP3 minimum of 600s' in out
    assert out.rstrip().endswith("config OK")


def test_connection_limit_and_command_timeout_keys(tmp_path, certs):
    text = (
        "[server]\nmax_connections = 20000\n[limits]\nmax_connections_per_ip = 7\ncommand_timeout = 30\n"
        + _listener("smtp", "smtp", 2525, "command_timeout = 5\n")
        + _listener("imap", "imap", 2143, "max_connections_per_ip = 3\n")
    )
    config = load(_write(tmp_path, certs, text))
    assert config.max_connections == 20000
    smtp, imap = config.listeners
    assert (smtp.limits.command_timeout, smtp.limits.max_connections_per_ip) == (5, 7)
    assert (imap.limits.command_timeout, imap.limits.max_connections_per_ip) == (30, 3)


def test_limit_defaults(tmp_path, certs):
    config = load(_write(tmp_path, certs, _listener("smtp", "smtp", 2525)))
    lst = config.listeners[0]
    assert config.max_connections == 10000
    assert (lst.limits.command_timeout, lst.limits.max_connections_per_ip) == (60, 50)
    assert lst.limits.greeting_timeout == 60
    assert lst.smtp_bare_newline == "normalize"


@pytest.mark.parametrize(
    "text, where",
    [
        ("[server]\nmax_connections = 0\n", "[server]: key 'max_connections': must be at least 1"),
        ("[server]\nmax_connections = 1.5\n", "[server]: key 'max_connections': expected an integer"),
        ("[limits]\nmax_connections_per_ip = 0\n", "[limits]: key 'max_connections_per_ip': must be at least 1"),
        ("[limits]\ncommand_timeout = 0\n", "[limits]: key 'command_timeout': must be at least"),
        ("[limits]\ngreeting_timeout = 0\n", "[limits]: key 'greeting_timeout': must be at least"),
        ("[limits]\ngreeting_timeout = \"9\"\n", "[limits]: key 'greeting_timeout': expected a number"),
        ("[limits]\ncommand_timeout = \"60\"\n", "[limits]: key 'command_timeout': expected a number"),
    ],
)
def test_bad_limit_values_name_the_key(tmp_path, certs, text, where):
    assert _error(tmp_path, certs, text + _listener("smtp", "smtp", 2525)).startswith(where)


@pytest.mark.parametrize("policy", ["normalize", "reject", "allow"])
def test_smtp_bare_newline_policies(tmp_path, certs, policy):
    text = _listener("smtp", "smtp", 2525, f'smtp_bare_newline = "{policy}"\n')
    assert load(_write(tmp_path, certs, text)).listeners[0].smtp_bare_newline == policy


def test_smtp_bare_newline_bad_value_and_wrong_protocol_are_errors(tmp_path, certs):
    msg = _error(tmp_path, certs, _listener("smtp", "smtp", 2525, 'smtp_bare_newline = "fix"\n'))
    assert msg == (
        "listeners[0] \"smtp\": key 'smtp_bare_newline': must be one of normalize, reject, allow, got 'fix'"
    )
    msg = _error(tmp_path, certs, _listener("imap", "imap", 2143, 'smtp_bare_newline = "reject"\n'))
    assert msg == "listeners[0] \"imap\": key 'smtp_bare_newline': only for protocol = \"smtp\""


# ---------------------------------------------------------------- shell helpers


class _Peer:
    def __init__(self, address) -> None:
        self.socket = self
        self._address = address

    def getpeername(self):
        return self._address


@pytest.mark.parametrize(
    "address, group",
    [
        (("192.0.2.7", 25), "192.0.2.7"),
        (("2001:db8:1:2:aaaa::1", 25, 0, 0), "2001:db8:1:2::/64"),
        (("2001:db8:1:2:bbbb::9", 25, 0, 0), "2001:db8:1:2::/64"),  # same /64, same group
        (("2001:db8:1:3::1", 25, 0, 0), "2001:db8:1:3::/64"),
        (("::ffff:192.0.2.7", 25, 0, 0), "192.0.2.7"),  # v4 on a dual-stack socket
        (("fe80::1%eth0", 25, 0, 2), "fe80::/64"),
    ],
)
def test_client_group_is_the_ipv4_address_or_the_ipv6_64(address, group):
    assert client_group(_Peer(address)) == group


def test_partial_line_smtp():
    engine = SmtpEngine(EnginePolicy())
    engine.start(tls=False)
    engine.backend_bytes(b"220 mx\r\n")
    assert not engine.partial_line
    engine.client_bytes(b"EHL")
    assert engine.partial_line
    engine.client_bytes(b"O c\r\n")
    assert not engine.partial_line  # sent on, waiting for the backend is not the client's line
    engine.backend_bytes(b"250 mx\r\n")
    engine.client_bytes(b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n")
    engine.backend_bytes(b"250 ok\r\n250 ok\r\n354 go\r\n")
    engine.client_bytes(b"a data line without its end")
    assert not engine.partial_line  # message content is not a command line


def test_partial_line_imap_not_inside_a_literal():
    engine = ImapEngine(EnginePolicy())
    engine.start(tls=False)
    engine.backend_bytes(b"* OK ready\r\n")
    engine.client_bytes(b"a1 NOO")
    assert engine.partial_line
    engine.client_bytes(b"P\r\na2 APPEND INBOX {10+}\r\nabc")
    assert not engine.partial_line  # mid-literal


def test_partial_line_pop3():
    engine = Pop3Engine(EnginePolicy())
    engine.start(tls=False)
    engine.backend_bytes(b"+OK ready\r\n")
    engine.client_bytes(b"ST")
    assert engine.partial_line
    engine.client_bytes(b"AT\r\n")
    assert not engine.partial_line


# ---------------------------------------------------------------- [server] workers


def test_workers_default_is_one_process(tmp_path, certs):
    assert load(_write(tmp_path, certs, _listener("smtp", "smtp", 2525))).workers == 1


@pytest.mark.parametrize("value, expected", [("1", 1), ("2", 2), ("64", 64)])
def test_workers_values(tmp_path, certs, value, expected):
    text = f"[server]\nworkers = {value}\n" + _listener("smtp", "smtp", 2525)
    assert load(_write(tmp_path, certs, text)).workers == expected


def test_workers_auto_is_the_cpu_count(tmp_path, certs, monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 3)
    text = '[server]\nworkers = "auto"\n' + _listener("smtp", "smtp", 2525)
    assert load(_write(tmp_path, certs, text)).workers == 3
    monkeypatch.setattr("os.cpu_count", lambda: 512)
    assert load(_write(tmp_path, certs, text)).workers == 64
    monkeypatch.setattr("os.cpu_count", lambda: None)
    assert load(_write(tmp_path, certs, text)).workers == 1


@pytest.mark.parametrize("value", ["0", "65", "-1", "1.5", "true", '"two"', '"AUTO"', '"4"'])
def test_bad_workers_values_name_the_key(tmp_path, certs, value):
    msg = _error(tmp_path, certs, f"[server]\nworkers = {value}\n" + _listener("smtp", "smtp", 2525))
    assert msg.startswith("[server]: key 'workers': expected an integer from 1 to 64 or \"auto\", got ")


def test_check_config_prints_the_workers(tmp_path, certs, capsys):
    text = "[server]\nworkers = 4\n" + _listener("smtp", "smtp", 2525)
    assert main(["check-config", "--config", str(_write(tmp_path, certs, text))]) == 0
    assert "workers: 4 (SO_REUSEPORT)\n" in capsys.readouterr().out


def test_workers_share_the_connection_limits(tmp_path, certs):
    from tlsproxy.server.workers import worker_config

    text = (
        "[server]\nworkers = 3\nmax_connections = 1000\n[metrics]\nlisten = \"127.0.0.1:9100\"\n"
        "[limits]\nmax_connections_per_ip = 7\n"
        + _listener("smtp", "smtp", 2525, "max_connections = 100\n") + _listener("imap", "imap", 2143)
    )
    share = worker_config(load(_write(tmp_path, certs, text)))
    assert share.max_connections == 334  # rounded up
    assert [lst.limits.max_connections for lst in share.listeners] == [34, 334]
    assert {lst.limits.max_connections_per_ip for lst in share.listeners} == {7}  # per worker
    assert share.metrics.listen is None  # the supervisor serves the endpoint
