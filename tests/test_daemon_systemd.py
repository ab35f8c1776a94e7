"""The systemd side of the daemon: the unit files pass `systemd-analyze verify`, and the notify
protocol speaks to a real datagram socket named by NOTIFY_SOCKET (sd_notify(3))."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from maintenancebot.sdnotify import Notifier

REPO = Path(__file__).resolve().parent.parent
UNITS = REPO / "systemd"
SYSTEM_UNITS = Path("/usr/lib/systemd/system")


def _verify_root(tmp: Path) -> Path:
    """A root for `systemd-analyze verify --root`: the system's own units (sysinit.target and
    friends, which verify follows), our units, and the programs their Exec lines name."""
    root = tmp / "root"
    shutil.copytree(SYSTEM_UNITS, root / SYSTEM_UNITS.relative_to("/"), symlinks=True)
    (root / "lib").symlink_to("usr/lib")  # merged /usr, for unit links that name /lib/...
    (root / "etc/systemd/system").mkdir(parents=True)
    for unit in UNITS.iterdir():
        shutil.copy(unit, root / "etc/systemd/system" / unit.name)
    for program in ("/opt/maintenancebot/venv/bin/maintenancebot", "/bin/kill"):
        target = root / program.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("#!/bin/sh\n")
        target.chmod(0o755)
    return root


def _verify(root: Path, *units: str) -> subprocess.CompletedProcess[str]:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing: `make setup` installs the Debian package systemd"
    return subprocess.run([analyze, "verify", "--man=no", f"--root={root}", *units],
                          capture_output=True, text=True, timeout=60, check=False)


UNIT_NAMES = ("maintenancebot.service", "maintenancebot-run@weekly-maintenance.service",
              "maintenancebot-run@weekly-maintenance.timer")


def test_the_unit_files_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    result = _verify(_verify_root(tmp_path), *UNIT_NAMES)
    # verify exits 0 on unknown keys and bad values (it only warns): any output is a failure.
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), (
        result.stdout + result.stderr)


def test_verify_would_catch_a_broken_unit(tmp_path: Path) -> None:
    # The check above is only worth something if a mistake in a unit makes it fail.
    root = _verify_root(tmp_path)
    unit = root / "etc/systemd/system/maintenancebot.service"
    unit.write_text(unit.read_text().replace("ProtectSystem=", "ProtectSystm="))
    result = _verify(root, "maintenancebot.service")
    assert "ProtectSystm" in result.stderr


def test_the_daemon_unit_is_notify_with_reload_watchdog_and_hardening() -> None:
    text = (UNITS / "maintenancebot.service").read_text()
    lines = {line.strip() for line in text.splitlines()}
    for expected in ("Type=notify", "ExecReload=/bin/kill -HUP $MAINPID", "Restart=on-failure",
                     "User=maintenancebot", "StateDirectory=maintenancebot",
                     "NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes",
                     "ProtectHome=read-only", "KillMode=mixed"):
        assert expected in lines, expected
    assert any(line.startswith("WatchdogSec=") for line in lines)
    # The stop budget of the daemon stays inside the unit's, so systemd never SIGKILLs a step.
    assert "--stop-timeout 80s" in text and "TimeoutStopSec=90s" in lines
    timer = (UNITS / "maintenancebot-run@.timer").read_text()
    assert "Persistent=true" in timer


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    yield sock, path
    sock.close()


def test_notify_sends_datagrams_to_the_socket_systemd_names(
        notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "30000000",
                         "WATCHDOG_PID": str(os.getpid())})
    assert notifier.ready("2 runbook(s) scheduled")
    assert sock.recv(4096).decode().splitlines() == [
        "READY=1", "STATUS=2 runbook(s) scheduled", f"MAINPID={os.getpid()}"]
    assert notifier.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"
    assert notifier.stopping("bye")
    assert sock.recv(4096).decode().splitlines() == ["STOPPING=1", "STATUS=bye"]
    assert notifier.watchdog_interval == 15.0  # half of WatchdogSec, as systemd advises


def test_notify_reaches_an_abstract_socket() -> None:
    name = f"maintenancebot-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).status("hello")
        assert sock.recv(4096) == b"STATUS=hello"


def test_without_notify_socket_nothing_is_sent_and_the_watchdog_is_off() -> None:
    notifier = Notifier({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"})
    assert not notifier.enabled and not notifier.ready("x")
    assert notifier.watchdog_interval is None  # the watchdog is for pid 1, not for us


def test_a_vanished_socket_is_logged_not_raised(tmp_path: Path) -> None:
    assert not Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")}).ready("x")
