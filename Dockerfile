# tlsproxy container image (see docs/operations.md).
#
#   docker build -t tlsproxy .
#   docker run --stop-timeout 45 -v /etc/tlsproxy:/etc/tlsproxy:ro \
#       -p 587:587 -p 465:465 tlsproxy
#
# The config is expected at /etc/tlsproxy/tlsproxy.toml (mounted); set
# [metrics] listen = "0.0.0.0:9464" or "127.0.0.1:9464" for the HEALTHCHECK.
# Docker's default stop timeout (10 s) is shorter than shutdown_grace
# (default 30 s): pass --stop-timeout (compose: stop_grace_period) above it.

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A fixed non-root UID/GID, so mounted keys can be made readable to it (0640, group 10001).
RUN groupadd --system --gid 10001 tlsproxy \
    && useradd --system --uid 10001 --gid tlsproxy --no-create-home --shell /usr/sbin/nologin tlsproxy

WORKDIR /src
COPY pyproject.toml README.md ./
COPY tlsproxy ./tlsproxy
RUN pip install --no-cache-dir . && rm -rf /src

WORKDIR /
# Ports below 1024 need no capability: Docker (20.10+) sets
# net.ipv4.ip_unprivileged_port_start=0 in the container's network namespace.
USER 10001:10001

# SMTP (MX, implicit submission, submission), POP3, IMAP, IMAPS, POP3S, metrics.
EXPOSE 25 465 587 110 143 993 995 9464

HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9464/healthz', timeout=4)"]

STOPSIGNAL SIGTERM
ENTRYPOINT ["tlsproxy"]
CMD ["run", "--config", "/etc/tlsproxy/tlsproxy.toml"]
