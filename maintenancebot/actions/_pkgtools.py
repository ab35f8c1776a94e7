"""What the `packages` action needs to know about apt and dnf: the command lines it runs and pure
parsers for what those tools print.

Owned here: building each command as argv joined by `shlex.join` (package names are never
formatted into a shell line unquoted), and parsing `apt-get -s` "Inst" lines, `dnf check-update`
and `dnf list` tables, `dpkg-query`/`rpm -q` version lists, `apt-cache madison`, and apt's "could
not get lock" message. Everything here is pure and runs no command; the action decides what to run
and when. Parsers are tested against hand-written fixture outputs of both tools.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

# An `apt-get -s` line for a package it would upgrade (old version present) or newly install:
#   Inst libpq5 [15.12-0+deb12u2] (15.20-0+deb12u1 Debian-Security:12/oldstable-security [amd64])
_APT_INST = re.compile(
    r"^Inst (?P<name>\S+) (?:\[(?P<old>[^\]]*)\] )?"
    r"\((?P<new>\S+) (?P<origin>.*?) ?\[(?P<arch>[^\]]+)\]\)"
)
_APT_LOCK = re.compile(
    r"Could not get lock (?P<path>\S+?)\.?\s+It is held by process (?P<pid>\d+)"
    r"(?: \((?P<comm>[^)]*)\))?"
)
_APT_ENV = {
    "DEBIAN_FRONTEND": "noninteractive",
    # needrestart would restart services on its own; restarts are the runbook's `service` steps.
    "NEEDRESTART_MODE": "l",
}
# Keep a changed config file the admin edited, take the package's default for untouched ones:
# without these, dpkg asks a question nobody is there to answer.
_DPKG_CONF = ["-o", "Dpkg::Options::=--force-confdef", "-o", "Dpkg::Options::=--force-confold"]


@dataclass(frozen=True)
class Upgrade:
    name: str
    old: str | None  # installed version (None: not known yet, or a new package)
    new: str
    origin: str = ""  # apt: the candidate's origins ("Debian-Security:12/..."); dnf: the repo
    security: bool = False

    def with_old(self, old: str | None) -> Upgrade:
        return replace(self, old=old)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "from": self.old, "to": self.new}


@dataclass(frozen=True)
class PackageManager:
    """One package manager: its name, its binary, and how to say things to it."""

    name: str
    binary: str

    def simulate(self, scope: str) -> str:
        if self.name == "apt":
            # `upgrade`, not `dist-upgrade`: never removes packages, never installs new ones.
            return shlex.join(["apt-get", "-s", "-o", "Debug::NoLocking=1", "upgrade"])
        security = ["--security"] if scope == "security" else []
        return shlex.join(["dnf", "-q", "check-update", *security])

    def simulation_ok(self, rc: int) -> bool:
        # dnf check-update exits 100 when updates are available, 0 when there are none.
        return rc == 0 or (self.name == "dnf" and rc == 100)

    def parse_simulation(self, text: str, scope: str) -> list[Upgrade]:
        if self.name == "apt":
            return [u for u in parse_apt_simulation(text) if u.old is not None]
        return parse_dnf_check_update(text, security=scope == "security")

    def installed(self, names: list[str]) -> str:
        if self.name == "apt":
            return shlex.join(["dpkg-query", "-W", "-f", "${Package}\\t${Version}\\n", "--",
                               *names]) + " 2>/dev/null"
        fmt = "%{NAME}\\t%|EPOCH?{%{EPOCH}:}:{}|%{VERSION}-%{RELEASE}\\n"
        return shlex.join(["rpm", "-q", "--qf", fmt, *names]) + " 2>/dev/null"

    def install(self, names: list[str], scope: str, lock_seconds: int) -> tuple[str, dict[str, str]]:
        """Upgrade exactly `names` (what the preview listed), non-interactively."""
        if self.name == "apt":
            argv = ["apt-get", "-y", "-q", "-o", f"DPkg::Lock::Timeout={lock_seconds}", *_DPKG_CONF,
                    "install", "--only-upgrade", *names]
            return shlex.join(argv), _APT_ENV
        security = ["--security"] if scope == "security" else []
        return shlex.join(["dnf", "-y", "upgrade", *security, *names]), {}

    def available(self, names: list[str]) -> str:
        if self.name == "apt":
            return shlex.join(["apt-cache", "madison", *names])
        return shlex.join(["dnf", "-q", "list", "--showduplicates", "--available", *names])

    def parse_available(self, text: str) -> dict[str, set[str]]:
        if self.name == "apt":
            return parse_apt_madison(text)
        offered: dict[str, set[str]] = {}
        for name, _arch, version, _repo in _dnf_rows(text):
            offered.setdefault(name, set()).add(version)
        return offered

    def downgrade(self, versions: list[tuple[str, str]], lock_seconds: int
                  ) -> tuple[str, dict[str, str]]:
        if self.name == "apt":
            argv = ["apt-get", "-y", "-q", "-o", f"DPkg::Lock::Timeout={lock_seconds}", *_DPKG_CONF,
                    "--allow-downgrades", "install", *(f"{n}={v}" for n, v in versions)]
            return shlex.join(argv), _APT_ENV
        return shlex.join(["dnf", "-y", "downgrade", *(f"{n}-{v}" for n, v in versions)]), {}

    @property
    def reboot_probe(self) -> str:
        """Prints yes, no or unknown."""
        if self.name == "apt":
            return "if [ -e /var/run/reboot-required ]; then echo yes; else echo no; fi"
        # needs-restarting (dnf-utils) exits 1 when a reboot is needed, 0 when not.
        return ("if command -v needs-restarting >/dev/null 2>&1; then needs-restarting -r "
                ">/dev/null 2>&1; case $? in 0) echo no;; 1) echo yes;; *) echo unknown;; esac; "
                "else echo unknown; fi")


APT = PackageManager("apt", "apt-get")
DNF = PackageManager("dnf", "dnf")


# ---------------------------------------------------------------------------------- parsers


def parse_apt_simulation(text: str) -> list[Upgrade]:
    """Every `Inst` line of `apt-get -s upgrade|dist-upgrade`; security = the candidate comes from
    a suite whose name contains "security" (bookworm-security, jammy-security, ...)."""
    upgrades = []
    for line in text.splitlines():
        match = _APT_INST.match(line)
        if match:
            origin = match["origin"].strip()
            upgrades.append(Upgrade(match["name"], match["old"], match["new"], origin,
                                    security=any("security" in s.lower() for s in _suites(origin))))
    return upgrades


def _suites(origin: str) -> list[str]:
    """'Debian:12.15/oldstable, Debian-Security:12/oldstable-security' -> the suite names."""
    return [part.strip().rsplit("/", 1)[-1] for part in origin.split(",")]


def parse_dnf_check_update(text: str, *, security: bool) -> list[Upgrade]:
    """The package table of `dnf -q check-update [--security]` (arch suffix dropped; the old
    version is filled in later from rpm). Everything under "Obsoleting Packages" is ignored."""
    return [Upgrade(name, None, version, repo, security=security)
            for name, _arch, version, repo in _dnf_rows(text)]


def _dnf_rows(text: str) -> Iterator[tuple[str, str, str, str]]:
    """(name, arch, version, repo) of a dnf package table; dnf wraps a long name.arch onto a
    line of its own, with version and repo on the next line."""
    pending: list[str] = []
    for line in text.splitlines():
        if line.startswith("Obsoleting Packages"):
            return
        tokens = pending + line.split()
        pending = []
        if len(tokens) == 1 and "." in tokens[0] and not tokens[0].endswith(":"):
            pending = tokens
        elif len(tokens) == 3 and "." in tokens[0] and "-" in tokens[1]:
            name, _, arch = tokens[0].rpartition(".")
            yield name, arch, tokens[1], tokens[2].lstrip("@")


def parse_versions(text: str) -> dict[str, str]:
    """`name<TAB>version` lines (dpkg-query -W, rpm -q --qf) -> {name: version}. A package
    installed in several versions at once (kernels on RHEL) maps to all of them, comma-separated,
    so that gaining a new one still shows as a change; repeats (multi-arch) count once."""
    seen: dict[str, list[str]] = {}
    for line in text.splitlines():
        name, sep, version = line.partition("\t")
        name, version = name.strip(), version.strip()
        if sep and name and version and version not in seen.setdefault(name, []):
            seen[name].append(version)
    return {name: ", ".join(versions) for name, versions in seen.items()}


def parse_apt_madison(text: str) -> dict[str, set[str]]:
    """`apt-cache madison` -> {name: versions the configured repositories still offer}."""
    offered: dict[str, set[str]] = {}
    for line in text.splitlines():
        parts = [part.strip() for part in line.split("|")]
        if len(parts) >= 3 and parts[0] and parts[1]:
            offered.setdefault(parts[0], set()).add(parts[1])
    return offered


def lock_error(text: str) -> tuple[str, int, str] | None:
    """(path, pid, command) from apt's "Could not get lock ... held by process N (cmd)"."""
    match = _APT_LOCK.search(text)
    if match is None:
        return None
    return match["path"], int(match["pid"]), match["comm"] or ""
