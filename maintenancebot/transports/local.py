"""The local transport: runs commands on this machine with subprocess, for the demo and tests.

Owns process handling for `connection: local` hosts: the same `wrap_script` line the SSH transport
runs (so sudo and the remote-side `timeout` behave identically), its own session and the killing of
that whole session at the controller deadline, and plain file reads and writes. It must not
interpret results (a non-zero rc is a result) and must not leak OSError past its interface.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

from maintenancebot.errors import CommandTimeout, TransportError
from maintenancebot.models import Host
from maintenancebot.transports.base import (
    Command,
    CommandResult,
    OutputTail,
    controller_deadline,
    wrap_script,
)

_TIMEOUT_RCS = (124, 137)  # GNU timeout: 124 after SIGTERM, 128+9 when it had to SIGKILL
_DRAIN_SECONDS = 1.0  # after a kill, how long to wait for output a stray process still holds
_CHUNK = 65536


class LocalTransport:
    """`Transport` on the controller itself, as the controller's user (`host.user` is not used).
    Stateless, so connect/close are no-ops."""

    def __init__(self, host: Host) -> None:
        self.host = host

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def connect(self) -> None:
        """Nothing to open."""

    def close(self) -> None:
        """Nothing to release."""

    def run(self, command: Command, *, before_start: Callable[[], object] | None = None
            ) -> CommandResult:
        if before_start is not None:
            before_start()
        started = time.monotonic()
        try:
            # A new session, so the controller deadline can kill everything the command started.
            # cwd = home, like an SSH login.
            proc = subprocess.Popen(
                ["sh", "-c", wrap_script(command)],
                stdin=subprocess.DEVNULL if command.stdin is None else subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                start_new_session=True, cwd=Path.home(),
            )
        except OSError as exc:
            raise TransportError(f"{self.host.name}: cannot start sh: {exc}") from exc
        streams = _Streams(proc, command.stdin, command.output_limit)
        allowed = controller_deadline(command)  # seconds from `started`, or None
        # Done when both pipes are closed, as `communicate` would be: a child left in the
        # background still holding them keeps the command running.
        if not streams.finish(allowed) or _still_running(proc, allowed, started):
            _kill_session(proc, streams)
            raise CommandTimeout(
                f"{self.host.name}: command still running after {time.monotonic() - started:.0f}s "
                f"(its timeout was {command.timeout:g}s); killed its process session",
                _text(streams.out.value()), _text(streams.err.value()),
                time.monotonic() - started,
            )
        return self._result(command, _rc(proc.returncode), streams.out.value(),
                            streams.err.value(), time.monotonic() - started)

    def _result(
        self, command: Command, rc: int, out: bytes, err: bytes, duration: float
    ) -> CommandResult:
        if command.timeout and rc in _TIMEOUT_RCS and duration >= command.timeout:
            raise CommandTimeout(
                f"{self.host.name}: command timed out after {command.timeout:g}s and was killed",
                _text(out), _text(err), duration,
            )
        return CommandResult(rc, _text(out), _text(err), duration)

    def put(self, data: bytes, path: str, mode: int = 0o600) -> None:
        """Like the SSH transport: a temporary file with its final mode, renamed into place."""
        temp = _on_host(f"{path}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            with os.fdopen(fd, "wb") as handle:
                os.fchmod(handle.fileno(), mode)  # os.open's mode is filtered by the umask
                handle.write(data)
            os.replace(temp, _on_host(path))
        except OSError as exc:
            temp.unlink(missing_ok=True)
            raise TransportError(f"{self.host.name}: cannot write {path}: {exc.strerror}") from exc

    def get(self, path: str) -> bytes:
        try:
            return _on_host(path).read_bytes()
        except OSError as exc:
            raise TransportError(f"{self.host.name}: cannot read {path}: {exc.strerror}") from exc


class _Streams:
    """A command's stdout and stderr, each drained by a thread of its own into an `OutputTail`
    (so a flood of output costs at most the tail's bound), and its stdin fed by a third."""

    def __init__(self, proc: subprocess.Popen[bytes], stdin: bytes | None,
                 limit: int | None) -> None:
        self.out, self.err = OutputTail(limit), OutputTail(limit)
        assert proc.stdout is not None and proc.stderr is not None
        work: list[tuple[Callable[..., None], tuple[Any, ...]]] = [
            (_drain, (proc.stdout, self.out)), (_drain, (proc.stderr, self.err))]
        if stdin is not None:
            work.append((_feed, (proc.stdin, stdin)))
        self._threads = [threading.Thread(target=target, args=args, daemon=True)
                         for target, args in work]
        for thread in self._threads:
            thread.start()

    def finish(self, seconds: float | None) -> bool:
        """Whether the pipes closed (and stdin was written) within `seconds` (None: wait)."""
        deadline = None if seconds is None else time.monotonic() + seconds
        for thread in self._threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in self._threads)


def _drain(pipe: IO[bytes], tail: OutputTail) -> None:
    with pipe:
        for chunk in iter(lambda: pipe.read1(_CHUNK), b""):  # type: ignore[attr-defined]
            tail.add(chunk)


def _feed(pipe: IO[bytes], data: bytes) -> None:
    try:
        with pipe:
            pipe.write(data)
    except (BrokenPipeError, ValueError):
        pass  # the command did not read it all (or the pipe was closed on a kill): its choice


def _still_running(proc: subprocess.Popen[bytes], allowed: float | None,
                   started: float) -> bool:
    """Pipes closed: the command has ended or is about to; True if not `allowed` seconds
    after `started`."""
    try:
        proc.wait(None if allowed is None
                  else max(0.0, allowed - (time.monotonic() - started)))
    except subprocess.TimeoutExpired:
        return True
    return False


def _kill_session(proc: subprocess.Popen[bytes], streams: _Streams) -> None:
    """SIGKILL every process of the command's session, and keep what it printed until then.

    The process group alone is not enough: GNU `timeout` moves itself and the script into a group
    of their own, inside our session."""
    for pid in _session_members(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    # Something that left the session (setsid) may still hold our pipes: keep what arrived by
    # then. Its drain threads (daemons) end when it closes them; closing the pipes here would
    # wait for them, as a reader holds each pipe's lock.
    streams.finish(_DRAIN_SECONDS)
    proc.wait()


def _session_members(sid: int) -> list[int]:
    members = [sid]
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # after "comm)": state, ppid, pgrp, session
            members.append(int(entry.name))
    return members


def _on_host(path: str) -> Path:
    # Relative paths start at the home directory, as they do over SSH and SFTP.
    return Path.home() / path


def _rc(returncode: int) -> int:
    # subprocess reports death by signal N as -N; shells and sshd report 128+N.
    return 128 - returncode if returncode < 0 else returncode


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")
