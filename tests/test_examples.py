"""Every runbook in runbooks/ against the demo fleet: it validates, its dry-run changes nothing
on any host (whole trees hashed before and after), and it lists every step of every host."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from maintenancebot import app, views
from maintenancebot.loader import load_runbook
from maintenancebot.models import Settings
from maintenancebot.testing.demo import demo_inventory, seed
from maintenancebot.testing.fleet import Fleet
from tests.harness import tree_digest

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((REPO / "runbooks").glob("*.yaml"))
DRY_OUTCOMES = {"ok", "would_run", "skipped", "unknown", "needs_approval"}


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
    assert {p.stem for p in EXAMPLES} >= {"fleet-health", "rolling-restart"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_a_dry_run_of_each_example_changes_nothing_and_lists_every_step(
    demo: tuple[Fleet, Settings, Path], path: Path
) -> None:
    fleet, settings, inventory = demo
    hosts_dir = fleet.workdir / "hosts"
    before = tree_digest(hosts_dir)
    plan = app.prepare(settings, str(path), str(inventory), None)
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
                    if s["status"] not in DRY_OUTCOMES]
        assert not problems, (host["host"], problems)


def test_rolling_restart_really_restarts_the_canary_and_records_it(
    demo: tuple[Fleet, Settings, Path]
) -> None:
    fleet, settings, inventory = demo
    plan = app.prepare(settings, str(REPO / "runbooks/rolling-restart.yaml"), str(inventory), None)
    outcome = app.execute(settings, plan, dry_run=False)
    assert str(outcome.status) == "succeeded"
    for host in plan.hosts:
        assert (fleet.root(host.name) / "run/app.running").exists()
    with app.open_store(settings) as store:
        doc = views.run_document(store, outcome.run_id)
    restart = doc["hosts"][0]["steps"][0]
    assert restart["status"] == "ok" and restart["changed"] is True
