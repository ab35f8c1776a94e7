"""safe_delete through the whole bot (loader -> plan -> engine -> store -> SSH) on real sshd
hosts: the dry-run lists exactly the files the real run moves, and a failing later step rolls
the step back so that every file returns with its metadata."""

from __future__ import annotations

from pathlib import Path

import pytest

from maintenancebot.states import HostStatus, RunStatus
from maintenancebot.testing.fleet import Fleet
from tests.harness import Bench
from tests.trees import MOVABLE, build_hostile, etc_fingerprint, files_digest, without_trash


@pytest.fixture
def bench(fleet: Fleet, tmp_path: Path) -> Bench:
    return Bench(fleet, tmp_path)


def trees(bench: Bench) -> tuple[str, dict[str, Path]]:
    """A hostile tree on every host; returns the dir name (same on each host) and the bases."""
    name = f"sd-{bench.tmp.name}"
    bases = {host: bench.fleet.root(host) / name for host in bench.fleet.names}
    for base in bases.values():
        build_hostile(base)
    return name, bases


def runbook(name: str, *, then_fail: bool = False) -> str:
    text = f"""
        hosts: all
        steps:
          - name: Trash old files
            action: safe_delete
            with:
              paths: ["{{{{ root }}}}/{name}/root/**"]
              within: ["{{{{ root }}}}/{name}/root"]
              exclude: ["*/escape-dir"]
    """
    if then_fail:
        text += """
          - {name: A later step fails, run: 'exit 3'}
        """
    return text


def test_dry_run_lists_exactly_the_files_the_real_run_moves_on_every_host(bench: Bench) -> None:
    name, bases = trees(bench)
    before = {host: files_digest(base) for host, base in bases.items()}

    dry = bench.run(runbook(name), dry_run=True)

    assert dry.status is RunStatus.SUCCEEDED
    assert {host: files_digest(base) for host, base in bases.items()} == before
    planned = {h: bench.steps(dry.run_id, h)[0] for h in bench.fleet.names}
    real = bench.run(runbook(name))
    assert real.status is RunStatus.SUCCEEDED
    for host in bench.fleet.names:
        done = bench.steps(real.run_id, host)[0]
        assert planned[host]["status"] == "would_run" and done["status"] == "ok"
        assert done["files"] == planned[host]["files"]
        assert len(done["files"]) == len(MOVABLE) - 1  # escape-dir is excluded
        assert done["details"]["bytes"] == planned[host]["details"]["bytes"] > 0


def test_a_failing_later_step_rolls_back_and_every_file_comes_back(bench: Bench) -> None:
    name, bases = trees(bench)
    before = {host: files_digest(base) for host, base in bases.items()}
    etc = etc_fingerprint()

    outcome = bench.run(runbook(name, then_fail=True))

    assert outcome.status is RunStatus.FAILED
    assert set(outcome.hosts.values()) == {HostStatus.FAILED}
    for host, base in bases.items():
        steps = bench.steps(outcome.run_id, host)
        assert [(s["kind"], s["status"]) for s in steps] == [
            ("step", "rolled_back"), ("step", "failed"), ("rollback", "ok")]
        assert steps[2]["details"]["restored"] == len(MOVABLE) - 1
        assert without_trash(files_digest(base)) == before[host]
    assert etc_fingerprint() == etc
