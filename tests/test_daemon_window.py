"""Run-level limits on the real code path: a runbook's `window` (no host starts after it has
closed; hosts already going finish; the run says which hosts were left) and the runbook lease
(never two runs of one runbook at once). Real runs on the sshd fleet."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from maintenancebot.errors import HostsBusy
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


def test_a_runbook_never_runs_twice_at_once_even_on_disjoint_hosts(
        fleet: Fleet, tmp_path: Path) -> None:
    bench = Bench(fleet, tmp_path)
    text = 'steps: [{name: hold, run: "sleep 1.5"}]'
    first = threading.Thread(target=bench.run, args=(text,), kwargs={"narrow": [fleet.names[0]]})
    first.start()
    try:
        with bench.store() as store:  # wait until the first run holds its leases
            for _ in range(200):
                if store.list_runs():
                    break
                time.sleep(0.02)
        with pytest.raises(HostsBusy, match="runbook test"):
            bench.run(text, narrow=[fleet.names[1]])
    finally:
        first.join()
    assert bench.run(text, narrow=[fleet.names[1]]).status is RunStatus.SUCCEEDED
