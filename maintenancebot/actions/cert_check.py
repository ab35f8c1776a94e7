"""The `cert_check` action: days to expiry of certificate files and TLS endpoints, seen from a host.

Owned here: collecting certificates on the host (PEM files and chains, DER files, and the leaf
certificate a TLS endpoint presents to a connection made *from the host*), reading their expiry
with a small DER reader (pure, tested without a network), grading each against `warn_days` and
`critical_days`, and the optional `renew: certbot` that runs `certbot renew --cert-name NAME` when
a certificate is inside the warning window, then checks again. It must not verify trust chains
or hostnames (it measures expiry, not validity), send private keys off the host (the host program
extracts CERTIFICATE blocks only, so a combined cert+key file never leaves it whole), or change
anything during a dry-run.

Why parse DER ourselves: the host program uses only the Python standard library, whose `ssl`
module can hand out a peer certificate's DER (even unverified) but cannot decode one without a
private API; shipping the DER back and reading notAfter/subject here needs no `openssl` binary on
the host and no `cryptography` on the controller.

Readonly with renew: the engine runs a readonly action's `apply` during a dry-run. `apply` honours
`ctx.dry_run`: in a dry-run it only checks and reports `would_renew`; certbot runs in real runs
only. So the class stays `readonly = True` for every argument set.

Reversible: a check changes nothing, so `rollback` is an honest no-op; an engine told "not
reversible" would mark every successful check ROLLBACK_FAILED when a later step fails. After a
real renewal, `rollback` fails plainly: a renewed certificate cannot be un-renewed.

Seams for tests: `certbot:` names the certbot executable on the host (default `certbot`), so a
test installs a fake script; `CertCheckAction(clock=...)` fixes "now" (the controller's clock).
"""

from __future__ import annotations

import base64
import calendar
import math
import re
import shlex
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from maintenancebot.actions import ActionContext, ActionReport, register_action
from maintenancebot.actions._probe import ProbeError, run, run_python, tail
from maintenancebot.models import Duration
from maintenancebot.transports.base import Transport

MAX_FILE_BYTES = 1 << 20  # a certificate bundle is kilobytes; anything larger is not one
LEVELS = ("ok", "warn", "critical", "expired", "error")  # "error": could not be read
# Count keys in the report data; "errors" (not "error") because a failed step's data says what
# went wrong under "error", as every action's does.
_COUNT_KEYS = {"ok": "ok", "warn": "warn", "critical": "critical", "expired": "expired",
               "error": "errors"}
_ALERTING = ("critical", "expired", "errors")
_CERT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]*$")


# ---------------------------------------------------------------------------------- arguments


class Endpoint(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    address: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    sni: str | None = None  # default: the address, unless it is an IP literal

    def label(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        sni = f" (sni {self.sni})" if self.sni and self.sni != self.address else ""
        return f"{host}:{self.port}{sni}"


def _endpoint(value: object) -> object:
    """'host:443', '[::1]:8443' -> {address, port}; mappings pass through to the model."""
    if not isinstance(value, str):
        return value
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"endpoint {value!r} is not host:port")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return {"address": host, "port": int(port)}


def _cert_name(value: str) -> str:
    if not _CERT_NAME.match(value):
        raise ValueError(f"{value!r} is not a certbot certificate name (like example.com)")
    return value


class CertCheckArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    files: tuple[str, ...] = ()  # paths or globs on the host
    endpoints: tuple[Annotated[Endpoint, BeforeValidator(_endpoint)], ...] = ()
    warn_days: int = Field(21, ge=0)
    critical_days: int = Field(7, ge=0)
    connect_timeout: Duration = 10.0
    renew: Literal["certbot"] | None = None
    cert_name: Annotated[str, AfterValidator(_cert_name)] | None = None
    certbot: str = Field("certbot", min_length=1)  # the executable on the host (a test seam)

    @model_validator(mode="after")
    def _consistent(self) -> CertCheckArgs:
        if not self.files and not self.endpoints:
            raise ValueError("give at least one of files or endpoints")
        if self.critical_days > self.warn_days:
            raise ValueError("critical_days must not be larger than warn_days")
        if self.renew and not self.cert_name:
            raise ValueError("renew: certbot needs cert_name (the certbot certificate name)")
        return self


# ---------------------------------------------------------------------------------- host side

# Runs on the host with a JSON request on stdin. Only certificate blocks leave the host.
_COLLECT = r"""
import base64, glob, json, os, re, socket, ssl, sys
req = json.load(sys.stdin)
PEM = re.compile(rb"-----BEGIN CERTIFICATE-----(.+?)-----END CERTIFICATE-----", re.S)
def certs_of(data):
    blocks = [base64.b64decode(b) for b in PEM.findall(data)]
    if not blocks and data[:1] == b"\x30":
        blocks = [data]  # a DER file
    return [base64.b64encode(b).decode() for b in blocks]
def read(path):
    try:
        with open(path, "rb") as handle:
            data = handle.read(req["max_bytes"] + 1)
    except OSError as exc:
        return {"path": path, "error": exc.strerror or str(exc)}
    if len(data) > req["max_bytes"]:
        return {"path": path, "error": "larger than %d bytes" % req["max_bytes"]}
    found = certs_of(data)
    return {"path": path, "certs": found} if found else {"path": path, "error": "no certificate"}
def files(pattern):
    if not any(c in pattern for c in "*?["):
        return {"pattern": pattern, "matches": [read(pattern)]}
    paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    return {"pattern": pattern, "matches": [read(p) for p in paths]}
def endpoint(e):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # we measure expiry; an expired cert must still be read
    try:
        ctx.set_ciphers("ALL:@SECLEVEL=0")  # old servers are the ones most worth checking
    except ssl.SSLError:
        pass
    try:
        with socket.create_connection((e["address"], e["port"]), timeout=req["timeout"]) as raw:
            with ctx.wrap_socket(raw, server_hostname=e["sni"]) as tls:
                der = tls.getpeercert(binary_form=True)
    except (OSError, ValueError) as exc:
        return dict(e, error=str(exc) or type(exc).__name__)
    return dict(e, certs=[base64.b64encode(der).decode()] if der else [])
print(json.dumps({"files": [files(p) for p in req["files"]],
                  "endpoints": [endpoint(e) for e in req["endpoints"]]}))
"""


# ---------------------------------------------------------------------------------- DER (pure)


@dataclass(frozen=True)
class CertInfo:
    subject: str
    not_after: float  # seconds since the epoch


_NAME_OIDS = {b"\x55\x04\x03": "CN", b"\x55\x04\x0a": "O", b"\x55\x04\x0b": "OU",
              b"\x55\x04\x06": "C"}


def parse_certificate(der: bytes) -> CertInfo:
    """Subject and notAfter of an X.509 certificate (DER). Raises ValueError when malformed."""
    try:
        _, cert, _ = _tlv(der, 0)
        _, tbs, _ = _tlv(cert, 0)
        fields = list(_children(tbs))
        if fields and fields[0][0] == 0xA0:  # [0] version is optional (v1 certificates)
            fields = fields[1:]
        # serialNumber, signature, issuer, validity, subject
        validity, subject = fields[3][1], fields[4][1]
        times = list(_children(validity))
        return CertInfo(_name(subject), _time(*times[1]))
    except (IndexError, ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"not a readable X.509 certificate: {exc}") from None


def _tlv(data: bytes, offset: int) -> tuple[int, bytes, int]:
    tag, length = data[offset], data[offset + 1]
    offset += 2
    if length & 0x80:
        width = length & 0x7F
        length = int.from_bytes(data[offset:offset + width], "big")
        offset += width
    if offset + length > len(data):
        raise ValueError("truncated DER")
    return tag, data[offset:offset + length], offset + length


def _children(data: bytes) -> Iterator[tuple[int, bytes]]:
    offset = 0
    while offset < len(data):
        tag, value, offset = _tlv(data, offset)
        yield tag, value


def _time(tag: int, value: bytes) -> float:
    text = value.decode("ascii").rstrip("Z")
    if tag == 0x17:  # UTCTime: YYMMDDHHMM[SS]Z, years 50-99 mean 19xx (RFC 5280)
        year = int(text[:2])
        text = f"{1900 + year if year >= 50 else 2000 + year}{text[2:]}"
    elif tag != 0x18:  # GeneralizedTime: YYYYMMDDHHMMSS[.fff]Z
        raise ValueError(f"unexpected time tag {tag:#x}")
    stamp = datetime.strptime(text[:14].ljust(14, "0"), "%Y%m%d%H%M%S")
    return float(calendar.timegm(stamp.timetuple()))


def _name(data: bytes) -> str:
    parts = []
    for _, rdn in _children(data):
        for _, pair in _children(rdn):
            (_, oid), (tag, value) = list(_children(pair))[:2]
            if oid in _NAME_OIDS:
                text = value.decode("utf-16-be" if tag == 0x1E else "utf-8")
                parts.append(f"{_NAME_OIDS[oid]}={text}")
    return ", ".join(parts)


# ---------------------------------------------------------------------------------- grading


def grade(seconds_left: float, warn_days: int, critical_days: int) -> tuple[int, str]:
    """(whole days left, level): expired at or past notAfter, else by whole days remaining.
    Days are truncated toward zero, so a certificate that expired 2.5 days ago shows -2."""
    days = math.trunc(seconds_left / 86400)
    if seconds_left <= 0:
        return days, "expired"
    if days < critical_days:
        return days, "critical"
    return days, "warn" if days < warn_days else "ok"


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------------- the action


class CertCheckAction:
    name: ClassVar[str] = "cert_check"
    Args: ClassVar[type[BaseModel]] = CertCheckArgs
    previewable: ClassVar[bool] = True
    readonly: ClassVar[bool] = True  # a dry-run checks for real and never renews
    reversible: ClassVar[bool] = True  # see the module docstring

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock

    def preview(self, transport: Transport, args: CertCheckArgs, ctx: ActionContext) -> ActionReport:
        return self._check_only(transport, args, ctx, dry_run=True)

    def apply(self, transport: Transport, args: CertCheckArgs, ctx: ActionContext) -> ActionReport:
        report = self._check_only(transport, args, ctx, dry_run=ctx.dry_run)
        if ctx.dry_run or not report.data.get("would_renew"):
            return report
        return self._renew(transport, args, ctx, report)

    def rollback(self, transport: Transport, args: CertCheckArgs, report: ActionReport,
                 ctx: ActionContext) -> ActionReport:
        if report.changed:
            return ActionReport(ok=False, changed=False, summary=(
                f"certbot renewed {args.cert_name}; a renewal cannot be undone "
                "(the new certificate stays in place)"))
        return ActionReport(ok=True, changed=False, summary="nothing to undo: cert_check only read")

    # ------------------------------------------------------------------------------ steps

    def _check_only(self, transport: Transport, args: CertCheckArgs, ctx: ActionContext,
                    *, dry_run: bool) -> ActionReport:
        try:
            certs, unmatched = self._check(transport, args, ctx)
        except ProbeError as exc:
            return ActionReport(ok=False, changed=False, summary=f"cert_check failed: {exc}",
                                data={"error": str(exc)})
        data = _tally(certs, unmatched)
        data["would_renew"] = bool(args.renew) and (data["warn"] + data["critical"]
                                                    + data["expired"]) > 0
        summary = _summary(certs, data)
        if data["would_renew"]:
            summary += f"; {'would run' if dry_run else 'running'} {_renew_line(args)}"
        return ActionReport(ok=not _alerting(data), changed=False, summary=summary, data=data)

    def _check(self, transport: Transport, args: CertCheckArgs, ctx: ActionContext
               ) -> tuple[list[dict[str, Any]], list[str]]:
        request = {
            "files": list(args.files), "max_bytes": MAX_FILE_BYTES,
            "timeout": args.connect_timeout,
            "endpoints": [{"address": e.address, "port": e.port, "label": e.label(),
                           "sni": e.sni or _default_sni(e.address)} for e in args.endpoints],
        }
        answer = run_python(transport, ctx, _COLLECT, request)
        now = self.clock()
        certs: list[dict[str, Any]] = []
        unmatched: list[str] = []
        for group in answer.get("files", []):
            if not group["matches"]:
                unmatched.append(group["pattern"])  # a glob may match nothing on some hosts
            certs += [_entry(m["path"], m, now, args) for m in group["matches"]]
        certs += [_entry(e["label"], e, now, args) for e in answer.get("endpoints", [])]
        return certs, unmatched

    def _renew(self, transport: Transport, args: CertCheckArgs, ctx: ActionContext,
               before: ActionReport) -> ActionReport:
        result = run(transport, ctx, _renew_line(args))
        after = self._check_only(transport, args, ctx, dry_run=False)
        outcome = f"certbot renew {args.cert_name}: " + (
            "ok" if result.rc == 0 else f"failed (rc {result.rc})")
        if "certs" not in after.data:  # the re-check itself failed: say both
            return ActionReport(ok=False, changed=result.rc == 0, rc=result.rc,
                                summary=f"{outcome}; then {after.summary}", data=after.data)
        # certbot decides by its own renew_before_expiry whether a certificate is due, so a
        # successful run may change nothing: "renewed" means a certificate really changed.
        changed = _expiries(before) != _expiries(after)
        data = {**after.data, "renewed": changed, "would_renew": False, "certbot_rc": result.rc,
                "worst_days_before": before.data.get("worst_days")}
        return ActionReport(
            ok=result.rc == 0 and not _alerting(data), changed=changed,
            summary=f"{outcome}{'' if changed else ', no certificate changed'}; now "
                    f"{_summary(data['certs'], data)}",
            data=data, stdout=tail(result.stdout, 40), stderr=tail(result.stderr, 40),
            rc=result.rc,
        )


# ---------------------------------------------------------------------------------- reporting


def _entry(source: str, found: dict[str, Any], now: float, args: CertCheckArgs) -> dict[str, Any]:
    """One row per file or endpoint: the certificate that expires first decides."""
    if "error" in found:
        return {"source": source, "level": "error", "error": found["error"]}
    try:
        chain = [parse_certificate(base64.b64decode(der)) for der in found["certs"]]
    except ValueError as exc:
        return {"source": source, "level": "error", "error": str(exc)}
    if not chain:
        return {"source": source, "level": "error", "error": "no certificate presented"}
    position, first = min(enumerate(chain), key=lambda item: item[1].not_after)
    days, level = grade(first.not_after - now, args.warn_days, args.critical_days)
    return {"source": source, "subject": first.subject, "not_after": _iso(first.not_after),
            "days_left": days, "level": level, "chain_length": len(chain), "position": position}


def _tally(certs: list[dict[str, Any]], unmatched: list[str]) -> dict[str, Any]:
    days = [c["days_left"] for c in certs if "days_left" in c]
    data: dict[str, Any] = {key: sum(c["level"] == level for c in certs)
                            for level, key in _COUNT_KEYS.items()}
    data.update(certs=certs, worst_days=min(days) if days else None, unmatched=unmatched)
    return data


def _summary(certs: list[dict[str, Any]], data: dict[str, Any]) -> str:
    counts = ", ".join(f"{data[key]} {level}" for level, key in list(_COUNT_KEYS.items())[1:]
                       if data[key])
    text = f"{len(certs)} certificate(s): " + (counts or "all ok")
    dated = [c for c in certs if "days_left" in c]
    if dated:
        soonest = min(dated, key=lambda c: c["days_left"])
        text += f"; soonest {soonest['source']} in {soonest['days_left']} day(s)"
    if data["unmatched"]:
        text += f"; no match for {', '.join(data['unmatched'])}"
    return text


def _alerting(data: dict[str, Any]) -> bool:
    return any(data[key] for key in _ALERTING)


def _expiries(report: ActionReport) -> list[tuple[str, str | None]]:
    return [(c["source"], c.get("not_after")) for c in report.data.get("certs", [])]


def _renew_line(args: CertCheckArgs) -> str:
    return shlex.join([args.certbot, "renew", "--cert-name", args.cert_name or "",
                       "--non-interactive"])


def _default_sni(address: str) -> str | None:
    """SNI carries host names only; an IP literal gets none (as browsers do)."""
    if ":" in address or re.fullmatch(r"[\d.]+", address):
        return None
    return address


register_action(CertCheckAction())
