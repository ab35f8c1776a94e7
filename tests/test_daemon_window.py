"""A runbook's `window`: no host starts after it has closed; hosts already going finish; the
run says which hosts were left for next time. Real runs on the sshd fleet."""

from __future__ import annotations

from pathlib import Path

from maintenancebot.states import HostStatus, RunStatus
from maintenancebot.testing.fleet import Fleet
from tests.harness import Bench


def test_no_host_starts_after_the_window_closes(fleet: Fleet, tmp_path: Path) -> None:
    bench = Bench(fleet, tmp_path)
    outcome = bench.run("""
        window: 1s
        concurrency: 1
        steps: [{name: work, run: "sleep 1.3"}]
    """)
    first, *rest = fleet.names
    assert outcome.hosts[first] is HostStatus.SUCCEEDED  # started inside the window, finished
    assert [outcome.hosts[name] for name in rest] == [HostStatus.NOT_STARTED] * len(rest)
    assert outcome.status is RunStatus.ABORTED
    assert "window of 1s closed" in (outcome.reason or "")
    doc = bench.document(outcome.run_id)
    left = [h for h in doc["hosts"] if h["status"] == "not_started"]
    assert [h["host"] for h in left] == rest
    assert all("left for next time" in (h.get("error") or "") for h in left), left


def test_a_window_long_enough_lets_every_host_start(fleet: Fleet, tmp_path: Path) -> None:
    outcome = Bench(fleet, tmp_path).run("""
        window: 1h
        concurrency: 1
        steps: [{name: work, run: "true"}]
    """)
    assert outcome.status is RunStatus.SUCCEEDED


def test_a_dry_run_shows_every_host_whatever_the_window(fleet: Fleet, tmp_path: Path) -> None:
    outcome = Bench(fleet, tmp_path).run("""
        window: 1s
        concurrency: 1
        steps: [{name: look, run: "sleep 0.6", readonly: true}]
    """, dry_run=True)
    assert set(outcome.hosts.values()) == {HostStatus.SUCCEEDED}
