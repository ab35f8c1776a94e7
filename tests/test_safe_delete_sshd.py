"""The hostile-tree suite of issue 3, over real sshd: the safe_delete action and its host program
against symlinks to /etc and out of the root, `..` in globs, globs that would match /, a
directory swapped for a symlink mid-run, protected files, names with newlines and invalid UTF-8,
and cap overflows. After each: nothing outside the `within` root changed (the whole test tree is
hashed before and after), and what moved comes back byte for byte with mode, owner and mtime."""

from __future__ import annotations

import json
import os
import shlex
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from maintenancebot.actions import ActionContext, ActionReport
from maintenancebot.actions._probe import REMOTE_PYTHON
from maintenancebot.actions.safe_delete import (
    SafeDeleteAction,
    SafeDeleteArgs,
    program,
    run_helper,
)
from maintenancebot.testing.fleet import Fleet
from maintenancebot.transports import Transport, open_transport
from maintenancebot.transports.base import Command
from tests.trees import (
    BAD_UTF8,
    MOVABLE,
    NEWLINE,
    OTHER_UID,
    aged,
    build_hostile,
    etc_fingerprint,
    files_digest,
    outside_of,
    without_trash,
)

ACTION = SafeDeleteAction()


def ctx(run_id: str = "run-1", step: int = 0, sudo: bool = False) -> ActionContext:
    return ActionContext(run_id=run_id, step_index=step, step_name="clean", sudo=sudo,
                         timeout=60, dry_run=False)


@pytest.fixture()
def transport(fleet: Fleet) -> Iterator[Transport]:
    link = open_transport(fleet.hosts[0], fleet.ssh_settings)
    link.connect()
    yield link
    link.close()


@pytest.fixture()
def base(fleet: Fleet, tmp_path: Path) -> Path:
    return fleet.root(fleet.names[0]) / f"hostile-{tmp_path.name}"


@pytest.fixture()
def root(base: Path) -> Path:
    return build_hostile(base)


def args(root: Path, **extra: Any) -> SafeDeleteArgs:
    return SafeDeleteArgs.model_validate({"paths": [f"{root}/**"], "within": [str(root)],
                                          **extra})


def moved(report: ActionReport, root: Path) -> set[str]:
    return {os.path.relpath(p, root) for p in report.data["files"]}


def test_hostile_tree_moves_only_what_is_inside_and_restores_every_byte(
        transport: Transport, base: Path, root: Path) -> None:
    before, etc = files_digest(base), etc_fingerprint()

    report = ACTION.apply(transport, args(root), ctx())

    assert report.ok and report.changed, report.summary
    # Names decode with backslashreplace for people; the bytes travel in the manifest.
    shown = {n.replace("\\xff\\xfe", "\udcff\udcfe") for n in moved(report, root)}
    assert shown == MOVABLE
    after = files_digest(base)
    assert outside_of(after, "root") == outside_of(before, "root")  # outside: not one byte
    assert etc_fingerprint() == etc and Path("/etc/passwd").is_file()
    for rel in ("app/fresh.log", "app/server.key", "app/site.pem", "app/site.crt",
                "app/id_ed25519", "app/.git/objects/pack.log", "app/.ssh/authorized.log",
                "app/pipe.log"):
        assert after[f"root/{rel}"] == before[f"root/{rel}"], rel  # protected or too young
    for rel in MOVABLE:
        assert f"root/{rel}" not in after, rel
    trash = root / ".maintenancebot-trash" / "run-1" / "0"
    assert (trash / "files" / str(root).lstrip("/") / "app" / "etc-dir").is_symlink()
    assert (trash / "manifest.json").is_file() and oct(trash.stat().st_mode)[-3:] == "700"
    assert report.data["bytes_trashed"] == report.data["bytes"] > 0
    assert report.data["bytes_freed"] == 0 and report.data["top_dirs"]

    undo = ACTION.rollback(transport, args(root), report, ctx())

    assert undo.ok and undo.data["restored"] == len(MOVABLE), undo.summary
    assert without_trash(files_digest(base)) == before  # content, mode, mtime, owner
    if os.geteuid() == 0:
        assert (root / "app" / "owned.log").stat().st_uid == OTHER_UID
    assert os.readlink(root / "app" / "etc-dir") == "/etc"


@pytest.mark.parametrize("sudo", [False, True], ids=["plain", "sudo"])
def test_dry_run_lists_exactly_what_the_real_run_moves(
        transport: Transport, base: Path, root: Path, sudo: bool) -> None:
    before = files_digest(base)

    plan = ACTION.preview(transport, args(root, verbose=True), ctx(sudo=sudo))

    assert files_digest(base) == before  # a preview changes nothing, not even a trash dir
    assert plan.ok and not plan.changed
    rules = "\n".join(plan.data["skipped"])
    for rule in ("protected-name", "protected-dir", "special-file", "min-age"):
        assert rule in rules
    real = ACTION.apply(transport, args(root), ctx(sudo=sudo))
    assert real.data["files"] == plan.data["files"]
    assert real.data["bytes"] == plan.data["bytes"]
    undo = ACTION.rollback(transport, args(root), real, ctx(sudo=sudo))
    assert undo.ok and without_trash(files_digest(base)) == before


def test_names_with_newlines_and_invalid_utf8_are_moved_and_restored_exactly(
        transport: Transport, base: Path, root: Path) -> None:
    before = files_digest(base)
    report = ACTION.apply(transport, args(root, paths=[f"{root}/app/*e*k*.log",
                                                     f"{root}/app/bad-*"]), ctx())
    assert report.ok and report.data["count"] == 2, report.summary
    assert not (root / "app" / NEWLINE).exists() and not (root / "app" / BAD_UTF8).exists()
    undo = ACTION.rollback(transport, args(root), report, ctx())
    assert undo.ok and without_trash(files_digest(base)) == before
    assert (root / "app" / BAD_UTF8).read_bytes() == b"not utf-8\n"


@pytest.mark.parametrize("cap", [{"max_files": 3}, {"max_bytes": 100}])
def test_past_a_cap_nothing_at_all_is_moved(transport: Transport, base: Path, root: Path,
                                            cap: dict[str, int]) -> None:
    before = files_digest(base)
    report = ACTION.apply(transport, args(root, **cap), ctx())
    assert not report.ok and not report.changed
    assert ("max_files=3" if "max_files" in cap else "max_bytes=100") in report.summary
    assert files_digest(base) == before  # not one file, not even a trash dir


def raw(transport: Transport, request: dict[str, Any]) -> dict[str, Any]:
    """The host program without the action's argument checks: what a hostile runbook that
    slipped past validation would get."""
    return run_helper(transport, request, sudo=False, timeout=60)


def test_dotdot_in_a_glob_is_refused_on_the_host(transport: Transport, base: Path,
                                                 root: Path) -> None:
    before = files_digest(base)
    answer = raw(transport, {"op": "trash", "paths": [f"{root}/app/../../outside/*"],
                             "within": [str(root)], "trash_id": ["r", "0"]})
    assert not answer["ok"] and "'..'" in answer["error"]
    assert files_digest(base) == before


@pytest.mark.parametrize("glob", ["/", "/**", "//**/**", "/*", "/**/*"])
def test_a_glob_that_would_match_slash_touches_nothing(transport: Transport, base: Path,
                                                       root: Path, glob: str) -> None:
    before = files_digest(base)
    answer = raw(transport, {"op": "trash", "paths": [glob], "within": [str(root)],
                             "trash_id": ["r", "0"]})
    if glob in ("/*",):  # matches only top-level names: none of them lies inside the root
        assert answer["ok"] and answer["count"] == 0 and answer["warnings"]
    elif glob == "/**/*":  # the root's own files may match; / itself never does
        assert answer["count"] == len(MOVABLE)
        return
    else:
        assert answer["count"] == 0 and "matches / and was dropped" in answer["warnings"][0]
    assert files_digest(base) == before


@pytest.mark.parametrize("within", ["/etc", "/", "/home", "/usr/lib", "{root}/app/etc-dir",
                                    "{root}/app/.git"])
def test_roots_on_the_floor_or_resolving_onto_it_are_refused(
        transport: Transport, base: Path, root: Path, within: str) -> None:
    before = files_digest(base)
    given = within.format(root=root)
    answer = raw(transport, {"op": "trash", "paths": [f"{given}/**"], "within": [given],
                             "trash_id": ["r", "0"], "min_age": 0})
    assert not answer["ok"] and "protected floor" in answer["error"]
    assert files_digest(base) == before


def test_a_root_given_through_a_symlink_is_walked_at_its_real_path(
        transport: Transport, base: Path, root: Path) -> None:
    (base / "alias").symlink_to(root)
    before = files_digest(base)
    answer = raw(transport, {"op": "plan", "paths": [f"{base}/alias/app/*.log"],
                             "within": [str(base / "alias")]})
    assert answer["ok"]
    assert all(f["path"].startswith(f"{root}/app/") for f in answer["files"])
    assert files_digest(base) == before


# A host-side hook between the scan and the first move: the program the host runs is the real
# one, with only its `main()` call replaced by one that swaps a directory for a symlink to the
# outside first. That is the race: the scan saw a directory, the move meets a symlink.
SWAP_MAIN = """
def _swap():
    os.rename({dir!r}, {dir!r} + ".away")
    os.symlink({target!r}, {dir!r})
_report = handle(json.loads(sys.stdin.buffer.read().decode("utf-8")), after_scan=_swap)
sys.stdout.write(json.dumps(_report, sort_keys=True) + "\\n")
"""


def test_a_directory_swapped_for_a_symlink_mid_run_cannot_redirect_a_move(
        transport: Transport, base: Path, root: Path) -> None:
    deep = root / "app" / "sub" / "deep"
    # The decoy holds a hard link to the very file the scan chose: same inode, same size and
    # mtime, so only the directory checks (no link followed, same parent) can tell them apart.
    decoy = base / "outside" / "deep"
    decoy.mkdir()
    os.link(deep / "older.log", decoy / "older.log")
    before = files_digest(base)
    source = program().replace('if __name__ == "__main__":\n    main()',
                               SWAP_MAIN.format(dir=str(deep), target=str(decoy)))
    assert source != program()
    request = {"op": "trash", "paths": [f"{root}/**"], "within": [str(root)],
               "trash_id": ["swap", "0"]}
    result = transport.run(Command(shlex.join([REMOTE_PYTHON, "-I", "-c", source]),
                                   stdin=json.dumps(request).encode(), timeout=60))
    answer = json.loads(result.stdout)

    assert answer["ok"], answer["error"]
    skipped = {s["path"]: s["rule"] for s in answer["skipped"]}
    assert skipped[f"{deep}/older.log"].startswith("changed-during-run")
    assert f"{deep}/older.log" not in {f["path"] for f in answer["files"]}
    after = files_digest(base)
    assert outside_of(after, "root") == outside_of(before, "root")  # the decoy is untouched
    assert (decoy / "older.log").read_bytes() == b"deeper\n"
    assert after["root/app/sub/deep.away/older.log"] == before["root/app/sub/deep/older.log"]
    # Everything else moved, and comes back.
    undo = raw(transport, {"op": "restore", "trash_dir": answer["trash_dir"],
                           "within": [str(root)]})
    assert undo["ok"] and undo["count"] == len(MOVABLE) - 1
    deep.unlink()  # undo the swap itself: then the whole tree is as it was, byte for byte
    deep.with_name("deep.away").rename(deep)
    assert without_trash(files_digest(base)) == before


def test_restore_never_overwrites_a_file_that_came_back(transport: Transport, base: Path,
                                                        root: Path) -> None:
    report = ACTION.apply(transport, args(root, paths=[f"{root}/app/old.log"]), ctx())
    assert report.ok and report.data["count"] == 1
    (root / "app" / "old.log").write_bytes(b"a new file with the same name\n")
    undo = ACTION.rollback(transport, args(root), report, ctx())
    assert not undo.ok and "not clobbered" in undo.summary
    assert (root / "app" / "old.log").read_bytes() == b"a new file with the same name\n"


def test_mode_delete_deletes_for_good_and_says_rollback_cannot_undo_it(
        transport: Transport, base: Path, root: Path) -> None:
    before = files_digest(base)
    report = ACTION.apply(transport, args(root, paths=[f"{root}/app/old.log",
                                                       f"{root}/app/escape.log"],
                                          mode="delete"), ctx())
    assert report.ok and report.data["count"] == 2 and report.data["bytes_freed"] > 0
    assert not (root / ".maintenancebot-trash").exists()
    after = files_digest(base)
    assert set(before) - set(after) == {"root/app/old.log", "root/app/escape.log"}
    assert outside_of(after, "root") == outside_of(before, "root")  # the link's target stays
    undo = ACTION.rollback(transport, args(root), report, ctx())
    assert not undo.ok and "deleted for good" in undo.summary


def test_a_concurrent_swapper_cannot_make_a_real_run_touch_anything_outside(
        transport: Transport, base: Path, root: Path) -> None:
    """The same race as above, unscripted: a thread flips a directory between the root and a
    parking place outside, leaving a symlink to a decoy in its place, while the real action runs
    over sshd. Timing decides how many moves meet the swap (usually dozens); whatever it
    decides, nothing outside may change and everything moved must come back."""
    busy = root / "app" / "busy"
    for i in range(200):
        aged(busy / f"f{i:03}.log", f"{i}\n".encode())
    decoy, parking = base / "outside" / "decoy", base / "outside" / "parking"
    decoy.mkdir()
    parking.mkdir()
    for i in range(0, 200, 7):  # same inodes as in the root: only the directory checks help
        os.link(busy / f"f{i:03}.log", decoy / f"f{i:03}.log")
    before = files_digest(base)
    stop = threading.Event()

    def swapper() -> None:
        while not stop.is_set():  # the directory leaves the root; a link to the decoy stands in
            busy.rename(parking / "busy")
            busy.symlink_to(decoy)
            time.sleep(0.002)
            busy.unlink()
            (parking / "busy").rename(busy)
            time.sleep(0.01)  # mostly in place, so that the scan finds files to race over

    thread = threading.Thread(target=swapper)
    thread.start()
    try:
        report = ACTION.apply(transport, args(root), ctx("race"))
    finally:
        stop.set()
        thread.join()

    assert report.ok, report.summary
    after = files_digest(base)
    assert outside_of(after, "root") == outside_of(before, "root")
    undo = ACTION.rollback(transport, args(root), report, ctx("race"))
    assert undo.ok, undo.summary
    assert without_trash(files_digest(base)) == before
