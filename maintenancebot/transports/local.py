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
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Self

from maintenancebot.errors import CommandTimeout, TransportError
from maintenancebot.models import Host
from maintenancebot.transports.base import (
    Command,
    CommandResult,
    controller_deadline,
    keep_tail,
    wrap_script,
)

_TIMEOUT_RCS = (124, 137)  # GNU timeout: 124 after SIGTERM, 128+9 when it had to SIGKILL
_DRAIN_SECONDS = 1.0  # after a kill, how long to wait for output a stray process still holds


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
        try:
            out, err = proc.communicate(command.stdin, timeout=controller_deadline(command))
        except subprocess.TimeoutExpired:
            out, err = _kill_session(proc)
            raise CommandTimeout(
                f"{self.host.name}: command still running after {time.monotonic() - started:.0f}s "
                f"(its timeout was {command.timeout:g}s); killed its process session",
                _text(out), _text(err), time.monotonic() - started,
            ) from None
        # Read whole first (the memory is spent): the same result as over SSH, not its bound.
        out, err = keep_tail(out, command.output_limit), keep_tail(err, command.output_limit)
        return self._result(command, _rc(proc.returncode), out, err, time.monotonic() - started)

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


def _kill_session(proc: subprocess.Popen[bytes]) -> tuple[bytes, bytes]:
    """SIGKILL every process of the command's session, then collect what it printed.

    The process group alone is not enough: GNU `timeout` moves itself and the script into a group
    of their own, inside our session."""
    for pid in _session_members(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        return proc.communicate(timeout=_DRAIN_SECONDS)
    except subprocess.TimeoutExpired as exc:
        # Something left the session (setsid) and still holds our pipes: keep what we have.
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
        proc.wait()
        return exc.stdout or b"", exc.stderr or b""


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
