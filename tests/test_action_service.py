"""The `service` action over real sshd, against a unit-like service (systemd is not PID 1 here):
a Python HTTP server in the host's root directory, started and stopped by shell commands through
`manager: command`. Its health is probed on the host, over real HTTP and TCP."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from maintenancebot.actions import ActionContext, action_arg_errors
from maintenancebot.actions.service import ServiceAction, ServiceArgs
from maintenancebot.testing.fleet import Fleet
from maintenancebot.transports import Transport, open_transport


def ctx(dry_run: bool = False) -> ActionContext:
    return ActionContext(run_id="t", step_index=0, step_name="x", sudo=False, timeout=60,
                         dry_run=dry_run)


@dataclass
class FakeUnit:
    """An HTTP server the host runs in the background; its pid file says whether it is up."""

    root: Path
    address: str
    port: int

    @property
    def pidfile(self) -> Path:
        return self.root / "svc.pid"

    def commands(self) -> dict[str, str]:
        pid = shlex.quote(str(self.pidfile))
        alive = f'kill -0 "$(cat {pid} 2>/dev/null)" 2>/dev/null'
        serve = shlex.join(["python3", "-m", "http.server", str(self.port), "--bind",
                            self.address, "--directory", str(self.root)])
        return {
            "status": alive,
            "start": f"setsid {serve} >/dev/null 2>&1 </dev/null & echo $! > {pid}",
            "stop": f'kill "$(cat {pid})" && while {alive}; do sleep 0.05; done',
        }

    def args(self, **extra: Any) -> ServiceArgs:
        health = {"http": f"http://{self.address}:{self.port}/", "tcp": f"{self.address}:{self.port}",
                  "retries": 20, "interval": 0.1, **extra.pop("health", {})}
        return ServiceArgs.model_validate({"unit": "web", "manager": "command", **self.commands(),
                                           "health": health, **extra})

    def running(self) -> bool:
        try:
            os.kill(int(self.pidfile.read_text()), 0)
        except (FileNotFoundError, ValueError, ProcessLookupError):
            return False
        return True

    def kill(self) -> None:
        if self.running():
            os.kill(int(self.pidfile.read_text()), signal.SIGKILL)


def _free_port(address: str) -> int:
    with socket.socket() as sock:
        sock.bind((address, 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture()
def transport(fleet: Fleet) -> Iterator[Transport]:
    link = open_transport(fleet.hosts[0], fleet.ssh_settings)
    link.connect()
    yield link
    link.close()


@pytest.fixture()
def unit(fleet: Fleet, tmp_path: Path) -> Iterator[FakeUnit]:
    host = fleet.hosts[0]
    root = fleet.root(host.name) / f"svc-{tmp_path.name}"
    root.mkdir(parents=True)
    fake = FakeUnit(root, host.address, _free_port(host.address))
    yield fake
    fake.kill()


def _wait_until(check: Any, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return False


# ------------------------------------------------------------------------------ arguments


def test_args_are_validated_statically() -> None:
    def fields(args: dict[str, Any]) -> list[str]:
        return [" ".join(map(str, loc)) + ": " + msg for loc, msg in
                action_arg_errors("service", args)]

    assert fields({"unit": "nginx"}) == []
    assert "unit: " in fields({"unit": "ng inx"})[0]
    assert "action: " in fields({"unit": "nginx", "action": "bounce"})[0]
    assert "health tcp: " in fields({"unit": "x", "health": {"tcp": "localhost"}})[0]
    assert "health http: " in fields({"unit": "x", "health": {"http": "ftp://x/"}})[0]
    assert "needs status, stop" in fields({"unit": "x", "manager": "command", "start": "go"})[0]
    assert "only with manager: command" in fields({"unit": "x", "start": "go"})[0]
    assert "cannot answer" in fields({"unit": "x", "action": "stop",
                                      "health": {"http": "http://h/"}})[0]
    assert fields({"unit": "x", "health": {"retries": "{{ n }}"}}) == []


# ------------------------------------------------------------------------------ command manager


def test_preview_reports_the_state_and_changes_nothing(
        transport: Transport, unit: FakeUnit) -> None:
    report = ServiceAction().preview(transport, unit.args(), ctx(dry_run=True))
    assert report.ok and not report.changed, report.summary
    assert report.summary.startswith("web is inactive; would restart it, then check active, http")
    assert report.data["state"] == {"ActiveState": "inactive"}
    assert not unit.running()


def test_restart_starts_the_service_and_checks_http_tcp_and_command(
        transport: Transport, unit: FakeUnit) -> None:
    args = unit.args(health={"command": f"test -s {shlex.quote(str(unit.pidfile))}"})
    report = ServiceAction().apply(transport, args, ctx())
    assert report.ok and report.changed, report.summary
    assert unit.running()
    assert report.data["before"] == {"active": "inactive", "enabled": None}
    checks = report.data["health"]["checks"]
    assert checks["http"] == {"ok": True, "detail": "HTTP 200"}
    assert checks["tcp"]["ok"] and checks["command"]["ok"] and checks["active"]["ok"]
    assert report.summary.startswith("restarted web; healthy after")


def test_rollback_stops_a_service_that_was_stopped_before(
        transport: Transport, unit: FakeUnit) -> None:
    action, args = ServiceAction(), unit.args()
    report = action.apply(transport, args, ctx())
    assert report.ok and unit.running()
    undo = action.rollback(transport, args, report, ctx())
    assert undo.ok and undo.changed, undo.summary
    assert undo.summary == "web is stopped again, as before the step"
    assert not unit.running()


def test_rollback_starts_a_service_that_was_running_before_a_stop(
        transport: Transport, unit: FakeUnit) -> None:
    action = ServiceAction()
    assert action.apply(transport, unit.args(action="start"), ctx()).ok
    stop = unit.args(action="stop", health={"http": None, "tcp": None})
    report = action.apply(transport, stop, ctx())
    assert report.ok and report.data["before"]["active"] == "active", report.summary
    assert report.data["health"]["checks"]["active"] == {"ok": True, "detail": "inactive"}
    assert not unit.running()
    undo = action.rollback(transport, stop, report, ctx())
    assert undo.ok and undo.summary == "web is running again, as before the step"
    assert _wait_until(unit.running)


def test_rollback_of_a_restart_says_it_cannot_be_undone(
        transport: Transport, unit: FakeUnit) -> None:
    action = ServiceAction()
    assert action.apply(transport, unit.args(action="start"), ctx()).ok
    report = action.apply(transport, unit.args(), ctx())
    assert report.ok and report.data["before"]["active"] == "active"
    undo = action.rollback(transport, unit.args(), report, ctx())
    assert undo.ok and not undo.changed
    assert undo.summary == "web is running, as before the step; a restart itself cannot be undone"


def test_an_unhealthy_service_fails_the_step_and_says_which_check(
        transport: Transport, unit: FakeUnit) -> None:
    closed = _free_port(unit.address)
    args = unit.args(health={"http": f"http://{unit.address}:{closed}/health",
                             "tcp": f"{unit.address}:{closed}", "retries": 2, "interval": 0.1,
                             "timeout": 1})
    report = ServiceAction().apply(transport, args, ctx())
    assert not report.ok and report.changed
    health = report.data["health"]
    assert health["attempts"] == 2 and not health["passed"]
    assert health["checks"]["active"]["ok"]  # it runs, but does not answer
    assert "http: " in health["failed"] and "refused" in health["failed"].lower()
    assert "unhealthy after 2 check(s)" in report.summary


def test_a_hanging_health_command_times_out(transport: Transport, unit: FakeUnit) -> None:
    args = unit.args(action="start", health={"http": None, "tcp": None, "command": "sleep 30",
                                             "retries": 1, "timeout": 1})
    started = time.monotonic()
    report = ServiceAction().apply(transport, args, ctx())
    assert not report.ok
    assert report.data["health"]["checks"]["command"]["ok"] is False
    assert time.monotonic() - started < 10


def test_a_failing_start_command_is_reported(transport: Transport, unit: FakeUnit) -> None:
    args = unit.args(action="start", start="echo no such binary >&2; exit 3")
    report = ServiceAction().apply(transport, args, ctx())
    assert not report.ok and report.summary == "start web failed (rc 3): no such binary"


# ------------------------------------------------------------------------------ systemd


def test_systemd_without_systemd_fails_clearly(transport: Transport) -> None:
    args = ServiceArgs(unit="cron")
    preview = ServiceAction().preview(transport, args, ctx(dry_run=True))
    applied = ServiceAction().apply(transport, args, ctx())
    if preview.ok:  # a machine that does run systemd: the unit's real state is shown
        assert "would restart it" in preview.summary
        return
    assert preview.summary.startswith("cannot read cron: ")
    assert not applied.ok and not applied.changed
    assert applied.summary.startswith("cannot read the state of cron")


# ------------------------------------------------------------------------------ whole engine


def test_engine_rolls_the_service_back_when_a_later_step_fails(
        fleet: Fleet, unit: FakeUnit, tmp_path: Path) -> None:
    pytest.importorskip("maintenancebot.store", reason="the run store is not written yet")
    import json

    from tests.harness import Bench

    bench = Bench(fleet, tmp_path)
    args = {"unit": "web", "manager": "command", **unit.commands(),
            "health": {"tcp": f"{unit.address}:{unit.port}", "retries": 20, "interval": 0.1}}
    outcome = bench.run(f"""
        hosts: all
        steps:
          - {{name: Restart web, action: service, with: {json.dumps(args)}}}
          - {{name: Smoke test, run: "false"}}
    """, narrow=[fleet.names[0]])
    steps = bench.steps(outcome.run_id, fleet.names[0])
    kinds = [(s["kind"], s["status"]) for s in steps]
    assert ("rollback", "ok") in kinds, kinds
    assert steps[0]["details"]["before"]["active"] == "inactive"
    assert not unit.running()
