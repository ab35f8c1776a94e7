"""The loader: YAML to models, and every mistake as FILE:LINE: field: message."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml
from pydantic import BaseModel, ConfigDict

from maintenancebot import loader
from maintenancebot.actions import ACTIONS, known_actions
from maintenancebot.errors import ConfigError
from maintenancebot.loader import (
    load_inventory,
    load_runbook,
    load_runbooks,
    load_settings,
    validate_paths,
)
from maintenancebot.models import Settings
from maintenancebot.yamlsource import one_line_yaml

TESTS = Path(__file__).parent
FIXTURES = TESTS / "fixtures"
REPO = TESTS.resolve().parent


def lines_of(paths: list[Path]) -> list[str]:
    return [str(issue) for issue in validate_paths(paths)]


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ------------------------------------------------------------------ the fixture directories


def test_validate_reports_each_mistake_of_the_broken_fixtures_on_its_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(TESTS)
    known = ", ".join(known_actions()) or "none"
    b = "fixtures/broken"
    assert lines_of([Path(b)]) == [
        f"{b}/config.yaml:3: ssh.connect_timeout: invalid duration 'soon' (use e.g. 30s, 10m, 2h, 7d)",
        f"{b}/config.yaml:4: llm.api_key: unknown key (did you mean 'api_key_env'?)",
        f"{b}/config.yaml:4: llm.api_key: write secrets as env:NAME or file:/path, never inline",
        f"{b}/duplicate_key.yaml:5: steps[0].run: duplicate key (first on line 4; the last one would win)",
        f"{b}/empty.yaml:1: the file is empty",
        f"{b}/fields.yaml:3: concurrency: expected an integer, got the string 'many'",
        f"{b}/fields.yaml:4: max_failures: invalid count or percentage '150%' (use e.g. 3 or 25%)",
        f"{b}/fields.yaml:5: timezone: unknown time zone 'Mars/Olympus' (use an IANA name like Europe/Berlin)",
        f"{b}/fields.yaml:6: schedule: invalid cron expression '0 3 * *': expected 5 fields (minute hour day month weekday), got 4",
        f"{b}/fields.yaml:10: steps[0].timout: unknown key (did you mean 'timeout'?)",
        f"{b}/fields.yaml:13: steps[1].timeout: invalid duration 'ten minutes' (use e.g. 30s, 10m, 2h, 7d)",
        f"{b}/fields.yaml:14: steps[1].on_failure: must be 'stop', 'continue' or 'rollback', got the string 'explode'",
        f"{b}/inventory.yaml:2: defaults.jump: undefined jump host 'gateway'",
        f"{b}/inventory.yaml:4: groups.web.hosts[1]: undefined host 'web-03' (define it under hosts:)",
        f"{b}/inventory.yaml:6: groups.legacy.children[0]: groups contain each other: db -> legacy -> db",
        f"{b}/inventory.yaml:8: hosts.web-01.port: must be less than or equal to 65535, got the number 70000",
        f"{b}/inventory.yaml:11: hosts.db-01.vars.db_password: write secrets as env:NAME or file:/path, never inline",
        f"{b}/inventory.yaml:12: hosts.web: 'web' names both a host and a group, so host patterns would be ambiguous",
        f"{b}/notes.yaml:2: not recognised as a runbook (it has no 'steps'), an inventory ('hosts', 'groups', 'defaults') or a config file ('state_dir', 'ssh', 'runbooks', ...)",
        f"{b}/steps.yaml:3: hosts[1]: unknown host or group 'dbs'",
        f"{b}/steps.yaml:6: steps[0].when: reads 'disk', which is only registered later (by the step on line 8)",
        f"{b}/steps.yaml:11: steps[2].name: duplicate step name 'Measure' (first on line 8)",
        f"{b}/steps.yaml:12: steps[2].run: template syntax error: unexpected '}}' (template line 1)",
        f"{b}/steps.yaml:14: steps[3].when: template syntax error: unexpected 'end of template' (template line 1)",
        f"{b}/steps.yaml:16: steps[4]: a step needs exactly one of 'run' or 'action'",
        f"{b}/steps.yaml:18: steps[4].action: unknown action 'nuke' (known: {known})",
        f"{b}/steps.yaml:21: steps[5].register: duplicate register name 'disk' (first on line 10)",
        f"{b}/steps.yaml:25: steps[6].approval: a readonly step needs no approval (it runs even in a dry-run); drop 'approval' or 'readonly'",
        f"{b}/syntax.yaml:6: YAML syntax error: expected <block end>, but found '<block sequence start>' (while parsing a block mapping on line 2)",
        f"{b}/twin.yaml:2: name: runbook 'steps' is defined twice: here and at {b}/steps.yaml:2",
    ]  # fmt: skip


def test_valid_fixtures_have_no_issues() -> None:
    assert validate_paths([FIXTURES / "valid"]) == []


def test_valid_runbook_and_inventory_load_as_models() -> None:
    runbook = load_runbook(FIXTURES / "valid" / "weekly.yaml")
    inventory = load_inventory(FIXTURES / "valid" / "inventory.yaml")
    assert runbook.name == "weekly-maintenance"
    assert runbook.steps[0].register_as == "disk_pct"
    assert runbook.steps[-1].gated
    assert set(inventory.hosts) == {"web-01", "web-02", "db-01", "bastion"}
    assert inventory.groups["linux"].children == ["web", "db"]


# ------------------------------------------------------------------ runbooks


def test_runbook_name_defaults_to_the_file_stem(tmp_path: Path) -> None:
    path = write(tmp_path, "disk-pressure.yml", "steps: [{name: df, run: df -h}]\n")
    assert load_runbook(path).name == "disk-pressure"


def test_load_runbook_raises_with_every_issue_of_the_file() -> None:
    with pytest.raises(ConfigError) as caught:
        load_runbook(FIXTURES / "broken" / "fields.yaml")
    assert [issue.line for issue in caught.value.issues] == [3, 4, 5, 6, 10, 13, 14]


def test_missing_required_key_is_reported_on_the_line_of_its_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", "steps:\n  - name: a\n    run: x\n  - run: y\n")
    assert lines_of([path]) == [f"{path}:4: steps[1].name: missing required key"]


def test_an_empty_batch_is_an_issue_where_a_zero_breaker_is_not(tmp_path: Path) -> None:
    # A batch of 0 hosts used to mean 1 silently; max_failures: 0 means "stop at the first".
    path = write(tmp_path, "r.yaml", """\
batches: [0, "0%", 1, 100%]
max_failures: 0
steps: [{name: a, run: "true"}]
""")
    assert lines_of([path]) == [
        f"{path}:1: batches[0]: a batch needs at least one host, got 0",
        f"{path}:1: batches[1]: a batch needs at least one host, got 0%",
    ]


def test_names_every_template_has_cannot_be_vars_or_registers(tmp_path: Path) -> None:
    # `host`, `run` and `vars` win over vars and registers: one named so was out of reach.
    runbook = write(tmp_path, "r.yaml", """\
vars: {run: 1}
steps:
  - {name: a, run: "true", register: host}
  - {name: b, run: "true", register: hosts}
""")
    inventory = write(tmp_path, "inventory.yaml", """\
groups: {web: {hosts: [w1], vars: {vars: 2}}}
hosts: {w1: {vars: {host: 3}}}
""")
    said = "is a name every template already has (host, run, vars); pick another"
    assert lines_of([runbook, inventory]) == [
        f"{inventory}:1: groups.web.vars: 'vars' {said}",
        f"{inventory}:2: hosts.w1.vars: 'host' {said}",
        f"{runbook}:1: vars: 'run' {said}",
        f"{runbook}:3: steps[0].register: 'host' {said}",
    ]


def test_a_runbook_must_name_some_hosts(tmp_path: Path) -> None:
    for hosts in ('""', "[]", '[web, " "]'):
        path = write(tmp_path, "r.yaml", f"hosts: {hosts}\nsteps: [{{name: a, run: 'true'}}]\n")
        said = "must name hosts or groups (all, a group, a glob, a list of them)"
        assert lines_of([path]) == [f"{path}:1: hosts: {said}"], hosts


def test_a_check_between_batches_needs_batches(tmp_path: Path) -> None:
    # Without batches the run is one batch, and the check would silently never run.
    text = "between_batches: ./canary-ok.sh\nsteps: [{name: a, run: x}]\n"
    path = write(tmp_path, "r.yaml", text)
    assert lines_of([path]) == [
        (f"{path}:1: between_batches: runs between rolling batches, and this runbook has none, so "
        "it would never run (add e.g. batches: [1, 100%])")]
    path.write_text(f"batches: [1, 100%]\n{path.read_text()}")
    assert lines_of([path]) == []


def test_a_value_fitting_no_member_of_a_union_is_one_issue(tmp_path: Path) -> None:
    number = write(tmp_path, "a.yaml", "hosts: 5\nsteps: [{name: a, run: x}]\n")
    bad_item = write(tmp_path, "b.yaml", "hosts: [web, 5]\nsteps: [{name: a, run: x}]\n")
    assert lines_of([number, bad_item]) == [
        f"{number}:1: hosts: expected a string or a list, got the number 5",
        f"{bad_item}:1: hosts[1]: expected a string, got the number 5",
    ]


def test_a_when_may_not_read_its_own_register_or_wear_braces(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "r.yaml",
        """\
steps:
  - {name: a, run: uptime, register: up, when: "up.rc == 0"}
  - {name: b, run: uptime, when: "{{ up.rc == 0 }}"}
""",
    )
    assert lines_of([path]) == [
        f"{path}:2: steps[0].when: reads 'up', which is only registered later (by this step)",
        f"{path}:3: steps[1].when: a 'when' is a bare expression; drop the {{{{ }}}}",
    ]


def test_templates_inside_with_are_checked_where_they_are_written(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "r.yaml",
        """\
steps:
  - name: clean
    action: nuke
    with:
      paths:
        - /var/log
        - "{{ oops"
""",
    )
    lines = lines_of([path])
    assert lines[1] == (
        f"{path}:7: steps[0].with.paths[1]: template syntax error: "
        "unexpected end of template, expected 'end of print statement'. (template line 1)"
    )


def test_a_name_holding_host_pattern_syntax_is_an_issue(tmp_path: Path) -> None:
    path = write(tmp_path, "inventory.yaml", """\
groups:
  "web:eu": {hosts: [web-1]}
hosts:
  web-1: {address: 127.0.0.2}
  "db 1": {}
  "db-[2]": {}
""")
    tail = "which host patterns read as syntax: it could never be selected by name"
    assert lines_of([path]) == [
        f"{path}:2: groups.web:eu: group name 'web:eu' holds ':', {tail}",
        f"{path}:5: hosts.db 1: host name 'db 1' holds ' ', {tail}",
        f"{path}:6: hosts.db-[2]: host name 'db-[2]' holds '[' ']', {tail}",
    ]


def test_an_unknown_filter_is_a_located_issue_not_a_crash(tmp_path: Path) -> None:
    # Parsing accepts any filter name; only compiling looks it up.
    path = write(tmp_path, "r.yaml", """\
steps:
  - {name: a, run: "echo {{ host | uppercase }}"}
  - {name: b, run: "true", when: "x | nosuch"}
""")
    unknown = "template syntax error: No filter named {!r}. (template line 1)"
    assert lines_of([path]) == [
        f"{path}:2: steps[0].run: " + unknown.format("uppercase"),
        f"{path}:3: steps[1].when: " + unknown.format("nosuch"),
    ]


class _FakeArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    paths: list[str]
    older_than: str = "7d"


class _FakeAction:
    name: ClassVar[str] = "fake_clean"
    Args: ClassVar[type[BaseModel]] = _FakeArgs
    previewable: ClassVar[bool] = True
    readonly: ClassVar[bool] = False
    reversible: ClassVar[bool] = True


def test_a_templated_path_is_checked_for_what_no_rendering_can_change(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "r.yaml",
        """\
steps:
  - name: clean
    action: safe_delete
    with:
      within: "{{ root }}/app"
      paths: ["{{ root }}/app/../../*", "{{ root }}/{{ sub }}..{{ sub }}/*"]
""",
    )
    # The second glob may render to a fine path; the first has its `..` whatever `root` is.
    assert lines_of([path]) == [
        f"{path}:6: steps[0].with.paths: glob contains '..': {{{{ root }}}}/app/../../*"]


def test_a_blank_command_condition_or_name_is_an_issue(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "r.yaml",
        """\
steps:
  - name: " "
    run: |

    rollback: "  "
  - name: fine
    when: ""
    run: "true"
""",
    )
    assert lines_of([path]) == [
        f"{path}:2: steps[0].name: must not be blank",
        f"{path}:3: steps[0].run: must not be blank",
        f"{path}:5: steps[0].rollback: must not be blank",
        f"{path}:7: steps[1].when: must not be blank",
    ]


def test_action_argument_errors_point_inside_with(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    known_actions()  # load the built-in actions first, so the fake one does not hide them
    monkeypatch.setitem(ACTIONS, "fake_clean", _FakeAction())
    path = write(
        tmp_path,
        "r.yaml",
        """\
steps:
  - name: clean
    action: fake_clean
    with:
      paths: [/tmp, 3]
      olderthan: 3d
  - name: clean without arguments
    action: fake_clean
""",
    )
    assert lines_of([path]) == [
        f"{path}:5: steps[0].with.paths[1]: must be a valid string",
        f"{path}:6: steps[0].with.olderthan: unknown key",
        f"{path}:7: steps[1].with.paths: missing required key",
    ]


def test_load_runbooks_keeps_the_valid_ones_and_reports_the_rest(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "name: same\nsteps: [{name: a, run: x}]\n")
    write(tmp_path, "b.yaml", "name: same\nsteps: [{name: b, run: y}]\n")
    write(tmp_path, "c.yml", "steps: [{name: c, run: z}]\n")
    write(tmp_path, "d.yaml", "steps: [{name: d}]\n")
    write(tmp_path, "notes.txt", "not yaml: [\n")
    runbooks, issues = load_runbooks(tmp_path)
    assert {name: path.name for name, (path, _) in runbooks.items()} == {
        "same": "a.yaml",
        "c": "c.yml",
    }
    assert [str(issue) for issue in issues] == [
        f"{tmp_path}/b.yaml:1: name: runbook 'same' is defined twice: here and at {tmp_path}/a.yaml:1",
        f"{tmp_path}/d.yaml:1: steps[0]: a step needs exactly one of 'run' or 'action'",
    ]


def test_load_runbooks_of_a_missing_directory_is_an_issue(tmp_path: Path) -> None:
    runbooks, issues = load_runbooks(tmp_path / "nope")
    assert runbooks == {}
    assert [issue.message for issue in issues] == ["no such file or directory"]


def test_the_daemon_s_catalog_reports_a_missing_runbooks_directory_once(tmp_path: Path) -> None:
    from maintenancebot.watch import Catalog, load_catalog

    inventory = write(tmp_path, "inventory.yaml", "hosts: {web-1: {address: 127.0.0.2}}\n")
    settings = Settings(runbooks=str(tmp_path / "nope"), inventory=str(inventory))
    loaded = load_catalog(settings, Catalog())
    assert [str(issue) for issue in loaded.issues] == [
        f"{tmp_path / 'nope'}: no such file or directory"]


# ------------------------------------------------------------------ YAML itself


def test_merge_keys_may_override_without_being_duplicates(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "r.yaml",
        """\
steps:
  - &base {name: a, run: x, timeout: 5m}
  - <<: *base
    name: b
""",
    )
    assert lines_of([path]) == []
    assert load_runbook(path).steps[1].timeout == 300


def test_unreadable_files_and_odd_documents_are_issues_not_tracebacks(tmp_path: Path) -> None:
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00")
    listing = write(tmp_path, "list.yaml", "- a\n- b\n")
    two = write(tmp_path, "two.yaml", "steps: []\n---\nsteps: []\n")
    tagged = write(tmp_path, "tag.yaml", "hosts:\n  a: !vault abc\n")
    assert lines_of([binary, listing, tmp_path / "missing.yaml", two, tagged]) == [
        f"{binary}: cannot read: not UTF-8 text",
        f"{listing}:1: the top level must be a mapping of keys, got a list",
        f"{tmp_path}/missing.yaml: no such file or directory",
        f"{tagged}:2: hosts.a: cannot read this value: could not determine a constructor for the tag '!vault'",
        f"{two}:2: a file holds one YAML document; found a second one",
    ]


def test_load_runbook_of_a_missing_file_raises_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_runbook(tmp_path / "missing.yaml")


# ------------------------------------------------------------------ inventories


def test_an_inventory_directory_is_merged(tmp_path: Path) -> None:
    write(tmp_path, "hosts.yaml", "hosts:\n  web-01: {address: 10.0.0.1}\n")
    write(tmp_path, "groups.yml", "groups:\n  web: {hosts: [web-01]}\n")
    inventory = load_inventory(tmp_path)
    assert list(inventory.hosts) == ["web-01"]
    assert inventory.groups["web"].hosts == ["web-01"]


def test_a_host_defined_in_two_files_names_both_places(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "hosts:\n  web-01: {}\n")
    write(tmp_path, "b.yaml", "# b\nhosts:\n  web-01: {}\n")
    with pytest.raises(ConfigError) as caught:
        load_inventory(tmp_path)
    assert [str(i) for i in caught.value.issues] == [
        f"{tmp_path}/b.yaml:3: hosts.web-01: host 'web-01' is defined twice: here and at {tmp_path}/a.yaml:2"
    ]


def test_two_names_for_one_machine_are_an_issue_within_one_inventory(tmp_path: Path) -> None:
    one = write(tmp_path, "one/a.yaml", """\
defaults: {port: 2222}
hosts:
  web-01: {address: 10.0.0.5}
  db-01: {address: 10.0.0.6}
  local-a: {connection: local}
""")
    write(tmp_path, "one/b.yaml", """\
hosts:
  web-01-again: {address: 10.0.0.5}
  web-01-other-port: {address: 10.0.0.5, port: 22}
  db-01-via-bastion: {address: 10.0.0.6, jump: web-01}
  local-b: {connection: local}
""")
    with pytest.raises(ConfigError) as caught:
        load_inventory(tmp_path / "one")
    assert [str(i) for i in caught.value.issues] == [
        (f"{tmp_path}/one/b.yaml:2: hosts.web-01-again.address: 'web-01-again' reaches the same "
        f"machine as 'web-01' ({one}:3), 10.0.0.5 port 2222: two names for one machine would let "
        "two runs, or one run twice, work on it at once")]
    # Separate inventories (a demo and production) may name the same address.
    other = write(tmp_path, "other.yaml", "hosts:\n  web-01: {address: 10.0.0.5, port: 2222}\n")
    assert lines_of([one, other]) == []


def test_secrets_by_reference_or_under_env_keys_are_fine(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "inv.yaml",
        """\
defaults:
  vars:
    api_token: env:API_TOKEN
    db_password: file:/etc/secret/db
    token_env: API_TOKEN
    run_token_budget: 5
    ssh_passphrase: "hunter2"
""",
    )
    assert lines_of([path]) == [
        f"{path}:7: defaults.vars.ssh_passphrase: write secrets as env:NAME or file:/path, never inline"
    ]


def test_runbook_hosts_are_checked_only_when_an_inventory_is_given(tmp_path: Path) -> None:
    runbook = write(tmp_path, "r.yaml", "hosts: 'web:&nope:!db*'\nsteps: [{name: a, run: x}]\n")
    inventory = write(tmp_path, "inv.yaml", "groups: {web: {hosts: [w1]}}\nhosts: {w1: {}}\n")
    assert lines_of([runbook]) == []
    assert lines_of([runbook, inventory]) == [f"{runbook}:1: hosts: unknown host or group 'nope'"]


# ------------------------------------------------------------------ settings


@pytest.fixture
def no_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No env var, and a system config path that does not exist (yet)."""
    monkeypatch.delenv(loader.CONFIG_ENV, raising=False)
    system = tmp_path / "etc" / "config.yaml"
    monkeypatch.setattr(loader, "SYSTEM_CONFIG", system)
    return system


def test_settings_default_when_no_config_file_exists(no_config: Path) -> None:
    assert load_settings(None) == Settings()


def test_settings_come_from_the_system_file_when_it_exists(no_config: Path) -> None:
    write(no_config.parent, no_config.name, "state_dir: /srv/mb\n")
    assert load_settings(None).state_dir == "/srv/mb"


def test_the_env_var_beats_the_system_file(
    no_config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(no_config.parent, no_config.name, "state_dir: /srv/system\n")
    env_file = write(tmp_path, "env.yaml", "state_dir: /srv/env\n")
    monkeypatch.setenv(loader.CONFIG_ENV, str(env_file))
    assert load_settings(None).state_dir == "/srv/env"
    explicit = write(tmp_path, "explicit.yaml", "state_dir: /srv/explicit\n")
    assert load_settings(explicit).state_dir == "/srv/explicit"


def test_relative_paths_are_relative_to_the_config_file(
    no_config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", "/home/ops")
    path = write(
        tmp_path,
        "conf/config.yaml",
        """\
runbooks: runbooks
inventory: ../inventory
state_dir: /var/lib/mb
ssh: {known_hosts: ~/.ssh/known_hosts, identity_file: keys/id_ed25519}
""",
    )
    settings = load_settings(path)
    assert settings.runbooks == f"{tmp_path}/conf/runbooks"
    assert settings.inventory == f"{tmp_path}/conf/../inventory"
    assert settings.state_dir == "/var/lib/mb"
    assert settings.ssh.known_hosts == "/home/ops/.ssh/known_hosts"
    assert settings.ssh.identity_file == f"{tmp_path}/conf/keys/id_ed25519"


def test_a_bad_config_raises_with_its_issues(no_config: Path, tmp_path: Path) -> None:
    path = write(tmp_path, "config.yaml", "ssh: {connect_timeout: soon}\nbogus: 1\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert [(i.line, i.field) for i in caught.value.issues] == [
        (1, "ssh.connect_timeout"),
        (2, "bogus"),
    ]


def test_a_config_file_named_by_the_env_var_must_exist(
    no_config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(loader.CONFIG_ENV, str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="nope.yaml: cannot read"):
        load_settings(None)


def test_non_string_keys_are_reported_on_their_own_line(tmp_path: Path) -> None:
    path = write(tmp_path, "inv.yaml", "hosts:\n  web-01: {}\n  null: x\n  3: {port: x}\n")
    assert lines_of([path]) == [
        f"{path}:3: hosts.None: a key must be a string (quote it), got nothing (null)",
        f"{path}:3: hosts.None: expected a mapping, got the string 'x'",
        f"{path}:4: hosts.3: a key must be a string (quote it), got the number 3",
        f"{path}:4: hosts.3.port: expected an integer, got the string 'x'",
    ]


def test_validate_skips_hidden_directories(tmp_path: Path) -> None:
    write(tmp_path, ".git/config.yaml", "nonsense: [\n")
    write(tmp_path, "runbooks/r.yaml", "steps: [{name: a, run: x}]\n")
    assert lines_of([tmp_path]) == []


PLUGIN_PROBE = """
import sys
{first}
from pydantic import BaseModel

class Probe(BaseModel):
    x: int

print(Probe(x=1).x, 'tamper' in sys.modules, 'importlib.metadata' in sys.modules)
"""


@pytest.mark.parametrize(("first", "expected"), [
    ("", "1 True True"),  # the control: plain pydantic loads the planted plugin
    ("import maintenancebot", "1 False False"),
])
def test_no_installed_pydantic_plugin_takes_part_in_validation(
        tmp_path: Path, first: str, expected: str) -> None:
    # A distribution that registers a pydantic plugin, as any package in the venv could.
    (tmp_path / "tamper.py").write_text("class Plugin:\n    def new_schema_validator(self, *a, "
                                        "**k):\n        return None, None, None\nplugin = "
                                        "Plugin()\n")
    info = tmp_path / "tamper-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tamper\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[pydantic]\ntamper = tamper:plugin\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"}
    env.pop("PYDANTIC_DISABLE_PLUGINS", None)
    done = subprocess.run([sys.executable, "-c", PLUGIN_PROBE.format(first=first)], env=env,
                          capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.split() == expected.split(), done.stderr


def test_one_line_yaml_is_one_line_and_reads_back_as_the_same_value() -> None:
    rng = random.Random(11)
    pieces = ["a", "7d", "x y", "a: b", "[x]", "{y}", "#", "'", '"', "\n", "\r\n", "\t", "é",
              "\u2028", "-", "?", "*", "&a", "!t", "%", "@", "`", "null", "yes", "1", "0x1", ""]

    def value(depth: int) -> Any:
        kind = rng.randrange(7 if depth < 3 else 4)
        if kind == 0:
            return "".join(rng.choice(pieces) for _ in range(rng.randrange(4)))
        if kind == 1:
            return rng.choice([0, -3, 10**20, 1.5, True, False, None])
        if kind in (2, 3):
            return rng.choice(pieces)
        if kind in (4, 5):
            return [value(depth + 1) for _ in range(rng.randrange(4))]
        return {rng.choice(pieces) or "k": value(depth + 1) for _ in range(rng.randrange(4))}

    for _ in range(500):
        given = {"arg": value(0)}
        text = one_line_yaml(given)
        assert "\n" not in text and "\r" not in text, text
        assert yaml.safe_load(text) == given, text
    assert one_line_yaml({"within": "/var/tmp", "paths": ["/var/tmp/*.tmp"], "older_than": "7d"}
                         ) == "{within: /var/tmp, paths: [/var/tmp/*.tmp], older_than: 7d}"
