"""The README's first command: the demo must keep working end to end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from maintenancebot.states import RunStatus
from maintenancebot.store import RunStore
from maintenancebot.testing.demo import start_docker


def test_the_demo_validates_plans_runs_and_shows_history(tmp_path: Path) -> None:
    # An earlier demo in the same directory: its hosts are gone with its fleet, so its runs
    # (and the trash they list) must be gone from what this demo shows.
    with RunStore.of_state_dir(tmp_path / "state") as earlier:
        earlier.create_run("19990101-000000-earlier", runbook="fleet-health", runbook_path=None,
                           runbook_hash=None, dry_run=False, started_by="demo", selection=None,
                           hosts=[("host-01", None)])
        earlier.finish_run("19990101-000000-earlier", RunStatus.SUCCEEDED)
    result = subprocess.run(
        [sys.executable, "-m", "maintenancebot.testing.demo", "--dir", str(tmp_path)],
        capture_output=True, text=True, timeout=180, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "== maintenancebot validate" in out and "== maintenancebot history" in out
    assert "DRY RUN: nothing was changed on any host" in out
    assert "needs_approval" in out, "the dry-run shows the gated reboot"
    assert "== maintenancebot deny" in out and "denied" in out, "on-call said no to the reboot"
    first, second = tmp_path / "fleet/hosts/host-01", tmp_path / "fleet/hosts/host-02"
    # fleet-health parked the first host's stale temp file, then disk-pressure trashed it:
    # moved into the run's trash, restorable, never deleted.
    assert not (first / "var/tmp/build-0.tmp").exists()
    assert [p.name for p in (first / "var/tmp/.maintenancebot-trash").rglob("build-0.tmp")]
    assert (second / "var/tmp/build-0.tmp").is_file(), "hosts below the threshold keep theirs"
    # weekly-maintenance compressed yesterday's log and pruned the old one, on every host it ran.
    logs = sorted(p.name for p in (first / "var/log/app").iterdir() if not p.name.startswith("."))
    assert logs == ["app.log", "app.log.1.gz", "app.log.2.gz"]
    assert "== maintenancebot trash list" in out and "Trash old temp files" in out
    assert "earlier" not in out


def test_the_demo_sets_up_its_docker_images_again_in_the_same_directory(tmp_path: Path) -> None:
    # `make demo` twice: the second one found the first one's container and stopped with a 409.
    if os.environ.get("MAINTENANCEBOT_SKIP_DOCKER") == "1":
        pytest.skip("MAINTENANCEBOT_SKIP_DOCKER=1")
    for _ in range(2):
        docker = start_docker(tmp_path)
        assert docker is not None, "this machine runs dockerd (see tests/test_action_docker_prune)"
        try:
            assert sorted(tag for image in json.loads(docker.request("GET", "/images/json")[1])
                          for tag in image["RepoTags"]) == \
                ["demo/batch:2024", "demo/web:0", "demo/web:1"]
        finally:
            docker.stop()


def test_a_demo_ended_by_sigterm_or_sighup_stops_its_hosts_and_dockerd(tmp_path: Path) -> None:
    # pkill, a CI timeout or a closed terminal: the demo's root-login sshds and its dockerd
    # must not outlive it, listening, holding a mount that makes `rm -rf` of the clone fail.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        workdir = tmp_path / signum.name
        demo = subprocess.Popen(
            [sys.executable, "-m", "maintenancebot.testing.demo", "--dir", str(workdir)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            assert demo.stdout is not None
            for line in demo.stdout:  # dockerd starts last, after the hosts
                if "dockerd for host-01" in line or "no Docker clean-up" in line:
                    break
            assert _processes_using(workdir), "the hosts run"
            demo.send_signal(signum)
            assert demo.wait(60) == 128 + signum
        finally:
            if demo.poll() is None:
                demo.kill()
        assert _processes_using(workdir) == []
        assert str(workdir) not in Path("/proc/self/mountinfo").read_text()


def _processes_using(workdir: Path) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # gone meanwhile
        if str(workdir) in text and "maintenancebot.testing.demo" not in text:
            found.append(text)
    return found


def test_the_demo_unmounts_a_data_root_that_a_killed_dockerd_left_mounted(
        tmp_path: Path) -> None:
    if os.environ.get("MAINTENANCEBOT_SKIP_DOCKER") == "1":
        pytest.skip("MAINTENANCEBOT_SKIP_DOCKER=1")
    data = tmp_path / "dockerd" / "data"
    data.mkdir(parents=True)
    # What SIGKILL leaves: dockerd mounts its data root on itself and never unmounts it.
    subprocess.run(["mount", "--bind", str(data), str(data)], check=True)
    try:
        docker = start_docker(tmp_path)
        assert docker is not None
        docker.stop()
        assert str(data) not in Path("/proc/self/mountinfo").read_text()
    finally:
        subprocess.run(["umount", str(data)], check=False, capture_output=True)
