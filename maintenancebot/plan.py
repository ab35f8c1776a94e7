"""(runbook, inventory, selection) -> Plan: which hosts, in which batches, with which variables.

Pure: no sockets, no clock, no randomness. Rendering of each step happens in the engine, because
a step may read what an earlier step of the same host registered; the Plan carries everything
rendering needs (host contexts and the run's compiled-template cache) so that templates are
compiled once per run, not once per host.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from maintenancebot.inventory import ResolvedInventory
from maintenancebot.models import Host, Runbook, resolve_share
from maintenancebot.redact import REDACTED, is_reference, resolve_reference
from maintenancebot.templating import Templates, unavailable


@dataclass(frozen=True)
class RunbookSource:
    """Where a runbook came from, recorded with every run so a result can be traced to a commit."""

    path: Path | None
    sha256: str
    git_commit: str | None = None
    git_dirty: bool | None = None

    @classmethod
    def from_text(cls, path: Path | None, text: bytes) -> RunbookSource:
        return cls(path=path, sha256=hashlib.sha256(text).hexdigest())


@dataclass(frozen=True)
class Plan:
    runbook: Runbook
    source: RunbookSource
    hosts: tuple[Host, ...]
    batches: tuple[tuple[str, ...], ...]
    selection: str
    max_failures: int | None
    templates: Templates = field(compare=False, repr=False)
    # `--var KEY=VALUE` from the command line: above runbook and inventory vars, like `-e`.
    overrides: dict[str, Any] = field(default_factory=dict)
    narrow: tuple[str, ...] = ()  # `--hosts` patterns, kept so a resumed run selects the same

    def host(self, name: str) -> Host:
        return next(host for host in self.hosts if host.name == name)

    def first_hosts(self) -> tuple[Host, ...]:
        """The hosts a run starts at once: its first batch, up to `concurrency`."""
        by_name = {host.name: host for host in self.hosts}
        return tuple(by_name[name] for name in self.batches[0][:max(1, self.runbook.concurrency)])

    def rollout(self) -> dict[str, Any]:
        """How the hosts are taken: what a dry-run shows before anyone runs it."""
        return {"batches": [list(batch) for batch in self.batches],
                "concurrency": self.runbook.concurrency, "max_failures": self.max_failures,
                "between_batches": self.runbook.between_batches}

    def lease_keys(self) -> list[str]:
        """What a real run of this plan leases: its hosts, and the runbook itself, which never
        runs twice at once, even on disjoint hosts."""
        return [host.name for host in self.hosts] + [f"runbook {self.runbook.name}"]


def build_plan(
    runbook: Runbook,
    inventory: ResolvedInventory,
    source: RunbookSource,
    narrow: list[str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> Plan:
    """Select the hosts and cut them into batches. Raises SelectionError if nothing is selected."""
    hosts = tuple(inventory.select(runbook.host_patterns, narrow))
    names = [host.name for host in hosts]
    selection = ":".join(runbook.host_patterns) + (f" & --hosts {':'.join(narrow)}" if narrow else "")
    breaker = (
        None if runbook.max_failures is None else resolve_share(runbook.max_failures, len(hosts))
    )
    return Plan(
        runbook=runbook,
        source=source,
        hosts=hosts,
        batches=split_batches(names, runbook.batches),
        selection=selection,
        max_failures=breaker,
        templates=Templates(),
        overrides=dict(overrides or {}),
        narrow=tuple(narrow or ()),
    )


def split_batches(names: list[str], sizes: list[int | str] | None) -> tuple[tuple[str, ...], ...]:
    """Rolling batches, Ansible `serial` style: each size is one batch, the last size repeats."""
    if not sizes:
        return (tuple(names),)
    batches: list[tuple[str, ...]] = []
    position = 0
    for turn in range(len(names)):
        if position >= len(names):
            break
        size = max(1, resolve_share(sizes[min(turn, len(sizes) - 1)], len(names)))
        batches.append(tuple(names[position : position + size]))
        position += size
    return tuple(batches)


def host_contexts(
    plan: Plan, host: Host, run: dict[str, Any], registered: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The variables a step of `host` renders with, and those its records show.

    Runbook vars are defaults; inventory vars (group, then host) override them, so one host can
    differ without forking the runbook; `--var` overrides both for one run. In the second
    context every secret reference is [REDACTED] instead of its value: a command rendered with
    it is what the store, the approvers and the reports see. The redactor knows a secret's own
    forms, but not what a filter makes of it (`| upper`, `| reverse`, `[2:]`); a command
    rendered without the secret cannot hold any of those. Without secrets, both are one dict."""
    merged = {**plan.runbook.vars, **host.vars, **plan.overrides}
    real = _context(resolve_secrets(merged), host, run, registered)
    masked = _map_references(merged, lambda _reference: REDACTED)
    if masked == merged:  # no secret reference: one context
        return real, real
    return real, _context(masked, host, run, registered)


def _context(merged: dict[str, Any], host: Host, run: dict[str, Any],
             registered: dict[str, Any]) -> dict[str, Any]:
    host_view = {
        "name": host.name,
        "address": host.address,
        "port": host.port,
        "groups": list(host.groups),
        "vars": host.vars,
    }
    return {**merged, **registered, "vars": merged, "host": host_view, "run": run}


def resolve_secrets(value: Any) -> Any:
    """Vars holding `env:NAME` or `file:/path` get the secret's value, read at render time so
    it lives only in memory; the store, logs and reports see it redacted."""
    return _map_references(value, _secret_of)


def _secret_of(reference: str) -> Any:
    secret = resolve_reference(reference)
    if secret is None:
        return unavailable(f"secret reference {reference!r} cannot be read on this controller")
    return secret.rstrip("\n")


def _map_references(value: Any, replace: Callable[[str], Any]) -> Any:
    """`value` with every `env:`/`file:` reference in it, however deep, replaced."""
    if isinstance(value, str) and is_reference(value):
        return replace(value)
    if isinstance(value, dict):
        return {key: _map_references(item, replace) for key, item in value.items()}
    if isinstance(value, list):
        return [_map_references(item, replace) for item in value]
    return value
