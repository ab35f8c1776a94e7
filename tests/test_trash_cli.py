"""`maintenancebot trash list | restore | purge` as an operator uses them, against runs made on
real sshd hosts: restore by hand on selected hosts, purge after retention (frees the trash and
touches nothing else), and the audit trail of both."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from maintenancebot.states import RunStatus
from maintenancebot.testing.fleet import Fleet
from tests.harness import Bench
from tests.trees import MOVABLE, aged, build_hostile, files_digest, without_trash

REPO = Path(__file__).resolve().parent.parent
TRASH = ".maintenancebot-trash"


class Operator:
    """The real CLI in a subprocess, on the same store and inventory as a Bench."""

    def __init__(self, bench: Bench) -> None:
        self.config = bench.tmp / "config.yaml"
        self.config.write_text(bench.fleet.config_yaml(Path(bench.settings.state_dir),
                                                       inventory=bench.inventory))

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "MAINTENANCEBOT_CONFIG": str(self.config), "NO_COLOR": "1"}
        return subprocess.run([sys.executable, "-m", "maintenancebot", *args], cwd=REPO,
                              capture_output=True, text=True, env=env, timeout=120, check=False)

    def json(self, *args: str) -> object:
        done = self(*args, "--json")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)


@pytest.fixture
def bench(fleet: Fleet, tmp_path: Path) -> Bench:
    return Bench(fleet, tmp_path)


def trash_everything(bench: Bench, name: str, hosts: str = "all") -> str:
    outcome = bench.run(f"""
        hosts: {hosts}
        steps:
          - name: Trash old files
            action: safe_delete
            with: {{paths: ["{{{{ root }}}}/{name}/root/**"], within: ["{{{{ root }}}}/{name}/root"]}}
    """)
    assert outcome.status is RunStatus.SUCCEEDED
    return outcome.run_id


def test_restore_by_hand_brings_every_file_back_on_the_selected_hosts(bench: Bench) -> None:
    name = f"cli-{bench.tmp.name}"
    bases = {h: bench.fleet.root(h) / name for h in bench.fleet.names}
    for base in bases.values():
        build_hostile(base)
    before = {h: files_digest(b) for h, b in bases.items()}
    run_id = trash_everything(bench, name)
    first, *others = bench.fleet.names
    op = Operator(bench)

    listed = op.json("trash", "list", "--run", run_id[:12])
    assert {(e["host"], e["state"], e["count"]) for e in listed} == {
        (h, "trashed", len(MOVABLE)) for h in bench.fleet.names}
    done = op("trash", "restore", run_id, "--host", first, "--by", "alice")

    assert done.returncode == 0, done.stderr
    assert f"{first}: ok: restored {len(MOVABLE)} file(s)" in done.stdout
    assert without_trash(files_digest(bases[first])) == before[first]
    for host in others:  # not selected: still in the trash
        assert not (bases[host] / "root" / "app" / "old.log").exists()
    states = {e["host"]: e["state"] for e in op.json("trash", "list", "--run", run_id)}
    assert states == {first: "restored", **{h: "trashed" for h in others}}
    plain = op("trash", "list", "--host", first)
    assert plain.returncode == 0 and f"{run_id}  {first}" in plain.stdout
    assert "restored" in plain.stdout

    again = op("trash", "restore", run_id)  # the rest; the first host has nothing left
    assert again.returncode == 0, again.stderr
    for host, base in bases.items():
        assert without_trash(files_digest(base)) == before[host]
    with bench.store() as store:
        audit = [a for a in store.audit_log(run_id) if a.action == "trash.restore"]
    assert (audit[0].host, audit[0].actor) == (first, "alice")
    assert sorted(a.host for a in audit) == sorted(bench.fleet.names)


def test_restore_of_an_unknown_run_or_host_is_bad_input(bench: Bench) -> None:
    name = f"cli-{bench.tmp.name}"
    aged(bench.fleet.root(bench.fleet.names[0]) / name / "root" / "a.log")
    op = Operator(bench)
    missing = op("trash", "restore", "20991231-000000-ffffff")
    assert missing.returncode == 2 and "no run" in missing.stderr
    run_id = trash_everything(bench, name, hosts=bench.fleet.names[0])
    wrong = op("trash", "restore", run_id, "--host", "no-such-host")
    assert wrong.returncode == 2 and "no trash on no-such-host" in wrong.stderr
    looked = bench.run("hosts: all\nsteps: [{name: look, run: 'true'}]")
    nothing = op("trash", "restore", "latest")  # names the run it means, not "latest"
    assert (nothing.returncode, nothing.stderr.strip()) == (
        2, f"error: run {looked.run_id} moved nothing to the trash")


def test_purge_after_retention_frees_the_trash_and_touches_nothing_else(bench: Bench) -> None:
    host = bench.fleet.names[0]
    name = f"purge-{bench.tmp.name}"
    base = bench.fleet.root(host) / name
    root = build_hostile(base)
    aged(root / "later" / "second.log", b"x" * 5000)
    op = Operator(bench)
    old_run = bench.run(f"""
        hosts: {host}
        steps:
          - name: Trash the app
            action: safe_delete
            with: {{paths: ["{{{{ root }}}}/{name}/root/app/**"],
                    within: ["{{{{ root }}}}/{name}/root"]}}
    """).run_id
    kept = op("trash", "purge")  # default retention (7 days): nothing is old enough
    assert kept.returncode == 0 and "nothing is older than the retention" in kept.stdout
    # Margins of several seconds either way, for a loaded CI machine: the old run is past 8 s
    # when we purge, the new one (a run and two CLI calls later) is not.
    time.sleep(10)
    new_run = bench.run(f"""
        hosts: {host}
        steps:
          - name: Trash later
            action: safe_delete
            with: {{paths: ["{{{{ root }}}}/{name}/root/later/*"],
                    within: ["{{{{ root }}}}/{name}/root"]}}
    """).run_id
    old_trash, new_trash = root / TRASH / old_run, root / TRASH / new_run
    assert old_trash.is_dir() and new_trash.is_dir()
    before = files_digest(base)

    preview = op("trash", "purge", "--older-than", "8s", "--dry-run")
    assert preview.returncode == 0, preview.stderr
    assert f"would purge 1 trash dir(s), {len(MOVABLE)} file(s)" in preview.stdout
    assert files_digest(base) == before

    done = op("trash", "purge", "--older-than", "8s", "--by", "bob")

    assert done.returncode == 0, done.stderr
    assert f"{host}: ok: purged 1 trash dir(s), {len(MOVABLE)} file(s)" in done.stdout
    assert not old_trash.exists()  # freed
    after = files_digest(base)
    assert after == {k: v for k, v in before.items() if f"{TRASH}/{old_run}" not in k}
    assert (new_trash / "0" / "manifest.json").is_file()  # younger: kept, still restorable
    states = {e["run_id"]: e["state"] for e in op.json("trash", "list")}
    assert states == {old_run: "purged", new_run: "trashed"}
    with bench.store() as store:
        purges = [a for a in store.audit_log() if a.action == "trash.purge"]
    assert [(p.host, p.actor, p.details["runs"]) for p in purges] == [(host, "bob", [old_run])]
    assert purges[0].details["bytes"] > 0
    restored = op("trash", "restore", new_run)
    assert restored.returncode == 0 and (root / "later" / "second.log").stat().st_size == 5000
    gone = op("trash", "restore", old_run)
    assert gone.returncode == 0 and "nothing to restore (already purged)" in gone.stdout


def test_a_later_step_purges_trash_past_retention_on_its_way_and_its_dry_run_says_so(
        bench: Bench) -> None:
    host = bench.fleet.names[0]
    name = f"auto-{bench.tmp.name}"
    base = bench.fleet.root(host) / name
    root = build_hostile(base)
    aged(root / "later" / "second.log", b"y" * 3000)

    def step(paths: str) -> str:
        return f"""
            hosts: {host}
            steps:
              - name: Trash
                action: safe_delete
                with: {{paths: ["{{{{ root }}}}/{name}/root/{paths}"],
                        within: ["{{{{ root }}}}/{name}/root"]}}
        """

    first = bench.run(step("app/**")).run_id
    time.sleep(2.2)
    short = bench.settings.model_copy(update={"trash_retention": 2.0})
    before = files_digest(base)

    dry = bench.run(step("later/*"), dry_run=True, settings=short)
    planned = bench.steps(dry.run_id, host)[0]["details"]
    assert files_digest(base) == before
    assert [p["dir"] for p in planned["purged"]] == [f"{root}/{TRASH}/{first}/0"]
    real = bench.run(step("later/*"), settings=short)
    done = bench.steps(real.run_id, host)[0]["details"]

    assert done["purged"] == planned["purged"] and done["bytes_purged"] > 0
    assert not (root / TRASH / first).exists()
    assert (root / TRASH / real.run_id / "0" / "manifest.json").is_file()
    after = files_digest(base)
    assert without_trash(after) == {k: v for k, v in without_trash(before).items()
                                    if k != "root/later/second.log"}
    states = {e["run_id"]: e["state"] for e in Operator(bench).json("trash", "list")}
    assert states == {first: "purged", real.run_id: "trashed"}
