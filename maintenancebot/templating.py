"""Sandboxed Jinja2 for `run`, `rollback`, action arguments and `when` expressions.

The one module that imports jinja2. Every template renders in a sandbox with StrictUndefined, so
a typo is an error instead of an empty string in a root shell. In shell templates every `{{ }}`
value is shell-quoted on the way out; a runbook opts out for one value with `| raw`. Templates
are compiled once and cached per `Templates` instance, which lives for one run (not per host).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jinja2
from jinja2 import meta, nodes
from jinja2.sandbox import SandboxedEnvironment

from maintenancebot.errors import TemplateError

# A value that is one expression and nothing else: `"{{ files }}"`, not `"{{ a }}/{{ b }}"`.
_WHOLE_EXPRESSION = re.compile(r"^\s*\{\{((?:(?!\{\{|\}\}).)*)\}\}\s*$", re.DOTALL)


class _Raw(str):
    """A value the runbook author asked to pass to the shell unquoted."""


def _quote_for_shell(value: Any) -> Any:
    if isinstance(value, _Raw):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return shlex.quote(str(value))


def _make_env(*, shell: bool) -> SandboxedEnvironment:
    env = SandboxedEnvironment(
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        finalize=_quote_for_shell if shell else None,
        autoescape=False,
    )
    env.filters["raw"] = _Raw
    env.filters["quote"] = lambda value: shlex.quote(str(value))
    return env


_SHELL = _make_env(shell=True)
_TEXT = _make_env(shell=False)


@dataclass(frozen=True)
class Registered:
    """What `register:` exposes of a step's result to later steps of the same host."""

    stdout: str = ""
    stderr: str = ""
    rc: int | None = None
    changed: bool = False
    duration: float = 0.0
    skipped: bool = False
    failed: bool = False
    data: Mapping[str, Any] | None = None  # an action's structured report

    @property
    def stdout_lines(self) -> list[str]:
        return self.stdout.splitlines()


def check_syntax(source: str, *, expression: bool = False) -> str | None:
    """The syntax error in `source` as a message, or None. Used by validation, renders nothing."""
    try:
        if expression:
            _TEXT.compile_expression(source)
        else:
            _known_filters_and_tests(_SHELL.parse(source))
    except jinja2.TemplateSyntaxError as exc:  # TemplateAssertionError (unknown filter) too
        return f"template syntax error: {exc.message} (template line {exc.lineno})"
    return None


def _known_filters_and_tests(tree: nodes.Template) -> None:
    """What Jinja's compiler refuses and its parser lets through, in the compiler's words. Not
    compiled here: that took a quarter of validating and planning 50 runbooks."""
    for node in tree.find_all((nodes.Filter, nodes.Test)):
        kind, known = (("filter", _SHELL.filters) if isinstance(node, nodes.Filter)
                       else ("test", _SHELL.tests))
        if node.name not in known:
            raise jinja2.TemplateAssertionError(f"No {kind} named {node.name!r}.", node.lineno)


def referenced_names(source: str, *, expression: bool = False) -> frozenset[str]:
    """Top-level variables a template reads; lets a dry-run know a value it lacks, not guess."""
    text = "{{ " + source + " }}" if expression else source
    return frozenset(meta.find_undeclared_variables(_TEXT.parse(text)))


class Templates:
    """Compiled templates for one run, keyed by source."""

    def __init__(self) -> None:
        self._shell: dict[str, jinja2.Template] = {}
        self._text: dict[str, jinja2.Template] = {}
        self._expressions: dict[str, Any] = {}
        self._names: dict[tuple[str, bool], frozenset[str]] = {}

    def render_shell(self, source: str, context: Mapping[str, Any]) -> str:
        return self._render(self._shell, _SHELL, source, context)

    def render_text(self, source: str, context: Mapping[str, Any]) -> str:
        return self._render(self._text, _TEXT, source, context)

    def render_value(self, value: Any, context: Mapping[str, Any]) -> Any:
        """Render every string inside an action's arguments (dicts and lists recursively)."""
        if isinstance(value, str):
            whole = _WHOLE_EXPRESSION.match(value)
            if whole is not None:
                # `files: "{{ cert_files }}"` passes the list itself, not its text (as Ansible).
                return self.value_of(whole.group(1), context)
            return self.render_text(value, context) if ("{{" in value or "{%" in value) else value
        if isinstance(value, Mapping):
            return {key: self.render_value(item, context) for key, item in value.items()}
        if isinstance(value, list):
            return [self.render_value(item, context) for item in value]
        return value

    def evaluate(self, expression: str, context: Mapping[str, Any]) -> bool:
        return bool(self.value_of(expression, context))

    def value_of(self, expression: str, context: Mapping[str, Any]) -> Any:
        compiled = self._expressions.get(expression)
        if compiled is None:
            compiled = self._expressions[expression] = _guard(
                lambda: _TEXT.compile_expression(expression, undefined_to_none=False)
            )
        value = _guard(lambda: compiled(**context))
        if isinstance(value, jinja2.Undefined):
            _guard(lambda: str(value))  # raises the StrictUndefined error with its hint
        return value

    def names(self, source: str, *, expression: bool = False) -> frozenset[str]:
        key = (source, expression)
        if key not in self._names:
            self._names[key] = referenced_names(source, expression=expression)
        return self._names[key]

    @staticmethod
    def _render(
        cache: dict[str, jinja2.Template],
        env: SandboxedEnvironment,
        source: str,
        context: Mapping[str, Any],
    ) -> str:
        template = cache.get(source)
        if template is None:
            template = cache[source] = _guard(lambda: env.from_string(source))
        return str(_guard(lambda: template.render(context)))


def _guard(call: Any) -> Any:
    """Run a Jinja call, turning its errors into our TemplateError with a readable message."""
    try:
        return call()
    except jinja2.UndefinedError as exc:
        raise TemplateError(f"undefined variable: {exc.message}") from exc
    except jinja2.exceptions.SecurityError as exc:
        raise TemplateError(f"not allowed in a runbook template: {exc}") from exc
    except jinja2.TemplateError as exc:
        raise TemplateError(f"template error: {exc}") from exc
    except (TypeError, ValueError, ArithmeticError, AttributeError, LookupError) as exc:
        # What an expression can raise (1/0, x[9], int('a'), the sandbox's range(10**9)): the
        # runbook's mistake, reported as one, not as a bug of ours with a traceback.
        raise TemplateError(f"template error: {type(exc).__name__}: {exc}") from exc


# ------------------------------------------------------------------------------ reports

# Reports (run summaries) are text for people, not shell: no quoting; blocks trimmed so a template
# can be laid out readably. Sandboxed and strict like every other template.
_REPORT = SandboxedEnvironment(
    undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True, autoescape=False,
)


def render_report(source: str, context: Mapping[str, Any]) -> str:
    """Render a report template shipped with the package (e.g. templates/summary.txt.j2)."""
    return str(_guard(lambda: _REPORT.from_string(source).render(context)))


def unavailable(hint: str) -> Any:
    """A value that fails the render that uses it, with `hint` as the reason (and only then:
    a secret nobody renders need not exist on this controller)."""
    return jinja2.StrictUndefined(hint=hint)
