"""Unit tests for configuration loading and validation (tlsproxy/config.py).

Every error must say where it was found, as ``listeners[0] "submission": key
'backend'``, so tests assert the listener label and the key, not just that
something failed. Certificates are real (tlsproxy.certs.generate), so the
cert/key checks run against files that load.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

from tlsproxy.certs import generate
from tlsproxy.config import (
    Address,
    Config,
    ConfigError,
    Limits,
    ListenerConfig,
    MetricsConfig,
    TlsSettings,
    load,
    parse,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "conf" / "example.toml"

LST = 'listeners[0] "submission"'

GOOD = """\
[metrics]
listen = "127.0.0.1:9464"

[tls]
cert = "certs/cert.pem"
key = "certs/key.pem"
min_version = "1.2"

[limits]
idle_timeout = 300

[[listeners]]
name = "submission"
protocol = "smtp"
mode = "starttls"
listen = "0.0.0.0:587"
backend = "127.0.0.1:2587"
require_tls = true
"""


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two unrelated CA+leaf sets: ``main/`` and ``other/``."""
    root = tmp_path_factory.mktemp("pki")
    generate(root / "main", "mail.example.com")
    generate(root / "other", "other.example.com")
    return root


@pytest.fixture
def confdir(tmp_path: Path, pki: Path) -> Path:
    """A config directory with ``certs/`` (the pair GOOD names) and
    ``other/`` (a second, unrelated pair)."""
    shutil.copytree(pki / "main", tmp_path / "certs")
    shutil.copytree(pki / "other", tmp_path / "other")
    return tmp_path


def write(confdir: Path, text: str, name: str = "tlsproxy.toml") -> Path:
    path = confdir / name
    path.write_text(text, encoding="utf-8")
    return path


def variant(old: str, new: str, base: str = GOOD) -> str:
    assert old in base, old
    return base.replace(old, new, 1)


def error_of(confdir: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(write(confdir, text))
    return str(info.value)


def listener_toml(name: str, listen: str, **extra: str) -> str:
    """One more [[listeners]] table (values in ``extra`` are raw TOML)."""
    lines = [
        "",
        "[[listeners]]",
        f'name = "{name}"',
        'protocol = "smtp"',
        'mode = "starttls"',
        f'listen = "{listen}"',
        'backend = "127.0.0.1:2525"',
    ]
    lines += [f"{k} = {v}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- valid files


def test_full_config_loads_into_dataclasses(confdir: Path) -> None:
    config = load(write(confdir, GOOD))

    assert isinstance(config, Config)
    assert config.metrics == MetricsConfig(listen=Address("127.0.0.1", 9464))
    assert config.shutdown_grace == 30.0
    assert len(config.listeners) == 1
    lst = config.listeners[0]
    assert isinstance(lst, ListenerConfig)
    assert lst.name == "submission"
    assert lst.protocol == "smtp"
    assert lst.mode == "starttls"
    assert lst.listen == Address("0.0.0.0", 587)
    assert lst.listen.is_wildcard
    assert lst.backend == Address("127.0.0.1", 2587)
    assert not lst.backend.is_wildcard
    assert lst.require_tls is True
    assert lst.tls == TlsSettings(
        cert=(confdir / "certs" / "cert.pem").resolve(),
        key=(confdir / "certs" / "key.pem").resolve(),
        min_version="1.2",
    )
    assert lst.limits == Limits(idle_timeout=300.0)


def test_loaded_config_is_immutable(confdir: Path) -> None:
    config = load(write(confdir, GOOD))
    lst = config.listeners[0]
    for obj, attr, value in [
        (config, "shutdown_grace", 0.0),
        (config, "listeners", ()),
        (config.metrics, "listen", None),
        (lst, "require_tls", False),
        (lst, "backend", Address("10.0.0.1", 25)),
        (lst.listen, "port", 25),
        (lst.tls, "cert", Path("/tmp/x.pem")),
        (lst.tls, "min_version", "1.3"),
        (lst.limits, "idle_timeout", 1.0),
    ]:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, attr, value)
    assert isinstance(config.listeners, tuple)  # not a list that could be appended to


def test_relative_cert_paths_resolve_against_the_config_dir_not_cwd(
    confdir: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(confdir, GOOD)
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    monkeypatch.chdir(elsewhere)  # no certs/ here: a CWD-relative lookup would fail

    tls = load(path).listeners[0].tls

    assert tls.cert == (confdir / "certs" / "cert.pem").resolve()
    assert tls.key == (confdir / "certs" / "key.pem").resolve()
    assert tls.cert.is_absolute() and tls.key.is_absolute()


def test_relative_config_path_still_resolves_certs_next_to_it(
    confdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (confdir / "etc").mkdir()
    shutil.copytree(confdir / "certs", confdir / "etc" / "certs")
    write(confdir / "etc", GOOD)
    monkeypatch.chdir(confdir)

    tls = load("etc/tlsproxy.toml").listeners[0].tls

    assert tls.cert == (confdir / "etc" / "certs" / "cert.pem").resolve()


def test_absolute_cert_paths_are_kept(confdir: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    other_dir = tmp_path_factory.mktemp("conf")
    cert, key = confdir / "certs" / "cert.pem", confdir / "certs" / "key.pem"
    text = variant('cert = "certs/cert.pem"', f'cert = "{cert}"')
    text = variant('key = "certs/key.pem"', f'key = "{key}"', text)

    tls = load(write(other_dir, text)).listeners[0].tls

    assert (tls.cert, tls.key) == (cert, key)


def test_parse_takes_relative_paths_from_base_dir(confdir: Path) -> None:
    import tomllib

    config = parse(tomllib.loads(GOOD), base_dir=confdir)
    assert config.listeners[0].tls.cert == (confdir / "certs" / "cert.pem").resolve()


def test_tls_defaults_are_inherited_and_a_listener_tls_table_overrides_them(confdir: Path) -> None:
    text = (
        GOOD
        + listener_toml("inherits", "127.0.0.1:2000")
        + listener_toml("tls13", "127.0.0.1:2001", tls='{ min_version = "1.3" }')
        + listener_toml(
            "own-cert", "127.0.0.1:2002", tls='{ cert = "other/cert.pem", key = "other/key.pem" }'
        )
    )
    by_name = {lst.name: lst for lst in load(write(confdir, text)).listeners}

    main_cert = (confdir / "certs" / "cert.pem").resolve()
    main_key = (confdir / "certs" / "key.pem").resolve()
    assert by_name["inherits"].tls == TlsSettings(main_cert, main_key, "1.2")
    # Only min_version overridden: cert and key still come from [tls].
    assert by_name["tls13"].tls == TlsSettings(main_cert, main_key, "1.3")
    # cert and key overridden (relative to the config dir), min_version inherited.
    assert by_name["own-cert"].tls == TlsSettings(
        (confdir / "other" / "cert.pem").resolve(), (confdir / "other" / "key.pem").resolve(), "1.2"
    )
    # The [tls] defaults were not changed by the overrides.
    assert by_name["submission"].tls == TlsSettings(main_cert, main_key, "1.2")


def test_listener_may_bring_its_own_cert_without_a_tls_section(confdir: Path) -> None:
    text = variant('[tls]\ncert = "certs/cert.pem"\nkey = "certs/key.pem"\nmin_version = "1.2"\n', "")
    text += '\n[listeners.tls]\ncert = "other/cert.pem"\nkey = "other/key.pem"\nmin_version = "1.3"\n'

    tls = load(write(confdir, text)).listeners[0].tls

    assert tls == TlsSettings(
        (confdir / "other" / "cert.pem").resolve(), (confdir / "other" / "key.pem").resolve(), "1.3"
    )


def test_limits_defaults_and_per_listener_overrides(confdir: Path) -> None:
    text = variant(
        "[limits]\nidle_timeout = 300\n",
        "[limits]\nidle_timeout = 120\nhandshake_timeout = 5\nmax_connections = 50\n",
    )
    text += listener_toml(
        "imap-like", "127.0.0.1:2143", idle_timeout="1800", max_line_length="65536", connect_timeout="2.5"
    )
    by_name = {lst.name: lst for lst in load(write(confdir, text)).listeners}

    assert by_name["submission"].limits == Limits(
        handshake_timeout=5, connect_timeout=10.0, idle_timeout=120, max_line_length=8192, max_connections=50
    )
    assert by_name["imap-like"].limits == Limits(
        handshake_timeout=5, connect_timeout=2.5, idle_timeout=1800, max_line_length=65536, max_connections=50
    )


def test_limits_default_when_no_limits_section(confdir: Path) -> None:
    text = variant("[limits]\nidle_timeout = 300\n", "")
    assert load(write(confdir, text)).listeners[0].limits == Limits()
    assert Limits().idle_timeout >= 300  # RFC 5321 §4.5.3.2.7: at least 5 minutes


def test_optional_sections_and_keys_have_defaults(confdir: Path) -> None:
    text = variant('[metrics]\nlisten = "127.0.0.1:9464"\n', "")
    text = variant("require_tls = true\n", "", text)
    text = variant('name = "submission"\n', "", text)
    text = variant('min_version = "1.2"\n', "", text)

    config = load(write(confdir, text))

    assert config.metrics.listen is None
    assert config.shutdown_grace == 30.0
    lst = config.listeners[0]
    assert lst.require_tls is False  # off unless asked for
    assert lst.name == "listener0"
    assert lst.tls.min_version == "1.2"


def test_server_shutdown_grace(confdir: Path) -> None:
    config = load(write(confdir, "[server]\nshutdown_grace = 2.5\n" + GOOD))
    assert config.shutdown_grace == 2.5
    assert load(write(confdir, "[server]\nshutdown_grace = 0\n" + GOOD)).shutdown_grace == 0


def test_require_tls_is_dropped_on_implicit_listeners(confdir: Path) -> None:
    text = variant('mode = "starttls"', 'mode = "implicit"')
    lst = load(write(confdir, text)).listeners[0]
    assert lst.mode == "implicit"
    assert lst.require_tls is False


@pytest.mark.parametrize(
    "text, expected",
    [
        ("mail.example.com:25", Address("mail.example.com", 25)),
        ("localhost:1", Address("localhost", 1)),
        ("10.0.0.5:65535", Address("10.0.0.5", 65535)),
        ("legacy_mail:2525", Address("legacy_mail", 2525)),  # container service names
        ("mail-01.example:25", Address("mail-01.example", 25)),
        ("[::1]:25", Address("::1", 25)),
        ("[2001:db8::25]:2525", Address("2001:db8::25", 2525)),
        ("[::]:587", Address("::", 587)),
    ],
)
def test_good_backend_addresses(confdir: Path, text: str, expected: Address) -> None:
    config = load(write(confdir, variant('backend = "127.0.0.1:2587"', f'backend = "{text}"')))
    assert config.listeners[0].backend == expected


def test_ipv6_address_is_shown_in_brackets() -> None:
    assert str(Address("::1", 25)) == "[::1]:25"
    assert str(Address("127.0.0.1", 25)) == "127.0.0.1:25"


def test_protocols_and_modes_accepted(confdir: Path) -> None:
    text = variant('protocol = "smtp"\nmode = "starttls"', 'protocol = "imap"\nmode = "starttls"')
    text += listener_toml("pop3", "127.0.0.1:2110").replace('"smtp"', '"pop3"')
    text += listener_toml("pop3s", "127.0.0.1:2995").replace('"smtp"', '"pop3"').replace(
        '"starttls"', '"implicit"'
    )
    text += listener_toml("raw", "127.0.0.1:2636").replace('"smtp"', '"tcp"').replace(
        '"starttls"', '"implicit"'
    )
    got = [(lst.protocol, lst.mode) for lst in load(write(confdir, text)).listeners]
    assert got == [("imap", "starttls"), ("pop3", "starttls"), ("pop3", "implicit"), ("tcp", "implicit")]


def test_same_port_on_different_specific_addresses_is_allowed(confdir: Path) -> None:
    text = variant('listen = "0.0.0.0:587"', 'listen = "127.0.0.1:587"')
    text += listener_toml("second", "127.0.0.2:587")
    text += listener_toml("v6", "[::1]:587")
    assert len(load(write(confdir, text)).listeners) == 3


# ---------------------------------------------------------------- errors: structure


def test_unknown_top_level_key(confdir: Path) -> None:
    msg = error_of(confdir, "colour = \"blue\"\n" + GOOD)
    assert msg.startswith("config: unknown key 'colour'")


def test_unknown_top_level_table(confdir: Path) -> None:
    msg = error_of(confdir, GOOD + "\n[listener]\nname = \"x\"\n")  # singular: a typo
    assert "unknown key 'listener'" in msg


@pytest.mark.parametrize(
    "old, new, where, key",
    [
        # A typo must never silently leave require_tls at its default (off).
        ("require_tls = true", "requre_tls = true", LST, "requre_tls"),
        ("require_tls = true", "require_TLS = true", LST, "require_TLS"),
        ("require_tls = true", "require_tls = true\nidle_timout = 30", LST, "idle_timout"),
        ('min_version = "1.2"', 'min_version = "1.2"\ncertificate = "x.pem"', "[tls]", "certificate"),
        ("idle_timeout = 300", "idle_timeout = 300\nidle = 30", "[limits]", "idle"),
        ('listen = "127.0.0.1:9464"', 'listen = "127.0.0.1:9464"\nport = 9464', "[metrics]", "port"),
    ],
)
def test_unknown_key_names_its_table(confdir: Path, old: str, new: str, where: str, key: str) -> None:
    msg = error_of(confdir, variant(old, new))
    assert msg.startswith(f"{where}: unknown key '{key}'")


def test_unknown_key_in_a_listener_tls_table(confdir: Path) -> None:
    msg = error_of(confdir, GOOD + 'tls = { cert = "certs/cert.pem", keyfile = "certs/key.pem" }\n')
    assert msg.startswith(f"{LST}.tls: unknown key 'keyfile'")


def test_unknown_key_in_server_table(confdir: Path) -> None:
    msg = error_of(confdir, "[server]\ngrace = 5\n" + GOOD)
    assert msg.startswith("[server]: unknown key 'grace'")


@pytest.mark.parametrize(
    "value, expected",
    [('"yes"', "true or false"), ('"true"', "true or false"), ("1", "true or false")],
)
def test_require_tls_must_be_a_boolean(confdir: Path, value: str, expected: str) -> None:
    msg = error_of(confdir, variant("require_tls = true", f"require_tls = {value}"))
    assert msg.startswith(f"{LST}: key 'require_tls'")
    assert expected in msg


@pytest.mark.parametrize(
    "old, new, key",
    [
        ('listen = "0.0.0.0:587"', "listen = 587", "listen"),
        ('backend = "127.0.0.1:2587"', "backend = 2587", "backend"),
        ('protocol = "smtp"', "protocol = true", "protocol"),
        ('mode = "starttls"', 'mode = ["starttls"]', "mode"),
        ("require_tls = true", "require_tls = true\nidle_timeout = \"300\"", "idle_timeout"),
        ("require_tls = true", "require_tls = true\nidle_timeout = true", "idle_timeout"),
        ("require_tls = true", "require_tls = true\nmax_connections = 10.5", "max_connections"),
        ("require_tls = true", "require_tls = true\nmax_line_length = true", "max_line_length"),
        ("require_tls = true", 'require_tls = true\ntls = "certs/cert.pem"', "tls"),
    ],
)
def test_wrong_value_types(confdir: Path, old: str, new: str, key: str) -> None:
    msg = error_of(confdir, variant(old, new))
    assert msg.startswith(f"{LST}: key '{key}'")


def test_listener_name_of_the_wrong_type(confdir: Path) -> None:
    msg = error_of(confdir, variant('name = "submission"', "name = 25"))
    assert msg.startswith("listeners[0]: key 'name'")


@pytest.mark.parametrize("key", ["protocol", "mode", "listen", "backend"])
def test_required_listener_keys(confdir: Path, key: str) -> None:
    lines = [line for line in GOOD.splitlines() if not line.startswith(f"{key} =")]
    msg = error_of(confdir, "\n".join(lines) + "\n")
    assert msg.startswith(f"{LST}: key '{key}': required")


def test_listener_label_without_a_name_uses_the_index(confdir: Path) -> None:
    text = variant('name = "submission"\n', "") + listener_toml("second", "127.0.0.1:2000")
    text = variant('listen = "127.0.0.1:2000"', 'listen = "127.0.0.1"', text)
    msg = error_of(confdir, text)
    assert msg.startswith("listeners[1] \"second\": key 'listen'")


@pytest.mark.parametrize(
    "address, detail",
    [
        ("127.0.0.1", "expected host:port"),  # no port
        ("mail.example.com", "expected host:port"),
        (":25", "expected host:port"),
        ("127.0.0.1:", "port must be 1-65535"),
        ("127.0.0.1:0", "port must be 1-65535"),
        ("127.0.0.1:70000", "port must be 1-65535"),
        ("127.0.0.1:65536", "port must be 1-65535"),
        ("127.0.0.1:-1", "port must be 1-65535"),
        ("127.0.0.1:25x", "port must be 1-65535"),
        ("127.0.0.1: 25", "port must be 1-65535"),
        ("host:²5", "port must be 1-65535"),  # str.isdigit() is true, int() fails
        ("host:٢٥", "port must be 1-65535"),  # Arabic-Indic digits: int() reads 25
        ("::1:25", "brackets"),  # IPv6 without brackets
        ("2001:db8::1:25", "brackets"),
        ("[::1:25", "brackets"),
        ("[not-v6]:25", "not an IPv6 address"),
        ("[127.0.0.1]:25", "not an IPv6 address"),
        ("exa mple.com:25", "not a host name"),  # garbage hosts
        ("a b-c:25", "not a host name"),
        ("!!-!!:25", "not a host name"),
        ("mail..example:25", "not a host name"),
        ("-mail.example:25", "not a host name"),
        ("mail.example-:25", "not a host name"),
        ("mail/example:25", "not a host name"),
        ("é.example:25", "not a host name"),
        ("999.1.1.1:25", "not a valid IPv4 address"),
        ("256.0.0.1:25", "not a valid IPv4 address"),
        ("127.1:25", "not a valid IPv4 address"),
        ("1.2.3:25", "not a valid IPv4 address"),
    ],
)
@pytest.mark.parametrize("key", ["listen", "backend"])
def test_bad_addresses(confdir: Path, key: str, address: str, detail: str) -> None:
    old = 'listen = "0.0.0.0:587"' if key == "listen" else 'backend = "127.0.0.1:2587"'
    msg = error_of(confdir, variant(old, f'{key} = "{address}"'))
    assert msg.startswith(f"{LST}: key '{key}'")
    assert detail in msg


def test_bad_metrics_address(confdir: Path) -> None:
    msg = error_of(confdir, variant('listen = "127.0.0.1:9464"', 'listen = "127.0.0.1:0"'))
    assert msg.startswith("[metrics]: key 'listen'")


@pytest.mark.parametrize("value", ['"http"', '"SMTP"', '"lmtp"', '""'])
def test_unknown_protocol(confdir: Path, value: str) -> None:
    msg = error_of(confdir, variant('protocol = "smtp"', f"protocol = {value}"))
    assert msg.startswith(f"{LST}: key 'protocol': must be one of smtp, imap, pop3, tcp")


@pytest.mark.parametrize("value", ['"tls"', '"ssl"', '"STARTTLS"', '"plain"'])
def test_unknown_mode(confdir: Path, value: str) -> None:
    msg = error_of(confdir, variant('mode = "starttls"', f"mode = {value}"))
    assert msg.startswith(f"{LST}: key 'mode': must be one of starttls, implicit")


def test_starttls_needs_a_mail_protocol(confdir: Path) -> None:
    msg = error_of(confdir, variant('protocol = "smtp"', 'protocol = "tcp"'))
    assert msg.startswith(f"{LST}: key 'mode'")
    assert "starttls" in msg and "tcp" in msg


@pytest.mark.parametrize("value", ['"1.1"', '"1.0"', '"TLSv1.2"', '"1.4"', "1.2"])
def test_min_version_in_tls_section(confdir: Path, value: str) -> None:
    msg = error_of(confdir, variant('min_version = "1.2"', f"min_version = {value}"))
    assert msg.startswith("[tls]: key 'min_version'")


def test_min_version_in_a_listener_tls_table_names_the_listener(confdir: Path) -> None:
    msg = error_of(confdir, GOOD + 'tls = { min_version = "1.1" }\n')
    assert msg.startswith(f"{LST}.tls: key 'min_version'")
    assert "1.2, 1.3" in msg


def test_no_listeners(confdir: Path) -> None:
    text = GOOD.split("[[listeners]]")[0]
    assert "at least one [[listeners]]" in error_of(confdir, text)
    assert "at least one [[listeners]]" in error_of(confdir, "listeners = []\n" + text)


def test_listener_that_is_not_a_table(confdir: Path) -> None:
    text = 'listeners = ["submission"]\n' + GOOD.split("[[listeners]]")[0]
    assert error_of(confdir, text).startswith("listeners[0]: must be a table")


def test_section_that_is_not_a_table(confdir: Path) -> None:
    text = 'limits = 5\n' + variant("[limits]\nidle_timeout = 300\n", "")
    assert error_of(confdir, text).startswith("config: key 'limits': must be a table")


def test_invalid_toml(confdir: Path) -> None:
    path = write(confdir, variant('name = "submission"', 'name = "submission'))
    with pytest.raises(ConfigError) as info:
        load(path)
    assert str(info.value).startswith(f"{path}: invalid TOML")
    line = GOOD.splitlines().index('name = "submission"') + 1
    assert f"line {line}" in str(info.value)  # tomllib says where


def test_duplicate_keys_are_invalid_toml(confdir: Path) -> None:
    msg = error_of(confdir, variant("require_tls = true", "require_tls = true\nrequire_tls = false"))
    assert "invalid TOML" in msg


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path / "nope.toml")
    assert str(info.value) == f"{tmp_path / 'nope.toml'}: cannot read: No such file or directory"


def test_config_file_not_utf8(confdir: Path) -> None:
    path = confdir / "latin1.toml"
    path.write_bytes(GOOD.replace("submission", "soumission é").encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load(path)
    assert "not UTF-8" in str(info.value)


# ---------------------------------------------------------------- errors: limits


@pytest.mark.parametrize("key", ["idle_timeout", "handshake_timeout", "connect_timeout"])
@pytest.mark.parametrize("value", ["-1", "0", "-0.5", "nan", "inf", "-inf"])
def test_bad_timeouts_in_a_listener(confdir: Path, key: str, value: str) -> None:
    msg = error_of(confdir, GOOD + f"{key} = {value}\n")
    assert msg.startswith(f"{LST}: key '{key}'")


@pytest.mark.parametrize("value", ["-300", "0", "nan", "inf"])
def test_bad_timeout_in_limits_section(confdir: Path, value: str) -> None:
    msg = error_of(confdir, variant("idle_timeout = 300", f"idle_timeout = {value}"))
    assert msg.startswith("[limits]: key 'idle_timeout'")


@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
def test_bad_shutdown_grace(confdir: Path, value: str) -> None:
    msg = error_of(confdir, f"[server]\nshutdown_grace = {value}\n" + GOOD)
    assert msg.startswith("[server]: key 'shutdown_grace'")


@pytest.mark.parametrize(
    "key, value", [("max_line_length", "511"), ("max_line_length", "0"), ("max_connections", "0"),
                   ("max_connections", "-5")]
)
def test_bad_integer_limits(confdir: Path, key: str, value: str) -> None:
    msg = error_of(confdir, GOOD + f"{key} = {value}\n")
    assert msg.startswith(f"{LST}: key '{key}': must be at least")


def test_smallest_allowed_limits(confdir: Path) -> None:
    text = GOOD + "max_line_length = 512\nmax_connections = 1\nidle_timeout = 0.001\n"
    limits = load(write(confdir, text)).listeners[0].limits
    assert (limits.max_line_length, limits.max_connections, limits.idle_timeout) == (512, 1, 0.001)


# ---------------------------------------------------------------- errors: certificates


def test_no_certificate_anywhere(confdir: Path) -> None:
    text = variant('cert = "certs/cert.pem"\nkey = "certs/key.pem"\n', "")
    msg = error_of(confdir, text)
    assert msg.startswith(f"{LST}: key 'cert': required")


def test_cert_without_key(confdir: Path) -> None:
    msg = error_of(confdir, variant('key = "certs/key.pem"\n', ""))
    assert msg.startswith(f"{LST}: key 'key': required")


def test_missing_cert_file(confdir: Path) -> None:
    msg = error_of(confdir, variant('cert = "certs/cert.pem"', 'cert = "certs/missing.pem"'))
    assert msg.startswith(f"{LST}: key 'cert': cannot read {(confdir / 'certs' / 'missing.pem').resolve()}")


def test_missing_key_file(confdir: Path) -> None:
    msg = error_of(confdir, variant('key = "certs/key.pem"', 'key = "certs/missing.pem"'))
    assert msg.startswith(f"{LST}: key 'key': cannot read")


def test_unreadable_cert_file(confdir: Path) -> None:
    # A directory where the file should be: unreadable even for root, for whom
    # file permission bits do not stop reading.
    (confdir / "certs" / "dir.pem").mkdir()
    msg = error_of(confdir, variant('cert = "certs/cert.pem"', 'cert = "certs/dir.pem"'))
    assert msg.startswith(f"{LST}: key 'cert': cannot read")


def test_unreadable_key_file(confdir: Path) -> None:
    (confdir / "certs" / "dir.pem").mkdir()
    msg = error_of(confdir, variant('key = "certs/key.pem"', 'key = "certs/dir.pem"'))
    assert msg.startswith(f"{LST}: key 'key': cannot read")


def test_key_that_does_not_match_the_cert(confdir: Path) -> None:
    msg = error_of(confdir, variant('key = "certs/key.pem"', 'key = "other/key.pem"'))
    assert msg.startswith(f"{LST}: key 'key'")
    assert "does not match" in msg


def test_ca_key_is_not_the_leaf_key(confdir: Path) -> None:
    # cert.pem is leaf then CA: the key must match the first (leaf) certificate.
    msg = error_of(confdir, variant('key = "certs/key.pem"', 'key = "certs/ca-key.pem"'))
    assert "does not match" in msg


def test_mismatch_in_a_listener_override_names_that_listener(confdir: Path) -> None:
    text = GOOD + listener_toml(
        "second", "127.0.0.1:2000", tls='{ cert = "other/cert.pem", key = "certs/key.pem" }'
    )
    msg = error_of(confdir, text)
    assert msg.startswith("listeners[1] \"second\": key 'key'")
    assert "does not match" in msg


GARBAGE_PEM = "-----BEGIN CERTIFICATE-----\nthis is not base64 !!\n-----END CERTIFICATE-----\n"
GARBAGE_KEY = "-----BEGIN PRIVATE KEY-----\nthis is not base64 !!\n-----END PRIVATE KEY-----\n"


@pytest.mark.parametrize("content", [GARBAGE_PEM, "hello\n", ""])
def test_garbage_cert_file(confdir: Path, content: str) -> None:
    (confdir / "certs" / "bad.pem").write_text(content)
    msg = error_of(confdir, variant('cert = "certs/cert.pem"', 'cert = "certs/bad.pem"'))
    assert msg.startswith(f"{LST}: key 'cert'")
    assert "no PEM certificate" in msg


@pytest.mark.parametrize("content", [GARBAGE_KEY, "hello\n", ""])
def test_garbage_key_file(confdir: Path, content: str) -> None:
    (confdir / "certs" / "bad.pem").write_text(content)
    msg = error_of(confdir, variant('key = "certs/key.pem"', 'key = "certs/bad.pem"'))
    assert msg.startswith(f"{LST}: key 'key'")
    assert "not an unencrypted PEM private key" in msg


def test_cert_and_key_swapped(confdir: Path) -> None:
    text = variant(
        'cert = "certs/cert.pem"\nkey = "certs/key.pem"', 'cert = "certs/key.pem"\nkey = "certs/cert.pem"'
    )
    msg = error_of(confdir, text)
    assert msg.startswith(f"{LST}: key 'cert'")


def test_encrypted_key_is_refused(confdir: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key((confdir / "certs" / "key.pem").read_bytes(), None)
    (confdir / "certs" / "enc.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    msg = error_of(confdir, variant('key = "certs/key.pem"', 'key = "certs/enc.pem"'))
    assert msg.startswith(f"{LST}: key 'key'")
    assert "unencrypted" in msg


# ---------------------------------------------------------------- errors: uniqueness


def test_duplicate_names(confdir: Path) -> None:
    msg = error_of(confdir, GOOD + listener_toml("submission", "127.0.0.1:2000"))
    assert msg.startswith("listeners[1] \"submission\": key 'name'")
    assert "listeners[0]" in msg


@pytest.mark.parametrize(
    "first, second",
    [
        ("127.0.0.1:2525", "127.0.0.1:2525"),  # same host:port
        ("0.0.0.0:2525", "127.0.0.1:2525"),  # the wildcard covers every address
        ("127.0.0.1:2525", "0.0.0.0:2525"),
        ("[::]:2525", "127.0.0.1:2525"),
        ("0.0.0.0:2525", "[::1]:2525"),
        ("[::1]:2525", "[::1]:2525"),
    ],
)
def test_duplicate_listen_addresses(confdir: Path, first: str, second: str) -> None:
    text = variant('listen = "0.0.0.0:587"', f'listen = "{first}"') + listener_toml("second", second)
    msg = error_of(confdir, text)
    assert msg.startswith("listeners[1] \"second\": key 'listen'")
    assert '"submission"' in msg


def test_duplicate_listen_is_found_beyond_neighbours(confdir: Path) -> None:
    text = (
        GOOD
        + listener_toml("b", "127.0.0.1:2000")
        + listener_toml("c", "127.0.0.1:2001")
        + listener_toml("d", "127.0.0.1:587")  # clashes with listeners[0] (0.0.0.0:587)
    )
    msg = error_of(confdir, text)
    assert msg.startswith("listeners[3] \"d\": key 'listen'")
    assert '"submission"' in msg


# ---------------------------------------------------------------- conf/example.toml


@pytest.fixture
def example(tmp_path: Path, pki: Path) -> Path:
    """conf/example.toml copied next to generated certs at the paths it names."""
    path = tmp_path / "example.toml"
    shutil.copy(EXAMPLE, path)
    shutil.copytree(pki / "main", tmp_path / "certs")
    return path


def test_example_config_parses(example: Path) -> None:
    config = load(example)
    by_name = {lst.name: lst for lst in config.listeners}
    by_port = {lst.listen.port: lst for lst in config.listeners}

    assert config.metrics.listen is not None
    assert not config.metrics.listen.is_wildcard  # metrics are not for the public
    assert {(lst.protocol, lst.mode) for lst in config.listeners} == {
        ("smtp", "starttls"), ("smtp", "implicit"), ("imap", "starttls"), ("imap", "implicit"),
        ("pop3", "starttls"), ("pop3", "implicit"), ("tcp", "implicit"),
    }
    expected = {
        587: ("smtp", "starttls", True),
        465: ("smtp", "implicit", False),
        25: ("smtp", "starttls", False),
        143: ("imap", "starttls", True),
        993: ("imap", "implicit", False),
        110: ("pop3", "starttls", True),
        995: ("pop3", "implicit", False),
    }
    for port, (protocol, mode, require) in expected.items():
        lst = by_port[port]
        assert (lst.protocol, lst.mode, lst.require_tls) == (protocol, mode, require), port
    # RFC 3207 §4: a publicly-referenced MX must not require TLS.
    assert by_port[25].require_tls is False
    for lst in config.listeners:
        assert lst.tls.cert == (example.parent / "certs" / "cert.pem").resolve()
        assert lst.tls.key == (example.parent / "certs" / "key.pem").resolve()
    assert "ldaps" in by_name and by_name["ldaps"].tls.min_version == "1.3"


def test_example_config_documents_every_key() -> None:
    """Each key starts a comment line of its own ("# key: ..." or "#   key  ...")."""
    text = EXAMPLE.read_text(encoding="utf-8")
    comment_lines = [line.lstrip("#").strip() for line in text.splitlines() if line.startswith("#")]
    comments = "\n".join(comment_lines)
    keys = (
        {"name", "protocol", "mode", "listen", "backend", "require_tls", "tls", "shutdown_grace"}
        | set(Limits.__dataclass_fields__)
        | set(TlsSettings.__dataclass_fields__)
    )
    for key in sorted(keys):
        assert any(
            line.startswith((f"{key}:", f"{key} ", f"{key},")) for line in comment_lines
        ), f"{key} is not documented in conf/example.toml"
    for default in ("Default: 30", "Default: 10", "Default: 300", "Default: 8192", "Default: 1000",
                    'Default: "1.2"', "Default: false", "RFC 3207"):
        assert default in comments, default
