"""The CLI's consoles (maintenancebot/terminal.py): rich is loaded only when a stream may be a
terminal, and then rich decides exactly as it did before (a real pseudo-terminal, FORCE_COLOR,
TTY_COMPATIBLE)."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PROBE = ("import sys; from maintenancebot.terminal import LazyConsole; "
         "terminal = LazyConsole(stderr=True).is_terminal; print(terminal, 'rich' in sys.modules)")


def probe(stderr: int, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE")}
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, stdout=subprocess.PIPE,
                          stderr=stderr, text=True, env={**clean, **env}, timeout=60, check=True)
    return done.stdout.strip()


@pytest.mark.parametrize(("env", "expected"), [
    ({}, "False False"),
    ({"FORCE_COLOR": "1"}, "True True"),
    ({"FORCE_COLOR": ""}, "False True"),
    ({"TTY_COMPATIBLE": "1"}, "True True"),
    ({"TTY_COMPATIBLE": "0"}, "False True"),
])
def test_a_pipe_is_no_terminal_without_rich_unless_the_environment_says_so(
        env: dict[str, str], expected: str) -> None:
    assert probe(subprocess.PIPE, **env) == expected


def test_a_pseudo_terminal_is_a_terminal() -> None:
    leader, follower = pty.openpty()
    try:
        assert probe(follower) == "True True"
    finally:
        os.close(leader)
        os.close(follower)


def test_printing_goes_to_the_stream_of_the_moment(capsys: pytest.CaptureFixture[str]) -> None:
    from maintenancebot.terminal import LazyConsole

    console = LazyConsole(stderr=True, highlight=False)
    assert not console.is_terminal
    console.print("to stderr", markup=False)
    assert capsys.readouterr().err == "to stderr\n"
