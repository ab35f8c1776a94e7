"""YAML files -> Runbook, Inventory and Settings, with every problem as FILE:LINE: field: message.

Owns the checks that need a whole document or several of them (duplicate step names, templates,
actions, host patterns against inventories, inline secrets; the inventory files' own cross-checks
are `inventory_checks`); single values are
checked by the models' validators, whose errors `yamlsource` places on their lines. Checks read
the raw data defensively rather than the model, so that one file reports all of its problems at
once, not only those the model got far enough to see. Reads files; runs nothing, renders nothing.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ValidationError

from maintenancebot.actions import action_arg_errors, get_action
from maintenancebot.errors import ConfigError, ConfigIssue
from maintenancebot.inventory import ResolvedInventory, unknown_terms
from maintenancebot.inventory_checks import (
    Where,
    defined_twice,
    inventory_issues,
    inventory_names,
    string_items,
)
from maintenancebot.models import HostDefaults, Inventory, Runbook, Settings
from maintenancebot.templating import check_syntax, referenced_names
from maintenancebot.yamlsource import (
    Loc,
    Source,
    plain_message,
    read_mapping,
    strip_union_tags,
    validation_issues,
    walk,
    yaml_files,
    yaml_files_in,
)

CONFIG_ENV = "MAINTENANCEBOT_CONFIG"
SYSTEM_CONFIG = Path("/etc/maintenancebot/config.yaml")

_INVENTORY_KEYS = {"hosts", "groups", "defaults"}
_CONFIG_KEYS = set(Settings.model_fields)
_UNRECOGNISED = (
    "not recognised as a runbook (it has no 'steps'), an inventory ('hosts', 'groups', "
    "'defaults') or a config file ('state_dir', 'ssh', 'runbooks', ...)"
)
# A key that ends in a secret's name holds a secret; `token_env` or `run_token_budget` do not.
_SECRET_KEY = re.compile(
    r"(^|[_-])(password|passwd|passphrase|token|secret|api_?key|access_?key|secret_?key)$",
    re.IGNORECASE,
)
_SECRET_REFERENCE = re.compile(r"^(env:[A-Za-z_][A-Za-z0-9_]*|file:.+)$")
_INLINE_SECRET = "write secrets as env:NAME or file:/path, never inline"
_READONLY_GATED = (
    "a readonly step needs no approval (it runs even in a dry-run); drop 'approval' or 'readonly'"
)
_CHECK_WITHOUT_BATCHES = (
    "runs between rolling batches, and this runbook has none, so it would never run (add e.g. "
    "batches: [1, 100%])"
)
_M = TypeVar("_M", bound=BaseModel)


# ------------------------------------------------------------------------------ public API


def load_runbook(path: Path, inventory: ResolvedInventory | None = None) -> Runbook:
    """One runbook file; its name defaults to the file's stem. With the `inventory` it will run
    on, a host pattern naming what that inventory lacks is an issue at its line too."""
    issues: list[ConfigIssue] = []
    source = read_mapping(path, issues)
    runbook = _check_runbook(source, path.stem, issues) if source else None
    if source and runbook and inventory is not None:
        issues += _host_pattern_issues(source, set(inventory.groups), set(inventory.hosts))
    if runbook is None or issues:
        raise ConfigError(_sorted(issues))
    return runbook


def load_runbooks(directory: Path) -> tuple[dict[str, tuple[Path, Runbook]], list[ConfigIssue]]:
    """Every valid runbook in `directory` (not its subdirectories) by name, and the problems of
    the others. On a duplicate name the first file (by name) wins and the other is an issue."""
    if not directory.is_dir():
        return {}, [ConfigIssue(str(directory), None, "", "no such file or directory")]
    issues: list[ConfigIssue] = []
    runbooks: dict[str, tuple[Path, Runbook]] = {}
    seen: dict[str, Where] = {}
    for path in yaml_files_in(directory):
        file_issues: list[ConfigIssue] = []
        source = read_mapping(path, file_issues)
        runbook = _check_runbook(source, path.stem, file_issues) if source else None
        if source and runbook and not file_issues:
            file_issues += _duplicate_name(seen, source, runbook.name)
            runbooks.setdefault(runbook.name, (path, runbook))
        issues += file_issues
    return runbooks, _sorted(issues)


def load_inventory(path: Path) -> Inventory:
    """An inventory file, or a directory whose *.yaml/*.yml files together form one inventory."""
    issues: list[ConfigIssue] = []
    files = yaml_files_in(path) if path.is_dir() else [path]
    if not files:
        issues.append(ConfigIssue(str(path), None, "", "no *.yaml or *.yml files here"))
    sources = [s for s in (read_mapping(file, issues) for file in files) if s is not None]
    parts = [_validate(source, Inventory, issues) for source in sources]
    issues += inventory_issues(sources, merged=True)
    issues += [i for source in sources for i in _secret_issues(source, source.data, ())]
    if issues:
        raise ConfigError(_sorted(issues))
    return _merge_inventories([part for part in parts if part is not None])


def load_settings(path: Path | None = None) -> Settings:
    """The config file: `path`, else $MAINTENANCEBOT_CONFIG, else /etc/maintenancebot/config.yaml
    when it exists, else the defaults. Relative paths in it are relative to the file itself."""
    chosen = path or (Path(os.environ[CONFIG_ENV]) if os.environ.get(CONFIG_ENV) else None)
    if chosen is None and SYSTEM_CONFIG.exists():
        chosen = SYSTEM_CONFIG
    if chosen is None:
        return Settings()
    issues: list[ConfigIssue] = []
    source = read_mapping(chosen, issues)
    settings = _check_settings(source, issues) if source else None
    if settings is None or issues:
        raise ConfigError(_sorted(issues))
    return _resolve_paths(settings, chosen.absolute().parent)


def validate_paths(paths: list[Path]) -> list[ConfigIssue]:
    """Every problem in the given files and directories (searched for *.yaml/*.yml), each file
    recognised by its content. Runbooks' host patterns are checked against the union of the
    inventories among them, if any."""
    issues: list[ConfigIssue] = []
    runbooks: list[Source] = []
    inventories: list[Source] = []
    for path in yaml_files(paths, issues):
        source = read_mapping(path, issues)
        kind = _classify(source, issues) if source else None
        if source and kind == "runbook":
            runbooks.append(source)
            _check_runbook(source, path.stem, issues)
        elif source and kind == "inventory":
            inventories.append(source)
            _validate(source, Inventory, issues)
        elif source and kind == "config":
            _check_settings(source, issues)
    issues += inventory_issues(inventories, merged=False)
    issues += [i for source in inventories for i in _secret_issues(source, source.data, ())]
    issues += _runbook_set_issues(runbooks, inventories)
    return _sorted(issues)


# ------------------------------------------------------------------------------ shared


def _classify(source: Source, issues: list[ConfigIssue]) -> str | None:
    keys = set(source.data)
    if "steps" in keys:
        return "runbook"
    if keys & _INVENTORY_KEYS:
        return "inventory"
    if keys & _CONFIG_KEYS:
        return "config"
    issues.append(source.issue((), _UNRECOGNISED))
    return None


def _sorted(issues: Iterable[ConfigIssue]) -> list[ConfigIssue]:
    unique = dict.fromkeys(issues)  # a model check and a raw check may find the same thing
    return sorted(unique, key=lambda i: (i.file, i.line or 0))


def _validate(
    source: Source, model: type[_M], issues: list[ConfigIssue], data: Any = None
) -> _M | None:
    try:
        return model.model_validate(source.data if data is None else data)
    except ValidationError as exc:
        issues += validation_issues(source, exc, model, data)
        return None


def inline_secrets(values: dict[str, Any]) -> list[str]:
    """Where `values` (`--var` pairs, say) hold a secret inline, as KEY or KEY.sub paths."""
    return [".".join(map(str, where)) for where in _inline_secret_locs(values, ())]


def _secret_issues(source: Source, value: Any, loc: Loc) -> list[ConfigIssue]:
    return [source.issue(where, _INLINE_SECRET) for where in _inline_secret_locs(value, loc)]


def _inline_secret_locs(value: Any, loc: Loc) -> Iterator[Loc]:
    """Values under secret-looking keys that are not env:NAME / file:/path references."""
    for where, item in walk(value, loc):
        if isinstance(where[-1], str) and _SECRET_KEY.search(where[-1]) and _inline_secret(item):
            yield where


def _inline_secret(value: Any) -> bool:
    if isinstance(value, str):
        # A template ("{{ host.vars.db_password }}") refers to a secret, it does not hold one.
        return bool(value) and not _SECRET_REFERENCE.match(value) and "{{" not in value
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ------------------------------------------------------------------------------ runbooks

_Steps = list[tuple[int, dict[Any, Any]]]


def _check_runbook(source: Source, default_name: str, issues: list[ConfigIssue]) -> Runbook | None:
    data = source.data
    runbook = _validate(source, Runbook, issues, {"name": default_name, **data})
    issues += _schedule_issues(source)
    issues += _secret_issues(source, data.get("vars"), ("vars",))
    if data.get("between_batches") and "batches" not in data:
        issues.append(source.issue(("between_batches",), _CHECK_WITHOUT_BATCHES))
    raw_steps = data.get("steps")
    raw_steps = raw_steps if isinstance(raw_steps, list) else []
    steps = [(i, s) for i, s in enumerate(raw_steps) if isinstance(s, dict)]
    issues += _duplicates(source, steps, "name", "step name")
    issues += _duplicates(source, steps, "register", "register name")
    registers: dict[str, int] = {}
    for index, step in steps:
        if isinstance(step.get("register"), str):
            registers.setdefault(step["register"], index)
    for index, step in steps:
        issues += _step_shape_issues(source, index, step)
        issues += _template_issues(source, index, step, registers)
        issues += _action_issues(source, index, step)
    return runbook


def _schedule_issues(source: Source) -> list[ConfigIssue]:
    schedule, timezone = source.data.get("schedule"), source.data.get("timezone", "UTC")
    if not isinstance(schedule, str):
        return []
    # local: keeps apscheduler (~25 ms) out of the start-up of a run of an unscheduled runbook
    from maintenancebot.scheduling import check_cron

    # A bad time zone is reported on its own line; the cron check must not fail on it too.
    problem = check_cron(schedule, timezone if _known_timezone(timezone) else "UTC")
    return [source.issue(("schedule",), problem)] if problem else []


def _known_timezone(name: object) -> bool:
    try:
        ZoneInfo(str(name))
    except (ZoneInfoNotFoundError, ValueError):
        return False
    return True


def _duplicates(source: Source, steps: _Steps, key: str, what: str) -> list[ConfigIssue]:
    first: dict[str, int] = {}
    issues = []
    for index, step in steps:
        value = step.get(key)
        if isinstance(value, str) and value in first:
            line = source.line(("steps", first[value], key))
            message = f"duplicate {what} {value!r} (first on line {line})"
            issues.append(source.issue(("steps", index, key), message))
        elif isinstance(value, str):
            first[value] = index
    return issues


def _step_shape_issues(source: Source, index: int, step: dict[Any, Any]) -> list[ConfigIssue]:
    here: Loc = ("steps", index)
    issues = []
    # The model says this too, but only when the step's other fields are valid; the wording is
    # the model's so that `_sorted` keeps one copy when both see it.
    if ("run" in step) == ("action" in step):
        issues.append(source.issue(here, "a step needs exactly one of 'run' or 'action'"))
    elif "with" in step and "action" not in step:
        issues.append(source.issue(here, "'with' belongs to an 'action' step"))
    gated = isinstance(approval := step.get("approval"), dict) and approval.get("required", True)
    if step.get("readonly") is True and gated:
        issues.append(source.issue((*here, "approval"), _READONLY_GATED))
    return issues


def _template_issues(
    source: Source, index: int, step: dict[Any, Any], registers: dict[str, int]
) -> list[ConfigIssue]:
    issues = []
    for loc, text, expression in _templates(step):
        where = ("steps", index, *loc)
        if expression and "{{" in text:
            issues.append(source.issue(where, "a 'when' is a bare expression; drop the {{ }}"))
            continue
        problem = check_syntax(text, expression=expression)
        if problem:
            issues.append(source.issue(where, problem))
        elif loc[0] != "rollback":  # a rollback runs after later steps, so it may read them
            for name in sorted(referenced_names(text, expression=expression)):
                issues += _too_early(source, where, name, index, registers.get(name))
    return issues


def _templates(step: dict[Any, Any]) -> Iterator[tuple[Loc, str, bool]]:
    """(loc inside the step, template text, is it an expression) for every templated field."""
    for key in ("run", "rollback", "when"):
        if isinstance(step.get(key), str) and step[key].strip():  # blank: the model says so
            yield (key,), step[key], key == "when"
    for loc, value in walk(step.get("with"), ("with",)):
        if isinstance(value, str):
            yield loc, value, False


def _too_early(
    source: Source, where: Loc, name: str, index: int, registered: int | None
) -> list[ConfigIssue]:
    """A template of step `index` reading a register that no earlier step has set."""
    if registered is None or registered < index:
        return []
    line = source.line(("steps", registered))
    by = "this step" if registered == index else f"the step on line {line}"
    return [source.issue(where, f"reads {name!r}, which is only registered later (by {by})")]


def _action_issues(source: Source, index: int, step: dict[Any, Any]) -> list[ConfigIssue]:
    name, args = step.get("action"), step.get("with", {})
    if not isinstance(name, str) or not isinstance(args, dict):
        return []  # a wrong type is the model's to report
    errors = action_arg_errors(name, args)
    if get_action(name) is None:  # then the one error is about the name, not the arguments
        return [source.issue(("steps", index, "action"), message) for _, message in errors]
    issues = []
    for loc, message in errors:
        inner, _ = strip_union_tags(args, loc, missing=message == "Field required")
        issues.append(source.issue(("steps", index, "with", *inner), plain_message(message)))
    return issues


def _runbook_set_issues(runbooks: list[Source], inventories: list[Source]) -> list[ConfigIssue]:
    """Across files: duplicate runbook names, and host patterns naming what no inventory has."""
    issues: list[ConfigIssue] = []
    seen: dict[str, Where] = {}
    names = inventory_names(inventories)
    for source in runbooks:
        name = source.data.get("name", Path(source.file).stem)
        if isinstance(name, str):
            issues += _duplicate_name(seen, source, name)
        if inventories:
            issues += _host_pattern_issues(source, set(names.groups), set(names.hosts))
    return issues


def _duplicate_name(seen: dict[str, Where], source: Source, name: str) -> list[ConfigIssue]:
    if name in seen:
        return [defined_twice(source, ("name",), f"runbook {name!r}", seen[name])]
    seen[name] = (source, ("name",))
    return []


def _host_pattern_issues(source: Source, groups: set[str], hosts: set[str]) -> list[ConfigIssue]:
    patterns = source.data.get("hosts", "all")
    items = (
        [(("hosts",), patterns)]
        if isinstance(patterns, str)
        else [(("hosts", index), pattern) for index, pattern in string_items(patterns)]
    )
    return [
        source.issue(loc, f"unknown host or group {term!r}")
        for loc, pattern in items
        for term in unknown_terms([pattern], groups, hosts)
    ]


def _merge_inventories(parts: list[Inventory]) -> Inventory:
    defaults = next((p.defaults for p in parts if p.defaults != HostDefaults()), HostDefaults())
    groups = {name: group for part in parts for name, group in part.groups.items()}
    hosts = {name: entry for part in parts for name, entry in part.hosts.items()}
    return Inventory(defaults=defaults, groups=groups, hosts=hosts)


# ------------------------------------------------------------------------------ settings


def _check_settings(source: Source, issues: list[ConfigIssue]) -> Settings | None:
    settings = _validate(source, Settings, issues)
    issues += _secret_issues(source, source.data, ())
    return settings


def _resolve_paths(settings: Settings, base: Path) -> Settings:
    """Relative paths against the config file's directory, `~` against the home directory."""

    def resolve(model: BaseModel, *keys: str) -> dict[str, Any]:
        values = {key: getattr(model, key) for key in keys}
        return {
            key: value and str(base / Path(value).expanduser()) for key, value in values.items()
        }

    ssh = settings.ssh.model_copy(update=resolve(settings.ssh, "known_hosts", "identity_file"))
    paths = resolve(settings, "runbooks", "inventory", "state_dir")
    return settings.model_copy(update={**paths, "ssh": ssh})
