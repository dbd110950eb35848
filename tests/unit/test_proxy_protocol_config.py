"""Config keys of the PROXY protocol (per listener) and of [logging]: values
land in the dataclasses, and each error names the listener and the key."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from tlsproxy.certs import generate
from tlsproxy.config import ConfigError, LoggingConfig, parse


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("conf")
    generate(directory / "certs", ["localhost"])
    return directory


def config(base_dir: Path, top: dict | None = None, **listener_keys):
    raw = {
        "tls": {"cert": "certs/cert.pem", "key": "certs/key.pem"},
        "listeners": [
            {"name": "smtp", "protocol": "smtp", "mode": "starttls", "listen": "127.0.0.1:2525",
             "backend": "127.0.0.1:25", **listener_keys}
        ],
        **(top or {}),
    }
    return parse(raw, base_dir)


def error(base_dir: Path, top: dict | None = None, **listener_keys) -> str:
    with pytest.raises(ConfigError) as info:
        config(base_dir, top, **listener_keys)
    return str(info.value)


def test_defaults_off(base_dir: Path) -> None:
    c = config(base_dir)
    lst = c.listeners[0]
    assert (lst.proxy_protocol, lst.proxy_trusted_networks, lst.backend_proxy_protocol) == (False, (), None)
    assert c.logging == LoggingConfig(format="text", level="info")


def test_proxy_protocol_keys(base_dir: Path) -> None:
    lst = config(
        base_dir, proxy_protocol=True, proxy_trusted_networks=["10.0.0.0/8", "127.0.0.1/32", "fd00::/8"],
        backend_proxy_protocol="v2",
    ).listeners[0]
    assert lst.proxy_protocol is True
    assert lst.proxy_trusted_networks == (
        ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("fd00::/8"),
    )
    assert lst.backend_proxy_protocol == "v2"


def test_backend_proxy_protocol_alone(base_dir: Path) -> None:
    lst = config(base_dir, backend_proxy_protocol="v1").listeners[0]
    assert (lst.proxy_protocol, lst.backend_proxy_protocol) == (False, "v1")


WHERE = 'listeners[0] "smtp": key'


@pytest.mark.parametrize(
    "keys, expected",
    [
        ({"proxy_protocol": True}, f"{WHERE} 'proxy_trusted_networks': required (non-empty)"),
        ({"proxy_protocol": True, "proxy_trusted_networks": []}, f"{WHERE} 'proxy_trusted_networks': required"),
        ({"proxy_trusted_networks": ["10.0.0.0/8"]}, f"{WHERE} 'proxy_trusted_networks': only used with"),
        ({"proxy_protocol": "yes"}, f"{WHERE} 'proxy_protocol': expected true or false"),
        ({"proxy_protocol": True, "proxy_trusted_networks": "10.0.0.0/8"},
         f"{WHERE} 'proxy_trusted_networks': expected list"),
        ({"proxy_protocol": True, "proxy_trusted_networks": ["10.0.0.1/8"]},
         f"{WHERE} 'proxy_trusted_networks': '10.0.0.1/8' is not a network: 10.0.0.1/8 has host bits set"),
        ({"proxy_protocol": True, "proxy_trusted_networks": ["lb.example"]},
         f"{WHERE} 'proxy_trusted_networks': 'lb.example' is not a network"),
        ({"proxy_protocol": True, "proxy_trusted_networks": [10]},
         f"{WHERE} 'proxy_trusted_networks': 10 is not a network"),
        ({"backend_proxy_protocol": "v3"}, f"{WHERE} 'backend_proxy_protocol': must be one of v1, v2, got 'v3'"),
        ({"backend_proxy_protocol": True}, f"{WHERE} 'backend_proxy_protocol': expected a string"),
        ({"proxy_protocl": True}, "listeners[0] \"smtp\": unknown key 'proxy_protocl'"),
    ],
)
def test_proxy_protocol_errors_name_the_key(base_dir: Path, keys: dict, expected: str) -> None:
    assert error(base_dir, **keys).startswith(expected)


def test_logging_table(base_dir: Path) -> None:
    assert config(base_dir, {"logging": {"format": "json", "level": "debug"}}).logging == LoggingConfig("json", "debug")


@pytest.mark.parametrize(
    "table, expected",
    [
        ({"format": "xml"}, "[logging]: key 'format': must be one of text, json, got 'xml'"),
        ({"level": "INFO"}, "[logging]: key 'level': must be one of debug, info, warning, error, got 'INFO'"),
        ({"colour": True}, "[logging]: unknown key 'colour'"),
    ],
)
def test_logging_errors_name_the_key(base_dir: Path, table: dict, expected: str) -> None:
    assert error(base_dir, {"logging": table}).startswith(expected)
