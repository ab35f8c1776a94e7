"""Shared plumbing for actions that ask a host something: run one command, or run a small
stdlib-only Python program on the host with a JSON request on stdin and a JSON answer on stdout.

Owned here: how an action turns "ask the host" into a `Command` (sudo and timeout from the
`ActionContext`, `LC_ALL=C` so tools print parseable English), the one-round-trip remote Python
runner, and small value parsers several actions share (byte sizes). Not here: anything specific to
one action, and no quoting by hand: shell lines are built with `shlex.join`/`shlex.quote` by the
callers, and the Python runner passes its request as data on stdin, never inside the program text.
"""

from __future__ import annotations

import json
import re
import shlex
from typing import Annotated, Any

from pydantic import BeforeValidator

from maintenancebot.actions import ActionContext
from maintenancebot.transports.base import Command, CommandResult, Transport

# Tools like apt-get and dnf translate their output; the parsers expect the C locale.
C_LOCALE = {"LC_ALL": "C"}

# Hosts run their own Python 3 (any 3.x the distribution ships); only the standard library is
# used by the programs we send, so nothing has to be installed on a host.
REMOTE_PYTHON = "python3"


class ProbeError(Exception):
    """A probe ran but its answer could not be understood (no python3, garbled output)."""


def run(
    transport: Transport,
    ctx: ActionContext,
    script: str,
    *,
    stdin: bytes | None = None,
    env: dict[str, str] | None = None,
    timeout: float | None = None,
) -> CommandResult:
    """Run `script` (already quoted by the caller) with the step's sudo and timeout."""
    return transport.run(Command(
        script=script, stdin=stdin, sudo=ctx.sudo, timeout=timeout or ctx.timeout,
        env={**C_LOCALE, **(env or {})},
    ))


def run_python(
    transport: Transport,
    ctx: ActionContext,
    program: str,
    request: dict[str, Any],
    *,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Run `program` on the host with `request` as JSON on stdin; return its JSON answer.

    The program is passed with `-c` (quoted once by `shlex.join`) so that stdin stays free for
    the request: untrusted values travel as data and are never spliced into code."""
    script = shlex.join([REMOTE_PYTHON, "-c", program])
    result = run(transport, ctx, script, stdin=json.dumps(request).encode(), timeout=timeout)
    if result.rc == 127:
        raise ProbeError(f"{REMOTE_PYTHON} is not installed on the host")
    try:
        answer = json.loads(result.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        raise ProbeError(
            f"remote probe failed (rc {result.rc}): {tail(result.stderr or result.stdout)}"
        ) from None
    if not isinstance(answer, dict):
        raise ProbeError(f"remote probe answered {answer!r}, not an object")
    return answer


def tail(text: str, lines: int = 8, width: int = 2000) -> str:
    """The last lines of a tool's output: enough to say why it failed, bounded for the store."""
    kept = "\n".join(text.strip().splitlines()[-lines:])
    return kept[-width:]


# ------------------------------------------------------------------------------ byte sizes

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b)?\s*$", re.IGNORECASE)
_SIZE_FACTOR = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


def parse_size(value: object) -> int:
    """Bytes from 1048576, '512K', '10M', '2G', '1.5GiB' or '10MB' (binary units: 1K = 1024 bytes,
    because that is what `ls -h` and `du -h` show the operator who writes the runbook)."""
    if isinstance(value, bool):  # pydantic turns only ValueError into a field error
        raise ValueError(f"invalid size {value!r}")  # noqa: TRY004
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.match(str(value))
        if not match:
            raise ValueError(f"invalid size {value!r} (use bytes or e.g. 512K, 10M, 2G)")
        size = int(float(match.group(1)) * _SIZE_FACTOR[match.group(2).lower()])
    if size < 0:
        raise ValueError(f"invalid size {value!r}: must not be negative")
    return size


Size = Annotated[int, BeforeValidator(parse_size)]
