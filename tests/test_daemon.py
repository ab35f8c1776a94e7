"""The daemon's decisions, in-process, with a real APScheduler and a clock the tests move.

The only fake is the clock: APScheduler's `datetime` (what it reads as "now") and the daemon's
clock both follow `FakeClock`. Runs are real: the same `app.execute` as the CLI, against the
sshd fleet (and one `connection: local` host where only timing matters), recorded in SQLite.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import apscheduler.schedulers.base as apscheduler_base
import pytest

from maintenancebot import resume
from maintenancebot.daemon import Daemon, DaemonError
from maintenancebot.loader import validate_paths
from maintenancebot.models import Settings, SlackSettings
from maintenancebot.scheduling import fire_times_between
from maintenancebot.states import HostStatus, RunStatus
from maintenancebot.store import FireRecord, RunRecord, RunStore
from maintenancebot.testing.fleet import Fleet
from tests.harness import until
from tests.httpfakes import Reply, fake_server, slack_ok


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


RAN_ONCE = """
    schedule: "0 3 * * *"
    hosts: [{host}]
    steps: [{{name: mark, run: "echo ran >> {{{{ root }}}}/nightly-ran"}}]
"""


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


# ---------------------------------------------------------------------------------- health


def test_healthz_and_metrics_answer_from_the_store_and_the_schedule(world: World) -> None:
    world.runbook("nightly", RAN_ONCE.format(host=world.fleet.names[0]))
    daemon = world.start(listen=("127.0.0.1", 0))
    assert daemon.http_address is not None
    base = "http://{}:{}".format(*daemon.http_address)
    world.move_to(daemon, utc("2026-11-22 03:00:01"))
    assert daemon.wait_idle(30)

    with urllib.request.urlopen(f"{base}/metrics", timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        metrics = response.read().decode()
    samples = dict(line.rsplit(" ", 1) for line in metrics.splitlines()
                   if line and not line.startswith("#"))
    assert samples['maintenancebot_runs_total{runbook="nightly",status="succeeded",'
                   'dry_run="false"}'] == "1"
    assert samples['maintenancebot_schedule_fires_total{runbook="nightly",'
                   'decision="started"}'] == "1"
    assert samples['maintenancebot_step_duration_seconds_count{runbook="nightly"}'] == "1"
    assert float(samples['maintenancebot_last_success_timestamp_seconds{runbook="nightly"}']) > 0
    assert float(samples['maintenancebot_next_fire_timestamp_seconds{runbook="nightly"}']) == (
        utc("2026-11-23 03:00").timestamp())
    assert samples["maintenancebot_llm_tokens_total"] == "0"

    with urllib.request.urlopen(f"{base}/healthz", timeout=5) as response:
        assert json.load(response)["status"] == "ok"
    daemon.request_stop("test")
    with pytest.raises(urllib.error.HTTPError) as failed:
        urllib.request.urlopen(f"{base}/healthz", timeout=5)
    assert failed.value.code == 503 and json.load(failed.value)["status"] == "stopping"


def test_a_cli_run_is_refused_on_a_host_a_scheduled_run_holds(world: World) -> None:
    host = world.fleet.names[0]
    world.runbook("hog", f"""
        schedule: "0 3 * * *"
        hosts: [{host}]
        steps: [{{name: hold, run: "sleep 2"}}]
    """)
    other = world.runbook("other", f"""
        hosts: [{host}]
        steps: [{{name: quick, run: "true"}}]
    """)
    config = world.dir.parent / "config.yaml"
    config.write_text(world.fleet.config_yaml(Path(world.settings.state_dir), runbooks=world.dir,
                                              inventory=world.inventory))
    world.clock.now = utc("2026-11-22 02:59")
    daemon = world.start()
    world.move_to(daemon, utc("2026-11-22 03:00:01"))
    until(lambda: bool(world.runs("hog")))

    def cli_run() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "maintenancebot", "--config", str(config),
                               "run", str(other)], capture_output=True, text=True, timeout=60,
                              check=False)

    refused = cli_run()
    (hog,) = world.runs("hog")
    assert refused.returncode == 1, refused.stderr
    # (the console wraps long lines; the words are what a person reads)
    assert f"{host} (held by run {hog.id})" in " ".join(refused.stderr.split())
    assert world.runs("other") == []  # nothing started, nothing recorded as a run
    assert daemon.wait_idle(30)
    assert cli_run().returncode == 0


def test_a_lease_left_by_a_dead_process_is_reclaimed(world: World, tmp_path: Path) -> None:
    db = Path(world.settings.state_dir) / "maintenancebot.db"
    grab = ("import sys; from maintenancebot.store import RunStore; "
            "print(RunStore(sys.argv[1]).acquire_hosts(['web-01'], 'run dead', 'x'))")
    done = subprocess.run([sys.executable, "-c", grab, str(db)], capture_output=True, text=True,
                          check=True, timeout=60)
    assert done.stdout.strip() == "{}"  # it took the lease, then died holding it
    with RunStore(db) as store:
        assert store.busy_hosts(["web-01"]) == {}
        assert store.acquire_hosts(["web-01"], "run alive", "y") == {}
        assert store.busy_hosts(["web-01"]) == {"web-01": "run alive"}
        reclaimed = [a for a in store.audit_log() if a.action == "lease.reclaimed"]
    assert [(a.host, a.details["holder"]) for a in reclaimed] == [("web-01", "run dead")]


def test_the_timer_flavour_writes_a_node_exporter_textfile(world: World) -> None:
    world.runbook("nightly", RAN_ONCE.format(host=world.fleet.names[0]))
    daemon = world.start()
    world.move_to(daemon, utc("2026-11-22 03:00:01"))
    assert daemon.wait_idle(30)
    config = world.dir.parent / "config.yaml"
    config.write_text(world.fleet.config_yaml(Path(world.settings.state_dir), runbooks=world.dir,
                                              inventory=world.inventory))
    textfile = world.dir.parent / "collector" / "maintenancebot.prom"
    textfile.parent.mkdir()
    done = subprocess.run([sys.executable, "-m", "maintenancebot", "--config", str(config),
                           "metrics", "--textfile", str(textfile)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    text = textfile.read_text()
    assert ('maintenancebot_runs_total{runbook="nightly",status="succeeded",dry_run="false"} 1'
            in text.splitlines())
    assert "maintenancebot_up" not in text  # no daemon behind a textfile
    assert [p.name for p in textfile.parent.iterdir()] == ["maintenancebot.prom"]


def test_a_missed_fire_and_a_rejected_edit_are_sent_to_slack(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLACK_BOT_TOKEN", "xoxb-1-test")
    path = world.runbook("nightly", RAN_ONCE.format(host=world.fleet.names[0]))
    with fake_server([slack_ok()]) as slack:
        world.settings = world.settings.model_copy(update={"slack": SlackSettings(
            channel="#maintenance", base_url=slack.url + "api/")})
        daemon = world.start()
        daemon = world.restart(daemon, utc("2026-11-22 05:00"))  # within the grace: late run
        assert daemon.wait_idle(30)
        daemon = world.restart(daemon, utc("2026-11-23 10:00"))  # beyond the 6h grace
        path.write_text(path.read_text().replace("steps:", "stepz:"))
        daemon.poll()
        assert daemon.poll()
        # Sent from the daemon's announcer thread: scheduling never waits for Slack.
        until(lambda: any("stepz" in json.dumps(r.json()) for r in slack.requests))
        assert daemon.stop("test over")  # while Slack still answers: the queue drains
        posted = [json.dumps(request.json()) for request in slack.requests]
    assert any("nightly: late" in text and "missed while the daemon was down" in text
               for text in posted), posted
    assert any("nightly: missed" in text and "misfire_grace" in text for text in posted), posted
    assert any("invalid runbook" in text and "stepz" in text for text in posted), posted


def test_fires_while_the_kill_switch_is_set_are_skipped_and_recorded(world: World) -> None:
    world.runbook("nightly", RAN_ONCE.format(host=world.fleet.names[0]))
    daemon = world.start()
    daemon.store.set_stop("incident 4711", "alice")
    world.move_to(daemon, utc("2026-11-22 03:00:01"))
    assert daemon.wait_idle(5)
    (fire,) = world.fires("nightly")
    assert fire.decision == "skipped" and "incident 4711" in (fire.reason or "")
    assert world.runs() == []


def test_a_slow_slack_does_not_hold_up_the_schedule(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLACK_BOT_TOKEN", "xoxb-1-test")
    world.runbook("nightly", RAN_ONCE.format(host=world.fleet.names[0]))
    slow = Reply(200, {"ok": True, "channel": "C1", "ts": "1.2", "message": {"ts": "1.2"}},
                 delay=1.5)
    with fake_server([slow]) as slack:
        world.settings = world.settings.model_copy(update={"slack": SlackSettings(
            channel="#maintenance", base_url=slack.url + "api/")})
        daemon = world.start()
        daemon.stop("restart")
        world.clock.now = utc("2026-11-22 10:00")  # 03:00 missed beyond grace: announced
        began = time.monotonic()
        daemon = world.start()
        assert time.monotonic() - began < 1.0  # READY did not wait for Slack's 1.5 s
        assert [f.decision for f in world.fires("nightly")] == ["missed"]
        until(lambda: len(slack.requests) >= 1)
        assert daemon.stop("test over")  # while Slack still answers: the queue drains


def test_startup_resumes_runs_parked_on_approvals_before_scheduling(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    # Runs parked on approvals are taken back first, then the schedule starts; the end-to-end
    # resume (kill -9, approve, nothing re-run) is in test_approvals_resume.py.
    calls: list[tuple[object, object, dict[str, object]]] = []

    def resume_waiting_runs(settings: Settings, store: RunStore) -> list[threading.Thread]:
        calls.append((settings, store, dict(daemon_next_fires())))
        return []

    monkeypatch.setattr(resume, "resume_waiting_runs", resume_waiting_runs)
    world.runbook("nightly", RAN_ONCE.format(host=world.fleet.names[0]))
    daemon = Daemon(world.settings, clock=world.clock)
    world.daemons.append(daemon)

    def daemon_next_fires() -> dict[str, object]:
        return dict(daemon.next_fires())

    daemon.start()
    assert len(calls) == 1
    settings, store, scheduled_then = calls[0]
    assert settings is world.settings and store is daemon.store
    assert scheduled_then == {}  # nothing was scheduled yet when parked runs resumed