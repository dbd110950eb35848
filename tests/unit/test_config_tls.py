"""Config keys for SNI certificates, client certificates (mTLS) and the file
watcher: [tls] certificates / client_ca / client_auth / watch_interval and the
same keys in a listener's tls table. Errors name the listener and the key."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tlsproxy.certs import generate
from tlsproxy.config import CertificatePair, ConfigError, load

LISTENER = """
[[listeners]]
name = "smtps"
protocol = "smtp"
mode = "implicit"
listen = "127.0.0.1:465"
backend = "127.0.0.1:25"
"""
LST = 'listeners[0] "smtps"'


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pki")
    generate(root / "default", "mail.example.com")
    generate(root / "org", ["example.org", "*.example.org"])
    generate(root / "net", "mail.example.net")
    generate(root / "clash", "example.org")  # claims a name "org" has
    generate(root / "clients", "client one", usage="client")
    return root


@pytest.fixture
def confdir(tmp_path: Path, pki: Path) -> Path:
    shutil.copytree(pki, tmp_path / "certs")
    return tmp_path


def load_text(confdir: Path, text: str):
    path = confdir / "tlsproxy.toml"
    path.write_text(text, encoding="utf-8")
    return load(path)


def error(confdir: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_text(confdir, text)
    return str(info.value)


DEFAULT_PAIR = '[tls]\ncert = "certs/default/cert.pem"\nkey = "certs/default/key.pem"\n'


def test_defaults_no_sni_no_mtls_watch_every_5s(confdir):
    config = load_text(confdir, DEFAULT_PAIR + LISTENER)
    tls = config.listeners[0].tls
    assert (tls.certificates, tls.client_ca, tls.client_auth) == ((), None, None)
    assert config.tls_watch_interval == 5.0


def test_sni_certificates_in_tls_are_inherited_with_paths_from_the_config_dir(confdir):
    config = load_text(confdir, DEFAULT_PAIR + """
[[tls.certificates]]
cert = "certs/org/cert.pem"
key = "certs/org/key.pem"
[[tls.certificates]]
cert = "certs/net/cert.pem"
key = "certs/net/key.pem"
""" + LISTENER)
    certs = confdir / "certs"
    assert config.listeners[0].tls.certificates == (
        CertificatePair(certs / "org" / "cert.pem", certs / "org" / "key.pem"),
        CertificatePair(certs / "net" / "cert.pem", certs / "net" / "key.pem"),
    )


def test_a_listeners_certificates_replace_the_inherited_list(confdir):
    config = load_text(confdir, DEFAULT_PAIR + """
[[tls.certificates]]
cert = "certs/org/cert.pem"
key = "certs/org/key.pem"
""" + LISTENER + """
[[listeners.tls.certificates]]
cert = "certs/net/cert.pem"
key = "certs/net/key.pem"
""")
    pairs = config.listeners[0].tls.certificates
    assert [p.cert.parent.name for p in pairs] == ["net"]


def test_two_certificates_claiming_one_name_is_an_error(confdir):
    text = DEFAULT_PAIR + """
[[tls.certificates]]
cert = "certs/org/cert.pem"
key = "certs/org/key.pem"
[[tls.certificates]]
cert = "certs/clash/cert.pem"
key = "certs/clash/key.pem"
""" + LISTENER
    assert error(confdir, text) == (
        f"{LST}: tls.certificates[1]: 'example.org' is already served by tls.certificates[0]"
    )


def test_an_sni_pair_that_does_not_match_names_its_index_and_key(confdir):
    text = DEFAULT_PAIR + """
[[tls.certificates]]
cert = "certs/org/cert.pem"
key = "certs/net/key.pem"
""" + LISTENER
    message = error(confdir, text)
    assert message.startswith(f"{LST}: tls.certificates[0]: key 'key': ")
    assert "does not match the certificate" in message


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ('certificates = "certs/org/cert.pem"', "[tls]: key 'certificates': expected an array"),
        ('certificates = [{cert = "certs/org/cert.pem"}]', "[tls].certificates[0]: key 'key': required"),
        (
            'certificates = [{cert = "certs/org/cert.pem", key = "certs/org/key.pem", name = "x"}]',
            "[tls].certificates[0]: unknown key 'name'",
        ),
    ],
)
def test_malformed_certificates_entries(confdir, entry, expected):
    assert error(confdir, DEFAULT_PAIR + entry + "\n" + LISTENER).startswith(expected)


def test_client_ca_defaults_to_required(confdir):
    config = load_text(confdir, DEFAULT_PAIR + LISTENER + 'tls = { client_ca = "certs/clients/ca.pem" }\n')
    tls = config.listeners[0].tls
    assert tls.client_ca == confdir / "certs" / "clients" / "ca.pem"
    assert tls.client_auth == "required"


def test_client_auth_optional(confdir):
    table = 'tls = { client_ca = "certs/clients/ca.pem", client_auth = "optional" }\n'
    text = DEFAULT_PAIR + LISTENER + table
    assert load_text(confdir, text).listeners[0].tls.client_auth == "optional"


@pytest.mark.parametrize(
    ("tls_table", "expected"),
    [
        ('{ client_auth = "required" }', f"{LST}: key 'client_auth': needs client_ca"),
        (
            '{ client_ca = "certs/clients/ca.pem", client_auth = "yes" }',
            f"{LST}.tls: key 'client_auth': must be one of required, optional, got 'yes'",
        ),
        ('{ client_ca = "certs/nowhere.pem" }', f"{LST}: key 'client_ca': cannot read "),
        ('{ client_ca = "certs/default/key.pem" }', f"{LST}: key 'client_ca': "),
    ],
)
def test_client_ca_errors(confdir, tls_table, expected):
    assert error(confdir, DEFAULT_PAIR + LISTENER + f"tls = {tls_table}\n").startswith(expected)


def test_client_ca_without_certificates_names_the_file(confdir):
    message = error(confdir, DEFAULT_PAIR + LISTENER + 'tls = { client_ca = "certs/default/key.pem" }\n')
    assert message.endswith("key.pem holds no PEM certificate")


def test_watch_interval(confdir):
    assert load_text(confdir, DEFAULT_PAIR + "watch_interval = 0.5\n" + LISTENER).tls_watch_interval == 0.5
    assert load_text(confdir, DEFAULT_PAIR + "watch_interval = 0\n" + LISTENER).tls_watch_interval == 0


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("watch_interval = -1", "[tls]: key 'watch_interval': must be at least 0, got -1"),
        ('watch_interval = "5s"', "[tls]: key 'watch_interval': expected a number, got '5s'"),
    ],
)
def test_watch_interval_errors(confdir, line, expected):
    assert error(confdir, DEFAULT_PAIR + line + "\n" + LISTENER) == expected


def test_watch_interval_is_global_not_per_listener(confdir):
    message = error(confdir, DEFAULT_PAIR + LISTENER + "tls = { watch_interval = 1 }\n")
    assert message.startswith(f"{LST}.tls: unknown key 'watch_interval'")
