"""The one redaction pipeline: known secret values and common secret shapes become [REDACTED].

Everything that leaves the process or lands on disk (the store, log records, the LLM prompt, Slack
payloads) passes through one `Redactor` built per run from the secrets the bot knows: values of
`env:`/`file:` references in the inventory, the Slack and LLM keys named in the settings, and
secret-looking environment variables. Patterns catch what nobody declared (a password echoed by a
script, a key block in stderr). This module only transforms strings: it never logs a value it
masks, and the only I/O it does is resolving `env:`/`file:` references when asked to.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

from maintenancebot.models import Settings

log = logging.getLogger(__name__)

REDACTED = "[REDACTED]"
# Shorter values ("admin", "root", "1234") occur in ordinary text; masking them would destroy
# the output that makes a report useful, and a six-character secret is not worth guarding this way.
MIN_SECRET_LENGTH = 6
_MAX_SECRET_FILE = 64 * 1024  # a secret file larger than this is not a secret, it is a mistake

# A key whose name ends in a secret's name holds a secret (`db_password`); `token_env` does not.
_SECRET_KEY = re.compile(
    r"(^|[_.-])(password|passwd|pwd|passphrase|token|secret|api_?key|access_?key|secret_?key"
    r"|private_?key|credentials?)$", re.IGNORECASE)
_SECRET_ENV = re.compile(r"(PASSWORD|PASSWD|PASSPHRASE|TOKEN|SECRET|API_?KEY|ACCESS_?KEY|"
                         r"PRIVATE_?KEY|CREDENTIALS?)", re.IGNORECASE)
_REFERENCE = re.compile(r"^(?:env:(?P<env>[A-Za-z_][A-Za-z0-9_]*)|file:(?P<file>.+))$")

_KEYWORD = (r"(?:password|passwd|pwd|passphrase|token|secret|api[_-]?key|access[_-]?key"
            r"|private[_-]?key|client[_-]?secret|credentials?)")
_VALUE = r"(?:\"[^\"\n]*\"|'[^'\n]*'|[^\s\"',;&)}\]]+)"
# Every repeat next to a keyword is bounded ({0,64}) and every pattern starts at a literal or a
# word boundary: output is untrusted, and an unbounded `[\w-]*` before an alternation is
# quadratic on a long run of dashes or word characters.
_KEY = rf"[\w.-]{{0,64}}{_KEYWORD}[\w.-]{{0,64}}"
_PEM_BLOCK = re.compile(
    r"-----BEGIN ([A-Z0-9 ]{0,40})PRIVATE KEY-----.*?(?:-----END \1PRIVATE KEY-----|\Z)", re.DOTALL)
_PEM_END = re.compile(r"-----END [A-Z0-9 ]{0,40}PRIVATE KEY-----")
_BASE64_LINE = re.compile(r"[A-Za-z0-9+/=]{16,}\r?")


def _keep_quotes(match: re.Match[str]) -> str:
    """`key=` + masked value, keeping the value's quotes so JSON and shell stay readable."""
    value = match.group(2)
    quote_char = value[0] if value[:1] in ("'", '"') else ""
    return f"{match.group(1)}{quote_char}{REDACTED}{quote_char}"


@dataclass(frozen=True)
class _Rule:
    """A secret shape, and the literal needles without which its pattern cannot match.

    Almost no output holds a secret, and a substring search is far cheaper than a regex pass, so a
    pattern runs only when every group in `needles` has one member in the text. `folded` rules
    ignore case: their lowercase needles are looked for in the lowercased text.
    """

    pattern: re.Pattern[str]
    replacement: str | Callable[[re.Match[str]], str]
    needles: tuple[tuple[str, ...], ...]
    folded: bool

    def may_match(self, text: str) -> bool:
        for group in self.needles:
            for needle in group:
                if needle in text:
                    break
            else:
                return False
        return True


def _rule(pattern: re.Pattern[str], replacement: str | Callable[[re.Match[str]], str],
          *needles: str | tuple[str, ...]) -> _Rule:
    """Each of `needles` is a needle or a tuple of alternatives; the text must hold all of them."""
    groups = tuple((group,) if isinstance(group, str) else group for group in needles)
    cased = any(needle.lower() != needle.upper() for group in groups for needle in group)
    return _Rule(pattern, replacement, groups, bool(pattern.flags & re.IGNORECASE) and cased)


# One of these is in every match of `_KEY`: `pass` covers password, passwd and passphrase, and
# `secret` covers client_secret.
_KEYWORD_NEEDLES = ("pass", "pwd", "token", "secret", "credential",
                    *(f"{word}{sep}key" for word in ("api", "access", "private")
                      for sep in ("", "_", "-")))
_AWS_KEY_PREFIXES = ("AKIA", "ASIA", "AGPA", "AIDA", "AROA", "ANPA", "ANVA", "AIPA")

# Applied in order after private key blocks (see `_mask_key_blocks`). A one-character group goes
# first where a rule has one: it is found with memchr and spares most text the longer searches.
_RULES: tuple[_Rule, ...] = (
    _rule(re.compile(r"\b(https?://hooks\.slack\.com/)[^\s\"'<>]+"), r"\1[REDACTED]",
          "://hooks.slack.com/"),
    _rule(re.compile(r"\b([a-z][a-z0-9+.-]{0,30}://[^\s:/@\"'<>]{1,256}):[^\s@/\"'<>]{1,256}@",
                     re.IGNORECASE), r"\1:[REDACTED]@", "@", "://"),
    _rule(re.compile(r"\b(authorization[ \t]*[:=][ \t]*[\"']?)(bearer|basic|token|bot|digest)"
                     r"[ \t]+[^\s\"',]+", re.IGNORECASE), r"\1\2 [REDACTED]", "authorization"),
    _rule(re.compile(r"\b(bearer)[ \t]+[A-Za-z0-9._~+/-]{8,}=*", re.IGNORECASE), r"\1 [REDACTED]",
          "bearer"),
    _rule(re.compile(rf"\b(?:{'|'.join(_AWS_KEY_PREFIXES)})[A-Z0-9]{{16}}\b"),
          "[REDACTED:aws-key-id]", "A", _AWS_KEY_PREFIXES),
    _rule(re.compile(r"\b(aws_secret_access_key[ \t]*[\"']?[ \t]*[:=][ \t]*[\"']?)"
                     r"[A-Za-z0-9/+=]{40}", re.IGNORECASE), r"\1[REDACTED]",
          "aws_secret_access_key"),
    _rule(re.compile(r"\bxox[abprseo]-[A-Za-z0-9-]{8,}"), "[REDACTED:slack-token]", "xox"),
    _rule(re.compile(r"\bxapp-[A-Za-z0-9-]{8,}"), "[REDACTED:slack-token]", "xapp-"),
    _rule(re.compile(r"\beyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{8,}"),
          "[REDACTED:jwt]", "eyJ"),
    _rule(re.compile(r"\bsk-[A-Za-z0-9_-]{20,}"), "[REDACTED:api-key]", "sk-"),
    _rule(re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}"), "[REDACTED:github-token]",
          "_", ("ghp_", "gho_", "ghu_", "ghs_", "ghr_")),
    # `--password x` / `--token=x` on a command line.
    _rule(re.compile(rf"(?<![\w-])(--?{_KEY}(?:[ \t]+|=))(?!\[REDACTED)({_VALUE})", re.IGNORECASE),
          _keep_quotes, "-", _KEYWORD_NEEDLES),
    # `password=x`, `DB_PASSWORD: x`, `"api_key": "x"`; not `/etc/passwd:` (a path, not a key).
    _rule(re.compile(rf"(?<![\w/.-])({_KEY}[\"']?[ \t]*[:=][ \t]*)(?!\[REDACTED)({_VALUE})",
                     re.IGNORECASE), _keep_quotes, (":", "="), _KEYWORD_NEEDLES),
)


def _apply_rules(text: str) -> str:
    folded = _fold(text)
    for rule in _RULES:
        haystack = folded if rule.folded else text
        if haystack is not None and not rule.may_match(haystack):
            continue
        masked = rule.pattern.sub(rule.replacement, text)
        if masked is not text:
            # Later rules look for their needles in what they will actually be applied to.
            text, folded = masked, _fold(masked)
    return text


def _fold(text: str) -> str | None:
    """The text to look for lowercase needles in; None when only the patterns themselves can tell.

    Ignoring case, re matches `ı` and `İ` to `i`, `ſ` to `s` and the Kelvin sign to `k`, which
    `str.lower` does not do; ASCII text has no such letters.
    """
    return text.lower() if text.isascii() else None


def _mask_key_blocks(text: str) -> str:
    """Private key blocks, whole or cut off at either end by an output tail."""
    if "PRIVATE KEY-----" not in text:
        return text
    text = _PEM_BLOCK.sub("[REDACTED:private-key]", text)
    if not _PEM_END.search(text):
        return text
    # An END line whose BEGIN fell off the top of a tail: drop the base64 lines above it. Done
    # line by line because a regex for "base64 lines followed by END" is quadratic on a blob.
    kept: list[str] = []
    for line in text.split("\n"):
        if _PEM_END.search(line):
            while kept and _BASE64_LINE.fullmatch(kept[-1]):
                kept.pop()
            line = _PEM_END.sub("[REDACTED:private-key]", line)
        kept.append(line)
    return "\n".join(kept)


class Redactor:
    """Masks known secret values and secret-shaped text. Immutable; cheap to call per string."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        variants = {form for value in secrets for form in _forms(value)}
        self._count = len(variants)
        # Longest first, so a secret that contains another is masked whole, not in pieces.
        ordered = sorted(variants, key=len, reverse=True)
        self._known = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    @property
    def known_count(self) -> int:
        return self._count

    def __call__(self, text: str) -> str:
        if not text:
            return text
        if self._known is not None:
            text = self._known.sub(REDACTED, text)
        return _apply_rules(_mask_key_blocks(text))

    def redact_obj(self, obj: Any) -> Any:
        """A copy of nested dicts/lists with every string redacted and secret-keyed values masked."""
        if isinstance(obj, str):
            return self(obj)
        if isinstance(obj, Mapping):
            return {self(str(key)) if isinstance(key, str) else key: self._value(key, value)
                    for key, value in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [self.redact_obj(item) for item in obj]
        return obj

    def _value(self, key: object, value: Any) -> Any:
        secret_key = isinstance(key, str) and _SECRET_KEY.search(key) is not None
        if secret_key and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return REDACTED if str(value) and not _is_reference(value) else value
        return self.redact_obj(value)


def _is_reference(value: object) -> bool:
    # `env:DB_PASSWORD` names a secret without holding it, and the name helps whoever debugs.
    return isinstance(value, str) and _REFERENCE.match(value) is not None


def _forms(value: str) -> set[str]:
    """The shapes a secret takes in output: as is, each line of it, URL-, JSON- and base64-encoded."""
    value = value.strip()
    if len(value) < MIN_SECRET_LENGTH:
        return set()
    forms = {value, quote(value, safe=""), quote_plus(value), json.dumps(value)[1:-1],
             base64.b64encode(value.encode()).decode().rstrip("=")}
    lines = [line.strip() for line in value.splitlines()]
    forms.update(line for line in lines if len(line) >= MIN_SECRET_LENGTH)
    return {form for form in forms if len(form) >= MIN_SECRET_LENGTH}


# ------------------------------------------------------------------------------ known secrets


def secrets_from_settings_and_env(
    settings: Settings | None,
    inventory_vars: object,
    environ: Mapping[str, str] | None = None,
) -> list[str]:
    """Every secret value the bot can know of, for one `Redactor` per run.

    `inventory_vars` is any nested structure (host vars, `inventory.model_dump()`); every
    `env:NAME` / `file:/path` string in it is resolved. Unreadable references are skipped: the
    loader or the step that uses them reports that, and redaction must never fail a run.
    """
    env = os.environ if environ is None else environ
    found = [value for ref in _references(inventory_vars) if (value := _resolve(ref, env))]
    for name in _settings_env_names(settings):
        if env.get(name):
            found.append(env[name])
    found += [value for name, value in env.items() if _SECRET_ENV.search(name) and value]
    return found


def resolve_reference(value: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The secret an `env:NAME` / `file:/path` reference points at; None if it cannot be read."""
    return _resolve(value, os.environ if environ is None else environ)


def is_reference(value: object) -> bool:
    return _is_reference(value)


def _references(obj: object) -> Iterable[str]:
    if isinstance(obj, str):
        if _is_reference(obj):
            yield obj
    elif isinstance(obj, Mapping):
        for value in obj.values():
            yield from _references(value)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for item in obj:
            yield from _references(item)


def _resolve(reference: str, env: Mapping[str, str]) -> str | None:
    match = _REFERENCE.match(reference)
    if match is None:
        return None
    if match.group("env"):
        return env.get(match.group("env"))
    path = Path(match.group("file")).expanduser()
    try:
        with path.open("rb") as handle:
            return handle.read(_MAX_SECRET_FILE).decode("utf-8", "replace")
    except OSError as exc:
        log.debug("secret file %s unreadable for redaction: %s", path, exc.strerror)
        return None


def _settings_env_names(settings: Settings | None) -> list[str]:
    if settings is None:
        return []
    names: list[str | None] = []
    if settings.slack is not None:
        slack = settings.slack
        names += [slack.token_env, slack.webhook_url_env, slack.signing_secret_env,
                  slack.app_token_env]
    if settings.llm is not None:
        names.append(settings.llm.api_key_env)
    return [name for name in names if name]


# ------------------------------------------------------------------------------ logging


class RedactingFilter(logging.Filter):
    """Redacts a log record's message, arguments and traceback before any handler formats it.

    Attach it to handlers (not loggers: a logger's filters skip records propagated from its
    children). `redactor` may be swapped when the daemon reloads the inventory.
    """

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # bad %-args: keep both parts rather than lose the record
            message = f"{record.msg} {record.args!r}"
        record.msg = self.redactor(message)
        record.args = None
        if record.exc_info and not record.exc_text:
            # Formatters reuse exc_text when it is set, so the traceback is formatted once, here.
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redactor(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redactor(record.stack_info)
        return True


def install_log_redaction(redactor: Redactor,
                          handlers: Iterable[logging.Handler] | None = None) -> RedactingFilter:
    """Add one shared RedactingFilter to `handlers` (default: the root logger's handlers)."""
    redacting = RedactingFilter(redactor)
    for handler in logging.getLogger().handlers if handlers is None else handlers:
        handler.addFilter(redacting)
    return redacting
