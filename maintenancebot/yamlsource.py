"""YAML text -> plain data plus the line each key and item came from; issues placed on those lines.

The only module that imports PyYAML (`loader` reads through it). It walks SafeLoader's node tree
itself rather than calling `yaml.safe_load`, because the node tree is where line numbers live and
because `safe_load` silently keeps the last of two duplicate keys. It also turns pydantic's errors into
`ConfigIssue`s, since placing an error means knowing where each value came from. It knows
nothing about what a runbook or an inventory means (that is `loader`) and never raises for a
bad document: every problem comes back as an issue. The one YAML it writes is an action's
arguments on one line, for records and reports (`one_line_yaml`).
"""

from __future__ import annotations

import difflib
import types
from collections.abc import Hashable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from maintenancebot.errors import ConfigIssue

Loc = tuple[Any, ...]
"""A path into a document: mapping keys and list indexes, e.g. ('steps', 2, 'timeout')."""

YAML_SUFFIXES = (".yaml", ".yml")

# Aliases can make a small file expand into a huge tree ("billion laughs"); stop well before.
_MAX_NODES = 200_000
# libyaml (PyYAML's C extension) builds the same node tree, with the same line marks, about ten
# times faster: a 1,000-host inventory parsed in 0.7 s with the pure-Python parser. The Python
# one is the fallback for a PyYAML built without libyaml.
_SafeLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_MERGE_TAG = "tag:yaml.org,2002:merge"
_PLAIN_TAGS: dict[type[Node], str] = {
    MappingNode: "tag:yaml.org,2002:map",
    SequenceNode: "tag:yaml.org,2002:seq",
}


@dataclass(frozen=True)
class Source:
    """One parsed YAML file: its data and the line of every key and list item in it."""

    file: str
    data: Any
    lines: Mapping[Loc, int] = field(default_factory=dict)

    def line(self, loc: Loc) -> int | None:
        """The line of `loc`, or of its nearest enclosing key when `loc` itself is absent
        (a missing key is reported on the line of the mapping that lacks it)."""
        for end in range(len(loc), -1, -1):
            line = self.lines.get(loc[:end])
            if line is not None:
                return line
        return None

    def issue(self, loc: Loc, message: str) -> ConfigIssue:
        return ConfigIssue(self.file, self.line(loc), format_loc(loc, self.data), message)


def format_loc(loc: Loc, data: Any = None) -> str:
    """('steps', 2, 'with', 'paths') -> 'steps[2].with.paths'. With the document's data, an
    integer key of a mapping shows as `.7`, not as a list index."""
    text = ""
    for part in loc:
        index = isinstance(part, int) and not isinstance(part, bool) and not isinstance(data, dict)
        text += f"[{part}]" if index else (f".{part}" if text else str(part))
        data = data.get(part) if isinstance(data, dict) else _item(data, part)
    return text


def _item(data: Any, part: Any) -> Any:
    return data[part] if _has(data, part) else None


def yaml_files(paths: list[Path], issues: list[ConfigIssue]) -> list[Path]:
    """The given files, and the *.yaml/*.yml files anywhere under the given directories."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = (p for p in path.rglob("*") if p.suffix in YAML_SUFFIXES and p.is_file())
            # Skip hidden trees (.git, editors' backups): they are not the user's config.
            files += sorted(p for p in found if not _hidden(p.relative_to(path)))
        elif path.exists():
            files.append(path)
        else:
            issues.append(ConfigIssue(str(path), None, "", "no such file or directory"))
    return list(dict.fromkeys(files))


def yaml_files_in(directory: Path) -> list[Path]:
    """The *.yaml/*.yml files directly in `directory`, by name."""
    return sorted(p for p in directory.iterdir() if p.suffix in YAML_SUFFIXES and p.is_file())


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def read_mapping(path: Path, issues: list[ConfigIssue]) -> Source | None:
    """Like `read_source`, for the files we read: their top level must be a mapping."""
    source, read_issues = read_source(path)
    issues += read_issues
    if source is not None and not isinstance(source.data, dict):
        got = _describe(source.data)
        issues.append(source.issue((), f"the top level must be a mapping of keys, got {got}"))
        return None
    return source


def walk(value: Any, loc: Loc = ()) -> Iterator[tuple[Loc, Any]]:
    """Every value inside `value` (depth first, containers before their items) with its loc."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield (*loc, key), item
            yield from walk(item, (*loc, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield (*loc, index), item
            yield from walk(item, (*loc, index))


def read_source(path: Path, display: str | None = None) -> tuple[Source | None, list[ConfigIssue]]:
    """Read and parse one file; None (with the reason as an issue) when there is no document."""
    name = display or str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return None, [ConfigIssue(name, None, "", "cannot read: not UTF-8 text")]
    except OSError as exc:
        return None, [ConfigIssue(name, None, "", f"cannot read: {exc.strerror or exc}")]
    return parse_source(text, name)


def parse_source(text: str, file: str, loader_class: Any = _SafeLoader) -> tuple[
        Source | None, list[ConfigIssue]]:
    loader = loader_class(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None, [ConfigIssue(file, 1, "", "the file is empty")]
        builder = _Builder(loader)
        data = builder.build(root, ())
    except yaml.MarkedYAMLError as exc:
        if loader_class is not yaml.SafeLoader:
            # Rare, and the pure-Python parser words syntax errors more helpfully than libyaml
            # ("expected <block end>, but found '-'" rather than "did not find expected key").
            return parse_source(text, file, yaml.SafeLoader)
        return None, [_syntax_issue(file, exc)]
    except _TooLarge:
        return None, [ConfigIssue(file, None, "", "document too large (aliases expanding?)")]
    finally:
        loader.dispose()
    lines = {(): root.start_mark.line + 1, **builder.lines}
    return Source(file, data, lines), [
        ConfigIssue(file, line, format_loc(loc, data), message)
        for loc, line, message in builder.issues
    ]


def _syntax_issue(file: str, exc: yaml.MarkedYAMLError) -> ConfigIssue:
    mark = exc.problem_mark or exc.context_mark
    line = mark.line + 1 if mark else None
    if exc.context == "expected a single document in the stream":
        return ConfigIssue(file, line, "", "a file holds one YAML document; found a second one")
    message = f"YAML syntax error: {exc.problem}"
    if exc.context and exc.context_mark and exc.context_mark.line + 1 != line:
        message += f" ({exc.context} on line {exc.context_mark.line + 1})"
    return ConfigIssue(file, line, "", message)


class _TooLarge(Exception):
    pass


_NOT_A_KEY = object()


class _Builder:
    """Turns a node tree into dicts, lists and scalars, recording lines and per-node issues."""

    def __init__(self, loader: Any) -> None:  # a SafeLoader or CSafeLoader
        self.loader = loader
        self.lines: dict[Loc, int] = {}
        self.issues: list[tuple[Loc, int, str]] = []
        self._building: set[int] = set()  # nodes on the current path, to stop recursive aliases
        self._flattened: set[int] = set()  # mappings whose merge keys are already applied
        self._count = 0

    def build(self, node: Node, loc: Loc) -> Any:
        self._count += 1
        if self._count > _MAX_NODES:
            raise _TooLarge
        if id(node) in self._building:
            self._issue(node, loc, "an alias refers to itself")
            return None
        self._building.add(id(node))
        try:
            if isinstance(node, MappingNode):
                return self._mapping(node, loc)
            if isinstance(node, SequenceNode):
                return self._sequence(node, loc)
            return self._scalar(node, loc)
        finally:
            self._building.discard(id(node))

    def _issue(self, node: Node, loc: Loc, message: str) -> None:
        self.issues.append((loc, node.start_mark.line + 1, message))

    def _scalar(self, node: Node, loc: Loc) -> Any:
        try:
            return self.loader.construct_object(node, deep=True)
        except yaml.MarkedYAMLError as exc:
            self._issue(node, loc, f"cannot read this value: {exc.problem}")
            return None

    def _check_tag(self, node: Node, loc: Loc) -> None:
        if node.tag != _PLAIN_TAGS[type(node)]:
            self._issue(node, loc, f"unsupported YAML tag {node.tag!r}")

    def _sequence(self, node: SequenceNode, loc: Loc) -> list[Any]:
        self._check_tag(node, loc)
        items = []
        for index, item in enumerate(node.value):
            self.lines[(*loc, index)] = item.start_mark.line + 1
            items.append(self.build(item, (*loc, index)))
        return items

    def _mapping(self, node: MappingNode, loc: Loc) -> dict[Any, Any]:
        self._check_tag(node, loc)
        if id(node) not in self._flattened:
            # Check before merge keys (`<<: *base`) are applied: a key that overrides a merged
            # one is deliberate, a key written twice in the same mapping is a mistake.
            self._check_duplicates(node, loc)
            self._flattened.add(id(node))
            try:
                self.loader.flatten_mapping(node)
            except yaml.MarkedYAMLError as exc:
                self._issue(node, loc, f"cannot merge: {exc.problem}")
                node.value = [(k, v) for k, v in node.value if k.tag != _MERGE_TAG]
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = self._key(key_node, loc)
            if key is _NOT_A_KEY:
                continue
            self.lines[(*loc, key)] = key_node.start_mark.line + 1
            result[key] = self.build(value_node, (*loc, key))
        return result

    def _key(self, node: Node, loc: Loc) -> Any:
        if isinstance(node, ScalarNode):
            key = self._scalar(node, loc)
            if isinstance(key, Hashable):
                return key
        self._issue(node, loc, "a key must be a plain value, not a list or mapping")
        return _NOT_A_KEY

    def _check_duplicates(self, node: MappingNode, loc: Loc) -> None:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG or not isinstance(key_node, ScalarNode):
                continue
            key = self._scalar(key_node, loc)
            line = key_node.start_mark.line + 1
            if isinstance(key, Hashable) and key in first_line:
                message = f"duplicate key (first on line {first_line[key]}; the last one would win)"
                self.issues.append(((*loc, key), line, message))
            elif isinstance(key, Hashable):
                first_line[key] = line


# ------------------------------------------------------------------ pydantic errors -> issues

_EXPECTED = {
    "string_type": "a string",
    "list_type": "a list",
    "tuple_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "a whole number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "float_type": "a number",
    "float_parsing": "a number",
    "none_required": "nothing (null)",
}

_PYDANTIC_PHRASES = {
    "Field required": "missing required key",
    "Extra inputs are not permitted": "unknown key",
}


@dataclass(frozen=True)
class _Error:
    loc: Loc  # with union member names removed, so it points into the document
    union: Loc | None  # where a union started, when the error belongs to one of its members
    expected: str | None  # for a type error, what the member wanted ("a string")
    message: str


def validation_issues(
    source: Source, error: ValidationError, model: type[BaseModel], data: Any = None
) -> list[ConfigIssue]:
    """pydantic's errors for `data` (default: the source's data) validated as `model`.

    A value that fits no member of a union makes pydantic report once per member; the member
    that got deepest into the value is what the author meant, and the rest is noise.
    """
    data = source.data if data is None else data
    errors = [_error(data, model, err) for err in error.errors()]
    deepest: dict[Loc, int] = {}
    for err in errors:
        if err.union is not None:
            deepest[err.union] = max(deepest.get(err.union, 0), len(err.loc))
    kept = [e for e in errors if e.union is None or len(e.loc) == deepest[e.union]]
    # The members of one union that failed at one place say one thing; other errors stand alone.
    groups: dict[tuple[Loc, int], list[_Error]] = {}
    for number, err in enumerate(kept):
        groups.setdefault((err.loc, -1 if err.union is not None else number), []).append(err)
    return [
        source.issue(loc, _merge(errs, _describe(_at(data, loc))))
        for (loc, _), errs in groups.items()
    ]


def _merge(errors: list[_Error], got: str) -> str:
    """One message for the errors of one place: a value error wins over 'expected X' ones, which
    are joined ('expected a string or a list')."""
    specific = list(dict.fromkeys(e.message for e in errors if e.expected is None))
    if specific:
        return "; ".join(specific)
    expected = list(dict.fromkeys(e.expected for e in errors if e.expected))
    return f"expected {' or '.join(expected)}, got {got}"


def _error(data: Any, model: type[BaseModel], err: Any) -> _Error:
    raw_loc: Loc = tuple(err["loc"])
    kind: str = err["type"]
    if kind == "invalid_key" or raw_loc[-1:] == ("[key]",):
        # pydantic shows a non-string key as a string ('None') or a number (True -> 1) in the
        # loc; the key itself is the input, and it leads to the right line.
        parent, union = strip_union_tags(data, raw_loc[: -2 if kind != "invalid_key" else -1])
        loc = (*parent, err["input"])
        return _Error(
            loc, union, None, f"a key must be a string (quote it), got {_describe(err['input'])}"
        )
    loc, union = strip_union_tags(data, raw_loc, missing=kind == "missing")
    if kind in _EXPECTED:
        return _Error(loc, union, _EXPECTED[kind], "")
    if kind == "extra_forbidden":
        return _Error(loc, union, None, "unknown key" + _known_keys_hint(model, loc))
    return _Error(
        loc, union, None, _phrase(kind, err["msg"], err.get("ctx") or {}, err.get("input"))
    )


def _phrase(kind: str, msg: str, ctx: Mapping[str, Any], value: Any) -> str:
    if kind == "string_too_short" and ctx.get("min_length") == 1:
        return "must not be empty"
    if kind == "too_short":
        count = ctx.get("min_length", 1)
        return f"needs at least {count} item{'s' if count != 1 else ''}"
    if msg.startswith("Input should be "):
        return f"must be {msg.removeprefix('Input should be ')}, got {_describe(value)}"
    return plain_message(msg)


def plain_message(msg: str) -> str:
    """A pydantic message in our words (also used for action arguments' errors)."""
    for prefix in ("Value error, ", "Assertion failed, "):
        msg = msg.removeprefix(prefix)
    if msg.startswith("Input should be "):
        return "must be " + msg.removeprefix("Input should be ")
    return _PYDANTIC_PHRASES.get(msg, msg)


def strip_union_tags(data: Any, loc: Loc, *, missing: bool = False) -> tuple[Loc, Loc | None]:
    """Drop the union member names pydantic puts in a loc ('hosts', 'list[str]', 0).

    A part that leads nowhere in the data is a member name, except the last part of a
    'missing' error, which names the absent key. Returns the loc and where the union started.
    """
    kept: list[Any] = []
    union: Loc | None = None
    node = data
    for index, part in enumerate(loc):
        if isinstance(node, dict) and not _has(node, part):
            # pydantic writes a null or numeric mapping key as a string ('None'): find the key.
            part = next((key for key in node if str(key) == str(part)), part)
        if _has(node, part):
            node = node[part]
        elif not (missing and index == len(loc) - 1):
            union = tuple(kept) if union is None else union
            continue
        kept.append(part)
    return tuple(kept), union


def _has(node: Any, part: Any) -> bool:
    if isinstance(node, dict):
        return isinstance(part, Hashable) and part in node
    return isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)


def _at(data: Any, loc: Loc) -> Any:
    for part in loc:
        if isinstance(data, dict):
            data = data.get(part)
        elif isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data):
            data = data[part]
        else:
            return None
    return data


def _describe(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return f"the number {value}"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"


def _known_keys_hint(model: type[BaseModel], loc: Loc) -> str:
    keys = _keys_at(model, loc[:-1])
    if not keys:
        return ""
    close = difflib.get_close_matches(str(loc[-1]), keys, n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (known keys: {', '.join(keys)})"


def _keys_at(annotation: Any, loc: Loc) -> list[str]:
    """The keys the model expects at `loc`, found by walking the model's type annotations."""
    for part in loc:
        annotation = _step_into(annotation, part)
    for option in _options(annotation):
        if isinstance(option, type) and issubclass(option, BaseModel):
            return [info.alias or name for name, info in option.model_fields.items()]
    return []


def _step_into(annotation: Any, part: Any) -> Any:
    for option in _options(annotation):
        if isinstance(option, type) and issubclass(option, BaseModel):
            for name, info in option.model_fields.items():
                if part in (name, info.alias):
                    return info.annotation
        elif get_origin(option) is list and isinstance(part, int):
            return get_args(option)[0]
        elif get_origin(option) is dict:
            return get_args(option)[1]
    return None


def _options(annotation: Any) -> list[Any]:
    """The members of a union (through Annotated and Optional), or the annotation itself."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _options(get_args(annotation)[0])
    if origin is Union or origin is types.UnionType:
        return [member for arg in get_args(annotation) for member in _options(arg)]
    return [annotation]


class _OneLineDumper(getattr(yaml, "CSafeDumper", yaml.SafeDumper)):  # type: ignore[misc]
    """YAML in flow style on one line: a string with a line break is double-quoted (escaped)."""


def _string(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    breaks = any(char in value for char in "\n\r\x85\u2028\u2029")
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style='"' if breaks else None)


_OneLineDumper.add_representer(str, _string)


def one_line_yaml(value: Any) -> str:
    """An action's arguments as the runbook's `with:` would say them, on one line:
    `{within: /var/tmp, paths: [/var/tmp/*.tmp], older_than: 7d}`, not Python's repr."""
    text: str = yaml.dump(value, Dumper=_OneLineDumper, default_flow_style=True,
                          sort_keys=False, width=1 << 30, allow_unicode=True)
    return text.strip().removesuffix("...").strip()
