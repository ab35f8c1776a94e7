"""Parked runs survive their process: `run --no-wait` leaves the run to the daemon (exit 4), a
daemon killed with SIGKILL while hosts are parked resumes them at its next start, the same
request stays answerable, and no completed step runs twice (counted on the hosts)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from maintenancebot.states import HostStatus, RunStatus
from maintenancebot.testing.fleet import Fleet
from tests.harness import until
from tests.test_approvals import GATED, fresh_roots
from tests.test_daemon_process import Service

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def service(fleet: Fleet, tmp_path: Path) -> Iterator[Service]:
    fresh_roots(fleet)
    made = Service(fleet, tmp_path)
    with made.config.open("a") as config:
        config.write("approvers: {cli: [alice]}\n")
    yield made
    made.close()


def cli(service: Service, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MAINTENANCEBOT_CONFIG": str(service.config), "NO_COLOR": "1"}
    return subprocess.run([sys.executable, "-m", "maintenancebot", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120, check=False)


def test_no_wait_then_kill_9_then_restart_then_approve_runs_nothing_twice(
        service: Service) -> None:
    fleet = service.fleet
    names = fleet.names
    (fleet.root(names[0]) / "flag").write_text("yes\n")
    service.runbook("gated", GATED % {"timeout": "30m", "on_deny": "skip", "quorum": 1})

    left = cli(service, "run", "gated", "--no-wait")
    assert left.returncode == 4, left.stderr
    store = service.store()
    run = store.list_runs(limit=1)[0]
    assert run.status is RunStatus.WAITING
    request = store.list_approvals()[0]
    assert [h.host for h in request.hosts] == [names[0]]
    assert {h.host: h.status for h in store.get_hosts(run.id)}[names[0]] is HostStatus.WAITING
    assert all((fleet.root(n) / "after").exists() for n in names[1:])

    daemon = service.spawn()
    service.expect("READY=1")
    until(lambda: store.get_run(run.id).status is RunStatus.RUNNING)
    assert store.get_run(run.id).pid == daemon.pid
    daemon.send_signal(signal.SIGKILL)
    daemon.wait(timeout=10)

    daemon = service.spawn()
    service.expect("READY=1")
    until(lambda: store.get_run(run.id).pid == daemon.pid)
    assert store.list_approvals()[0].id == request.id, "the same request stays answerable"
    answered = cli(service, "approve", str(request.id), "--by", "alice")
    assert answered.returncode == 0, answered.stderr
    until(lambda: store.get_run(run.id).status is RunStatus.SUCCEEDED, timeout=30)
    for name in names:
        assert (fleet.root(name) / "count").read_text().splitlines() == ["ran"], name
        assert (fleet.root(name) / "after").exists()
        assert (fleet.root(name) / "rebooted").exists() == (name == names[0])
    assert len(store.list_approvals(status=None)) == 1
    actions = [a.action for a in store.audit_log(run.id)]
    assert actions.count("run.resumed") == 2 and "run.detached" in actions
    assert service.stop(daemon) == 0
    store.close()
