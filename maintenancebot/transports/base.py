"""The small interface between the bot's logic and a host: run a command, move a file.

Commands are data. A `Command` holds the shell script exactly as the runbook rendered it; the
transport alone decides how to wrap it (sudo, remote timeout) and quotes with `shlex` in one place,
`wrap_script`, shared by every transport so that local and SSH runs execute the very same line.
"""

from __future__ import annotations

import math
import re
import shlex
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from maintenancebot.models import Host

# Seconds the remote `timeout` waits after SIGTERM before SIGKILL; the controller-side deadline
# is the remote one plus this plus a margin, so the remote kill normally wins and reports rc 124.
KILL_GRACE = 3


@dataclass(frozen=True)
class Command:
    script: str
    stdin: bytes | None = None
    timeout: float | None = None
    sudo: bool = False
    env: dict[str, str] = field(default_factory=dict)
    # Keep only the last this many bytes of stdout and of stderr (None: all). A runbook's
    # command gets a limit, so that one printing gigabytes cannot take the controller's memory
    # (and every other host's run) with it; the bot's own helpers print bounded reports.
    output_limit: int | None = None


# What a runbook's command (a step, a rollback, the check between batches) keeps of its stdout
# and of its stderr, from the end: enough for any `register` a runbook reasons about, and at
# most ~10 MB per host however much it prints.
RUNBOOK_OUTPUT_LIMIT = 4 << 20


class OutputTail:
    """The last `limit` bytes of a stream, kept as it arrives (all of it when `limit` is
    None), and how many bytes before them were dropped."""

    def __init__(self, limit: int | None) -> None:
        self._limit = limit
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._dropped = 0

    def add(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        limit = self._limit
        while limit is not None and self._chunks and self._size - len(self._chunks[0]) >= limit:
            first = self._chunks.popleft()  # whole chunks: no copying while a flood goes on
            self._size -= len(first)
            self._dropped += len(first)

    def value(self) -> bytes:
        """What was kept; if anything was dropped, a line before it says how much."""
        data = b"".join(self._chunks)
        dropped = self._dropped
        if self._limit is not None and len(data) > self._limit:
            dropped += len(data) - self._limit
            data = data[len(data) - self._limit:]
        if not dropped:
            return data
        return (f"[maintenancebot: {dropped} bytes of output dropped; the last {len(data)} "
                "follow]\n").encode() + data


@dataclass(frozen=True)
class CommandResult:
    rc: int
    stdout: str
    stderr: str
    duration: float

    @property
    def ok(self) -> bool:
        return self.rc == 0


class Transport(Protocol):
    host: Host

    def connect(self) -> None:
        """Open the connection (raises ConnectError / HostKeyError). Idempotent."""

    def run(self, command: Command, *, before_start: Callable[[], object] | None = None
            ) -> CommandResult:
        """Run to completion; a non-zero rc is a result, not an error. Raises CommandTimeout
        (the command was killed, whole process group) or TransportError (connection lost).
        `before_start` is called once everything is ready and the command about to start; the
        command does not start unless it returns (it waits for the step's record to be on disk,
        while the channel opens)."""

    def put(self, data: bytes, path: str, mode: int = 0o600) -> None:
        """Write `data` to `path` on the host (as the login user)."""

    def get(self, path: str) -> bytes:
        """Read a file from the host (as the login user)."""

    def close(self) -> None:
        """Release the connection. Idempotent; never raises."""


def wrap_script(command: Command) -> str:
    """The one shell line a transport executes for `command`: `command_argv`, through `sudo -n`
    when the command wants root (it fails at once instead of prompting for a password that
    nobody will type)."""
    argv = command_argv(command)
    return shlex.join(["sudo", "-n", "--", *argv] if command.sudo else argv)


def command_argv(command: Command) -> list[str]:
    """What runs `command` once the user is right: with a timeout, `timeout` runs the script
    (through `sh -c`, or itself for a plain command: `_plain_command`) in its own process group
    and kills that whole group (TERM, then KILL), so a hung step cannot survive its deadline
    even though no pty is allocated. That group is also what tells the SSH transport's shell
    whether a command left processes behind (`ssh_shell`)."""
    argv = _plain_command(command.script) or ["sh", "-c", command.script]
    if command.env:
        argv = ["env", *(f"{key}={value}" for key, value in sorted(command.env.items())), *argv]
    if command.timeout:
        seconds = max(1, math.ceil(command.timeout))
        argv = ["timeout", "-k", str(KILL_GRACE), str(seconds), *argv]
    return argv


# A script that is one simple command with nothing for a shell to expand or interpret (no
# variables, globs, redirections, operators, assignments, escapes; quotes only around literal
# text) and that names a program, not a shell builtin or keyword, means exactly "exec this program
# with these words", which `timeout`, `env` or `sudo` do themselves: the host then starts one
# process fewer for the step (`uptime`, `find /var/log -name '*.log' -mtime +7`). Anything else
# runs through `sh -c` as written.
_PLAIN_PART = r"""(?:[\w./,:+@=-]|'[^'\n]*'|"[^"$`\\\n]*")"""
_PLAIN = re.compile(rf"[\w./,:+@-]+(?: +{_PLAIN_PART}+)*", re.ASCII)
_SHELL_WORDS = frozenset((
    ".", ":", "alias", "bg", "break", "builtin", "case", "cd", "chdir", "command", "continue",
    "declare", "do", "done", "echo", "elif", "else", "esac", "eval", "exec", "exit", "export",
    "false", "fc", "fg", "fi", "for", "function", "getopts", "hash", "if", "in", "jobs", "kill",
    "let", "local", "printf", "pwd", "read", "readonly", "return", "select", "set", "shift",
    "source", "test", "then", "time", "times", "trap", "true", "type", "typeset", "ulimit",
    "umask", "unalias", "unset", "until", "wait", "while",
))


# Within a plain script, a word is a run of parts, and quote removal keeps each part's text:
# POSIX sh's (and shlex.split's) result for this grammar, at a sixth of shlex's cost per step.
_WORD = re.compile(rf"{_PLAIN_PART}+", re.ASCII)
_PART_TEXT = re.compile(r"""'([^'\n]*)'|"([^"$`\\\n]*)"|([\w./,:+@=-]+)""", re.ASCII)


def _plain_command(script: str) -> list[str] | None:
    if not _PLAIN.fullmatch(script):
        return None
    # Each part matches one group of _PART_TEXT, so joining a match's groups gives its text.
    words = ["".join(map("".join, _PART_TEXT.findall(word))) for word in _WORD.findall(script)]
    if words[0] in _SHELL_WORDS or words[0].startswith("-"):
        return None
    return words


def controller_deadline(command: Command) -> float | None:
    """How long the controller waits before giving up on a command whose remote kill failed."""
    if not command.timeout:
        return None
    return math.ceil(command.timeout) + KILL_GRACE + 2


TransportFactory = Callable[[Host], Transport]
