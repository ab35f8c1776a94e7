"""Every runbook in runbooks/ against the demo fleet: it validates, its dry-run changes nothing
on any host (whole trees hashed before and after), and it lists every step of every host."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from maintenancebot import app, views
from maintenancebot.approvals import answer
from maintenancebot.engine import RunOutcome
from maintenancebot.loader import load_runbook
from maintenancebot.models import Approvers, Settings
from maintenancebot.prepare import prepare
from maintenancebot.testing.demo import demo_inventory, seed
from maintenancebot.testing.fleet import Fleet
from tests.harness import tree_digest

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((REPO / "runbooks").glob("*.yaml"))
DRY_OUTCOMES = {"ok", "would_run", "skipped", "unknown", "needs_approval"}
# Checks that the demo fleet is seeded to fail: a failed check in a dry-run is the truth.
EXPECTED_ALERTS = {("weekly-maintenance", "host-02", "Backups are fresh")}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Fleet, Settings, Path]]:
    workdir = tmp_path_factory.mktemp("examples")
    with Fleet(workdir / "fleet", 3) as fleet:
        seed(fleet)
        inventory = workdir / "inventory.yaml"
        inventory.write_text(demo_inventory(fleet))
        settings = Settings(state_dir=str(workdir / "state"), ssh=fleet.ssh_settings)
        yield fleet, settings, inventory


def test_there_are_examples() -> None:
    assert {p.stem for p in EXAMPLES} >= {"fleet-health", "rolling-restart", "weekly-maintenance",
                                          "disk-pressure"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_a_dry_run_of_each_example_changes_nothing_and_lists_every_step(
    demo: tuple[Fleet, Settings, Path], path: Path
) -> None:
    fleet, settings, inventory = demo
    hosts_dir = fleet.workdir / "hosts"
    before = tree_digest(hosts_dir)
    plan = prepare(settings, str(path), str(inventory), None)
    outcome = app.execute(settings, plan, dry_run=True)
    assert tree_digest(hosts_dir) == before, "the dry-run changed a host"
    with app.open_store(settings) as store:
        doc = views.run_document(store, outcome.run_id)
    assert doc["label"] == "DRY RUN" and doc["changed_nothing"] is True
    names = [step.name for step in load_runbook(path).steps]
    assert {h["host"] for h in doc["hosts"]} == {h.name for h in plan.hosts}
    for host in doc["hosts"]:
        steps = [s for s in host["steps"] if s["kind"] == "step"]
        assert [s["name"] for s in steps] == names, host["host"]
        problems = [(s["name"], s["status"], s["error"]) for s in steps
                    if s["status"] not in DRY_OUTCOMES
                    and (path.stem, host["host"], s["name"]) not in EXPECTED_ALERTS]
        assert not problems, (host["host"], problems)


def test_rolling_restart_really_restarts_the_canary_and_records_it(
    demo: tuple[Fleet, Settings, Path]
) -> None:
    fleet, settings, inventory = demo
    plan = prepare(settings, str(REPO / "runbooks/rolling-restart.yaml"), str(inventory), None)
    outcome = app.execute(settings, plan, dry_run=False)
    assert str(outcome.status) == "succeeded"
    for host in plan.hosts:
        assert (fleet.root(host.name) / "run/app.running").exists()
    with app.open_store(settings) as store:
        doc = views.run_document(store, outcome.run_id)
    restart = doc["hosts"][0]["steps"][0]
    assert restart["status"] == "ok" and restart["changed"] is True


def _facts(settings: Settings, run_id: str) -> dict[tuple[str, str], Any]:
    with app.open_store(settings) as store:
        doc = views.run_document(store, run_id)
    return {(host["host"], step["name"]): (step["status"], step.get("details") or {})
            for host in doc["hosts"] for step in host["steps"] if step["kind"] == "step"}


def test_the_weekly_real_run_does_exactly_what_its_dry_run_listed(
    demo: tuple[Fleet, Settings, Path]
) -> None:
    fleet, settings, inventory = demo
    # This machine's apt stands behind every demo host: never patch it from a test.
    plan = prepare(settings, str(REPO / "runbooks/weekly-maintenance.yaml"), str(inventory),
                       None, {"apply_patches": False})
    dry = _facts(settings, app.execute(settings, plan, dry_run=True).run_id)
    # The last demo host has a pending reboot: the gated reboot parks it, and on-call says no.
    settings = settings.model_copy(update={"approvers": Approvers(cli=["oncall"])})
    done: list[RunOutcome] = []
    running = threading.Thread(target=lambda: done.append(
        app.execute(settings, plan, dry_run=False, started_by="cron")))
    running.start()
    with app.open_store(settings) as store:
        deadline = time.monotonic() + 60
        while not store.list_approvals() and time.monotonic() < deadline:
            time.sleep(0.1)
        request = store.list_approvals()[0]
        assert [h.host for h in request.hosts] == [fleet.names[-1]]
        answer(settings, store, request.id, approve=False, by="oncall", channel="cli",
               reason="not in the demo")
    running.join(60)
    real = _facts(settings, done[0].run_id)
    assert real[(fleet.names[-1], "Reboot for the new kernel")][0] == "denied"
    assert dry.keys() == real.keys()
    for key, (status, details) in dry.items():
        if key[1] == "Compress and prune logs":
            assert status == "would_run" and real[key][0] == "ok"
            assert sorted(real[key][1]["files"]) == sorted(details["files"]), key
            assert details["files"], "the seeded logs were found"
        elif key[1] in ("Backups are fresh", "Certificates are not about to expire"):
            assert real[key][0] == status, key  # read-only checks: same verdict
    first = fleet.root(fleet.names[0]) / "var/log/app"
    assert sorted(p.name for p in first.iterdir() if not p.name.startswith(".")) == [
        "app.log", "app.log.1.gz", "app.log.2.gz"]
