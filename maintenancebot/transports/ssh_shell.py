"""Commands through one long-lived POSIX shell per SSH connection.

A session channel per command makes sshd set up a session and start the login shell each time:
about 1.2 ms of the host's CPU and 1 ms of ours per command, more than `uptime` itself costs
(README, Performance). So a connection keeps one `/bin/sh` on one channel and hands it one
command line at a time. The command runs exactly as it would on a channel of its own (the same
`command_argv`, whose `timeout` leads a process group and kills it whole), in the background of
that shell with stdin from /dev/null. The shell then prints a marker, a random nonce per
command, with the exit status on stdout and alone on stderr; what came before the markers is
the command's output.

What a channel of its own gave for free is kept on purpose:
- **The end of the output.** A channel ends at EOF, once every process holding the output has
  exited, not only the command. So after each command the shell looks for such processes: any
  still in the command's process group (`kill -0`), and any started since the command (pids
  after its own, up to the last one /proc/loadavg gives) whose stdout or stderr is the shell's
  (a `setsid` daemon). If it finds one, or cannot tell, it exits, and the output is read on to
  EOF or the deadline, as before; the next command gets a new shell. Output after a marker
  ends the shell the same way. Otherwise a stray writer's text could land in the next
  command's output, and in what a later step registers.
- **Isolation.** Each command is a process of its own: it cannot change the shell's directory,
  variables or options. The shell itself only sets `_`, `f`, `i`, `l`, `n`, `p`, `q`, `r` and
  its positional parameters, none of them exported.
- **Quiet signals.** A shell reports a child killed by a signal ("Terminated") on stderr; `wait
  2>/dev/null` keeps that out of the output, as `exec` on a channel of its own did.
- **sudo.** The same runner goes under `sudo -n`, so that the processes are checked as root.
  It reads the marker from stdin: in its arguments, a step printing `ps` would print it.

Commands with stdin data (the end of their input is the channel's EOF) or without a timeout (no
process group to check) take a channel of their own (`SshTransport.run`).

The channel is duck-typed (paramiko's `Channel`): `transports.ssh` stays the one module that
imports paramiko, and catches what it raises.
"""

from __future__ import annotations

import re
import secrets
import shlex
from collections.abc import Callable
from typing import Any

from maintenancebot.transports.base import Command, OutputTail, command_argv
from maintenancebot.transports.ssh_output import Arrivals, read

SHELL_COMMAND = "exec /bin/sh"

# Runs "$@" (the command's argv) for marker $n and leaves its exit status in r. Then prints
# "left" unless nothing it started can still write to the output: nothing is left in the process
# group that `timeout` leads, and no process started since (pids p+1 to the last pid given, from
# /proc/loadavg) has the shell's stdout or stderr as its own (a `setsid` daemon). Without
# /proc, after a pid wrap, or with too many new pids to look at, it says "left" to be safe.
_RUNNER = """"$@" </dev/null & p=$!; wait "$p" 2>/dev/null; r=$?; l=
if kill -0 -"$p" 2>/dev/null || ! read -r _ _ _ _ q </proc/loadavg 2>/dev/null \\
  || [ "$q" -lt "$p" ] || [ $((q - p)) -gt 500 ]; then l=1; fi
i=$p; while [ -z "$l" ] && [ "$i" -lt "$q" ]; do i=$((i + 1)); [ -e /proc/$i/fd ] || continue
  for f in /proc/$i/fd/1 /proc/$i/fd/2; do
    if [ "$f" -ef /proc/$$/fd/1 ] || [ "$f" -ef /proc/$$/fd/2 ]; then l=1; fi; done; done
if [ -n "$l" ]; then printf '%s left\\n' "$n"; fi"""

# Sent once per shell, so that a command line is short to send and to parse.
DEFINE_RUNNER = f"mb_run() {{\nn=$1; shift\n{_RUNNER}\n}}\n"
# Under sudo the runner is a root `sh` of its own, and reads the marker from stdin: in its
# arguments, `ps` would show it, and a step that prints `ps` output would print the marker.
_SUDO_RUNNER = f"read -r n\n{_RUNNER}\nexit $r"


class ShellEnded(Exception):
    """The shell's channel closed before the command's markers came (the shell was killed)."""


def fits(command: Command) -> bool:
    """Whether `command` can run in the shell: it has a timeout and no stdin data (the module's
    docstring says why)."""
    return command.stdin is None and bool(command.timeout)


def shell_line(command: Command, nonce: str) -> str:
    argv = shlex.join(command_argv(command))
    markers = f"printf '%s %d\\n' {nonce} \"$r\"; printf '%s\\n' {nonce} >&2"
    if command.sudo:
        return (f"sudo -n -- sh -c {shlex.quote(_SUDO_RUNNER)} sh {argv} <<'MB_MARKER'\n"
                f"{nonce}\nMB_MARKER\nr=$?; {markers}\n")
    return f"mb_run {nonce} {argv}; {markers}\n"


class ShellSession:
    """One `/bin/sh` on `channel`, running one command at a time."""

    def __init__(self, channel: Any) -> None:
        self.channel = channel
        self._arrivals = Arrivals(channel)
        channel.sendall(DEFINE_RUNNER.encode())
        # False once the shell was told to exit (or broke): the transport then starts another.
        self.usable = True

    def run(self, command: Command, deadline: float | None,
            before_start: Callable[[], object] | None) -> tuple[int | None, bytes, bytes]:
        """(exit status, stdout, stderr); the status is None if the deadline came first.
        Raises ShellEnded, and whatever the channel raises (the caller translates it)."""
        nonce = secrets.token_hex(16)
        out = _Stream(nonce, command.output_limit, status=True)
        err = _Stream(nonce, command.output_limit, status=False)
        if before_start is not None:
            before_start()
        self.channel.sendall(shell_line(command, nonce).encode())
        if not self._read(out, err, deadline, lambda: out.done and err.done):
            self.usable = False
            return None, out.value(), err.value()
        if out.ended or err.ended:
            self.usable = False
            raise ShellEnded("the shell running the command ended before the command did")
        if out.left or out.stray or err.stray:
            # Something still holds the output: read it to EOF, as a channel of its own would.
            self.usable = False
            self.channel.sendall(b"exit\n")
            if not self._read(out, err, deadline, lambda: False):
                return None, out.value(), err.value()
        return out.status, out.value(), err.value()

    def _read(self, out: _Stream, err: _Stream, deadline: float | None,
              finished: Callable[[], bool]) -> bool:
        """Read both streams until `finished()` or EOF (True), or the deadline (False)."""
        if not read(self.channel, self._arrivals, out.add, err.add, deadline, finished):
            return False
        if not finished():  # EOF
            out.end()
            err.end()
        return True


# A marker is the nonce and a word up to a line end: " left" or " <status>" on stdout, nothing
# on stderr. Anything longer after the nonce is not one of ours.
_STATUS_WORD = re.compile(rb" (\d{1,3})")
_LONGEST_WORD = 8


class _Stream:
    """One of the shell's streams during one command: the command's bytes up to its last
    marker (kept as `OutputTail` keeps them), then, if anything came after that, stray bytes
    from someone still holding the stream. On stdout, the "left" marker may come first."""

    def __init__(self, nonce: str, limit: int | None, *, status: bool) -> None:
        self._nonce = nonce.encode()
        self._tail = OutputTail(limit)
        self._wants_status = status
        self._carry = b""  # the end of what came, in case it starts a marker
        self.done = False
        self.ended = False  # EOF came before the marker
        self.left = False
        self.status: int | None = None
        self.stray = False  # bytes came after the marker: someone else holds the stream

    def add(self, data: bytes) -> None:
        if self.done:
            self.stray = True
            self._tail.add(data)
            return
        data = self._carry + data
        self._carry = b""
        while not self.done:
            at = data.find(self._nonce)
            if at < 0:
                cut = max(0, len(data) - len(self._nonce) + 1)
                self._tail.add(data[:cut])
                self._carry = data[cut:]
                return
            self._tail.add(data[:at])
            after = at + len(self._nonce)
            end = data.find(b"\n", after, after + _LONGEST_WORD + 1)
            if end < 0 and len(data) - after <= _LONGEST_WORD:
                self._carry = data[at:]  # the marker's word has not all come yet
                return
            if end >= 0 and self._take(data[after:end]):
                data = data[end + 1:]
            else:  # the nonce with another word (not from us): output
                self._tail.add(self._nonce)
                data = data[after:]
        if data:
            self.stray = True
            self._tail.add(data)  # the command's, as everything up to EOF will be

    def _take(self, word: bytes) -> bool:
        """Whether `word` completes one of our markers (and note what it says)."""
        if not self._wants_status:
            self.done = word == b""
            return self.done
        if word == b" left":
            self.left = True
            return True
        match = _STATUS_WORD.fullmatch(word)
        if match is None:
            return False
        self.status, self.done = int(match.group(1)), True
        return True

    def end(self) -> None:
        """EOF: whatever came and was not a whole marker is the command's output."""
        if not self.done:
            self.ended = self.done = True

    def value(self) -> bytes:
        if self._carry:  # cut off: what may have been the start of a marker is output too
            self._tail.add(self._carry)
            self._carry = b""
        return self._tail.value()
