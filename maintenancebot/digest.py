"""A run's JSON document (views.run_document) → a bounded digest, and its compact text rendering.

The digest is what the summary template, the LLM and Slack see. It groups hosts by identical
outcome, so its size grows with the number of distinct problems, never with the fleet: 500 green
hosts are one line. Every string taken from the run passes through the caller's `redact` first.
Pure: no I/O, no clock, no logging; the rendering has a hard size cap with explicit "and N more".
What changed (freed bytes, packages, certificates, backups) and who must act are read by
`digest_facts`.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from maintenancebot.digest_facts import (
    FAILED_STEP,
    Alert,
    Change,
    HostSet,
    approvals,
    collect_changes,
    format_bytes,
    host_set,
    names_by,
    needs_human,
    step_name,
)

__all__ = ["Alert", "Change", "Digest", "DigestLimits", "Failure", "HostSet", "OutcomeGroup",
           "build_digest", "format_bytes", "normalize", "render_digest"]

Redact = Callable[[str], str]

_HOST_ORDER = ("succeeded", "failed", "unreachable", "interrupted", "not_started", "running",
               "pending")
_HEX = re.compile(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*\d)[0-9a-f]{6,}\b", re.IGNORECASE)
_DIGITS = re.compile(r"\d+")


@dataclass(frozen=True)
class DigestLimits:
    max_chars: int = 6000        # the rendered digest never exceeds this
    named_hosts: int = 20        # failed / unreachable hosts named in the facts
    example_hosts: int = 3       # example names per outcome group
    hosts_per_item: int = 5      # hosts named per failure, change or attention line
    tail_lines: int = 3          # stderr lines kept per distinct failure
    tail_chars: int = 300
    line_chars: int = 300        # any single rendered line


@dataclass(frozen=True)
class OutcomeGroup:
    status: str
    hosts: HostSet
    steps: str            # "all 5 steps ok" or "3 ok, "Restart nginx" failed"
    error: str | None     # the host error, normalized (it is the same for the whole group)


@dataclass(frozen=True)
class Failure:
    step: str | None      # None: the host failed outside any step (unreachable, stopped)
    status: str
    rc: str | None        # "1", or "1, 127" when the same failure exits differently
    hosts: HostSet
    error: str | None
    tail: str | None      # the last lines of stderr of the first host, redacted

    @property
    def what(self) -> str:
        """`"Restart nginx" failed`, or just `unreachable` for a host that failed outside a step."""
        return self.status if self.step is None else f'"{self.step}" {self.status}'


@dataclass(frozen=True)
class Digest:
    run_id: str
    runbook: str
    status: str
    dry_run: bool
    reason: str | None
    host_total: int
    host_counts: tuple[tuple[str, int], ...]
    step_counts: tuple[tuple[str, int], ...]
    failed: HostSet
    unreachable: HostSet
    groups: tuple[OutcomeGroup, ...] = ()
    failures: tuple[Failure, ...] = ()
    changes: tuple[Change, ...] = ()
    approvals: tuple[Alert, ...] = ()
    needs_human: tuple[Alert, ...] = ()
    limits: DigestLimits = field(default_factory=DigestLimits)


def build_digest(doc: dict[str, Any], redact: Redact,
                 limits: DigestLimits = DigestLimits()) -> Digest:
    """The digest of one run document. Every string in it is redacted first, once: grouping
    normalizes digits away, and a secret with digits in it would no longer be recognized."""
    doc = _redacted(doc, redact, {})
    hosts: list[dict[str, Any]] = list(doc.get("hosts") or [])
    host_counts = Counter(str(h.get("status")) for h in hosts)
    step_counts = Counter(str(s.get("status")) for h in hosts for s in _steps(h))
    by_status = names_by(hosts, lambda h: str(h.get("status")))
    return Digest(
        run_id=str(doc.get("run_id")), runbook=str(doc.get("runbook")),
        status=str(doc.get("status")), dry_run=bool(doc.get("dry_run")),
        reason=str(doc["reason"]) if doc.get("reason") else None,
        host_total=len(hosts), host_counts=_ordered(host_counts, _HOST_ORDER),
        step_counts=tuple(step_counts.most_common()),
        failed=host_set(by_status.get("failed", []), limits.named_hosts),
        unreachable=host_set(by_status.get("unreachable", []), limits.named_hosts),
        groups=_outcome_groups(hosts, limits), failures=_failures(hosts, limits),
        changes=tuple(collect_changes(hosts, limits.hosts_per_item)),
        approvals=approvals(hosts, bool(doc.get("dry_run")), limits.hosts_per_item),
        needs_human=needs_human(hosts, bool(doc.get("dry_run")), limits.hosts_per_item),
        limits=limits,
    )


def _redacted(value: Any, redact: Redact, seen: dict[str, str]) -> Any:
    """`value` with every string redacted; `seen` memoizes, as names and statuses repeat."""
    if isinstance(value, str):
        if value not in seen:
            seen[value] = redact(value)
        return seen[value]
    if isinstance(value, dict):
        return {key: _redacted(item, redact, seen) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_redacted(item, redact, seen) for item in value]
    return value


def _steps(host: dict[str, Any]) -> list[dict[str, Any]]:
    return list(host.get("steps") or [])


def _ordered(counts: Counter[str], order: Iterable[str]) -> tuple[tuple[str, int], ...]:
    known = [(status, counts[status]) for status in order if counts[status]]
    return tuple(known + [(s, n) for s, n in counts.most_common() if s not in order])


def normalize(text: str | None, host: dict[str, Any] | None = None) -> str:
    """An error with what varies between hosts (names, numbers, hashes) collapsed, for grouping."""
    flat = " ".join((text or "")[-2000:].split())
    for name in (host or {}).get("host"), (host or {}).get("address"):
        if name:
            flat = flat.replace(str(name), "<host>")
    return _DIGITS.sub("#", _HEX.sub("#", flat))[:200]


# ------------------------------------------------------------------------------ outcomes


def _outcome_groups(hosts: list[dict[str, Any]],
                    limits: DigestLimits) -> tuple[OutcomeGroup, ...]:
    def signature(host: dict[str, Any]) -> tuple[Any, ...]:
        failures = tuple(_failure_key(step, status, host) for step, status in _failed_steps(host))
        statuses = tuple((step_name(s), str(s.get("status"))) for s in _steps(host))
        return str(host.get("status")), statuses, failures, normalize(host.get("error"), host)

    members: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for host in hosts:
        members.setdefault(signature(host), []).append(host)
    groups = [
        OutcomeGroup(status=key[0], hosts=host_set([str(h.get("host")) for h in group],
                                                   limits.example_hosts),
                     steps=_describe_steps(_steps(group[0])), error=key[3] or None)
        for key, group in members.items()
    ]
    # Trouble first, then the biggest groups: what a reader needs before the cap cuts anything.
    return tuple(sorted(groups, key=lambda g: (g.status == "succeeded", -g.hosts.total)))


def _failure_key(step: dict[str, Any], status: str, host: dict[str, Any]
                 ) -> tuple[str | None, str, str, str]:
    """What makes two failures the same: step, status, error, and the last line of stderr
    (the engine's error is often just "exited 1"; the cause is in stderr)."""
    last_line = (str(step.get("stderr_tail") or "").strip().splitlines() or [""])[-1]
    name = None if step.get("name") is None else step_name(step)
    return name, status, normalize(step.get("error"), host), normalize(last_line, host)


def _describe_steps(steps: list[dict[str, Any]]) -> str:
    if not steps:
        return "no steps ran"
    statuses = Counter(str(s.get("status")) for s in steps)
    if len(statuses) == 1:
        return f"all {len(steps)} steps {steps[0].get('status')}"
    routine = ("ok", "skipped", "would_run")
    parts = [f"{statuses[s]} {s}" for s in routine if statuses[s]]
    parts += [f'"{step_name(s)}" {s.get("status")}' for s in steps
              if s.get("status") not in routine]
    return ", ".join(parts)


def _failures(hosts: list[dict[str, Any]], limits: DigestLimits) -> tuple[Failure, ...]:
    found: dict[tuple[str | None, str, str, str], tuple[list[str], set[str], dict[str, Any]]] = {}
    for host in hosts:
        for step, status in _failed_steps(host):
            names, rcs, _ = found.setdefault(_failure_key(step, status, host), ([], set(), step))
            names.append(str(host.get("host")))
            if step.get("rc") is not None:
                rcs.add(str(step["rc"]))
    failures = [
        Failure(step=key[0], status=key[1], rc=", ".join(sorted(rcs)) or None,
                hosts=host_set(names, limits.hosts_per_item),
                error=_one_line(str(example["error"])) if example.get("error") else None,
                tail=_tail(str(example.get("stderr_tail") or ""), limits))
        for key, (names, rcs, example) in found.items()
    ]
    return tuple(sorted(failures, key=lambda f: -f.hosts.total))


def _failed_steps(host: dict[str, Any]) -> Iterable[tuple[dict[str, Any], str]]:
    """Failing steps; a host that failed with no failing step (unreachable) counts as one."""
    failing = [(s, str(s.get("status"))) for s in _steps(host) if s.get("status") in FAILED_STEP]
    if failing or host.get("status") not in ("failed", "unreachable", "interrupted"):
        return failing
    return [({"name": None, "error": host.get("error")}, str(host.get("status")))]


def _tail(text: str, limits: DigestLimits) -> str | None:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    joined = " | ".join(lines[-limits.tail_lines:])
    return ("…" + joined[-(limits.tail_chars - 1):] if len(joined) > limits.tail_chars
            else joined) or None


def _one_line(text: str, limit: int = 240) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


# ------------------------------------------------------------------------------ rendering

_OMITTED_RESERVE = 60  # room kept for each later section's "omitted" line


def render_digest(digest: Digest, max_chars: int | None = None) -> str:
    """Compact text for the template, the LLM and Slack threads; never longer than the cap."""
    cap = min(max_chars or digest.limits.max_chars, digest.limits.max_chars)
    changed = "would change" if digest.dry_run else "changes"
    sections = [
        ("needs a human", [_alert_line(a) for a in digest.needs_human]),
        ("failures", [_failure_block(f) for f in digest.failures]),
        ("outcome groups", [_group_line(g) for g in digest.groups]),
        ("approvals", [_alert_line(a) for a in digest.approvals]),
        (changed, [_change_line(c, digest.dry_run) for c in digest.changes]),
    ]
    text = _fit(headline_lines(digest), sections, cap, digest.limits.line_chars)
    return text if len(text) <= cap else text[: cap - 1] + "…"


def headline_lines(digest: Digest) -> list[str]:
    lines = ["DRY RUN: nothing was changed on any host"] if digest.dry_run else []
    lines.append(f'run {digest.run_id} of runbook "{digest.runbook}": {digest.status}')
    if digest.reason:
        lines.append(f"reason: {digest.reason}")
    counts = ", ".join(f"{status} {n}" for status, n in digest.host_counts)
    lines.append(f"hosts ({digest.host_total}): {counts or 'none'}")
    lines.append("steps: " + (", ".join(f"{s} {n}" for s, n in digest.step_counts) or "none"))
    if digest.failed.total:
        lines.append(f"failed hosts ({digest.failed.total}): {digest.failed}")
    if digest.unreachable.total:
        lines.append(f"unreachable hosts ({digest.unreachable.total}): {digest.unreachable}")
    return lines


def _fit(head: list[str], sections: list[tuple[str, list[str]]], cap: int,
         line_chars: int) -> str:
    out = [_clip(line, line_chars) for line in head]
    used = sum(len(line) + 1 for line in out)
    live = [(title, blocks) for title, blocks in sections if blocks]
    for position, (title, blocks) in enumerate(live):
        reserve = _OMITTED_RESERVE * (len(live) - position)
        title_line = f"{title} ({len(blocks)}):"
        if used + len(title_line) + reserve > cap:
            out.append(f"{title}: {len(blocks)} omitted (size cap)")
            used += len(out[-1]) + 1
            continue
        out.append(title_line)
        used += len(title_line) + 1
        for index, block in enumerate(blocks):
            text = "\n".join(_clip(line, line_chars) for line in block.splitlines())
            if used + len(text) + 1 + reserve > cap:
                out.append(f"- and {len(blocks) - index} more (size cap)")
                used += len(out[-1]) + 1
                break
            out.append(text)
            used += len(text) + 1
    return "\n".join(out)


def _group_line(group: OutcomeGroup) -> str:
    error = f"; error: {group.error}" if group.error else ""
    return f"- {group.hosts.counted} {group.status}: {group.steps} ({group.hosts}){error}"


def _failure_block(failure: Failure) -> str:
    rc = f" rc {failure.rc}" if failure.rc else ""
    where = f"on {failure.hosts.counted}: {failure.hosts}"
    lines = [f"- {failure.what}{rc} {where}"]
    if failure.error:
        lines.append(f"  error: {failure.error}")
    if failure.tail:
        lines.append(f"  stderr: {failure.tail}")
    return "\n".join(lines)


def _change_line(change: Change, dry_run: bool) -> str:
    verb = "would change" if dry_run else "changed"
    # Names only when few hosts changed: "480 hosts (web-000, …)" tells a reader nothing.
    names = f" ({change.hosts})" if change.hosts.total == len(change.hosts.names) else ""
    where = f" {verb} on {change.hosts.counted}{names}" if change.hosts.total else ""
    facts = f": {'; '.join(change.facts)}" if change.facts else ""
    return f'- "{change.step}"{where}{facts}'


def _alert_line(alert: Alert) -> str:
    return f"- {alert.what}: {alert.hosts.counted}: {alert.hosts}"


def _clip(line: str, limit: int) -> str:
    """One rendered line within `limit`, keeping its indentation."""
    indent = line[: len(line) - len(line.lstrip())]
    return indent + _one_line(line, limit - len(indent))
