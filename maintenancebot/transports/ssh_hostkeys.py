"""Which known_hosts lines speak of a host, as OpenSSH decides it.

Owns reading known_hosts (once per version of the file, indexed by host name), OpenSSH's ways of
naming a host there (plain, `[addr]:port`, lists, hashed `|1|`, wildcards, `!` negation) and the
error that refuses a key the file does not list, with the command that would add it. Plain text
and standard library only: `transports.ssh`, the one module that imports paramiko, turns the
lines into keys and the client that trusts only them.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import re
from pathlib import Path

from maintenancebot.errors import HostKeyError
from maintenancebot.models import Host


def unknown_key_error(host: Host, known_hosts: Path, offered: str) -> HostKeyError:
    port = "" if host.port == 22 else f"-p {host.port} "
    return HostKeyError(
        f"host key of {host.address}:{host.port} is not in {known_hosts} (it offered "
        f"{offered}); verify it and add it with ssh-keyscan {port}{host.address} >> {known_hosts}"
    )


def known_hosts_name(host: Host) -> str:
    """The name OpenSSH (and paramiko) look up: `addr`, or `[addr]:port` off port 22."""
    return host.address if host.port == 22 else f"[{host.address}]:{host.port}"


def known_host_lines(path: Path, name: str) -> list[tuple[int, str]]:
    """`name`'s lines (number, text), in file order: parsing every key of a 500-host file costs
    30 ms per connect."""
    try:
        stat = path.stat()
        plain, patterned = _known_hosts_index(path, stat.st_mtime_ns, stat.st_size)
    except OSError as exc:
        raise HostKeyError(f"cannot read known_hosts file {path}: {exc.strerror}") from exc
    return sorted(plain.get(name.lower(), []) + [
        (number, line) for number, line in patterned if _matches(line.split()[0], name)])


_Lines = list[tuple[int, str]]


@functools.lru_cache(maxsize=4)
def _known_hosts_index(path: Path, mtime_ns: int, size: int) -> tuple[dict[str, _Lines], _Lines]:
    """known_hosts read once per version of the file, not once per host (a 500-host run would
    scan 500 lines 500 times): lines by plain host name, and the lines that need matching
    (hashed names, wildcards, negations). @cert-authority / @revoked lines are skipped:
    paramiko cannot honour them."""
    plain: dict[str, _Lines] = {}
    patterned: _Lines = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.split()
        if len(fields) < 3 or fields[0].startswith(("#", "@")):
            continue
        if any(mark in fields[0] for mark in "|*?!"):
            patterned.append((number, line))
            continue
        for pattern in dict.fromkeys(fields[0].lower().split(",")):
            plain.setdefault(pattern, []).append((number, line))
    return plain, patterned


def _matches(patterns: str, name: str) -> bool:
    """OpenSSH known_hosts host matching: comma list, hashed |1| entries, * and ?, !negation."""
    matched = False
    for pattern in patterns.split(","):
        negated = pattern.startswith("!")
        pattern = pattern.removeprefix("!")
        if pattern.startswith("|1|"):
            hit = _hashed_name_is(pattern, name)
        elif "*" in pattern or "?" in pattern:
            regex = re.escape(pattern).replace(r"\*", ".*").replace(r"\?", ".")
            hit = re.fullmatch(regex, name, re.IGNORECASE) is not None
        else:
            hit = pattern.lower() == name.lower()
        if hit and negated:
            return False
        matched = matched or hit
    return matched


def _hashed_name_is(entry: str, name: str) -> bool:
    """`|1|salt|hash` (ssh-keygen -H): hash = HMAC-SHA1 of the name, keyed with the salt."""
    try:
        _, _, salt, digest = entry.split("|")
        expected = base64.b64decode(digest, validate=True)
        key = base64.b64decode(salt, validate=True)
    except ValueError:
        return False  # a malformed hashed entry names no host
    return hmac.compare_digest(hmac.new(key, name.encode(), hashlib.sha1).digest(), expected)
