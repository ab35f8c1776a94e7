"""The README's first command: the demo must keep working end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_the_demo_validates_plans_runs_and_shows_history(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "maintenancebot.testing.demo", "--dir", str(tmp_path)],
        capture_output=True, text=True, timeout=180, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "== maintenancebot validate" in out and "== maintenancebot history" in out
    assert "DRY RUN: nothing was changed on any host" in out
    assert "needs_approval" in out, "the dry-run shows the gated reboot"
    # The first host's cleanup really ran: its stale temp file was parked, not deleted.
    parked = tmp_path / "fleet/hosts/host-01/var/tmp/maintenancebot/parked/build-0.tmp"
    assert parked.is_file()
    assert (tmp_path / "fleet/hosts/host-02/var/tmp/build-0.tmp").is_file()
