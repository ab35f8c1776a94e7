"""After a run: its digest, its summary (LLM or template) and its notifications, recorded.

One function for the CLI, the daemon and `maintenancebot notify`, so a hand-started run, a
scheduled run and a resend say the same thing. Reporting never changes a run's outcome and never
raises: a summary or a Slack post that fails is recorded on the run (`notify_state = failed`,
with the reason) for `maintenancebot notify RUN_ID` to resend.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TextIO

from maintenancebot import views
from maintenancebot.digest import build_digest
from maintenancebot.models import Settings
from maintenancebot.notify import notifiers_from_settings, notify_all, run_message
from maintenancebot.redact import (
    RedactingFilter,
    Redactor,
    install_log_redaction,
    secrets_from_settings_and_env,
)
from maintenancebot.store import RunStore
from maintenancebot.summary import Summary, summarize

log = logging.getLogger(__name__)

SENT, FAILED, SKIPPED = "sent", "failed", "skipped"


@dataclass(frozen=True)
class Report:
    summary: Summary
    notify_state: str
    failed: tuple[str, ...] = ()


def redactor_for(settings: Settings, secret_sources: Any,
                 environ: Mapping[str, str] | None = None) -> Redactor:
    """Every secret this run could meet: config-named keys, `env:`/`file:` references in the
    inventory and runbook vars, and secret-looking environment variables."""
    env = os.environ if environ is None else environ
    return Redactor(secrets_from_settings_and_env(settings, secret_sources, env))


_log_filter: RedactingFilter | None = None


def guard_logs(redactor: Redactor) -> None:
    """Route every log record through `redactor` (swapped in place on later runs)."""
    global _log_filter
    if _log_filter is None:
        _log_filter = install_log_redaction(redactor)
    else:
        _log_filter.redactor = redactor
        for handler in logging.getLogger().handlers:
            if _log_filter not in handler.filters:
                handler.addFilter(_log_filter)


def report_run(
    settings: Settings, store: RunStore, run_id: str, redactor: Redactor, *,
    post: bool, console: TextIO | None = None, environ: Mapping[str, str] | None = None,
    resend: bool = False,
) -> Report:
    """Summarize `run_id` and send it: to `console` if given, to Slack when `post`.

    A resend reuses the stored summary, so it costs no tokens and says what was said.
    """
    env = os.environ if environ is None else environ
    try:
        digest = build_digest(views.run_document(store, run_id), redactor)
        run = store.get_run(run_id)
        if resend and run.summary_text:
            summary = Summary(run.summary_text, "llm" if run.summary_source == "llm" else
                              "template", None, 0)
        else:
            summary = summarize(digest, llm=settings.llm, ledger=store, redact=redactor,
                                environ=env)
            store.set_summary(run_id, summary.text, summary.source)
        if summary.reason:
            log.info("run %s: %s", run_id, summary.reason)
        targets = settings if post else settings.model_copy(update={"slack": None})
        notifiers = notifiers_from_settings(targets, env, console)
        failed = tuple(notify_all(notifiers, run_message(digest, summary, redactor)))
    except Exception as exc:  # the run is recorded already; its report must not take it down
        log.exception("reporting run %s failed", run_id)
        store.set_notify(run_id, FAILED, f"{type(exc).__name__}: {exc}")
        return Report(Summary("", "template", str(exc), 0), FAILED)
    slack_failed = [name for name in failed if name != "console"]
    if not post:
        state, error = SKIPPED, None
    elif slack_failed:
        state, error = FAILED, (f"could not deliver to {', '.join(slack_failed)}; "
                                f"resend with `maintenancebot notify {run_id}`")
    else:
        state, error = SENT, None
    store.set_notify(run_id, state, error)
    store.audit(f"notify.{state}", run_id=run_id,
                details={"failed": list(failed), "summary_source": summary.source,
                         "resend": resend})
    return Report(summary, state, failed)
