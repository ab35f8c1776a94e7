"""Checks across inventory files: names defined twice, undefined references, cycles.

An inventory may be split over files (merged into one) or `validate` may see several separate
inventories; these checks read the raw YAML data of all of them, so every problem is reported
with its file and line, however far the models got. Used by `loader`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from maintenancebot.errors import ConfigIssue
from maintenancebot.yamlsource import Loc, Source

Where = tuple[Source, Loc]  # a place in one file, to name in an issue about another


def defined_twice(source: Source, loc: Loc, what: str, first: Where) -> ConfigIssue:
    other, other_loc = first
    where = f"{other.file}:{other.line(other_loc)}"
    return source.issue(loc, f"{what} is defined twice: here and at {where}")


def mapping_of(value: Any) -> dict[Any, Any]:
    return value if isinstance(value, dict) else {}


def string_items(value: Any) -> list[tuple[int, str]]:
    """The string items of a list, with their index (wrong types are the model's to report)."""
    items = value if isinstance(value, list) else []
    return [(index, item) for index, item in enumerate(items) if isinstance(item, str)]



@dataclass
class InventoryNames:
    """Where each host and group of one or more inventory files is defined."""

    hosts: dict[str, Where] = field(default_factory=dict)
    groups: dict[str, Where] = field(default_factory=dict)
    twice: list[ConfigIssue] = field(default_factory=list)


def inventory_names(sources: list[Source], merged: bool = False) -> InventoryNames:
    """When `merged` the files form one inventory, so a name defined twice is an error; for
    `validate` they may be separate inventories (demo, production) that share names."""
    names = InventoryNames()
    for source in sources:
        for kind, table in (("hosts", names.hosts), ("groups", names.groups)):
            for name in (n for n in mapping_of(source.data.get(kind)) if isinstance(n, str)):
                if merged and name in table:
                    names.twice.append(
                        defined_twice(source, (kind, name), f"{kind[:-1]} {name!r}", table[name])
                    )
                table.setdefault(name, (source, (kind, name)))
    return names


def inventory_issues(sources: list[Source], *, merged: bool) -> list[ConfigIssue]:
    names = inventory_names(sources, merged)
    issues = names.twice + _group_cycle_issues(sources)
    for source in sources:
        issues += _reference_issues(source, names)
        issues += _ambiguous_name_issues(source, names)
    if merged:
        with_defaults = [(s, ("defaults",)) for s in sources if "defaults" in s.data]
        issues += [defined_twice(s, loc, "defaults", with_defaults[0]) for s, loc in with_defaults[1:]]
    for inventory in [sources] if merged else [[source] for source in sources]:
        issues += _one_machine_two_names_issues(inventory)
    return issues


def _one_machine_two_names_issues(sources: list[Source]) -> list[ConfigIssue]:
    """Two host names for one SSH endpoint (address, port, jump host): a run would work on that
    machine twice at once, and the lease that keeps a host out of two runs could not see it."""
    defaults = next((mapping_of(s.data["defaults"]) for s in sources if "defaults" in s.data), {})
    seen: dict[tuple[Any, ...], tuple[str, Where]] = {}
    issues = []
    for source in sources:
        for name, raw in mapping_of(source.data.get("hosts")).items():
            entry = mapping_of(raw)
            if (entry.get("connection") or defaults.get("connection")) == "local":
                continue
            address, jump = entry.get("address") or name, entry.get("jump") or defaults.get("jump")
            endpoint = (address, entry.get("port") or defaults.get("port") or 22, jump)
            if endpoint not in seen:
                seen[endpoint] = (str(name), (source, ("hosts", name)))
                continue
            first, (other, other_loc) = seen[endpoint]
            if first == name:
                continue  # one name defined twice: said already
            where = ("hosts", name, "address") if "address" in entry else ("hosts", name)
            issues.append(source.issue(where, (
                f"{name!r} reaches the same machine as {first!r} ({other.file}:"
                f"{other.line(other_loc)}), {endpoint[0]} port {endpoint[1]}: two names for one "
                "machine would let two runs, or one run twice, work on it at once")))
    return issues


def _reference_issues(source: Source, names: InventoryNames) -> list[ConfigIssue]:
    """Group members, group children and jump hosts that are not defined anywhere."""
    issues = []
    for group, spec in mapping_of(source.data.get("groups")).items():
        issues += [
            source.issue(
                ("groups", group, "hosts", i), f"undefined host {host!r} (define it under hosts:)"
            )
            for i, host in string_items(mapping_of(spec).get("hosts"))
            if host not in names.hosts
        ]
        issues += [
            source.issue(("groups", group, "children", i), f"undefined group {child!r}")
            for i, child in string_items(mapping_of(spec).get("children"))
            if child not in names.groups
        ]
    jumps = [(("defaults", "jump"), mapping_of(source.data.get("defaults")).get("jump"))] + [
        (("hosts", host, "jump"), mapping_of(entry).get("jump"))
        for host, entry in mapping_of(source.data.get("hosts")).items()
    ]
    issues += [
        source.issue(loc, f"undefined jump host {jump!r}")
        for loc, jump in jumps
        if isinstance(jump, str) and jump not in names.hosts
    ]
    return issues


# What a host pattern reads as syntax (web:db, web,db, !x, &y, web-*, web-[12], trimmed spaces):
# a host or group whose name holds one could never be selected by its name.
_PATTERN_SYNTAX = frozenset(":,!&*?[] \t\n")


def _ambiguous_name_issues(source: Source, names: InventoryNames) -> list[ConfigIssue]:
    """Names a host pattern could not tell apart: 'all', a host named like a group, and names
    holding pattern syntax."""
    issues = [
        source.issue((kind, "all"), "'all' is reserved: it means every host")
        for kind in ("hosts", "groups")
        if "all" in mapping_of(source.data.get(kind))
    ]
    issues += [
        source.issue((kind, name), f"{kind[:-1]} name {name!r} holds "
                     f"{' '.join(repr(c) for c in sorted(set(name) & _PATTERN_SYNTAX))}, which "
                     "host patterns read as syntax: it could never be selected by name")
        for kind in ("hosts", "groups")
        for name in mapping_of(source.data.get(kind))
        if isinstance(name, str) and set(name) & _PATTERN_SYNTAX
    ]
    return issues + [
        source.issue(
            ("hosts", host),
            f"{host!r} names both a host and a group, so host patterns would be ambiguous",
        )
        for host in mapping_of(source.data.get("hosts"))
        if host in names.groups and host != "all"
    ]


def _group_cycle_issues(sources: list[Source]) -> list[ConfigIssue]:
    """Groups that contain themselves through `children`, reported once per cycle."""
    edges: dict[str, list[tuple[str, Source, Loc]]] = {}
    for source in sources:
        for group, spec in mapping_of(source.data.get("groups")).items():
            edges.setdefault(group, []).extend(
                (child, source, ("groups", group, "children", i))
                for i, child in string_items(mapping_of(spec).get("children"))
            )
    issues: list[ConfigIssue] = []
    done: set[str] = set()

    def visit(group: str, path: list[str]) -> None:
        for child, source, loc in edges.get(group, []):
            if child in path:
                cycle = " -> ".join([*path[path.index(child) :], child])
                issues.append(source.issue(loc, f"groups contain each other: {cycle}"))
            elif child not in done:
                visit(child, [*path, child])
        done.add(group)

    for group in list(edges):
        if group not in done:
            visit(group, [group])
    return issues
