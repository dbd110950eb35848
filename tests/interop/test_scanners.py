"""TLS scanners against the proxy in front of the real servers: testssl.sh
and sslyze, each against the STARTTLS and the implicit-TLS listener of every
protocol (six targets), judged from their JSON output, not exit codes.

The suite fails if a scan
* finds SSLv2, SSLv3, TLS 1.0 or TLS 1.1 offered;
* finds a cipher suite offered without forward secrecy, or a non-AEAD one
  (CBC and the rest);
* (testssl) reports any finding with a severity (LOW and up, or WARN: a
  check that could not run) or a finding text saying VULNERABLE;
* (sslyze) reports a vulnerability, or the target is not compliant with
  Mozilla's "intermediate" configuration;
* did not complete, so that a broken scan cannot pass.

The certificate is the suite's own, from a private CA (certs.ca_cert): both
scanners are given that CA (testssl --add-ca, sslyze --certinfo_ca_file), so
chain-of-trust checks pass for the right reason and are not ignored; sslyze's
Mozilla check includes path validation, which succeeds only against the
supplied CA (asserted below). testssl's certificate section (-S) is not run:
its findings are about the test certificate, not the proxy (no OCSP/CRL URI
in a private test CA's leaf, no DNS CAA record for 127.0.0.1); sslyze's
certificate checks cover what the proxy controls (the chain it sends).

Scanners are slow: testssl runs only the protocol (-p), per-cipher (-e, with
its own sockets, so ciphers the local OpenSSL lacks are tried too) and
vulnerability (-U) checks, and the six targets of a scanner run
concurrently.
"""

from __future__ import annotations

import json
import re
import sys

import trio

from .clients import describe, run

TARGETS = [
    ("smtp-starttls", "smtp"),
    ("imap-starttls", "imap"),
    ("pop3-starttls", "pop3"),
    ("smtp-implicit", None),
    ("imap-implicit", None),
    ("pop3-implicit", None),
]
SCAN_TIMEOUT = 480.0
OLD_PROTOCOLS_TESTSSL = ("SSLv2", "SSLv3", "TLS1", "TLS1_1")
TESTSSL_VULNERABILITY_IDS = {
    "heartbleed",
    "CCS",
    "ROBOT",
    "secure_renego",
    "secure_client_renego",
    "CRIME_TLS",
    "POODLE_SSL",
    "fallback_SCSV",
    "SWEET32",
    "FREAK",
    "DROWN",
    "LOGJAM",
    "BEAST",
    "LUCKY13",
    "RC4",
}
BAD_SEVERITIES = {"LOW", "MEDIUM", "HIGH", "CRITICAL", "WARN", "FATAL"}


def aead(encryption: str) -> bool:
    encryption = encryption.upper()  # testssl writes "AESGCM", "ChaCha20"
    return "GCM" in encryption or "CHACHA20" in encryption or "CCM" in encryption


def problems_in_testssl(findings: list[dict]) -> list[str]:
    problems = []
    by_id = {f["id"]: f for f in findings}
    for f in findings:
        if f.get("severity") in BAD_SEVERITIES or "VULNERABLE" in f.get("finding", ""):
            problems.append(f"{f['id']}: {f.get('severity')} {f.get('finding')}")
    for proto in OLD_PROTOCOLS_TESTSSL:
        finding = by_id.get(proto, {}).get("finding", "missing")
        if not finding.startswith("not offered"):
            problems.append(f"{proto}: {finding}")
    if not by_id.get("TLS1_2", {}).get("finding", "").startswith("offered"):
        problems.append(f"TLS1_2 not found offered: {by_id.get('TLS1_2')}")
    ciphers = [f["finding"] for f in findings if f["id"].startswith("cipher_x")]
    if not ciphers:
        problems.append("no cipher found offered: the per-cipher scan did not run")
    for line in ciphers:
        # "xc02c  ECDHE-ECDSA-AES256-GCM-SHA384  ECDH 253  AESGCM  256  TLS_ECDHE_..."
        words = line.split()
        kx = words[2]
        encryption = words[4] if words[3].isdigit() else words[3]
        if kx not in ("ECDH", "DH"):
            problems.append(f"cipher without forward secrecy: {line}")
        if re.search(r"\bA(?:EC)?DH-|_anon_", line):
            problems.append(f"anonymous cipher: {line}")
        if not aead(encryption) or "CBC" in line:
            problems.append(f"non-AEAD (CBC) cipher: {line}")
    missing = TESTSSL_VULNERABILITY_IDS - by_id.keys()
    if missing:
        problems.append(f"vulnerability checks missing from the scan: {sorted(missing)}")
    if "scanProblem" in by_id:
        problems.append(f"scanProblem: {by_id['scanProblem']}")
    return problems


async def test_testssl_finds_no_weakness_on_any_listener(interop_proxy, postfix, certs, tmp_path):
    reports: dict[str, list[str]] = {}

    async def scan(
        name: str, starttls: str | None, port: int | None = None, checks=("-p", "-e", "-U")
    ) -> None:
        out = tmp_path / f"{name}.json"
        result = await run(
            [
                "testssl",
                "--quiet",
                "--color",
                "0",
                "--warnings",
                "batch",
                "--add-ca",
                str(certs.ca_cert),
                "--connect-timeout",
                "10",
                "--openssl-timeout",
                "10",
                "--jsonfile",
                str(out),
                *(["--starttls", starttls] if starttls else []),
                *checks,
                f"127.0.0.1:{port or interop_proxy.port(name)}",
            ],
            timeout=SCAN_TIMEOUT,
        )
        if not out.exists():
            reports[name] = [f"no JSON written: {describe(result)}"]
            return
        reports[name] = problems_in_testssl(json.loads(out.read_text()))

    async with trio.open_nursery() as nursery:
        for name, starttls in TARGETS:
            nursery.start_soon(scan, name, starttls)
        # Control: Postfix's own STARTTLS (Debian's default cipher list, an
        # RSA certificate) offers TLS 1.0 and CBC, RSA-key-exchange and
        # anonymous suites, and the judge says so. Only the AES128-SHA family
        # is tried there (-x), to keep the control quick.
        nursery.start_soon(scan, CONTROL, "smtp", postfix.tls_port, ("-p", "-x", "AES128-SHA"))
    assert_control_flagged(reports.pop(CONTROL))
    bad = {name: problems for name, problems in reports.items() if problems}
    assert len(reports) == len(TARGETS) and not bad, json.dumps(bad, indent=1)


CONTROL = "control: Postfix's own STARTTLS, no proxy"


def assert_control_flagged(problems: list[str]) -> None:
    for kind in ("non-AEAD (CBC) cipher", "cipher without forward secrecy", "anonymous cipher"):
        assert any(p.startswith(kind) for p in problems), (kind, problems)
    assert any(p.startswith(("TLS1:", "tls_1_0")) for p in problems), problems  # TLS 1.0 offered


# ---------------------------------------------------------------- sslyze

SSLYZE_OLD = (
    "ssl_2_0_cipher_suites",
    "ssl_3_0_cipher_suites",
    "tls_1_0_cipher_suites",
    "tls_1_1_cipher_suites",
)


def problems_in_sslyze(result: dict) -> list[str]:
    if result["scan_status"] != "COMPLETED" or result["connectivity_status"] != "COMPLETED":
        return [f"scan not completed: {result.get('connectivity_error_trace')}"]
    r = result["scan_result"]
    problems = [
        f"{name}: {attempt['status']} {attempt.get('error_reason')}"
        for name, attempt in r.items()
        if attempt["status"] != "COMPLETED" and attempt["status"] != "NOT_SCHEDULED"
    ]
    if problems:
        return problems
    for name in SSLYZE_OLD:
        accepted = r[name]["result"]["accepted_cipher_suites"]
        if accepted:
            problems.append(f"{name}: {[c['cipher_suite']['name'] for c in accepted]}")
    offered = []
    for name in ("tls_1_2_cipher_suites", "tls_1_3_cipher_suites"):
        offered += r[name]["result"]["accepted_cipher_suites"]
    if not offered:
        problems.append("no cipher suite accepted")
    for c in offered:
        suite = c["cipher_suite"]["name"]
        if (
            c.get("ephemeral_key") is None
            and not suite.startswith("TLS_AES")
            and not suite.startswith("TLS_CHACHA20")
        ):
            problems.append(f"cipher without forward secrecy: {suite}")
        if not aead(suite) or "CBC" in suite:
            problems.append(f"non-AEAD (CBC) cipher: {suite}")
        if c["cipher_suite"]["is_anonymous"]:
            problems.append(f"anonymous cipher: {suite}")
    checks = {
        "heartbleed": r["heartbleed"]["result"]["is_vulnerable_to_heartbleed"],
        "openssl_ccs_injection": r["openssl_ccs_injection"]["result"]["is_vulnerable_to_ccs_injection"],
        "robot": r["robot"]["result"]["robot_result"]
        not in ("NOT_VULNERABLE_NO_ORACLE", "NOT_VULNERABLE_RSA_NOT_SUPPORTED"),
        "tls_compression": r["tls_compression"]["result"]["supports_compression"],
        "tls_fallback_scsv": not r["tls_fallback_scsv"]["result"]["supports_fallback_scsv"],
        "insecure renegotiation": not r["session_renegotiation"]["result"]["supports_secure_renegotiation"],
        "client renegotiation DoS": r["session_renegotiation"]["result"][
            "is_vulnerable_to_client_renegotiation_dos"
        ],
    }
    problems += [name for name, vulnerable in checks.items() if vulnerable]
    deployment = r["certificate_info"]["result"]["certificate_deployments"][0]
    trusted_by = [
        p["trust_store"]["name"]
        for p in deployment["path_validation_results"]
        if p["was_validation_successful"]
    ]
    if trusted_by != ["Supplied CA file"]:
        problems.append(f"certificate trusted by {trusted_by}, expected the suite's CA only")
    return problems


async def test_sslyze_mozilla_intermediate_compliant_on_every_listener(
    interop_proxy, postfix, certs, tmp_path
):
    reports: dict[str, list[str]] = {}

    async def scan(starttls: str | None, names: list[str]) -> None:
        out = tmp_path / f"sslyze-{starttls or 'implicit'}-{len(reports)}.json"
        targets = [f"127.0.0.1:{postfix.tls_port if n == CONTROL else interop_proxy.port(n)}" for n in names]
        result = await run(
            [
                sys.executable,
                "-m",
                "sslyze",
                "--mozilla_config=intermediate",
                "--certinfo_ca_file",
                str(certs.ca_cert),
                "--json_out",
                str(out),
                *(["--starttls", starttls] if starttls else []),
                *targets,
            ],
            timeout=SCAN_TIMEOUT,
        )
        stdout = result.stdout.decode(errors="replace")
        if not out.exists():
            for name in names:
                reports[name] = [f"no JSON written: {describe(result)}"]
            return
        by_target = {
            f"{s['server_location']['ip_address']}:{s['server_location']['port']}": s
            for s in json.loads(out.read_text())["server_scan_results"]
        }
        for name, target in zip(names, targets):
            problems = (
                problems_in_sslyze(by_target[target]) if target in by_target else ["not in the JSON output"]
            )
            # The compliance verdict is printed, not in the JSON.
            if not re.search(rf"^\s*{re.escape(target)}: OK - Compliant\.$", stdout, re.M):
                verdict = re.search(rf"^\s*{re.escape(target)}: .*(?:\n\s+\*.*)*", stdout, re.M)
                problems.append(
                    f"not Mozilla intermediate compliant: {verdict.group(0) if verdict else stdout[-2000:]}"
                )
            reports[name] = problems

    async with trio.open_nursery() as nursery:
        for starttls in ("smtp", "imap", "pop3"):
            nursery.start_soon(scan, starttls, [f"{starttls}-starttls"])
        nursery.start_soon(scan, None, ["smtp-implicit", "imap-implicit", "pop3-implicit"])
        nursery.start_soon(scan, "smtp", [CONTROL])  # see the testssl control
    control = reports.pop(CONTROL)
    assert_control_flagged(control)
    assert any(p.startswith("not Mozilla intermediate compliant") for p in control), control
    bad = {name: problems for name, problems in reports.items() if problems}
    assert len(reports) == len(TARGETS) and not bad, json.dumps(bad, indent=1)
