"""tlsproxy: a STARTTLS-aware TLS offloader for legacy plaintext mail servers."""

__version__ = "0.1.0"
