"""Turns an Inventory document into resolved Hosts, and host patterns into a selection. Pure.

Precedence, lowest first: inventory `defaults`, then each group the host belongs to (in the
order groups are written), then the host's own entry. Patterns follow Ansible's shape, which ops
engineers already know: `web:db:!db-legacy`, globs, `&group` to intersect, `all`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from maintenancebot.errors import SelectionError
from maintenancebot.models import Host, HostEntry, Inventory

_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class ResolvedInventory:
    hosts: dict[str, Host]
    groups: dict[str, tuple[str, ...]]

    def select(self, patterns: list[str], narrow: list[str] | None = None) -> list[Host]:
        """Hosts matched by `patterns`, further narrowed by `narrow` (e.g. `--hosts`)."""
        names = select_names(patterns, self)
        given = ":".join(patterns)
        if not names:
            raise SelectionError(f"host pattern {given!r} selects no hosts")
        if narrow:
            try:
                narrowed = set(select_names(narrow, self))
            except SelectionError as exc:
                raise SelectionError(f"--hosts: {exc}") from None
            kept = [name for name in names if name in narrowed]
            if not kept:
                raise SelectionError(
                    f"--hosts {':'.join(narrow)!r} selects none of the runbook's {len(names)} "
                    f"host{'s' if len(names) != 1 else ''} ({given!r}); it can only narrow them")
            names = kept
        return [self.hosts[name] for name in names]


def group_members(inventory: Inventory) -> dict[str, tuple[str, ...]]:
    """Every group's hosts, children expanded. Cycles are cut (the loader reports them)."""

    def expand(group: str, seen: frozenset[str]) -> list[str]:
        spec = inventory.groups[group]
        members = list(spec.hosts)
        for child in spec.children:
            if child in inventory.groups and child not in seen:
                members += expand(child, seen | {child})
        return members

    return {
        name: tuple(dict.fromkeys(expand(name, frozenset({name})))) for name in inventory.groups
    }


def resolve_inventory(inventory: Inventory) -> ResolvedInventory:
    groups = group_members(inventory)
    groups["all"] = tuple(inventory.hosts)
    hosts: dict[str, Host] = {}

    def resolve(name: str, chain: tuple[str, ...] = ()) -> Host:
        if name in hosts:
            return hosts[name]
        if name in chain:
            raise SelectionError(f"jump hosts form a loop: {' -> '.join((*chain, name))}")
        hosts[name] = _build_host(inventory, name, groups, resolve, (*chain, name))
        return hosts[name]

    for name in inventory.hosts:
        resolve(name)
    return ResolvedInventory(hosts={name: hosts[name] for name in inventory.hosts}, groups=groups)


def _build_host(
    inventory: Inventory,
    name: str,
    groups: dict[str, tuple[str, ...]],
    resolve: Callable[[str, tuple[str, ...]], Host],
    chain: tuple[str, ...],
) -> Host:
    defaults = inventory.defaults
    entry = inventory.hosts.get(name) or HostEntry()
    member_of = tuple(group for group, members in groups.items() if name in members)
    merged_vars = dict(defaults.vars)
    for group in member_of:
        if group != "all":
            merged_vars.update(inventory.groups[group].vars)
    merged_vars.update(entry.vars)

    def pick(field: str) -> Any:
        value = getattr(entry, field)
        return getattr(defaults, field) if value is None else value

    jump_name = pick("jump")
    jump = resolve(jump_name, chain) if jump_name and jump_name != name else None
    return Host(
        name=name,
        address=entry.address or name,
        port=pick("port"),
        user=pick("user"),
        identity_file=pick("identity_file"),
        sudo=pick("sudo"),
        connection=pick("connection"),
        jump=jump,
        groups=member_of,
        vars=merged_vars,
    )


def _is_glob(term: str) -> bool:
    return bool(_GLOB_CHARS & set(term))


def split_patterns(patterns: list[str]) -> list[str]:
    """`['web:db', '!x']` -> `['web', 'db', '!x']`; commas are accepted as separators too."""
    terms: list[str] = []
    for pattern in patterns:
        terms += [t.strip() for t in pattern.replace(",", ":").split(":") if t.strip()]
    return terms


def unknown_terms(patterns: list[str], groups: set[str], hosts: set[str]) -> list[str]:
    """Plain names (not globs) in `patterns` that are neither a group, a host, nor `all`."""
    known = groups | hosts | {"all"}
    return [
        term.lstrip("!&")
        for term in split_patterns(patterns)
        if not _is_glob(term.lstrip("!&")) and term.lstrip("!&") not in known
    ]


def select_names(patterns: list[str], inventory: ResolvedInventory) -> list[str]:
    terms = split_patterns(patterns)
    unknown = unknown_terms(patterns, set(inventory.groups), set(inventory.hosts))
    if unknown:
        raise SelectionError(f"unknown host or group: {', '.join(unknown)}")
    include = [t for t in terms if not t.startswith(("!", "&"))] or ["all"]
    chosen: dict[str, None] = {}
    for term in include:
        chosen.update(dict.fromkeys(_match(term, inventory)))
    for term in (t for t in terms if t.startswith("&")):
        keep = set(_match(term[1:], inventory))
        chosen = {name: None for name in chosen if name in keep}
    for term in (t for t in terms if t.startswith("!")):
        for name in _match(term[1:], inventory):
            chosen.pop(name, None)
    return list(chosen)


def _match(term: str, inventory: ResolvedInventory) -> list[str]:
    if term in inventory.groups:
        return list(inventory.groups[term])
    if term in inventory.hosts:
        return [term]
    names = [h for h in inventory.hosts if fnmatch.fnmatchcase(h, term)]
    for group, members in inventory.groups.items():
        if fnmatch.fnmatchcase(group, term):
            names += members
    return list(dict.fromkeys(names))
