"""Shared fixtures: throwaway certificates, fake backends, a proxy on ephemeral
ports. Everything listens on 127.0.0.1 and is torn down with the test."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, settings

from tlsproxy.certs import GeneratedFiles, generate
from tlsproxy.config import Address, Config, Limits, ListenerConfig, TlsSettings
from tlsproxy.legacy_smtp import LegacySmtpServer
from tlsproxy.server.proxy import Proxy


# No timing assertions: hypothesis's per-example deadline and "too slow" check
# measure the machine's load, not the code's correctness.
settings.register_profile("tlsproxy", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("tlsproxy")


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> GeneratedFiles:
    return generate(tmp_path_factory.mktemp("certs"), ["localhost", "127.0.0.1"])


@pytest.fixture
def client_ctx(certs: GeneratedFiles) -> ssl.SSLContext:
    """What a careful mail client uses: verify the chain and the name."""
    return ssl.create_default_context(cafile=str(certs.ca_cert))


def listener(
    name: str,
    protocol: str,
    mode: str,
    backend_port: int,
    certs: GeneratedFiles,
    require_tls: bool = False,
    **limits: float,
) -> ListenerConfig:
    """A listener on an ephemeral 127.0.0.1 port (see Proxy.listener(name).bound_ports)."""
    return ListenerConfig(
        name=name,
        protocol=protocol,
        mode=mode,
        listen=Address("127.0.0.1", 0),
        backend=Address("127.0.0.1", backend_port),
        require_tls=require_tls,
        tls=TlsSettings(cert=certs.cert, key=certs.key),
        limits=Limits(**limits),  # type: ignore[arg-type]
    )


async def start_proxy(nursery: trio.Nursery, *listeners: ListenerConfig, grace: float = 5.0) -> Proxy:
    proxy = Proxy(Config(listeners=tuple(listeners), shutdown_grace=grace))
    await nursery.start(proxy.run)
    return proxy


def port_of(proxy: Proxy, name: str) -> int:
    return proxy.listener(name).bound_ports[0]


def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens (bound, then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
async def smtp_backend(nursery: trio.Nursery) -> LegacySmtpServer:
    server = LegacySmtpServer()
    await nursery.start(server.serve)
    return server


def sample(metric, **labels) -> float:
    """Current value of one labelled child of a prometheus_client metric."""
    return metric.labels(**labels)._value.get()  # noqa: SLF001


@pytest.fixture
def data_dir() -> Path:
    return Path(__file__).parent / "data"
