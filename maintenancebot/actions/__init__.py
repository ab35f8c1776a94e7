"""Built-in actions: the registry, and the contract every action keeps.

An action validates its arguments statically (so `validate` catches mistakes with file and line),
previews itself truthfully in a dry-run from read-only probes, applies, and rolls back where the
world allows. An action that cannot preview itself is refused in a dry-run (the engine fails
closed), never silently skipped.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from pydantic import BaseModel, ValidationError

from maintenancebot.transports.base import Transport


@dataclass(frozen=True)
class ActionContext:
    """What an action may know of the run besides its arguments."""

    run_id: str
    step_index: int
    step_name: str
    sudo: bool
    timeout: float
    dry_run: bool
    state: Mapping[str, Any] = field(default_factory=dict)  # e.g. trash root, retention


@dataclass(frozen=True)
class ActionReport:
    """An action's outcome: ok, whether it changed anything, a one-line summary, and structured
    data for the digest (counts, names, bytes, days) and for its own rollback."""

    ok: bool
    changed: bool
    summary: str
    data: Mapping[str, Any] = field(default_factory=dict)
    stdout: str = ""
    stderr: str = ""
    rc: int | None = None


class Action(Protocol):
    name: ClassVar[str]
    Args: ClassVar[type[BaseModel]]
    previewable: ClassVar[bool]  # can say truthfully, from read-only probes, what it would do
    readonly: ClassVar[bool]  # changes nothing, so it really runs during a dry-run
    reversible: ClassVar[bool]

    def preview(self, transport: Transport, args: Any, ctx: ActionContext) -> ActionReport: ...

    def apply(self, transport: Transport, args: Any, ctx: ActionContext) -> ActionReport: ...

    def rollback(
        self, transport: Transport, args: Any, report: ActionReport, ctx: ActionContext
    ) -> ActionReport: ...


ACTIONS: dict[str, Action] = {}


def register_action(action: Action) -> Action:
    ACTIONS[action.name] = action
    return action


_builtins_loaded = False


def _load_builtin_actions() -> None:
    """Import the action modules so they register themselves (kept lazy for CLI start-up).

    A flag, not `if not ACTIONS`: importing one action module directly (the digest reads
    backup_check's types) registers it alone, and the others must still be found."""
    global _builtins_loaded
    if _builtins_loaded:
        return
    for name in _action_modules():
        importlib.import_module(f"{__name__}.{name}")
    _builtins_loaded = True


def get_action(name: str) -> Action | None:
    # Only the module named like the action first, so a runbook's start-up pays for the actions
    # it uses (importing them all costs ~50 ms); all of them for any other name.
    if name not in ACTIONS and not _builtins_loaded and name in _action_modules():
        importlib.import_module(f"{__name__}.{name}")
    if name not in ACTIONS:
        _load_builtin_actions()
    return ACTIONS.get(name)


def _action_modules() -> list[str]:
    """The modules that define actions: not the `remote` package (programs sent to hosts as
    text) nor the private helpers (`_probe`, `_bundle`, ...)."""
    return [module.name for module in pkgutil.iter_modules(__path__)
            if not module.ispkg and not module.name.startswith("_")]


def known_actions() -> list[str]:
    _load_builtin_actions()
    return sorted(ACTIONS)


def action_arg_errors(name: str, args: Mapping[str, Any]) -> list[tuple[tuple[str | int, ...], str]]:
    """Static problems with an action's `with:` arguments, as (location inside `with`, message).

    Values that still hold a template are checked after rendering, at run time."""
    action = get_action(name)
    if action is None:
        return [((), f"unknown action {name!r} (known: {', '.join(known_actions()) or 'none'})")]
    try:
        action.Args.model_validate(dict(args))
    except ValidationError as exc:
        return [
            (tuple(err["loc"]), err["msg"])
            for err in exc.errors()
            if not _is_template(err.get("input"))
        ]
    return []


def _is_template(value: object) -> bool:
    return isinstance(value, str) and ("{{" in value or "{%" in value)
