"""Host keys for the SSH transport: a client that trusts only what known_hosts says of a host.

Owns reading known_hosts (once per version of the file, indexed by host name), OpenSSH's ways of
naming a host there (plain, `[addr]:port`, lists, hashed `|1|`, wildcards, `!` negation) and the
refusal of any key it does not list, with the command that would add it. Imported through
`transports.ssh`, which keeps paramiko's optional `invoke` out before paramiko loads.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import paramiko  # type: ignore[import-untyped,unused-ignore]
from paramiko.hostkeys import HostKeyEntry, InvalidHostKey  # type: ignore[import-untyped,unused-ignore]

from maintenancebot.errors import HostKeyError
from maintenancebot.models import Host


def verifying_client(host: Host, known_hosts: Path) -> paramiko.SSHClient:
    """A client that knows only `host`'s keys from known_hosts and rejects anything else."""
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(_RejectUnknownKey(known_hosts, host))
    _add_known_keys(client.get_host_keys(), known_hosts, _known_hosts_name(host))
    return client


class _RejectUnknownKey(paramiko.RejectPolicy):  # type: ignore[misc,unused-ignore]
    """paramiko's RejectPolicy, raising our error with the fix in the message."""

    def __init__(self, known_hosts: Path, host: Host) -> None:
        self._known_hosts = known_hosts
        self._host = host

    def missing_host_key(self, client: object, hostname: str, key: paramiko.PKey) -> None:
        host = self._host
        port = "" if host.port == 22 else f"-p {host.port} "
        raise HostKeyError(
            f"host key of {host.address}:{host.port} is not in {self._known_hosts} (it offered "
            f"{key.get_name()} {key.fingerprint}); verify it and add it with "
            f"ssh-keyscan {port}{host.address} >> {self._known_hosts}"
        )


def _known_hosts_name(host: Host) -> str:
    """The name OpenSSH (and paramiko) look up: `addr`, or `[addr]:port` off port 22."""
    return host.address if host.port == 22 else f"[{host.address}]:{host.port}"


def _add_known_keys(keys: paramiko.HostKeys, path: Path, name: str) -> None:
    """Load only `name`'s lines: parsing every key of a 500-host file costs 30 ms per connect."""
    try:
        stat = path.stat()
        index = _known_hosts_index(path, stat.st_mtime_ns, stat.st_size)
    except OSError as exc:
        raise HostKeyError(f"cannot read known_hosts file {path}: {exc.strerror}") from exc
    plain, patterned = index
    candidates = plain.get(name.lower(), []) + [
        (number, line) for number, line in patterned if _matches(line.split()[0], name)]
    for number, line in sorted(candidates):
        try:
            entry = HostKeyEntry.from_line(line, number)
        except (InvalidHostKey, paramiko.SSHException, ValueError) as exc:
            raise HostKeyError(f"{path}:{number}: unreadable host key: {exc}") from exc
        if entry is not None:
            keys.add(name, entry.key.get_name(), entry.key)


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
            hit = paramiko.HostKeys.hash_host(name, pattern) == pattern
        elif "*" in pattern or "?" in pattern:
            regex = re.escape(pattern).replace(r"\*", ".*").replace(r"\?", ".")
            hit = re.fullmatch(regex, name, re.IGNORECASE) is not None
        else:
            hit = pattern.lower() == name.lower()
        if hit and negated:
            return False
        matched = matched or hit
    return matched
