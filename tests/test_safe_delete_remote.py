"""The safe_delete host program on its own, run locally through `handle()` (and once through old
interpreters as the hosts would run it): the rules that do not need a network to be shown."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from maintenancebot.actions.remote.safe_delete import handle
from maintenancebot.actions.safe_delete import program
from tests.trees import BAD_UTF8, MOVABLE, aged, build_hostile, files_digest, without_trash

OLD_PYTHONS = [Path.home() / f".pyenv/versions/{v}/bin/python{v[:3]}"
               for v in ("3.6.15", "3.7.16", "3.8.18", "3.9.18")]


def trash(root: Path, **extra: object) -> dict[str, object]:
    return handle({"op": "trash", "paths": [f"{root}/**"], "within": [str(root)],
                   "trash_id": ["run", "0"], **extra})


@pytest.mark.parametrize("python", OLD_PYTHONS, ids=lambda p: p.name)
def test_the_program_runs_on_old_pythons_in_the_c_locale(tmp_path: Path, python: Path) -> None:
    if not python.exists():
        pytest.skip(f"{python} is not installed here")
    root = build_hostile(tmp_path / "base")
    before = files_digest(tmp_path / "base")

    def run(request: dict[str, object]) -> dict[str, object]:
        done = subprocess.run([str(python), "-I", "-c", program()], input=json.dumps(request),
                              capture_output=True, text=True, timeout=60, check=False,
                              env={"LC_ALL": "C", "PATH": "/usr/bin"})
        answer: dict[str, object] = json.loads(done.stdout)
        assert done.returncode == (0 if answer["ok"] else 1), done.stderr
        return answer

    moved = run({"op": "trash", "paths": [f"{root}/**"], "within": [str(root)],
                 "trash_id": ["old", "0"]})
    assert moved["ok"] and moved["count"] == len(MOVABLE), moved["error"]
    assert not (root / "app" / BAD_UTF8).exists()
    back = run({"op": "restore", "trash_dir": moved["trash_dir"], "within": [str(root)]})
    assert back["ok"] and back["count"] == len(MOVABLE)
    assert without_trash(files_digest(tmp_path / "base")) == before


@pytest.mark.parametrize("plant", ["world-writable", "other-owner"])
def test_a_planted_trash_dir_is_never_used(tmp_path: Path, plant: str) -> None:
    root = build_hostile(tmp_path / "base")
    planted = root / ".maintenancebot-trash"
    planted.mkdir()
    if plant == "world-writable":
        planted.chmod(0o777)
    elif os.geteuid() == 0:
        os.chown(planted, 4321, 4321)
    else:
        pytest.skip("needs root to give the dir another owner")
    before = files_digest(tmp_path / "base")
    report = trash(root)
    assert not report["ok"] and "not private" in str(report["error"])
    assert files_digest(tmp_path / "base") == before


def test_a_forged_manifest_cannot_make_a_restore_write_outside_the_roots(tmp_path: Path) -> None:
    root = build_hostile(tmp_path / "base")
    report = trash(root, paths=[f"{root}/app/old.log"])
    assert report["ok"] and report["count"] == 1
    manifest_path = root / ".maintenancebot-trash" / "run" / "0" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    evil = tmp_path / "base" / "outside" / "cron-job"
    manifest["files"][0]["path_b64"] = base64.b64encode(str(evil).encode()).decode()
    manifest_path.write_text(json.dumps(manifest))
    back = handle({"op": "restore", "trash_dir": report["trash_dir"], "within": [str(root)]})
    assert not back["ok"] and "outside the within roots" in str(back["errors"])
    assert not evil.exists()


def test_purge_unlinks_a_symlink_in_the_trash_and_never_follows_it(tmp_path: Path) -> None:
    root = build_hostile(tmp_path / "base")
    now = time.time()
    report = trash(root, paths=[f"{root}/app/old.log"], now=now)
    assert report["ok"] and report["count"] == 1
    files = root / ".maintenancebot-trash" / "run" / "0" / "files"
    (files / "planted").symlink_to(tmp_path / "base" / "outside")
    before = files_digest(tmp_path / "base" / "outside")
    gone = handle({"op": "purge", "trash_base": str(root / ".maintenancebot-trash"),
                   "retention": 3600, "now": now + 3601})
    assert gone["ok"] and gone["count"] == 2, gone  # the file and the link
    assert not (root / ".maintenancebot-trash" / "run").exists()
    assert files_digest(tmp_path / "base" / "outside") == before


def test_purge_keeps_what_is_younger_than_retention_and_other_runs(tmp_path: Path) -> None:
    root = build_hostile(tmp_path / "base")
    now = time.time()
    assert trash(root, paths=[f"{root}/app/old.log"], now=now)["count"] == 1
    assert handle({"op": "trash", "paths": [f"{root}/app/owned.log"], "within": [str(root)],
                   "trash_id": ["other", "0"], "now": now - 1000})["count"] == 1
    base = str(root / ".maintenancebot-trash")
    young = handle({"op": "purge", "trash_base": base, "retention": 10, "now": now + 5,
                    "runs": ["run"]})
    assert young["ok"] and young["kept"] == 1 and young["purged"] == []
    named = handle({"op": "purge", "trash_base": base, "retention": 10, "now": now + 11,
                    "runs": ["run"]})
    assert [p["dir"] for p in named["purged"]] == [f"{base}/run/0"]
    assert (root / ".maintenancebot-trash" / "other" / "0" / "manifest.json").is_file()


def test_a_file_replaced_between_scan_and_move_is_left_alone(tmp_path: Path) -> None:
    root = build_hostile(tmp_path / "base")
    target = root / "app" / "old.log"

    def replace() -> None:
        target.unlink()
        aged(target, b"a different file, same name and age\n")

    report = handle({"op": "trash", "paths": [str(target)], "within": [str(root)],
                     "trash_id": ["run", "0"]}, after_scan=replace)
    assert report["ok"] and report["count"] == 0
    assert report["skipped"][0]["rule"].startswith("changed-during-run")
    assert target.read_bytes() == b"a different file, same name and age\n"


@pytest.mark.parametrize("request_", [
    {"op": "trash", "paths": ["relative/*"], "within": ["/tmp"], "trash_id": ["a", "b"]},
    {"op": "trash", "paths": ["/tmp/x/*"], "within": ["/tmp/x"], "trash_id": ["..", "b"]},
    {"op": "restore", "trash_dir": "/tmp/not-a-trash", "within": ["/tmp"]},
    {"op": "purge", "trash_base": "/tmp/.maintenancebot-trash/run", "retention": 0},
    {"op": "rm -rf"},
])
def test_malformed_requests_are_refused_whole(request_: dict[str, object]) -> None:
    report = handle(request_)
    assert not report["ok"] and report["error"] and report["count"] == 0


def test_a_trash_that_turns_non_private_mid_run_stops_the_step_and_it_undoes_itself(
        tmp_path: Path) -> None:
    from maintenancebot.actions import ActionContext
    from maintenancebot.actions.safe_delete import SafeDeleteAction, SafeDeleteArgs
    from maintenancebot.models import Host
    from maintenancebot.transports.local import LocalTransport

    root = build_hostile(tmp_path / "base")
    before = files_digest(tmp_path / "base")
    # Someone made one level of the trash group-writable before the step reached it.
    planted = (root / ".maintenancebot-trash" / "run-x" / "0" / "files"
               / str(root).lstrip("/") / "app" / "sub")
    planted.mkdir(parents=True)
    for level in [planted, *planted.parents]:
        if level == root:
            break
        level.chmod(0o700)
    planted.chmod(0o770)
    report = SafeDeleteAction().apply(
        LocalTransport(Host(name="here", address="localhost", connection="local")),
        SafeDeleteArgs.model_validate({"paths": [f"{root}/**"], "within": [str(root)]}),
        ActionContext(run_id="run-x", step_index=0, step_name="t", sudo=False, timeout=60,
                      dry_run=False))
    assert not report.ok and "stopped: trash directory sub is not private" in report.summary
    assert report.data["count"] > 0 and report.data["undone"] and not report.changed
    assert without_trash(files_digest(tmp_path / "base")) == before


class NoPython:
    """A host without python3, as our own Transport interface reports it (the shell's 127)."""

    def run(self, command: object) -> object:
        from maintenancebot.transports.base import CommandResult

        return CommandResult(127, "", "sh: 1: python3: not found\n", 0.01)


def test_a_host_without_python3_fails_the_step_with_a_clear_message() -> None:
    from maintenancebot.actions import ActionContext
    from maintenancebot.actions.safe_delete import SafeDeleteAction, SafeDeleteArgs

    report = SafeDeleteAction().apply(
        NoPython(),  # type: ignore[arg-type]
        SafeDeleteArgs.model_validate({"paths": ["/srv/x/*"], "within": ["/srv/x"]}),
        ActionContext(run_id="r", step_index=0, step_name="t", sudo=True, timeout=60,
                      dry_run=False))
    assert not report.ok and not report.changed
    assert report.summary == ("python3 is not installed on the host (safe_delete runs a "
                              "Python 3.6+ program there)")


# Runs inside its own mount namespace, where `mnt` is a tmpfs: files there must cross
# filesystems to reach the trash under the first root (copy, fsync, verify, unlink) and again on
# the way back. Prints what the test checks.
ACROSS = r"""
import json, os, subprocess, sys
from pathlib import Path
from maintenancebot.actions.remote.safe_delete import handle
base = Path(sys.argv[1])
disk, mnt = base / "disk", base / "mnt"
subprocess.run(["mount", "-t", "tmpfs", "none", str(mnt)], check=True)
victim = mnt / "big.log"
victim.write_bytes(os.urandom(300000))
victim.chmod(0o640)
os.utime(victim, (1000000000, 1000000000))
before = (victim.read_bytes(), victim.stat().st_mode, victim.stat().st_mtime_ns)
moved = handle({"op": "trash", "paths": [str(mnt) + "/*"], "within": [str(disk), str(mnt)],
                "trash_id": ["x", "0"], "one_file_system": True})
copy = Path(moved["trash_dir"]) / "files" / str(victim).lstrip("/")
in_trash = (copy.read_bytes(), copy.stat().st_mode, copy.stat().st_mtime_ns) == before
gone = not victim.exists()
back = handle({"op": "restore", "trash_dir": moved["trash_dir"],
               "within": [str(disk), str(mnt)]})
after = (victim.read_bytes(), victim.stat().st_mode, victim.stat().st_mtime_ns)
print(json.dumps({"moved": moved["count"], "ok": moved["ok"] and back["ok"], "gone": gone,
                  "in_trash": in_trash, "restored": back["count"], "same": after == before,
                  "copy_left": copy.exists(), "devs": os.stat(disk).st_dev != os.stat(mnt).st_dev}))
"""


def test_across_filesystems_files_are_copied_verified_and_come_back(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs in a private mount namespace needs root")
    (tmp_path / "disk").mkdir()
    (tmp_path / "mnt").mkdir()
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable,
                           "-c", ACROSS, str(tmp_path)], capture_output=True, text=True,
                          timeout=60, check=False, cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"moved": 1, "ok": True, "gone": True, "in_trash": True,
                                       "restored": 1, "same": True, "copy_left": False,
                                       "devs": True}


MOUNTED = r"""
import json, os, subprocess, sys
from pathlib import Path
from maintenancebot.actions.remote.safe_delete import handle
root = Path(sys.argv[1]) / "root"
subprocess.run(["mount", "-t", "tmpfs", "none", str(root / "mounted")], check=True)
for path in (root / "here.log", root / "mounted" / "there.log"):
    path.write_bytes(b"old\n")
    os.utime(path, (1000000000, 1000000000))
answers = [handle({"op": "trash", "paths": [str(root) + "/**"], "within": [str(root)],
                   "trash_id": ["m", str(i)], "one_file_system": one_fs})
           for i, one_fs in enumerate((True, False))]
print(json.dumps({"moved": [a["count"] for a in answers],
                  "rules": [a["skipped_counts"] for a in answers],
                  "there": (root / "mounted" / "there.log").exists()}))
"""


def test_a_mount_point_inside_a_root_is_never_entered(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs in a private mount namespace needs root")
    (tmp_path / "root" / "mounted").mkdir(parents=True)
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable,
                           "-c", MOUNTED, str(tmp_path)], capture_output=True, text=True,
                          timeout=60, check=False, cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr
    # one_file_system: false admits same-mount subvolumes, never a mount point. (The second
    # pass also meets the first one's trash dir, which is never walked.)
    assert json.loads(done.stdout) == {"moved": [1, 0], "there": True, "rules": [
        {"mount-point": 1}, {"mount-point": 1, "protected-dir": 1}]}


def test_restore_remakes_missing_directories_below_the_root_but_never_the_root(
        tmp_path: Path) -> None:
    root = build_hostile(tmp_path / "base")
    moved = trash(root, paths=[f"{root}/app/sub/deep/older.log"])
    assert moved["count"] == 1
    shutil.rmtree(root / "app" / "sub")
    back = handle({"op": "restore", "trash_dir": moved["trash_dir"], "within": [str(root)]})
    assert back["ok"] and (root / "app" / "sub" / "deep" / "older.log").read_bytes() == \
        b"deeper\n"

    other = tmp_path / "base" / "other"  # a second root; the trash lives in the first
    aged(other / "x.log")
    within = [str(root), str(other)]
    gone = handle({"op": "trash", "paths": [f"{other}/*"], "within": within,
                   "trash_id": ["run", "1"]})
    assert gone["count"] == 1
    shutil.rmtree(other)
    again = handle({"op": "restore", "within": within, "trash_dir": gone["trash_dir"]})
    assert not again["ok"] and not other.exists()
    assert "No such file or directory" in again["errors"][0]["error"]
