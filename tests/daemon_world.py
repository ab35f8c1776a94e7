"""The daemon's test world: a clock the tests move (APScheduler's too), runbooks, the fleet's
inventory plus one local host, a state dir, and the daemons started on them."""

from __future__ import annotations

import textwrap
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import apscheduler.schedulers.base as apscheduler_base
import pytest

from maintenancebot.daemon import Daemon
from maintenancebot.models import Settings
from maintenancebot.store import FireRecord, RunRecord, RunStore
from maintenancebot.testing.fleet import Fleet


class FakeClock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock(datetime(2026, 11, 22, 1, 0, tzinfo=UTC))

    class FakeDatetime(datetime):
        @classmethod
        def now(cls, tz: object = None) -> datetime:  # type: ignore[override]
            return fake.now.astimezone(tz) if tz else fake.now.replace(tzinfo=None)  # type: ignore[arg-type]

    monkeypatch.setattr(apscheduler_base, "datetime", FakeDatetime)
    return fake


class World:
    """Runbooks dir, inventory (the fleet + one local host), state dir, and daemons on them."""

    def __init__(self, fleet: Fleet, tmp: Path, clock: FakeClock) -> None:
        self.fleet, self.clock = fleet, clock
        self.dir = tmp / "runbooks"
        self.dir.mkdir()
        self.inventory = tmp / "inventory.yaml"
        self.inventory.write_text(fleet.inventory_yaml() + "  local-1: {connection: local}\n")
        self.settings = Settings(runbooks=str(self.dir), inventory=str(self.inventory),
                                 state_dir=str(tmp / "state"), ssh=fleet.ssh_settings)
        self.daemons: list[Daemon] = []

    def runbook(self, name: str, text: str) -> Path:
        path = self.dir / f"{name}.yaml"
        path.write_text(textwrap.dedent(text))
        return path

    def start(self, listen: tuple[str, int] | None = None) -> Daemon:
        daemon = Daemon(self.settings, clock=self.clock, lease_poll=0.05, stop_timeout=30,
                        listen=listen)
        daemon.start()
        self.daemons.append(daemon)
        return daemon

    def restart(self, daemon: Daemon, at: datetime) -> Daemon:
        assert daemon.stop("test restart")
        self.clock.now = at
        return self.start()

    def move_to(self, daemon: Daemon, moment: datetime) -> None:
        """Set the clock, wake the scheduler, and wait until it has acted on the new time."""
        self.clock.now = moment
        daemon._scheduler.wakeup()
        deadline = time.monotonic() + 10
        while any(t is not None and t <= moment for t in daemon.next_fires().values()):
            assert time.monotonic() < deadline, f"scheduler did not catch up with {moment}"
            time.sleep(0.005)

    def fires(self, runbook: str | None = None) -> list[FireRecord]:
        with RunStore(Path(self.settings.state_dir) / "maintenancebot.db") as store:
            return store.fires(runbook)

    def runs(self, runbook: str | None = None) -> list[RunRecord]:
        with RunStore(Path(self.settings.state_dir) / "maintenancebot.db") as store:
            return list(reversed(store.list_runs(runbook=runbook)))

    def audit(self, action: str) -> list[dict[str, object]]:
        with RunStore(Path(self.settings.state_dir) / "maintenancebot.db") as store:
            return [a.details for a in store.audit_log() if a.action == action]

    def host_interval(self, run_id: str, host: str) -> tuple[datetime, datetime]:
        with RunStore(Path(self.settings.state_dir) / "maintenancebot.db") as store:
            record = next(h for h in store.get_hosts(run_id) if h.host == host)
        assert record.started_at and record.finished_at
        return record.started_at, record.finished_at


@pytest.fixture
def world(fleet: Fleet, tmp_path: Path, clock: FakeClock) -> Iterator[World]:
    made = World(fleet, tmp_path, clock)
    yield made
    for daemon in made.daemons:
        if daemon._store is not None:
            daemon.stop("test over")


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def decisions(fires: list[FireRecord]) -> list[tuple[str, str]]:
    return [(f.decision, f.fire_time.strftime("%m-%d %H:%M")) for f in fires]


RAN_ONCE = """
    schedule: "0 3 * * *"
    hosts: [{host}]
    steps: [{{name: mark, run: "echo ran >> {{{{ root }}}}/nightly-ran"}}]
"""
