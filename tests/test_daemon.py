"""The daemon's decisions, in-process, with a real APScheduler and a clock the tests move.

The only fake is the clock: APScheduler's `datetime` (what it reads as "now") and the daemon's
clock both follow `FakeClock`. Runs are real: the same `app.execute` as the CLI, against the
sshd fleet (and one `connection: local` host where only timing matters), recorded in SQLite.
"""

from __future__ import annotations

from datetime import UTC, timedelta
from pathlib import Path

import pytest

from maintenancebot.daemon import Daemon, DaemonError
from maintenancebot.loader import validate_paths
from maintenancebot.scheduling import fire_times_between
from maintenancebot.states import HostStatus, RunStatus
from maintenancebot.store import RunStore
from tests.daemon_world import RAN_ONCE, World, decisions, utc
from tests.harness import until

# ---------------------------------------------------------------------------------- when


def test_fires_follow_the_runbook_time_zone_across_the_end_of_dst(world: World) -> None:
    # Europe/Berlin leaves summer time at 03:00 CEST on 2026-10-25; 02:00-03:00 happens twice.
    world.runbook("twothirty", """
        schedule: "30 2 * * *"
        timezone: Europe/Berlin
        hosts: local-1
        steps: [{name: noop, run: "true"}]
    """)
    world.runbook("hourly", """
        schedule: "45 * * * *"
        timezone: Europe/Berlin
        hosts: local-1
        steps: [{name: noop, run: "true"}]
    """)
    world.clock.now = utc("2026-10-24 21:50")
    daemon = world.start()
    moment = world.clock.now
    while moment < utc("2026-10-26 02:00"):
        moment += timedelta(minutes=10)
        world.move_to(daemon, moment)
        assert daemon.wait_idle(20)
    # A fixed-hour job runs once in the repeated hour, as cron does (APScheduler alone runs it
    # twice): 02:30 CEST = 00:30Z on the 25th, then 02:30 CET = 01:30Z on the 26th.
    assert decisions(world.fires("twothirty")) == [("started", "10-25 00:30"),
                                                   ("started", "10-26 01:30")]
    # A wildcard-hour job follows real time: every hour, 01:45Z and 02:45Z (the same wall
    # clock 02:45 twice) both fire, and no hour is skipped.
    hourly = [f.fire_time for f in world.fires("hourly")]
    assert hourly == [utc("2026-10-24 21:45") + timedelta(hours=h) for h in range(1, 29)]
    assert all(f.run_id for f in world.fires())
    assert {r.status for r in world.runs()} == {RunStatus.SUCCEEDED}


def test_a_skipped_spring_hour_still_fires_once() -> None:
    # 02:30 does not exist on 2026-03-29 in Berlin; the run happens once, just after the jump.
    fires = fire_times_between("30 2 * * *", "Europe/Berlin", utc("2026-03-28 12:00"),
                               utc("2026-03-30 12:00"))
    assert [f.astimezone(UTC) for f in fires] == [utc("2026-03-29 01:30"),
                                                  utc("2026-03-30 00:30")]


# ---------------------------------------------------------------------------------- overlap


def test_a_fire_while_the_runbook_still_runs_is_refused_and_recorded(world: World) -> None:
    world.runbook("slow", """
        schedule: "* * * * *"
        hosts: local-1
        steps: [{name: wait, run: "sleep 2"}]
    """)
    world.clock.now = utc("2026-11-22 03:00:30")
    daemon = world.start()
    world.move_to(daemon, utc("2026-11-22 03:01:01"))
    world.move_to(daemon, utc("2026-11-22 03:02:01"))
    assert daemon.wait_idle(20)
    fires = world.fires("slow")
    assert decisions(fires) == [("started", "11-22 03:01"), ("skipped", "11-22 03:02")]
    assert "overlap" in (fires[1].reason or "") and fires[1].run_id is None
    assert [r.status for r in world.runs("slow")] == [RunStatus.SUCCEEDED]
    assert any(d.get("runbook") == "slow" for d in world.audit("schedule.skipped"))


def test_two_runbooks_sharing_a_host_take_turns_on_it(world: World) -> None:
    host = world.fleet.names[0]
    world.runbook("long", f"""
        schedule: "0 3 * * *"
        hosts: [{host}]
        steps: [{{name: hold, run: "sleep 1.5"}}]
    """)
    world.runbook("short", f"""
        schedule: "0 3 * * *"
        hosts: [{host}, {world.fleet.names[1]}]
        steps: [{{name: quick, run: "true"}}]
    """)
    world.clock.now = utc("2026-11-22 02:59")
    daemon = world.start()
    world.move_to(daemon, utc("2026-11-22 03:00:01"))
    assert daemon.wait_idle(30)
    runs = world.runs()
    assert sorted(r.runbook for r in runs) == ["long", "short"]
    assert {r.status for r in runs} == {RunStatus.SUCCEEDED}
    first, second = sorted(world.host_interval(r.id, host) for r in runs)
    assert first[1] <= second[0], "the shared host was in two runs at once"
    waited = world.audit("schedule.waiting_for_hosts")
    assert len(waited) == 1 and host in waited[0]["busy"]  # type: ignore[operator]


def test_a_run_waiting_for_busy_hosts_gives_up_when_its_window_closes(world: World) -> None:
    host = world.fleet.names[0]
    world.runbook("hog", f"""
        schedule: "0 3 * * *"
        hosts: [{host}]
        steps: [{{name: hold, run: "sleep 3"}}]
    """)
    world.runbook("patient", f"""
        schedule: "1 3 * * *"
        window: 10m
        hosts: [{host}]
        steps: [{{name: quick, run: "true"}}]
    """)
    world.clock.now = utc("2026-11-22 02:59")
    daemon = world.start()
    world.move_to(daemon, utc("2026-11-22 03:00:01"))
    until(lambda: bool(world.runs("hog")))  # the hog's run holds the host now
    world.move_to(daemon, utc("2026-11-22 03:01:01"))
    until(lambda: bool(world.audit("schedule.waiting_for_hosts")))
    world.clock.now = utc("2026-11-22 03:11:02")  # the patient one's window has closed
    assert daemon.wait_idle(30)
    patient = world.fires("patient")
    assert decisions(patient) == [("skipped", "11-22 03:01")]
    assert "window closed" in (patient[0].reason or "") and host in (patient[0].reason or "")
    assert [r.runbook for r in world.runs()] == ["hog"]


# ---------------------------------------------------------------------------------- misfires




def test_a_missed_fire_within_grace_runs_once_late_and_restarts_do_not_repeat_it(
        world: World) -> None:
    host = world.fleet.names[0]
    marker = world.fleet.root(host) / "nightly-ran"
    marker.unlink(missing_ok=True)
    world.runbook("nightly", RAN_ONCE.format(host=host))
    daemon = world.start()  # 01:00: the daemon knows the schedule from now on
    daemon = world.restart(daemon, utc("2026-11-22 05:00"))  # down over 03:00, 2h < 6h grace
    assert daemon.wait_idle(30)
    fires = world.fires("nightly")
    assert decisions(fires) == [("late", "11-22 03:00")]
    (run,) = world.runs("nightly")
    assert fires[0].run_id == run.id and run.started_by == "daemon (late)"
    assert run.status is RunStatus.SUCCEEDED
    daemon = world.restart(daemon, utc("2026-11-22 05:10"))
    daemon = world.restart(daemon, utc("2026-11-22 05:20"))
    assert daemon.wait_idle(30)
    assert decisions(world.fires("nightly")) == [("late", "11-22 03:00")]
    assert len(world.runs("nightly")) == 1 and marker.read_text() == "ran\n"


def test_a_fire_missed_beyond_grace_is_recorded_and_not_run(world: World) -> None:
    world.runbook("nightly", RAN_ONCE.format(host=world.fleet.names[0]))
    daemon = world.start()
    daemon = world.restart(daemon, utc("2026-11-22 10:00"))  # 7h after 03:00: beyond 6h
    assert daemon.wait_idle(5)
    fires = world.fires("nightly")
    assert decisions(fires) == [("missed", "11-22 03:00")]
    assert "misfire_grace" in (fires[0].reason or "")
    assert world.runs() == []
    assert world.audit("schedule.missed")


def test_after_days_down_only_the_newest_missed_fire_may_run(world: World) -> None:
    world.runbook("nightly", RAN_ONCE.format(host=world.fleet.names[0]))
    daemon = world.start()
    daemon = world.restart(daemon, utc("2026-11-25 04:00"))
    assert daemon.wait_idle(30)
    assert decisions(world.fires("nightly")) == [
        ("missed", "11-22 03:00"), ("missed", "11-23 03:00"), ("missed", "11-24 03:00"),
        ("late", "11-25 03:00")]
    assert len(world.runs("nightly")) == 1


def test_a_runbook_never_seen_before_does_not_catch_up(world: World) -> None:
    world.runbook("nightly", RAN_ONCE.format(host=world.fleet.names[0]))
    world.clock.now = utc("2026-11-22 05:00")  # 03:00 passed, but nobody scheduled it then
    daemon = world.start()
    assert daemon.wait_idle(5)
    assert world.fires() == [] and world.runs() == []


def test_two_daemons_cannot_share_a_state_directory(world: World) -> None:
    world.start()
    with pytest.raises(DaemonError, match="another maintenancebot daemon"):
        Daemon(world.settings, clock=world.clock).start()


# ---------------------------------------------------------------------------------- reload


def test_an_invalid_edit_keeps_the_old_schedule_and_a_fix_reschedules(world: World) -> None:
    host = world.fleet.names[0]
    path = world.runbook("nightly", RAN_ONCE.format(host=host))
    daemon = world.start()
    old_hash = daemon.catalog.runbooks["nightly"].source.sha256
    assert daemon.next_fires()["nightly"] == utc("2026-11-22 03:00")

    path.write_text(path.read_text().replace('"0 3 * * *"', '"0 4 * *"'))
    assert not daemon.poll()  # a file may be half-written: one look is not enough
    assert daemon.poll()
    (rejected,) = world.audit("reload.rejected")
    expected = [str(i) for i in validate_paths([world.dir, world.inventory])]
    assert rejected["issues"] == expected and f"{path}:2: schedule:" in expected[0]
    assert rejected["kept"] == ["nightly"]
    assert daemon.next_fires()["nightly"] == utc("2026-11-22 03:00")

    # The old version still fires, and the run records the content it ran.
    world.move_to(daemon, utc("2026-11-22 03:00:01"))
    assert daemon.wait_idle(30)
    (run,) = world.runs("nightly")
    assert run.runbook_hash == old_hash and run.status is RunStatus.SUCCEEDED

    path.write_text(RAN_ONCE.format(host=host).replace('"0 3 * * *"', '"30 4 * * *"'))
    daemon.poll()
    assert daemon.poll()
    assert daemon.next_fires()["nightly"] == utc("2026-11-22 04:30")
    assert daemon.catalog.runbooks["nightly"].runbook.schedule == "30 4 * * *"
    assert len(world.audit("reload.rejected")) == 1


def test_an_invalid_inventory_keeps_every_schedule(world: World) -> None:
    world.runbook("nightly", RAN_ONCE.format(host=world.fleet.names[0]))
    daemon = world.start()
    world.inventory.write_text(world.inventory.read_text() + "bogus_key: 1\n")
    daemon.poll()
    assert daemon.poll()
    (rejected,) = world.audit("reload.rejected")
    assert any("bogus_key" in line for line in rejected["issues"])  # type: ignore[union-attr]
    assert daemon.next_fires()["nightly"] == utc("2026-11-22 03:00")


def test_a_removed_runbook_is_unscheduled(world: World) -> None:
    path = world.runbook("nightly", RAN_ONCE.format(host=world.fleet.names[0]))
    daemon = world.start()
    path.unlink()
    daemon.poll()
    assert daemon.poll()
    assert "nightly" not in daemon.next_fires()


def test_a_late_run_gets_only_the_rest_of_its_window(world: World) -> None:
    world.runbook("windowed", """
        schedule: "0 3 * * *"
        window: 1h
        concurrency: 1
        steps: [{name: work, run: "sleep 1.3"}]
    """)
    daemon = world.start()
    daemon = world.restart(daemon, utc("2026-11-22 03:59:59"))  # 1 s of the window is left
    assert daemon.wait_idle(30)
    (run,) = world.runs("windowed")
    assert run.status is RunStatus.ABORTED and "window" in (run.reason or "")
    with RunStore(Path(world.settings.state_dir) / "maintenancebot.db") as store:
        statuses = [h.status for h in store.get_hosts(run.id)]
    assert statuses == [HostStatus.SUCCEEDED] + [HostStatus.NOT_STARTED] * (len(statuses) - 1)
