"""One chat completion through the `openai` client, with a timeout and bounded retries.

The only module that imports `openai`, and only inside functions: the CLI must start fast, and a
bot with no LLM configured must not need the package. It owns the transport concerns: the client's
own retries are off (`max_retries=0`) so that ours, via tenacity, are the only ones; they retry
with exponential backoff and jitter on rate limits, timeouts, 5xx and connection errors only (an
auth error or a bad request will not get better by asking again); every failure becomes LlmError.
It knows nothing about runs, digests or budgets: that is `summary`'s business.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from maintenancebot.errors import MaintenanceBotError
from maintenancebot.models import LlmSettings

if TYPE_CHECKING:
    from tenacity import RetryCallState

log = logging.getLogger(__name__)


class LlmError(MaintenanceBotError):
    """The LLM gave no usable answer (down, slow, refused, or said something malformed)."""


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 3          # calls in all, the first included
    initial_wait: float = 1.0  # seconds before the first retry; doubles each time
    max_wait: float = 10.0
    jitter: float = 1.0        # up to this many random seconds added, so workers do not stampede


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int | None      # from the response's usage; None if the provider omits it
    completion_tokens: int | None


def complete(settings: LlmSettings, api_key: str, system: str, prompt: str, *,
             max_tokens: int, retry: RetryPolicy = RetryPolicy()) -> Completion:
    """Ask for one completion of `prompt` under the fixed `system` message. No tools, ever."""
    import openai
    import tenacity

    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(max(1, retry.attempts)),
        # wait_exponential + wait_random: the same backoff-with-jitter on tenacity 8 and 9
        # (wait_exponential_jitter renamed its arguments between them).
        wait=tenacity.wait_exponential(multiplier=retry.initial_wait, max=retry.max_wait)
        + tenacity.wait_random(0, retry.jitter),
        retry=tenacity.retry_if_exception(_transient),
        before_sleep=_log_retry, reraise=True,
    )
    messages = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
    client = None
    try:
        client = openai.OpenAI(base_url=settings.base_url, api_key=api_key,
                               timeout=settings.timeout, max_retries=0)
        response = retrying(client.chat.completions.create, model=settings.model,
                            messages=messages, max_tokens=max_tokens, temperature=0.2)
    except openai.OpenAIError as exc:
        raise LlmError(_describe(exc, retry.attempts)) from exc
    except json.JSONDecodeError as exc:  # a 200 whose body is not JSON
        raise LlmError("malformed response: body is not JSON") from exc
    except ValueError as exc:  # e.g. a base_url the HTTP client cannot parse
        raise LlmError(f"cannot call the LLM: {type(exc).__name__}: {exc}"[:200]) from exc
    finally:
        if client is not None:
            client.close()
    return _completion(response)


def _transient(exc: BaseException) -> bool:
    """Worth another try: rate limits, timeouts, connection trouble and server errors only."""
    import openai

    if isinstance(exc, (openai.RateLimitError, openai.APIConnectionError)):
        return True  # APITimeoutError is an APIConnectionError
    return isinstance(exc, openai.APIStatusError) and exc.status_code >= 500


def _log_retry(state: RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome else None
    wait = state.next_action.sleep if state.next_action else 0.0
    log.warning("LLM call failed (%s); retry %d in %.1fs", _describe(error),
                state.attempt_number, wait)


def _describe(exc: BaseException | None, attempts: int | None = None) -> str:
    """A one-line reason without the response body (which may quote the prompt back)."""
    import openai

    tried = f" (after {attempts} attempts)" if attempts else ""
    if isinstance(exc, openai.APITimeoutError):
        return f"timed out{tried}"
    if isinstance(exc, openai.APIConnectionError):
        return f"connection failed{tried}"
    if isinstance(exc, openai.RateLimitError):
        return f"rate limited, HTTP 429{tried}"
    if isinstance(exc, openai.AuthenticationError):
        return "authentication failed, HTTP 401 (check the API key variable)"
    if isinstance(exc, openai.APIStatusError):
        return f"HTTP {exc.status_code} {type(exc).__name__}{tried if exc.status_code >= 500 else ''}"
    return type(exc).__name__ if exc is not None else "unknown error"


def _completion(response: Any) -> Completion:
    """The answer's text and usage, checked field by field: a proxy may return anything."""
    choices = getattr(response, "choices", None)
    if not isinstance(choices, list) or not choices:
        raise LlmError("malformed response: no choices")
    content = getattr(getattr(choices[0], "message", None), "content", None)
    if not isinstance(content, str) or not content.strip():
        raise LlmError("malformed response: empty message")
    usage = getattr(response, "usage", None)
    return Completion(content, _count(getattr(usage, "prompt_tokens", None)),
                      _count(getattr(usage, "completion_tokens", None)))


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None
