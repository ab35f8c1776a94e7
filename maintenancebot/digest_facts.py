"""The facts of a digest besides outcomes and failures: what changed, and who must act.

What changed is read tolerantly from the steps' `details` (safe_delete: files and bytes moved;
packages: updated; docker_prune: images and bytes; cert_check: days left; backup_check: stale).
Their exact keys are each action's business, so this module reads whatever known keys exist and
ignores the rest: a new action or a renamed key makes a digest less informative, never broken. "Needs a human" collects
failed, unreachable, interrupted and half-rolled-back hosts, pending approvals, certificates near
expiry and stale backups. It also owns `HostSet`, the bounded list of host names every digest line
uses. Pure: no I/O, no clock.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

Doc = dict[str, Any]

FAILED_STEP = ("failed", "timed_out", "rollback_failed", "refused", "interrupted")

# Numeric detail keys worth summing across hosts (`freed_bytes`, `count`, `images_pruned`, …).
_SUMMED = re.compile(r"(^|_)(bytes|count|freed|moved|removed|deleted|pruned|reclaimed|updated|"
                     r"upgraded|installed|files|images|volumes|containers|packages)(_|$)")
_NAMED_LISTS = ("packages", "updated", "upgraded", "installed", "images")
_LABEL_KEYS = ("name", "path", "subject", "endpoint", "file", "host")
_CHANGE_STATUSES = ("ok", "would_run")
_NEAR_EXPIRY_DAYS = 30
_FACTS_PER_CHANGE = 6


@dataclass(frozen=True)
class HostSet:
    """The first few host names of a set, and how many there are in all."""

    names: tuple[str, ...]
    total: int

    def __str__(self) -> str:
        more = self.total - len(self.names)
        shown = ", ".join(self.names)
        return f"{shown} and {more} more" if more > 0 else shown

    @property
    def counted(self) -> str:
        return f"{self.total} host" + ("" if self.total == 1 else "s")


def host_set(names: Sequence[str], limit: int) -> HostSet:
    return HostSet(tuple(names[:limit]), len(names))


@dataclass(frozen=True)
class Change:
    step: str
    hosts: HostSet            # hosts where the step changed (or would change) something
    facts: tuple[str, ...]    # "files 1,234", "freed 5.6 GiB", "packages 12: openssl, curl …"


@dataclass(frozen=True)
class Alert:
    """Something a check found that a person must act on (a certificate, a stale backup)."""

    what: str
    hosts: HostSet


def step_name(step: Doc) -> str:
    kind = step.get("kind") or "step"
    return str(step.get("name")) + ("" if kind == "step" else f" ({kind})")


def names_by(hosts: list[Doc], key: Callable[[Doc], Any]) -> dict[Any, list[str]]:
    """Host names grouped by `key(host)`, in fleet order."""
    groups: dict[Any, list[str]] = {}
    for host in hosts:
        groups.setdefault(key(host), []).append(str(host.get("host")))
    return groups


def names_by_step(hosts: list[Doc],
                  label: Callable[[Doc], str | None]) -> dict[tuple[str, str], list[str]]:
    """Host names grouped by (step, label(step)) for every step the label applies to."""
    found: dict[tuple[str, str], list[str]] = {}
    for host in hosts:
        for step in host.get("steps") or []:
            what = label(step)
            if what:
                found.setdefault((step_name(step), what), []).append(str(host.get("host")))
    return found


def collect_changes(hosts: list[Doc], limit: int) -> list[Change]:
    per_step: dict[str, _Tally] = {}
    for host in hosts:
        for step in host.get("steps") or []:
            details = step.get("details") if isinstance(step.get("details"), dict) else {}
            # A change is what a step did (changed) or, in a dry-run, would do; a read-only
            # check that reported facts changed nothing and belongs under alerts, not here.
            changed = bool(step.get("changed")) or step.get("status") == "would_run"
            if step.get("status") not in _CHANGE_STATUSES or not changed:
                continue
            tally = per_step.setdefault(str(step.get("name")), _Tally())
            tally.add(str(host.get("host")), changed, details)
    changes = [Change(step, host_set(t.changed_hosts, limit), t.facts())
               for step, t in per_step.items()]
    return [c for c in changes if c.hosts.total or c.facts]


def _check_alerts(hosts: list[Doc], limit: int) -> list[Alert]:
    certs: dict[str, list[tuple[str, int]]] = {}
    stale: dict[str, list[str]] = {}
    for host in hosts:
        name = str(host.get("host"))
        for step in host.get("steps") or []:
            details = step.get("details")
            if not isinstance(details, dict):
                continue
            for days in _near_expiry(details):
                certs.setdefault(str(step.get("name")), []).append((name, days))
            if _stale(details):
                stale.setdefault(str(step.get("name")), []).append(name)
    alerts = [Alert(f'certificate near expiry ("{step}"), soonest in {min(d for _, d in found)} '
                    f"days", host_set(list(dict.fromkeys(h for h, _ in found)), limit))
              for step, found in certs.items()]
    alerts += [Alert(f'backup stale ("{step}")', host_set(names, limit))
               for step, names in stale.items()]
    return alerts


def approvals(hosts: list[Doc], dry_run: bool, limit: int) -> tuple[Alert, ...]:
    label = {"needs_approval": "would need approval" if dry_run else "awaits approval",
             "waiting": "awaits approval", "denied": "was denied"}
    found = names_by_step(hosts, lambda s: label.get(str(s.get("status"))))
    return tuple(Alert(f'"{step}" {what}', host_set(names, limit))
                 for (step, what), names in found.items())


def needs_human(hosts: list[Doc], dry_run: bool, limit: int) -> tuple[Alert, ...]:
    """Hosts someone must look at, worst first: half-applied changes before plain failures."""
    items: list[Alert] = []
    rollback = names_by_step(hosts, lambda s: "rollback failed" if (
        s.get("status") == "rollback_failed"
        or (s.get("kind") == "rollback" and s.get("status") in FAILED_STEP)) else None)
    for (step, _), names in rollback.items():
        items.append(Alert(f'rollback failed after "{step}" (host may be half-changed)',
                           host_set(names, limit)))
    by_status = names_by(hosts, lambda h: str(h.get("status")))
    for status, what in (("failed", "failed"), ("unreachable", "unreachable"),
                         ("interrupted", "interrupted mid-run (check the step in flight)"),
                         ("not_started", "not started (breaker, kill switch or timeout)")):
        if by_status.get(status):
            items.append(Alert(what, host_set(by_status[status], limit)))
    pending = names_by_step(hosts, lambda s: "awaits approval" if (
        s.get("status") in ("needs_approval", "waiting") and not dry_run) else None)
    items += [Alert(f'"{step}" awaits approval', host_set(names, limit))
              for (step, _), names in pending.items()]
    return tuple(items + _check_alerts(hosts, limit))


class _Tally:
    """One step's details summed over the hosts it ran on."""

    def __init__(self) -> None:
        self.changed_hosts: list[str] = []
        self.sums: dict[str, float] = {}
        self.names: dict[str, list[str]] = {}

    def add(self, host: str, changed: bool, details: dict[str, Any]) -> None:
        if changed:
            self.changed_hosts.append(host)
        for key, value in _flat(details):
            if isinstance(value, list) and _SUMMED.search(key):
                self.sums[key] = self.sums.get(key, 0) + len(value)
                if key in _NAMED_LISTS:
                    self._remember(key, value)
            elif isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and _SUMMED.search(key):
                self.sums[key] = self.sums.get(key, 0) + value

    def _remember(self, key: str, items: list[Any]) -> None:
        names = self.names.setdefault(key, [])
        for item in items:
            label = _label(item)
            if label and label not in names and len(names) < 5:
                names.append(label)

    def facts(self) -> tuple[str, ...]:
        facts = []
        for key, total in self.sums.items():
            if key.endswith("bytes"):
                facts.append(f"{key[:-5].rstrip('_') or 'size'} {format_bytes(total)}".strip())
            else:
                named = self.names.get(key)
                sample = f": {', '.join(named)}" if named else ""
                facts.append(f"{key.replace('_', ' ')} {int(total):,}{sample}")
        return tuple(facts[:_FACTS_PER_CHANGE])


def _flat(details: dict[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    """Top-level keys, and one level down as `images_count` for {"images": {"count": 3}}."""
    for key, value in details.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and not prefix:
            yield from _flat(value, f"{name}_")
        else:
            yield name, value


def _label(item: Any) -> str | None:
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        for key in _LABEL_KEYS:
            if item.get(key):
                return str(item[key])
    return None


def _near_expiry(details: Any, warn: int = _NEAR_EXPIRY_DAYS) -> Iterable[int]:
    """Days left of every certificate in `details` that is within its warning window."""
    if isinstance(details, list):
        for item in details:
            yield from _near_expiry(item, warn)
    elif isinstance(details, dict):
        warn = _whole(details.get("warn_days") or details.get("threshold_days"), warn)
        days = details.get("days_left")
        if isinstance(days, (int, float)) and not isinstance(days, bool) \
                and (days <= warn or details.get("expiring")):
            yield int(days)
        for value in details.values():
            if isinstance(value, (list, dict)):
                yield from _near_expiry(value, warn)


def _whole(value: object, default: int) -> int:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        else default


def _stale(details: dict[str, Any]) -> bool:
    stale = details.get("stale")
    return bool(stale) if not isinstance(stale, list) else len(stale) > 0


def format_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"  # pragma: no cover - the loop always returns
