"""The connection's shell (`ssh_shell`): many commands in one `/bin/sh`, each ending exactly as
it would on a channel of its own. On real sshd, except the marker parsing, which is checked
against every way SSH could cut the stream into packets."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from maintenancebot.errors import CommandTimeout, TransportError
from maintenancebot.testing.fleet import Fleet
from maintenancebot.transports.base import Command, controller_deadline
from maintenancebot.transports.ssh import SshTransport
from maintenancebot.transports.ssh_shell import DEFINE_RUNNER, _Stream, shell_line
from tests.test_transports import pids_of, unique_sleep, wait_until

# The pid of the shell a command runs in: the parent of its `timeout`.
SHELL_PID = "awk '/^PPid:/ {print $2}' /proc/$PPID/status"


def shell_of(ssh: SshTransport) -> str:
    return ssh.run(Command(SHELL_PID, timeout=30)).stdout


@pytest.mark.parametrize("sudo", [False, True])
@pytest.mark.parametrize("leaver", ["", "setsid "], ids=["in-its-group", "setsid"])
def test_a_process_left_holding_the_output_is_read_to_eof_and_the_shell_replaced(
        fleet: Fleet, leaver: str, sudo: bool) -> None:
    """As on a channel of its own, the command's output ends when the last process holding
    it exits, not when the command does; in its own session (`setsid`), outside the process
    group, too. Its later text must never reach the next command's output."""
    with SshTransport(fleet.host(fleet.names[0]), fleet.ssh_settings) as ssh:
        before = shell_of(ssh)
        # The command waits until the process has surely left its group (it said "early").
        script = f"{leaver}sh -c 'echo early; sleep 1; echo late; echo late-err >&2' & sleep 0.5"
        started = time.monotonic()
        result = ssh.run(Command(script, timeout=30, sudo=sudo))
        assert time.monotonic() - started >= 1
        assert (result.rc, result.stdout, result.stderr) == (0, "early\nlate\n", "late-err\n")
        after = ssh.run(Command("sleep 1.5; echo next", timeout=30))
        assert (after.stdout, after.stderr) == ("next\n", "")
        assert shell_of(ssh) != before


def test_a_setsid_process_is_seen_where_the_host_has_its_own_pid_namespace(
        tmp_path: Path) -> None:
    """As on a machine of its own (the benchmark's hosts): the processes a step started are
    found through that namespace's /proc."""
    with Fleet(tmp_path, 1, pid_namespaces=True) as own, \
            SshTransport(own.host(own.names[0]), own.ssh_settings) as ssh:
        processes = ssh.run(Command("ls /proc | grep -c '^[0-9]'", timeout=30)).stdout
        assert int(processes) < 20, "the host sees the controller's processes"
        result = ssh.run(Command("setsid sh -c 'echo early; sleep 1; echo late' & sleep 0.5",
                                 timeout=30))
        assert result.stdout == "early\nlate\n"


def test_a_process_that_redirected_its_output_does_not_hold_the_command(fleet: Fleet) -> None:
    """The idiom for starting something that outlives a step: it does not hold the output, so
    the step ends at once."""
    marker = unique_sleep()
    with SshTransport(fleet.host(fleet.names[0]), fleet.ssh_settings) as ssh:
        try:
            started = time.monotonic()
            result = ssh.run(Command(f"setsid sleep {marker} >/dev/null 2>&1 & echo ok",
                                     timeout=30))
            assert (result.stdout, time.monotonic() - started < 1) == ("ok\n", True)
            assert running_count(marker) == 1
            # The shell may or may not be replaced: the sleep may still have held the output,
            # before its redirection, when the shell looked.
            assert ssh.run(Command("echo next", timeout=30)).stdout == "next\n"
        finally:
            kill_all(marker)


def test_a_command_that_kills_the_shell_fails_and_the_next_gets_a_new_one(fleet: Fleet) -> None:
    with SshTransport(fleet.host(fleet.names[0]), fleet.ssh_settings) as ssh:
        before = shell_of(ssh)
        with pytest.raises(TransportError, match="shell running the command ended"):
            ssh.run(Command(f'kill -KILL "$({SHELL_PID})"; sleep 1', timeout=30))
        assert ssh.run(Command("echo fine", timeout=30)).stdout == "fine\n"
        assert shell_of(ssh) != before


def test_a_command_whose_timeout_cannot_fire_is_abandoned_and_its_shell_closed(
        fleet: Fleet) -> None:
    """With the host's `timeout` stopped, only the controller's deadline ends the wait; the
    shell, still waiting for the command, is closed and the next command gets a new one."""
    marker = unique_sleep()
    command = Command(f"echo started; kill -STOP $PPID; sleep {marker}", timeout=1)
    deadline = controller_deadline(command) or 0
    with SshTransport(fleet.host(fleet.names[0]), fleet.ssh_settings) as ssh:
        try:
            before = shell_of(ssh)
            with pytest.raises(CommandTimeout, match="still running") as caught:
                ssh.run(command)
            assert caught.value.stdout == "started\n"
            assert deadline <= caught.value.duration < deadline + 2
            assert ssh.run(Command("echo fine", timeout=30)).stdout == "fine\n"
            assert shell_of(ssh) != before
        finally:
            kill_all(marker)


def test_the_shell_sets_nothing_a_command_can_see(fleet: Fleet) -> None:
    """Each command is a process of its own: what one changes, the next does not inherit, and
    the shell's own variables are not exported."""
    with SshTransport(fleet.host(fleet.names[0]), fleet.ssh_settings) as ssh:
        on_a_channel = ssh.run(Command("env | sort")).stdout
        ssh.run(Command("cd /tmp; export LEAK=1; umask 0; set -e; exit 0", timeout=30))
        in_the_shell = ssh.run(Command("pwd; umask; env | sort", timeout=30)).stdout
        home = ssh.run(Command("pwd; umask")).stdout
    assert in_the_shell == home + on_a_channel


def test_signals_are_not_reported_into_the_output(fleet: Fleet) -> None:
    """sh says "Terminated" on stderr when its child dies by a signal; not in a step's output,
    nor in the next one's."""
    with SshTransport(fleet.host(fleet.names[0]), fleet.ssh_settings) as ssh:
        killed = ssh.run(Command("kill -TERM $$", timeout=30))
        after = ssh.run(Command("true", timeout=30))
    assert (killed.rc, killed.stderr, after.stderr) == (143, "", "")


@pytest.mark.parametrize("sudo", [False, True])
def test_no_process_on_the_host_shows_the_marker(fleet: Fleet, sudo: bool) -> None:
    """A step that prints every process's command line (`ps`) must not print its own marker:
    its output would end there."""
    with SshTransport(fleet.host(fleet.names[0]), fleet.ssh_settings) as ssh:
        result = ssh.run(Command("ps -eo args; echo end", sudo=sudo, timeout=5))
    assert (result.rc, result.stdout.splitlines()[-1]) == (0, "end")
    assert "ps -eo args" in result.stdout


@pytest.mark.parametrize("shell", [["dash"], ["bash", "--posix"]], ids=["dash", "bash"])
def test_the_runner_means_the_same_in_dash_and_in_bash(shell: list[str]) -> None:
    """/bin/sh is dash on Debian and bash on RHEL: the same lines, fed to each through pipes as
    sshd would, give the same markers, no "Terminated", and see a `setsid` process that holds
    the output."""
    lines = (DEFINE_RUNNER
             + shell_line(Command("echo a; kill -TERM $$", timeout=5), "a" * 32)
             + shell_line(Command("setsid sh -c 'echo b; sleep 1; echo late' & sleep 0.3",
                                  timeout=5), "b" * 32))
    done = subprocess.run(shell, input=lines.encode(), capture_output=True, timeout=20,
                          check=True)
    assert done.stdout.decode() == (f"a\n{'a' * 32} 143\nb\n{'b' * 32} left\n{'b' * 32} 0\n"
                                    "late\n")
    assert done.stderr.decode() == f"{'a' * 32}\n{'b' * 32}\n"


# ------------------------------------------------------------------------------ the markers


NONCE = "0123456789abcdef" * 2


@pytest.mark.parametrize("seed", range(300))
def test_markers_are_found_however_the_stream_is_cut(seed: int) -> None:
    rng = random.Random(seed)
    # Output that looks like markers: other nonces, ours with another word or cut off.
    output = rng.choice([b"", b"no newline", b"x" * 70000, os.urandom(rng.randrange(200)),
                         f"{'f' * 32} 0\n{NONCE[:31]}".encode(),
                         f"{NONCE} 1234\n{NONCE} lefty\n{NONCE}".encode()])
    left = rng.random() < 0.5
    # A process left holding the output may write between the "left" line and the status.
    stray = rng.choice([b"", b"late\n"]) if left else b""
    status = rng.randrange(256)
    marker = (f"{NONCE} left\n".encode() + stray if left else b"") + f"{NONCE} {status}\n".encode()
    stream = _Stream(NONCE, None, status=True)
    for chunk in cut(output + marker, rng):
        stream.add(chunk)
    assert (stream.done, stream.value(), stream.left, stream.status, stream.stray) == \
        (True, output + stray, left, status, False)
    err = _Stream(NONCE, None, status=False)
    for chunk in cut(output + f"{NONCE}\n".encode() + b"stray", rng):
        err.add(chunk)
    assert (err.done, err.value(), err.stray) == (True, output + b"stray", True)


def test_a_stream_that_ends_before_its_marker_keeps_everything() -> None:
    stream = _Stream(NONCE, None, status=True)
    stream.add(b"partial " + NONCE[:20].encode())
    stream.end()
    assert (stream.ended, stream.status, stream.value()) == \
        (True, None, b"partial " + NONCE[:20].encode())
    cut_off = _Stream(NONCE, None, status=True)
    cut_off.add(f"out {NONCE} 1".encode())  # the status's line end never came
    cut_off.end()
    assert (cut_off.status, cut_off.value()) == (None, f"out {NONCE} 1".encode())


def cut(data: bytes, rng: random.Random) -> list[bytes]:
    points = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randrange(8))))
    return [data[start:end] for start, end in zip([0, *points], [*points, len(data)])]


def running_count(marker: str) -> int:
    return len(pids_of(marker))


def kill_all(marker: str) -> None:
    for pid in pids_of(marker):
        os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: not pids_of(marker))
