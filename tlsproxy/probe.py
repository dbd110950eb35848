"""``tlsproxy probe``: a mail server's STARTTLS and TLS, checked from the client side.

Each check has a connection of its own (``--tls`` skips step 1 and reads the
protocol from the greeting):

1. plaintext: capabilities, then login attempts refused by design with no real
   credentials: SMTP ``MAIL FROM:<>`` and ``AUTH PLAIN`` cancelled with
   ``*``; IMAP ``LOGIN probe probe``; POP3 ``USER probe`` (never ``PASS``);
2. STARTTLS, TLS unverified: version, cipher, certificate, capabilities again;
3. TLS verified (system store or ``--cafile``) for ``--servername``;
4. TLS 1.0, then 1.1, alone at SECLEVEL=0, if the local OpenSSL can offer them.

Output keys (``--json``) and exit codes: docs/operations.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import itertools
import json
import ssl
import sys
import warnings
from pathlib import Path

import trio
from cryptography import x509

from .config import ConfigError, parse_address

EXIT_OK, EXIT_PROBLEMS, EXIT_UNPROBED = 0, 1, 2
EXPIRY_WARNING_DAYS = 14
MAX_LINE = 65536
STARTTLS_WORD = {"smtp": "STARTTLS", "imap": "STARTTLS", "pop3": "STLS"}
OLD_VERSIONS = {"TLSv1": ssl.TLSVersion.TLSv1, "TLSv1.1": ssl.TLSVersion.TLSv1_1}


class ProbeError(Exception):
    """The server could not be probed at all (exit 2)."""


class TlsFailed(Exception):
    """No TLS session: the handshake failed."""


class StartTlsRefused(TlsFailed):
    """The server answered STARTTLS/STLS with an error."""


class _Wire:
    """Line-oriented client over a trio stream, upgradable to TLS."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buf = bytearray()
        self.tags = itertools.count(1)

    async def line(self) -> str:
        while (i := self.buf.find(b"\r\n")) < 0:
            if len(self.buf) > MAX_LINE:
                raise ProbeError("reply line too long")
            data = await self.stream.receive_some(MAX_LINE)  # BrokenResourceError: see run()
            if not data:
                raise ProbeError(f"connection closed by the server (after {bytes(self.buf)[:80]!r})")
            self.buf += data
        text = self.buf[:i].decode("utf-8", "replace")
        del self.buf[: i + 2]
        return text

    async def command(self, proto: str, text: str, multi: bool = False) -> list[str]:
        """Send one command, return its complete reply (IMAP: up to the tagged line)."""
        tag = f"p{next(self.tags)}" if proto == "imap" else None
        await self.stream.send_all((f"{tag} {text}" if tag else text).encode() + b"\r\n")
        lines = [await self.line()]
        while (
            (proto == "smtp" and lines[-1][3:4] == "-")
            or (tag and not lines[-1].startswith(tag + " "))
            or (multi and lines[0].startswith("+OK") and lines[-1] != ".")
        ):
            lines.append(await self.line())
        return lines

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


def _reason(exc: BaseException) -> str:
    """The readable part of a (trio-wrapped) ssl or socket error."""
    cause = exc.__cause__ or exc
    if isinstance(cause, ssl.SSLCertVerificationError):
        return cause.verify_message
    text = str(cause) or type(cause).__name__
    return text.split(" (_ssl.c:")[0]


@contextlib.contextmanager
def _deadline(seconds: float, what: str):
    try:
        with trio.fail_after(seconds):
            yield
    except trio.TooSlowError:
        raise ProbeError(f"{what}: no answer within {seconds:g} s") from None


async def _connect(opts: argparse.Namespace) -> _Wire:
    try:
        return _Wire(await trio.open_tcp_stream(opts.target.host, opts.target.port))
    except OSError as exc:
        raise ProbeError(f"cannot connect to {opts.target}: {exc.strerror or exc}") from None


async def _greeting(w: _Wire) -> tuple[str | None, str]:
    """Read the greeting; return the protocol it belongs to, and its last line."""
    line = await w.line()
    while line.startswith("220-"):
        line = await w.line()
    kinds = (("220", "smtp"), ("* OK", "imap"), ("* PREAUTH", "imap"), ("+OK", "pop3"))
    return next((proto for prefix, proto in kinds if line.startswith(prefix)), None), line


async def _capabilities(w: _Wire, proto: str) -> set[str]:
    if proto == "smtp":
        lines = await w.command(proto, "EHLO tlsproxy-probe")
        if lines[-1].startswith("250"):
            return {ln[4:].split(" ")[0].upper() for ln in lines[1:] if ln[4:]}
        await w.command(proto, "HELO tlsproxy-probe")  # an RFC 821 server: no extensions
        return set()
    if proto == "imap":
        lines = await w.command(proto, "CAPABILITY")
        return {c.upper() for ln in lines if ln.upper().startswith("* CAPABILITY ") for c in ln.split()[2:]}
    lines = await w.command(proto, "CAPA", multi=True)
    return {ln.split(" ")[0].upper() for ln in lines[1:-1]} if lines[0].startswith("+OK") else set()


async def _plaintext(opts: argparse.Namespace, w: _Wire) -> set[str]:
    proto, line = await _greeting(w)
    if proto != opts.starttls:
        raise ProbeError(f"{opts.starttls} greeting expected, got {line[:200]!r}")
    return await _capabilities(w, proto)


async def _open_tls(opts: argparse.Namespace, ctx: ssl.SSLContext) -> _Wire:
    """Connect, do the STARTTLS exchange if asked, handshake. Raises TlsFailed."""
    w = await _connect(opts)
    try:
        if opts.starttls:
            await _plaintext(opts, w)
            reply = (await w.command(opts.starttls, STARTTLS_WORD[opts.starttls]))[-1]
            if not (reply.startswith(("220", "+OK")) or reply.split(" ")[1:2] == ["OK"]):
                raise StartTlsRefused(f"{STARTTLS_WORD[opts.starttls]} refused: {reply}")
        w.stream = trio.SSLStream(w.stream, ctx, server_hostname=opts.servername)
        try:
            await w.stream.do_handshake()
        except trio.BrokenResourceError as exc:
            raise TlsFailed(f"TLS handshake failed: {_reason(exc)}") from None
    except BaseException:
        await w.aclose()
        raise
    return w


async def _login_probe(opts: argparse.Namespace, w: _Wire, caps: set[str]) -> dict:
    """Login attempts refused by design: no real credentials are ever sent."""
    proto, tried, mail = opts.starttls, [], None

    async def attempt(text: str) -> str:
        reply = (await w.command(proto, text))[-1]
        tried.append(f"{text} -> {reply}")
        return reply.split(" ", 1)[-1].upper() if proto == "imap" else reply  # IMAP: without the tag

    if proto == "smtp":
        advertised = "AUTH" in caps
        mail = (await attempt("MAIL FROM:<>")).startswith("2")  # 530: TLS required
        if mail:
            await w.command(proto, "RSET")
        reply = await attempt("AUTH PLAIN")
        accepted = reply.startswith(("334", "235"))
        if reply.startswith("334"):
            await attempt("*")  # RFC 4954 §4: cancels the exchange
    elif proto == "imap":
        advertised = any(c.startswith("AUTH=") for c in caps) or "LOGINDISABLED" not in caps
        reply = await attempt("LOGIN probe probe")
        # NO [PRIVACYREQUIRED] or BAD: refused for lack of TLS; any other NO
        # (e.g. [AUTHENTICATIONFAILED]) means the credentials were checked.
        accepted = reply.startswith("OK") or (reply.startswith("NO") and "PRIVACYREQUIRED" not in reply)
    else:
        advertised = "USER" in caps or "SASL" in caps
        accepted = (await attempt("USER probe")).startswith("+OK")  # PASS is never sent
    return {"advertised": advertised, "accepted": accepted, "mail_accepted": mail, "tried": tried}


def _cert_facts(der: bytes) -> dict:
    cert = x509.load_der_x509_certificate(der)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = san.get_values_for_type(x509.DNSName)
        names += [str(a) for a in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        names = []
    not_after = cert.not_valid_after_utc
    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "san": names,
        "not_after": not_after.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "days_left": (not_after - dt.datetime.now(dt.UTC)).days,
    }


def _old_context(version: ssl.TLSVersion) -> ssl.SSLContext | str:
    """A client context offering ``version`` alone, or why there is none here."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
            ctx.set_ciphers("ALL:@SECLEVEL=0")
            ctx.minimum_version = ctx.maximum_version = version
    except (ValueError, ssl.SSLError) as exc:
        return f"the local ssl library refuses this version ({exc})"
    # Does the local OpenSSL really send such a ClientHello? (bytes 9-10: client_version)
    outgoing = ssl.MemoryBIO()
    try:
        ctx.wrap_bio(ssl.MemoryBIO(), outgoing).do_handshake()
    except ssl.SSLWantReadError:
        pass
    except ssl.SSLError as exc:
        return f"the local OpenSSL cannot offer it ({_reason(exc)})"
    if outgoing.read()[9:11] != version.value.to_bytes(2, "big"):
        return "the local OpenSSL did not offer it"
    return ctx


async def probe(opts: argparse.Namespace) -> dict:
    """Run every check; raises ProbeError when the server cannot be probed."""
    opts.servername = opts.servername or opts.target.host
    f: dict = {
        "target": str(opts.target), "servername": opts.servername,
        "mode": "starttls" if opts.starttls else "implicit", "protocol": opts.starttls,
        "starttls_offered": None, "starttls_accepted": None, "credentials_before_tls": None,
        "tls": None, "certificate": None, "chain": None,
        "old_versions": {name: {"result": "not tested", "detail": "no TLS session"} for name in OLD_VERSIONS},
        "starttls_after_tls": None,
    }
    problems: list[str] = []
    if opts.starttls:
        with _deadline(opts.timeout, "plaintext session"):
            w = await _connect(opts)
            try:
                caps = await _plaintext(opts, w)
                f["starttls_offered"] = STARTTLS_WORD[opts.starttls] in caps
                f["credentials_before_tls"] = await _login_probe(opts, w, caps)
            finally:
                await w.aclose()

    unverified = ssl.create_default_context()
    unverified.check_hostname, unverified.verify_mode = False, ssl.CERT_NONE
    try:
        with _deadline(opts.timeout, "TLS session"):
            w = await _open_tls(opts, unverified)
            try:
                f["starttls_accepted"] = True if opts.starttls else None
                f["tls"] = {"version": w.stream.version(), "cipher": w.stream.cipher()[0]}
                f["certificate"] = _cert_facts(w.stream.getpeercert(binary_form=True))
                proto = opts.starttls
                if not proto:
                    with trio.move_on_after(min(5.0, opts.timeout / 2)):
                        proto = f["protocol"] = (await _greeting(w))[0]
                if proto:
                    f["starttls_after_tls"] = STARTTLS_WORD[proto] in await _capabilities(w, proto)
            finally:
                await w.aclose()
    except TlsFailed as exc:
        f["starttls_accepted"] = not isinstance(exc, StartTlsRefused) if opts.starttls else None
        problems.append(str(exc))

    if f["tls"]:
        verified = ssl.create_default_context(cafile=opts.cafile)
        f["chain"] = {"valid": True, "error": None, "trust": opts.cafile or "system store"}
        try:
            with _deadline(opts.timeout, "verified TLS session"):
                await (await _open_tls(opts, verified)).aclose()
        except TlsFailed as exc:
            f["chain"].update(valid=False, error=str(exc).removeprefix("TLS handshake failed: "))
    if f["starttls_accepted"] is not False:  # even if a modern handshake failed
        for name, version in OLD_VERSIONS.items():
            ctx = _old_context(version)
            if isinstance(ctx, str):
                f["old_versions"][name] = {"result": "not testable", "detail": ctx}
                continue
            try:
                with _deadline(opts.timeout, f"{name} handshake"):
                    w = await _open_tls(opts, ctx)
                    result = {"result": "accepted", "detail": f"negotiated {w.stream.version()}"}
                    await w.aclose()
            except (TlsFailed, ProbeError, trio.BrokenResourceError) as exc:
                result = {"result": "refused", "detail": _reason(exc)}
            f["old_versions"][name] = result

    f["problems"] = problems + _problems(f, opts.starttls)
    f["ok"] = not f["problems"]
    return f


def _problems(f: dict, proto: str | None) -> list[str]:
    out = []
    if proto:
        word = STARTTLS_WORD[proto]
        if not f["starttls_offered"]:
            out.append(f"{word} is not offered before TLS")
        creds = f["credentials_before_tls"]
        if creds["advertised"]:
            out.append("login is advertised before TLS (credentials could be sent in plaintext)")
        if creds["accepted"]:
            tried = "; ".join(t for t in creds["tried"] if not t.startswith("MAIL"))
            out.append(f"login is accepted before TLS: {tried}")
    if f["chain"] and not f["chain"]["valid"]:
        out.append(f"certificate chain is not valid for {f['servername']}: {f['chain']['error']}")
    cert = f["certificate"]
    if cert and cert["days_left"] < EXPIRY_WARNING_DAYS:
        out.append(f"certificate expires in {cert['days_left']} days ({cert['not_after']})")
    out += [f"{name} is accepted" for name, r in f["old_versions"].items() if r["result"] == "accepted"]
    if f["starttls_after_tls"]:
        out.append(f"{STARTTLS_WORD[f['protocol']]} is still offered after TLS")
    return out


def render(f: dict) -> str:
    """Human-readable report, one ``key: value`` per line."""

    def yn(value) -> str:
        return "unknown" if value is None else str(bool(value)).lower()

    lines = [f"target: {f['target']} ({f['protocol'] or 'unknown protocol'}, {f['mode']} TLS)"]
    if f["mode"] == "starttls":
        creds = f["credentials_before_tls"]
        lines += [f"starttls offered: {yn(f['starttls_offered'])}",
                  f"starttls accepted: {yn(f['starttls_accepted'])}",
                  f"login advertised before tls: {yn(creds['advertised'])}",
                  f"login accepted before tls: {yn(creds['accepted'])}"]
        if creds["mail_accepted"] is not None:
            mail = yn(creds["mail_accepted"])
            lines.append(f"mail accepted before tls: {mail} (fine on a port-25 MX only)")
        lines += [f"  tried: {t}" for t in creds["tried"]]
    if f["tls"]:
        lines.append(f"tls: {f['tls']['version']} {f['tls']['cipher']}")
    if cert := f["certificate"]:
        lines += [f"certificate subject: {cert['subject']}", f"certificate issuer: {cert['issuer']}",
                  f"certificate san: {', '.join(cert['san']) or '(none)'}",
                  f"certificate not after: {cert['not_after']} ({cert['days_left']} days left)"]
    if chain := f["chain"]:
        state = "valid" if chain["valid"] else f"INVALID: {chain['error']}"
        lines.append(f"chain for {f['servername']}: {state} (trust: {chain['trust']})")
    lines += [f"{name}: {r['result']} ({r['detail']})" for name, r in f["old_versions"].items()]
    lines.append(f"starttls after tls: {yn(f['starttls_after_tls'])}")
    lines += ["result: OK"] if f["ok"] else ["result: PROBLEMS"] + [f"  - {p}" for p in f["problems"]]
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    def target(text: str):
        try:
            return parse_address(text, "HOST:PORT")
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    def existing(text: str) -> str:
        if not Path(text).is_file():
            raise argparse.ArgumentTypeError(f"{text}: no such file")
        return text

    def seconds(text: str) -> float:
        if not float(text) > 0:  # ValueError: argparse's "invalid seconds value"
            raise ValueError(text)
        return float(text)

    p.add_argument("target", type=target, metavar="HOST:PORT")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--starttls", choices=sorted(STARTTLS_WORD), help="plaintext first, then STARTTLS/STLS")
    how.add_argument("--tls", action="store_true", help="implicit TLS from the first byte")
    p.add_argument("--servername", help="name to send (SNI) and verify the certificate for; default: HOST")
    p.add_argument("--cafile", type=existing, help="trust these CA certificates, not the system store")
    p.add_argument("--json", action="store_true", help="print one JSON object (keys: docs/operations.md)")
    p.add_argument("--timeout", type=seconds, default=10.0, help="seconds per connection (default 10)")


def run(opts: argparse.Namespace) -> int:
    try:
        facts = trio.run(probe, opts)
    except (ProbeError, ssl.SSLError, trio.BrokenResourceError) as exc:
        broken = isinstance(exc, trio.BrokenResourceError)
        error = f"connection broken: {_reason(exc)}" if broken else str(exc)
        print(f"tlsproxy probe: {opts.target}: {error}", file=sys.stderr)
        if opts.json:
            print(json.dumps({"target": str(opts.target), "error": error, "ok": False}))
        return EXIT_UNPROBED
    print(json.dumps(facts, indent=2) if opts.json else render(facts))
    return EXIT_OK if facts["ok"] else EXIT_PROBLEMS
