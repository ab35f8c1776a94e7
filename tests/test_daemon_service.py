"""The daemon as a service: health and metrics, host leases shared with the CLI, the timer
flavour's textfile, Slack notices, the kill switch, resuming parked runs at start-up.
Same world as test_daemon.py: a real APScheduler, the fleet, a clock the tests move."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from maintenancebot import resume
from maintenancebot.daemon import Daemon
from maintenancebot.models import Settings, SlackSettings
from maintenancebot.store import RunStore
from tests.daemon_world import RAN_ONCE, World, utc
from tests.harness import until
from tests.httpfakes import Reply, fake_server, slack_ok

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
    assert refused.returncode == 3, refused.stderr  # aborted: nothing ran, try later
    assert f"{host} (held by run {hog.id})" in refused.stderr
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
