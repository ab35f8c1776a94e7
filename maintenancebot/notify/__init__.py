"""Where a finished run's summary goes: the message, the notifier protocol, and fan-out.

Owns `RunMessage` (what every notifier sends, built once from the digest and the summary and
redacted once more on the way out), the `Notifier` protocol, `NotifyError`, and `notify_all`,
which logs a notifier's failure and reports it instead of raising: a notification never changes a
run's outcome, the caller marks the run `notify_failed` and `maintenancebot notify RUN_ID` resends.
The Slack notifier (the only importer of slack_sdk) is imported only when Slack is configured.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TextIO

from maintenancebot.digest import Digest, render_digest
from maintenancebot.errors import MaintenanceBotError
from maintenancebot.summary import Summary, headline

if TYPE_CHECKING:
    from maintenancebot.models import Settings

log = logging.getLogger(__name__)

DRY = "DRY RUN"


class NotifyError(MaintenanceBotError):
    """A notifier could not deliver (after its retries); the run is marked notify_failed."""


@dataclass(frozen=True)
class RunMessage:
    run_id: str
    runbook: str
    status: str
    dry_run: bool
    headline: str   # one line: runbook, status, run id (and DRY RUN)
    summary: str    # the Summary's text: the facts, and the LLM's paragraph if any
    details: str    # the rendered digest: outcome groups, failures with stderr, changes


class Notifier(Protocol):
    name: str

    def send(self, message: RunMessage) -> None:
        """Deliver `message` or raise NotifyError."""


def run_message(digest: Digest, summary: Summary, redact: Callable[[str], str]) -> RunMessage:
    """The message for one run. Everything in it was redacted already; this pass is the last net."""
    return RunMessage(
        run_id=digest.run_id, runbook=digest.runbook, status=digest.status,
        dry_run=digest.dry_run, headline=redact(headline(digest)), summary=redact(summary.text),
        details=redact(render_digest(digest)),
    )


def notify_all(notifiers: Iterable[Notifier], message: RunMessage) -> list[str]:
    """Send to every notifier; the names of those that failed (logged, never raised)."""
    failed = []
    for notifier in notifiers:
        try:
            notifier.send(message)
        except NotifyError as exc:
            log.warning("notifier %s failed for run %s: %s", notifier.name, message.run_id, exc)
            failed.append(notifier.name)
        except Exception:  # a bug in one notifier must not keep the others from sending
            log.exception("notifier %s crashed for run %s", notifier.name, message.run_id)
            failed.append(notifier.name)
    return failed


def notifiers_from_settings(settings: Settings, environ: Mapping[str, str],
                            stream: TextIO | None = None) -> list[Notifier]:
    """A console notifier when `stream` is given, and Slack when its token or webhook is set.

    Raises NotifyError when Slack is configured but unusable (a bot token and no channel).
    """
    notifiers: list[Notifier] = []
    if stream is not None:
        from maintenancebot.notify.console import ConsoleNotifier

        notifiers.append(ConsoleNotifier(stream))
    slack = settings.slack
    if slack is not None:
        token = environ.get(slack.token_env) or None
        webhook = environ.get(slack.webhook_url_env) if slack.webhook_url_env else None
        if token or webhook:
            from maintenancebot.notify.slack import SlackNotifier

            notifiers.append(SlackNotifier(slack, token, webhook or None))
        else:
            log.info("Slack configured but neither $%s nor a webhook variable is set",
                     slack.token_env)
    return notifiers
