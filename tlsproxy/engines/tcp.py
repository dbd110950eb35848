"""The trivial engine for protocol ``tcp``: TLS offload of any TCP service.
Nothing is ever rewritten, so the session goes raw from the first byte."""

from __future__ import annotations

from .base import Action, Close, EnginePolicy, Passthrough


class TcpEngine:
    def __init__(self, policy: EnginePolicy) -> None:
        self._policy = policy
        self._closed = False

    def start(self, tls: bool) -> list[Action]:
        return [Passthrough()]

    def client_bytes(self, data: bytes) -> list[Action]:  # never called after Passthrough
        return []

    def backend_bytes(self, data: bytes) -> list[Action]:
        return []

    def tls_started(self) -> list[Action]:
        return []

    def client_closed(self) -> list[Action]:
        return self._close("client_closed")

    def backend_closed(self) -> list[Action]:
        return self._close("backend_closed")

    def abort(self, reason: str) -> list[Action]:
        return self._close(reason)

    def _close(self, reason: str) -> list[Action]:
        # Like every engine: one Close, then silence (a second abort from a
        # shutdown racing a timeout must not close twice).
        if self._closed:
            return []
        self._closed = True
        return [Close(reason)]
