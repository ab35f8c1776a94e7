"""Redaction: known secret values in every encoding, common secret shapes, nested data, logs."""

from __future__ import annotations

import base64
import json
import logging
import random
import time
from pathlib import Path
from urllib.parse import quote

import pytest

from maintenancebot import redact
from maintenancebot.models import LlmSettings, Settings, SlackSettings
from maintenancebot.redact import (
    REDACTED,
    RedactingFilter,
    Redactor,
    install_log_redaction,
    secrets_from_settings_and_env,
)

DB_PASSWORD = "Tr0ub4dor&3-db/pass"


def test_known_secret_values_are_masked_in_every_encoding() -> None:
    redact = Redactor([DB_PASSWORD])
    encoded = base64.b64encode(DB_PASSWORD.encode()).decode()
    text = f"raw {DB_PASSWORD} url {quote(DB_PASSWORD, safe='')} b64 {encoded}"
    assert redact(text) == f"raw {REDACTED} url {REDACTED} b64 {REDACTED}=="


def test_a_secret_is_masked_inside_json_too() -> None:
    secret = 'quote"in-the-middle'
    assert Redactor([secret])(json.dumps({"out": f"x {secret} y"})) == '{"out": "x [REDACTED] y"}'


def test_short_values_are_not_treated_as_secrets() -> None:
    assert Redactor(["root", "admin"])("login as root or admin") == "login as root or admin"


def test_each_line_of_a_multiline_secret_file_is_known() -> None:
    secret = "first-line-of-secret\nsecond-line-of-secret\n"
    assert Redactor([secret])("tail: second-line-of-secret") == f"tail: {REDACTED}"


SECRET_SHAPES = [
    ("mysql://app:pa55w0rd@db.internal:3306/app", "mysql://app:[REDACTED]@db.internal:3306/app"),
    ("Authorization: Bearer abc.def.ghi-123456", "Authorization: Bearer [REDACTED]"),
    ("curl -H 'Authorization: Basic dXNlcjpwYXNz'", "curl -H 'Authorization: Basic [REDACTED]'"),
    ("export AWS_ACCESS_KEY_ID=AKIAIOSFODNN7EXAMPLE",
     "export AWS_ACCESS_KEY_ID=[REDACTED:aws-key-id]"),
    ("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
     "aws_secret_access_key = [REDACTED]"),
    ("token xoxb-1234-5678-abcdefghij ok", "token [REDACTED:slack-token] ok"),
    ("app xapp-1-A0123-456-abcdef0123", "app [REDACTED:slack-token]"),
    ("jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFU",
     "jwt [REDACTED:jwt]"),
    ("password=hunter22 user=bob", "password=[REDACTED] user=bob"),
    ("DB_PASSWORD: 'correct horse battery'", "DB_PASSWORD: '[REDACTED]'"),
    ('{"api_key": "abcdef123456", "name": "x"}', '{"api_key": "[REDACTED]", "name": "x"}'),
    ("passwd: letmein99", "passwd: [REDACTED]"),
    ("secret=abc123def", "secret=[REDACTED]"),
    ("pg_dump --password s3cr3t-flag --token=t0k3n", "pg_dump --password [REDACTED] --token=[REDACTED]"),
    ("hook https://hooks.slack.com/services/T000/B000/XXXXXXXXXX",
     "hook https://hooks.slack.com/[REDACTED]"),
]


@pytest.mark.parametrize(("text", "expected"), SECRET_SHAPES)
def test_common_secret_shapes_are_masked_and_keys_kept(text: str, expected: str) -> None:
    assert Redactor()(text) == expected


KEY_BLOCK = ("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAA\n"
             "AAAAABAAAAMwAAAAtzc2gtZWQyNTUxOQAAACD\n-----END OPENSSH PRIVATE KEY-----")


def test_private_key_blocks_are_masked_whole_even_when_cut_by_a_tail() -> None:
    block = KEY_BLOCK
    redact = Redactor()
    assert redact(f"before\n{block}\nafter") == "before\n[REDACTED:private-key]\nafter"
    head_only = block.split("AAAAAB")[0]
    assert "b3Blbn" not in redact(f"start\n{head_only}")
    tail_only = "\n".join(block.splitlines()[2:])
    assert redact(tail_only) == "[REDACTED:private-key]"


def test_ordinary_text_survives() -> None:
    text = "cat: /etc/passwd: No such file or directory; 3 files moved, 12 MiB freed"
    assert Redactor()(text) == text


def test_redaction_is_idempotent() -> None:
    redact = Redactor([DB_PASSWORD])
    text = f"password={DB_PASSWORD} Authorization: Bearer abcdefgh12345 xoxb-1111-2222-abcdefgh"
    assert redact(redact(text)) == redact(text)


def test_nested_objects_are_redacted_and_secret_keys_masked_but_references_kept() -> None:
    redact = Redactor([DB_PASSWORD])
    obj = {"db_password": "env:DB_PASSWORD", "api_token": "plain-token-value", "port": 5432,
           "nested": [{"token": "abc"}, f"dsn={DB_PASSWORD}"], "token_env": "SLACK_BOT_TOKEN"}
    assert redact.redact_obj(obj) == {
        "db_password": "env:DB_PASSWORD", "api_token": REDACTED, "port": 5432,
        "nested": [{"token": REDACTED}, f"dsn={REDACTED}"], "token_env": "SLACK_BOT_TOKEN",
    }


def test_secrets_are_collected_from_inventory_references_settings_and_environment(
        tmp_path: Path) -> None:
    token_file = tmp_path / "db-token"
    token_file.write_text("file-held-token-123\n")
    settings = Settings(slack=SlackSettings(token_env="BOT_TOK"),
                        llm=LlmSettings(api_key_env="LLM_KEY_VAR"))
    inventory = {"hosts": {"db-01": {"vars": {
        "db_password": "env:DB_PASSWORD", "api_token": f"file:{token_file}",
        "other": ["file:/nonexistent/secret", "env:UNSET_VAR", "plain value"]}}}}
    environ = {"DB_PASSWORD": DB_PASSWORD, "BOT_TOK": "xoxb-bot-token-value",
               "LLM_KEY_VAR": "llm-key-value-42", "MY_SERVICE_SECRET": "env-secret-99",
               "HOME": "/root/home-dir"}
    found = secrets_from_settings_and_env(settings, inventory, environ)
    for value in (DB_PASSWORD, "file-held-token-123\n", "xoxb-bot-token-value",
                  "llm-key-value-42", "env-secret-99"):
        assert value in found
    assert "/root/home-dir" not in found
    assert "file-held-token-123" not in Redactor(found)("token is file-held-token-123")


def test_log_records_are_redacted_in_message_args_and_traceback(
        caplog: pytest.LogCaptureFixture) -> None:
    redact = Redactor([DB_PASSWORD])
    caplog.handler.addFilter(RedactingFilter(redact))
    logger = logging.getLogger("maintenancebot.test")
    with caplog.at_level(logging.DEBUG):
        logger.debug("connecting with %s", DB_PASSWORD)
        logger.info("header Authorization: Bearer abcdefgh12345678")
        try:
            raise RuntimeError(f"bad dsn postgres://u:{DB_PASSWORD}@db/x")
        except RuntimeError:
            logger.exception("failed")
    assert DB_PASSWORD not in caplog.text
    assert "abcdefgh12345678" not in caplog.text
    assert "connecting with [REDACTED]" in caplog.text
    assert "RuntimeError" in caplog.text


def test_install_attaches_one_filter_to_each_given_handler() -> None:
    handlers = [logging.StreamHandler(), logging.StreamHandler()]
    installed = install_log_redaction(Redactor([DB_PASSWORD]), handlers)
    assert all(installed in handler.filters for handler in handlers)


def test_a_value_on_the_next_line_is_not_taken_for_the_secret() -> None:
    assert Redactor()("token:\nRestart nginx") == "token:\nRestart nginx"


HOSTILE_OUTPUTS = [
    "-" * 100_000 + "password" * 2000,
    "password" * 20_000 + "=x",
    "a." * 100_000,
    base64.encodebytes(bytes(range(256)) * 800).decode() + "-----END RSA PRIVATE KEY-----",
    "-----BEGIN RSA PRIVATE KEY-----" + "A" * 200_000,
]


@pytest.mark.parametrize("text", HOSTILE_OUTPUTS,
                         ids=["dashes", "keywords", "dots", "base64-blob", "unterminated-key"])
def test_hostile_output_is_redacted_in_linear_time(text: str) -> None:
    started = time.perf_counter()
    Redactor(["some-secret-value"])(text)
    assert time.perf_counter() - started < 1.0


# ------------------------------------------------------------------------------ needle shortcut

DF_OUTPUT = ("Filesystem     1024-blocks     Used Available Capacity Mounted on\n"
             "/dev/sda1         41152736 18329412  20710580      47% /\n")
UPTIME_OUTPUT = " 14:02:11 up 37 days,  3:14,  2 users,  load average: 0.08, 0.12, 0.09\n"
FIND_OUTPUT = "".join(f"/var/log/nginx/site-{i}/error.log.{i % 7}.gz\n" for i in range(40))


def redact_with_every_pattern(text: str) -> str:
    """The pipeline without the needle shortcut: every pattern runs over every text."""
    if not text:
        return text
    text = redact._mask_key_blocks(text)
    for rule in redact._RULES:
        text = rule.pattern.sub(rule.replacement, text)
    return text


# Ignoring case, re matches these to an ASCII letter; `str.lower` does not.
CASE_LOOKALIKES = [("i", "ı"), ("i", "İ"), ("I", "İ"), ("s", "ſ"), ("S", "ſ"), ("k", "K"),
                   ("K", "K")]
FRAGMENTS = [
    "password", "PassWord", "passwd", "pwd", "passphrase", "token", "secret", "client_secret",
    "api_key", "api-key", "APIKEY", "access_key", "private-key", "credentials", "db_", "my.",
    "/etc/passwd", "=", ":", ": ", " = ", " ", "\t", "\n", "\r", "'", '"', ",", ";", "&", ")", "]",
    "-", "--", "--token ", "-p=", "[REDACTED", "[REDACTED]", "[REDACTED:api-key]", "Bearer ",
    "bearer\t", "Authorization: ", "authorization=", "Basic ", "bot ", "https://u:p@h/", "://",
    "@", "https", "ftp", "hooks.slack.com/", "https://hooks.slack.com/", "AKIA", "ASIA", "AIPA",
    "IOSFODNN7EXAMPLE", "ABCDEFGHIJKLMNOP", "aws_secret_access_key",
    "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "xox", "xoxb-", "b-", "xapp-", "eyJ", "eyJhbGci",
    ".", "sk-", "gh", "ghp_", "p_", "_", "0123456789", "12345678", "abcdefghijklmnopqrstuvwxyz",
    "A", "s3cr3t", "-----BEGIN RSA PRIVATE KEY-----", "-----END RSA PRIVATE KEY-----",
    "ı", "İ", "ſ", "K", "é", "→", "ß", "ﬀ", "😀",
]


def generated_secret_shapes() -> list[str]:
    """One of each spelling the patterns accept, written out from the regexes, not the needles."""
    keywords = ["password", "passwd", "pwd", "passphrase", "token", "secret", "credential",
                "credentials", "clientsecret", "client_secret", "client-secret",
                *(f"{word}{sep}key" for word in ("api", "access", "private") for sep in "_-"),
                "apikey", "accesskey", "privatekey"]
    shapes = [f"{lead}{keyword}{sep}value9" for keyword in keywords
              for lead in ("-", "--", "", "db_") for sep in (" ", "=", ": ")]
    shapes += [f"{prefix}IOSFODNN7EXAMPLE" for prefix in
               ("AKIA", "ASIA", "AGPA", "AIDA", "AROA", "ANPA", "ANVA", "AIPA")]
    shapes += [f"gh{kind}_{'a1' * 16}" for kind in "pousr"]
    shapes += [f"xox{kind}-1234-abcd" for kind in "abprseo"] + ["xapp-1-A0123-456"]
    shapes += [f"{scheme}://hooks.slack.com/services/T0/B0/x" for scheme in ("http", "https")]
    shapes += [f"{scheme}://user:pw@host/" for scheme in ("http", "ftp", "git+ssh", "s3")]
    shapes += [f"authorization{sep}{kind} abc" for sep in (": ", "=", ":'")
               for kind in ("bearer", "basic", "token", "bot", "digest")]
    shapes += ["bearer abcdefgh12", "aws_secret_access_key: " + "a" * 40, "eyJabcd.efgh.ijklmnop",
               "sk-" + "a" * 20]
    return shapes


def equivalence_corpus() -> list[str]:
    base = generated_secret_shapes() + [text for text, _ in SECRET_SHAPES] + [
        KEY_BLOCK, KEY_BLOCK.split("AAAAAB")[0], "\n".join(KEY_BLOCK.splitlines()[2:]),
        "cat: /etc/passwd: No such file or directory; 3 files moved, 12 MiB freed",
        "token:\nRestart nginx", f"password={DB_PASSWORD} Authorization: Bearer abcdefgh12345",
        "header Authorization: Bearer abcdefgh12345678", f"bad dsn postgres://u:{DB_PASSWORD}@db/x",
        "dsn=x", "token is file-held-token-123", DF_OUTPUT, UPTIME_OUTPUT, FIND_OUTPUT,
        "sk-abcdefghijklmnopqrstuvwxyz=secret: x",
    ]
    embedded = [f"{before}{text}{after}" for text in base
                for before, after in [("noise ", " noise"), ("x", "y"), ("\n", "\n"), ("=", "=")]]
    cased = [case(text) for text in base for case in (str.upper, str.swapcase, str.title)]
    lookalikes = [text.replace(ascii_letter, other, count)
                  for text in base + cased for ascii_letter, other in CASE_LOOKALIKES
                  for count in (1, -1)]
    non_ascii = [f"é {text}" for text in base + cased]
    rng = random.Random(20240501)
    tokens = FRAGMENTS + [needle for rule in redact._RULES for group in rule.needles
                          for needle in group]
    randoms = ["".join(rng.choices(tokens, k=rng.randint(1, 12))) for _ in range(4000)]
    corpus = base + HOSTILE_OUTPUTS + embedded + cased + lookalikes + non_ascii + randoms
    return list(dict.fromkeys(corpus))


def test_skipping_patterns_by_needle_changes_no_output() -> None:
    corpus = equivalence_corpus()
    # The corpus must exercise every pattern, on ASCII and on non-ASCII text, or it proves nothing.
    for rule in redact._RULES:
        assert any(rule.pattern.search(text) and text.isascii() for text in corpus), rule
        assert any(rule.pattern.search(text) and not text.isascii() for text in corpus), rule
    redactor = Redactor()
    assert [text for text in corpus if redactor(text) != redact_with_every_pattern(text)] == []


def test_ordinary_output_skips_every_pattern_and_comes_back_unchanged() -> None:
    redactor = Redactor([DB_PASSWORD])
    for text in (DF_OUTPUT, UPTIME_OUTPUT, FIND_OUTPUT, "df -P /", "find: '/proc/1': Permission"):
        assert not any(rule.may_match(text.lower() if rule.folded else text)
                       for rule in redact._RULES), text
        assert redactor(text) == text
