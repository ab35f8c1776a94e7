"""`maintenancebot daemon` as systemd runs it: a real process, real signals, a real notify
socket, the real clock, and a run against the sshd fleet.

To get a run without waiting for a real cron minute, the store is told the daemon last looked
at the schedule a few minutes ago: the fire two minutes back is then a missed fire within grace,
and the daemon runs it late at once — the same path as after a real outage.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from maintenancebot.states import RunStatus, StepStatus
from maintenancebot.store import RunStore
from maintenancebot.testing.fleet import Fleet
from tests.harness import until

REPO = Path(__file__).resolve().parent.parent


class Service:
    """A config for the fleet, a notify socket, and daemon processes started on them."""

    def __init__(self, fleet: Fleet, tmp: Path) -> None:
        self.fleet, self.tmp = fleet, tmp
        self.runbooks = tmp / "runbooks"
        self.runbooks.mkdir()
        self.state = tmp / "state"
        inventory = tmp / "inventory.yaml"
        inventory.write_text(fleet.inventory_yaml())
        self.config = tmp / "config.yaml"
        self.config.write_text(fleet.config_yaml(self.state, runbooks=self.runbooks,
                                                 inventory=inventory))
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(str(tmp / "notify.sock"))
        self.messages: list[str] = []
        self.procs: list[subprocess.Popen[str]] = []

    def runbook(self, name: str, text: str) -> Path:
        path = self.runbooks / f"{name}.yaml"
        path.write_text(textwrap.dedent(text))
        return path

    def spawn(self, *args: str) -> subprocess.Popen[str]:
        env = {**os.environ, "MAINTENANCEBOT_CONFIG": str(self.config), "NO_COLOR": "1",
               "NOTIFY_SOCKET": str(self.tmp / "notify.sock"), "WATCHDOG_USEC": "300000"}
        proc = subprocess.Popen([sys.executable, "-m", "maintenancebot", "daemon", *args],
                                cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        self.procs.append(proc)
        return proc

    def expect(self, field: str, timeout: float = 20) -> str:
        """The next notify datagram holding `field` (e.g. READY=1); others are kept."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.socket.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                message = self.socket.recv(4096).decode()
            except TimeoutError:
                break
            self.messages.append(message)
            if field in message.splitlines():
                return message
        raise AssertionError(f"no {field} from the daemon; got {self.messages}")

    def store(self) -> RunStore:
        return RunStore(self.state / "maintenancebot.db")

    def close(self) -> None:
        """Kill whatever daemon a test left running."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.socket.close()

    def stop(self, proc: subprocess.Popen[str]) -> int:
        proc.send_signal(signal.SIGTERM)
        self.expect("STOPPING=1")
        rc = proc.wait(timeout=60)
        return rc


@pytest.fixture
def service(fleet: Fleet, tmp_path: Path) -> Iterator[Service]:
    made = Service(fleet, tmp_path)
    yield made
    made.close()




def test_sigterm_mid_run_finishes_the_step_records_interrupted_and_exits_0(
        service: Service) -> None:
    host = service.fleet.names[0]
    root = service.fleet.root(host)
    for name in ("s1-started", "s1-done", "s2"):
        (root / name).unlink(missing_ok=True)
    fire = (datetime.now(UTC) - timedelta(minutes=2)).replace(second=0, microsecond=0)
    service.runbook("nightly", f"""
        schedule: "{fire.minute} {fire.hour} * * *"
        hosts: [{host}]
        steps:
          - {{name: first, run: "touch {{{{ root }}}}/s1-started; sleep 2; touch {{{{ root }}}}/s1-done"}}
          - {{name: second, run: "touch {{{{ root }}}}/s2"}}
    """)
    with service.store() as store:  # the daemon last looked before that fire: it missed it
        store.set_handled_until("nightly", fire - timedelta(minutes=3))

    daemon = service.spawn()
    ready = service.expect("READY=1")
    assert any(line.startswith("STATUS=1 runbook(s) scheduled") for line in ready.splitlines())
    until((root / "s1-started").exists)
    time.sleep(0.5)  # mid-step, with the watchdog pinging meanwhile
    assert service.stop(daemon) == 0, daemon.stderr.read() if daemon.stderr else ""

    # The step in flight finished; the next one never started.
    assert (root / "s1-done").exists() and not (root / "s2").exists()
    with service.store() as store:
        (run,) = store.list_runs()
        assert run.status is RunStatus.INTERRUPTED and run.started_by == "daemon (late)"
        assert "daemon stopping (SIGTERM)" in (run.reason or "")
        steps = {s.name: s.status for s in store.get_steps(run.id)}
        assert steps == {"first": StepStatus.OK, "second": StepStatus.SKIPPED}
        assert [(f.decision, f.run_id) for f in store.fires("nightly")] == [("late", run.id)]
    assert service.messages.count("WATCHDOG=1") >= 2  # WATCHDOG_USEC=0.3s: every 0.15s

    # Started again (systemd's Restart=, a reboot): the fire was decided, nothing runs twice.
    again = service.spawn()
    service.expect("READY=1")
    time.sleep(0.5)
    assert service.stop(again) == 0
    with service.store() as store:
        assert len(store.list_runs()) == 1 and len(store.fires()) == 1

    # What an operator reads: the decision, the run it started, why it was late.
    listed = subprocess.run([sys.executable, "-m", "maintenancebot", "--config",
                             str(service.config), "fires", "--json"], capture_output=True,
                            text=True, timeout=60, check=True)
    (decided,) = json.loads(listed.stdout)
    assert (decided["runbook"], decided["decision"], decided["run_id"]) == (
        "nightly", "late", run.id)


def test_sighup_rejects_an_invalid_edit_keeps_the_schedule_and_takes_the_fix(
        service: Service) -> None:
    path = service.runbook("nightly", f"""
        schedule: "0 3 * * *"
        hosts: [{service.fleet.names[0]}]
        steps: [{{name: noop, run: "true"}}]
    """)
    daemon = service.spawn("--poll", "1h")  # only SIGHUP reloads in this test

    def next_fire() -> str:
        with service.store() as store:
            applied = [a for a in store.audit_log() if a.action == "reload.applied"]
        return str(applied[-1].details["next"]["nightly"])  # type: ignore[index]

    service.expect("READY=1")
    path.write_text(path.read_text().replace("steps:", "stepz:"))
    daemon.send_signal(signal.SIGHUP)
    service.expect("RELOADING=1")
    service.expect("READY=1")
    with service.store() as store:
        (rejected,) = [a for a in store.audit_log() if a.action == "reload.rejected"]
    assert any("stepz" in line for line in rejected.details["issues"])
    assert rejected.details["kept"] == ["nightly"]
    assert next_fire().endswith("T03:00:00+00:00")

    path.write_text(path.read_text().replace("stepz:", "steps:").replace("0 3", "30 4"))
    daemon.send_signal(signal.SIGHUP)
    service.expect("RELOADING=1")
    service.expect("READY=1")
    assert next_fire().endswith("T04:30:00+00:00")
    assert service.stop(daemon) == 0
    assert "stepz" in (daemon.stderr.read() if daemon.stderr else "")  # logged for the journal
