"""The `cert_check` action: the DER reader and grading (pure), then real certificates made with
`cryptography` in the fleet hosts' roots and a local TLS server with per-name certificates, read
over SSH from the hosts; `renew` against a fake certbot on the host. Fleet hosts are this machine,
so files written under `fleet.root(name)` are on the host, and 127.0.0.1 is reachable from it."""

from __future__ import annotations

import datetime as dt
import json
import socket
import socketserver
import ssl
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from maintenancebot.actions import ActionContext, action_arg_errors
from maintenancebot.actions._probe import run_python
from maintenancebot.actions.cert_check import (
    _COLLECT,
    CertCheckAction,
    CertCheckArgs,
    grade,
    parse_certificate,
)
from maintenancebot.testing.fleet import Fleet
from maintenancebot.transports import Transport, open_transport

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
KEY = ec.generate_private_key(ec.SECP256R1())  # one key for every test certificate: fast


def make_cert(cn: str, days: float, *, org: str | None = None) -> x509.Certificate:
    names = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org:
        names.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    name = x509.Name(names)
    end = NOW + dt.timedelta(days=days)
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(KEY.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(min(NOW, end) - dt.timedelta(days=1)).not_valid_after(end)
            .sign(KEY, hashes.SHA256()))


def pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def key_pem() -> bytes:
    return KEY.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def ctx(dry_run: bool = False) -> ActionContext:
    return ActionContext(run_id="t", step_index=0, step_name="certs", sudo=False, timeout=30,
                         dry_run=dry_run)


def check(transport: Transport, dry_run: bool = False, **args: Any) -> Any:
    action = CertCheckAction()
    parsed = CertCheckArgs.model_validate(args)
    return action.apply(transport, parsed, ctx(dry_run))


def by_source(report: Any) -> dict[str, dict[str, Any]]:
    return {c["source"]: c for c in report.data["certs"]}


# ------------------------------------------------------------------------------ pure


def test_der_reader_gives_subject_and_not_after_for_utc_and_generalized_times() -> None:
    soon = make_cert("soon.example", 30, org="Example Ltd")
    info = parse_certificate(soon.public_bytes(serialization.Encoding.DER))
    assert info.subject == "CN=soon.example, O=Example Ltd"
    assert info.not_after == soon.not_valid_after_utc.timestamp()
    late = make_cert("late.example", 365 * 40)  # after 2049: encoded as GeneralizedTime
    assert parse_certificate(late.public_bytes(serialization.Encoding.DER)).not_after == \
        late.not_valid_after_utc.timestamp()


def test_der_reader_rejects_garbage_with_a_value_error() -> None:
    with pytest.raises(ValueError, match="not a readable X.509"):
        parse_certificate(b"\x30\x03\x02\x01")


def test_grading_uses_whole_days_left() -> None:
    day = 86400
    assert grade(-1, 21, 7) == (0, "expired")
    assert grade(-2.5 * day, 21, 7) == (-2, "expired")
    assert grade(0, 21, 7) == (0, "expired")
    assert grade(6.9 * day, 21, 7) == (6, "critical")
    assert grade(7 * day, 21, 7) == (7, "warn")
    assert grade(20.5 * day, 21, 7) == (20, "warn")
    assert grade(21 * day, 21, 7) == (21, "ok")


def test_arguments_are_validated_statically() -> None:
    assert action_arg_errors("cert_check", {"files": ["/etc/ssl/a.pem"]}) == []
    assert action_arg_errors("cert_check", {"endpoints": ["web:443", {
        "address": "10.0.0.1", "port": 8443, "sni": "api.example"}]}) == []
    errors = dict(action_arg_errors("cert_check", {"endpoints": ["no-port"], "colour": 1}))
    assert ("endpoints", 0) in errors and errors[("colour",)] == "Extra inputs are not permitted"
    assert "at least one" in str(action_arg_errors("cert_check", {}))
    assert "cert_name" in str(action_arg_errors("cert_check", {"files": ["a"], "renew": "certbot"}))
    assert "critical_days" in str(action_arg_errors(
        "cert_check", {"files": ["a"], "warn_days": 5, "critical_days": 9}))
    assert action_arg_errors("cert_check", {"files": ["a"], "renew": "certbot",
                                            "cert_name": "--force"})


def test_endpoint_strings_accept_names_ipv4_and_bracketed_ipv6() -> None:
    args = CertCheckArgs.model_validate({"endpoints": ["web:443", "[::1]:8443"]})
    assert [(e.address, e.port) for e in args.endpoints] == [("web", 443), ("::1", 8443)]


# ------------------------------------------------------------------------------ on the hosts


@pytest.fixture
def transport(fleet: Fleet) -> Iterator[Transport]:
    conn = open_transport(fleet.hosts[0], fleet.ssh_settings)
    conn.connect()
    yield conn
    conn.close()


@pytest.fixture
def certs(fleet: Fleet, tmp_path: Path) -> Path:
    """A fresh directory of certificate files on host-01."""
    root = fleet.root(fleet.names[0]) / f"certs-{tmp_path.name}"
    root.mkdir(parents=True)
    (root / "ok.pem").write_bytes(pem(make_cert("ok.example", 90)))
    (root / "warn.pem").write_bytes(pem(make_cert("warn.example", 10.5)))
    (root / "critical.pem").write_bytes(pem(make_cert("critical.example", 3.5)))
    (root / "expired.pem").write_bytes(pem(make_cert("expired.example", -2)))
    # leaf valid for 60 days, but the intermediate behind it expires in 5: the chain breaks then
    (root / "chain.pem").write_bytes(pem(make_cert("leaf.example", 60),
                                         make_cert("Intermediate CA", 5.5)))
    (root / "haproxy.pem").write_bytes(pem(make_cert("combined.example", 40)) + key_pem())
    (root / "cert.der").write_bytes(make_cert("der.example", 50).public_bytes(
        serialization.Encoding.DER))
    return root


def test_files_are_graded_and_a_chain_reports_its_earliest_certificate(
    transport: Transport, certs: Path
) -> None:
    report = check(transport, files=[f"{certs}/*.pem", f"{certs}/cert.der"])
    rows = by_source(report)
    level = {Path(source).name: row["level"] for source, row in rows.items()}
    assert level == {"ok.pem": "ok", "warn.pem": "warn", "critical.pem": "critical",
                     "expired.pem": "expired", "chain.pem": "critical", "haproxy.pem": "ok",
                     "cert.der": "ok"}
    chain = rows[f"{certs}/chain.pem"]
    assert (chain["subject"], chain["chain_length"], chain["position"], chain["days_left"]) == \
        ("CN=Intermediate CA", 2, 1, 5)
    assert rows[f"{certs}/expired.pem"]["days_left"] == -2
    assert rows[f"{certs}/warn.pem"]["not_after"].endswith("Z")
    data = report.data
    assert (data["ok"], data["warn"], data["critical"], data["expired"], data["worst_days"]) == \
        (3, 1, 2, 1, -2)
    assert report.ok is False and report.changed is False  # critical and expired alert
    assert "1 expired" in report.summary and "soonest" in report.summary


def test_only_warnings_keep_the_step_ok(transport: Transport, certs: Path) -> None:
    report = check(transport, files=[f"{certs}/ok.pem", f"{certs}/warn.pem"])
    assert report.ok is True and report.data["warn"] == 1 and report.data["worst_days"] == 10


def test_missing_files_are_errors_but_a_glob_may_match_nothing(
    transport: Transport, certs: Path
) -> None:
    (certs / "notes.txt").write_text("no certificate here")
    report = check(transport, files=[f"{certs}/absent.pem", f"{certs}/notes.txt",
                                     f"{certs}/live/*/fullchain.pem", f"{certs}/ok.pem"])
    rows = by_source(report)
    assert rows[f"{certs}/absent.pem"] == {"source": f"{certs}/absent.pem", "level": "error",
                                           "error": "No such file or directory"}
    assert rows[f"{certs}/notes.txt"]["error"] == "no certificate"
    assert report.data["unmatched"] == [f"{certs}/live/*/fullchain.pem"]
    assert report.ok is False and report.data["errors"] == 2


def test_private_keys_never_leave_the_host(transport: Transport, certs: Path) -> None:
    answer = run_python(transport, ctx(), _COLLECT, {
        "files": [f"{certs}/haproxy.pem"], "endpoints": [], "max_bytes": 1 << 20, "timeout": 5})
    text = json.dumps(answer)
    assert len(answer["files"][0]["matches"][0]["certs"]) == 1
    assert "PRIVATE" not in text and key_pem().split(b"\n")[1].decode() not in text


# ------------------------------------------------------------------------------ TLS endpoints


class _TlsServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """127.0.0.1:PORT serving `default.test` (90 days), or per SNI `soon.test` (2 days) and
    `old.test` (expired)."""
    work = tmp_path_factory.mktemp("tls")
    (work / "key.pem").write_bytes(key_pem())

    def context(cn: str, days: float) -> ssl.SSLContext:
        (work / f"{cn}.pem").write_bytes(pem(make_cert(cn, days)))
        made = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        made.load_cert_chain(work / f"{cn}.pem", work / "key.pem")
        return made

    by_name = {"soon.test": context("soon.test", 2.5), "old.test": context("old.test", -1)}
    default = context("default.test", 90)

    def pick(sock: ssl.SSLObject | ssl.SSLSocket, name: str | None, _: ssl.SSLContext) -> None:
        sock.context = by_name.get(name or "", default)

    default.sni_callback = pick

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            try:
                with default.wrap_socket(self.request, server_side=True) as tls:
                    tls.recv(1)  # until the client hangs up
            except OSError:
                pass

    server = _TlsServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_endpoints_are_read_from_the_host_with_sni(transport: Transport, tls_server: int) -> None:
    port = tls_server
    report = check(transport, endpoints=[
        f"127.0.0.1:{port}",
        {"address": "127.0.0.1", "port": port, "sni": "soon.test"},
        {"address": "localhost", "port": port, "sni": "old.test"},
    ])
    rows = by_source(report)
    assert rows[f"127.0.0.1:{port}"]["subject"] == "CN=default.test"
    assert rows[f"127.0.0.1:{port}"]["level"] == "ok"
    assert rows[f"127.0.0.1:{port} (sni soon.test)"]["level"] == "critical"
    assert rows[f"localhost:{port} (sni old.test)"]["subject"] == "CN=old.test"
    assert rows[f"localhost:{port} (sni old.test)"]["level"] == "expired"
    assert report.ok is False and report.data["worst_days"] == -1


def test_an_unreachable_endpoint_is_an_error(transport: Transport) -> None:
    with socket.socket() as bound:  # bound but not listening: connections are refused
        bound.bind(("127.0.0.1", 0))
        closed = bound.getsockname()[1]
        report = check(transport, endpoints=[f"127.0.0.1:{closed}"], connect_timeout="2s")
    row = report.data["certs"][0]
    assert row["level"] == "error" and "refused" in row["error"].lower()
    assert report.ok is False


# ------------------------------------------------------------------------------ renew


@pytest.fixture
def fake_certbot(fleet: Fleet, tmp_path: Path) -> Path:
    """An executable on the host that logs its arguments and installs a fresh certificate."""
    root = fleet.root(fleet.names[0]) / f"certbot-{tmp_path.name}"
    root.mkdir(parents=True)
    (root / "site.pem").write_bytes(pem(make_cert("site.example", 5.5)))
    (root / "renewed.pem").write_bytes(pem(make_cert("site.example", 89.5)))
    script = root / "certbot"
    script.write_text(f'#!/bin/sh\necho "$@" >> "{root}/calls"\n'
                      f'cp "{root}/renewed.pem" "{root}/site.pem"\necho renewed\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def test_renew_runs_certbot_when_inside_the_warning_window_and_checks_again(
    transport: Transport, fake_certbot: Path
) -> None:
    root = fake_certbot.parent
    report = check(transport, files=[f"{root}/site.pem"], renew="certbot",
                   cert_name="site.example", certbot=str(fake_certbot))
    assert (root / "calls").read_text() == "renew --cert-name site.example --non-interactive\n"
    assert report.ok is True and report.changed is True
    assert report.data["renewed"] is True and report.data["worst_days_before"] == 5
    assert report.data["certs"][0]["days_left"] == 89 and report.data["certs"][0]["level"] == "ok"
    assert "renewed" in report.stdout
    undo = CertCheckAction().rollback(transport, CertCheckArgs.model_validate(
        {"files": ["x"]}), report, ctx())
    assert undo.ok is False and "cannot be undone" in undo.summary


def test_a_certbot_that_finds_nothing_due_changes_nothing_and_still_alerts(
    transport: Transport, fake_certbot: Path
) -> None:
    fake_certbot.write_text("#!/bin/sh\necho 'Certificate not yet due for renewal'\n")
    root = fake_certbot.parent
    report = check(transport, files=[f"{root}/site.pem"], renew="certbot",
                   cert_name="site.example", certbot=str(fake_certbot))
    assert report.rc == 0 and report.changed is False and report.data["renewed"] is False
    assert "no certificate changed" in report.summary
    assert report.ok is False and report.data["critical"] == 1  # still 5 days: still alerting


def test_renew_does_nothing_in_a_dry_run_or_when_every_certificate_is_fresh(
    transport: Transport, fake_certbot: Path
) -> None:
    root = fake_certbot.parent
    args: dict[str, Any] = {"files": [f"{root}/site.pem"], "renew": "certbot", "cert_name": "site.example",
            "certbot": str(fake_certbot)}
    dry = check(transport, dry_run=True, **args)
    assert dry.data["would_renew"] is True and "would run" in dry.summary
    assert not (root / "calls").exists()
    fresh = check(transport, **{**args, "files": [f"{root}/renewed.pem"]})
    assert fresh.data["would_renew"] is False and "renewed" not in fresh.data
    assert not (root / "calls").exists()
    undo = CertCheckAction().rollback(transport, CertCheckArgs.model_validate(args), fresh, ctx())
    assert undo.ok is True and "nothing to undo" in undo.summary


def test_a_failing_certbot_fails_the_step(transport: Transport, fake_certbot: Path) -> None:
    fake_certbot.write_text("#!/bin/sh\necho 'rate limited' >&2\nexit 1\n")
    root = fake_certbot.parent
    report = check(transport, files=[f"{root}/site.pem"], renew="certbot",
                   cert_name="site.example", certbot=str(fake_certbot))
    assert report.ok is False and report.rc == 1 and report.changed is False
    assert "failed (rc 1)" in report.summary and "rate limited" in report.stderr


def test_a_dry_run_through_the_engine_really_checks(fleet: Fleet, tmp_path: Path) -> None:
    pytest.importorskip("maintenancebot.store", reason="the run store is not written yet")
    from tests.harness import Bench

    for days, name in zip((90.5, 10.5, 3.5), fleet.names, strict=True):
        (fleet.root(name) / "site.pem").write_bytes(pem(make_cert(f"{name}.example", days)))
    bench = Bench(fleet, tmp_path)
    outcome = bench.run("""
        hosts: all
        steps:
          - name: Certificates
            action: cert_check
            with: {files: ["{{ root }}/site.pem"], renew: certbot, cert_name: site.example,
                   certbot: /nonexistent/certbot}
    """, dry_run=True)
    steps = {name: bench.steps(outcome.run_id, name)[0] for name in fleet.names}
    assert [s["status"] for s in steps.values()] == ["ok", "ok", "failed"]  # readonly: it ran
    assert [s["details"]["worst_days"] for s in steps.values()] == [90, 10, 3]
    assert [s["details"]["would_renew"] for s in steps.values()] == [False, True, True]
