"""A step made concrete for one host: its templates rendered twice when secrets are about.

The real render runs; the other, with each secret [REDACTED] (`plan.host_contexts`), is what
every record, approval and report shows, and what a template's error may say. The redactor
knows a secret's own forms, not what a filter makes of it (`| upper`, `| reverse`, `[2:]`).

Owns: rendering a step's `run:` or action arguments, and which variables its templates read.
Not here: Jinja itself (`templating`), the contexts (`plan`), running anything (`hostrun`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from maintenancebot.actions import get_action
from maintenancebot.errors import TemplateError
from maintenancebot.models import Step
from maintenancebot.templating import Templates
from maintenancebot.yamlsource import (
    format_loc,
    one_line_yaml,
    plain_message,
    strip_union_tags,
    walk,
)


@dataclass(frozen=True)
class Rendered:
    """`script` is what runs (a `run:` step's shell line, its secrets in it), `command` what
    every record, approval and report shows; `args` an action's validated arguments."""

    command: str
    script: str | None
    args: Any
    context: dict[str, Any]
    shown_context: dict[str, Any]


def render_step(templates: Templates, step: Step, context: dict[str, Any],
                shown_context: dict[str, Any]) -> Rendered:
    """Raises TemplateError, also for an action's arguments that are invalid once rendered."""
    if step.run is not None:
        script, command = render_shell(templates, step.run, context, shown_context)
        return Rendered(command, script, None, context, shown_context)
    action = get_action(step.action or "")
    assert action is not None, "the loader rejects unknown actions"
    values = templates.render_value(step.args, context)
    try:
        args = action.Args.model_validate(values)
    except ValidationError as exc:
        raise TemplateError(_argument_errors(values, exc)) from None
    if shown_context is not context:
        values = templates.render_value(step.args, shown_context)
    return Rendered(f"{step.action} {one_line_yaml(values)}", None, args, context,
                    shown_context)


def _argument_errors(values: Any, error: ValidationError) -> str:
    """`with.paths: glob contains '..': /srv/../x`, as `validate` says it for a literal value;
    pydantic's own text adds its input and a link, which a report has no room for."""
    problems = []
    for err in error.errors():
        loc, _ = strip_union_tags(values, tuple(err["loc"]), missing=err["type"] == "missing")
        problems.append(f"{format_loc(('with', *loc), {'with': values})}: "
                        f"{plain_message(err['msg'])}")
    return "; ".join(problems)


def render_shell(templates: Templates, source: str, context: dict[str, Any],
                 shown_context: dict[str, Any]) -> tuple[str, str]:
    """A shell template as it runs, and as it is shown (one render without secrets about)."""
    script = templates.render_shell(source, context)
    if shown_context is context:
        return script, script
    return script, templates.render_shell(source, shown_context)


def told(error: Exception, context: dict[str, Any], shown_context: dict[str, Any],
         attempt: Callable[[dict[str, Any]], object]) -> str:
    """A template's error as the records may say it. Its message can quote a value (`'dict
    object' has no attribute 'HUNTER2'`, an argument's check), so with secrets about, it
    is the message of the same `attempt` without them; if that one succeeds, the error came
    from a secret's value, and only that is said."""
    if shown_context is context:
        return str(error)
    try:
        attempt(shown_context)
    except TemplateError as shown_error:
        return str(shown_error)
    return "the error depends on a secret's value, so its message is not shown"


def reads_of(templates: Templates, step: Step) -> set[str]:
    """The variables a step's templates read: its `when`, `run`, `rollback` and arguments."""
    reads = set(templates.names(step.when, expression=True)) if step.when else set()
    arguments = [value for _, value in walk(step.args) if isinstance(value, str)]
    for source in (step.run, step.rollback, *arguments):
        if source:
            reads |= templates.names(source)
    return reads
