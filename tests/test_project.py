"""Project-wide promises: the example config documents every option, and each third-party
library with a sharp edge is imported by exactly one module (so it can be swapped or audited)."""

from __future__ import annotations

import ast
from pathlib import Path

from pydantic import BaseModel

from maintenancebot.loader import load_settings
from maintenancebot.models import Settings

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "maintenancebot"

# library -> the only modules allowed to import it
BOUNDARIES = {
    "paramiko": {"transports/ssh.py"},
    "yaml": {"yamlsource.py"},
    "jinja2": {"templating.py"},
    "apscheduler": {"scheduling.py"},
    # the Slack wire module; the approval message, endpoint and Socket Mode take the SDK from it
    "slack_sdk": {"notify/slack.py"},
    "openai": {"llm.py"},
    "docker": {"actions/docker_prune.py"},
    # the store and its parts: approvals, group commit, processes and leases, schedule
    "sqlite3": {"store.py", "store_approvals.py", "store_commit.py", "store_process.py",
                "store_records.py", "store_schedule.py"},
}


def _fields(model: type[BaseModel], prefix: str = "") -> set[str]:
    names = set()
    for name, info in model.model_fields.items():
        names.add(prefix + name)
        for candidate in getattr(info.annotation, "__args__", (info.annotation,)):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                names |= _fields(candidate, f"{prefix}{name}.")
    return names


def _present(data: object, prefix: str = "") -> set[str]:
    if not isinstance(data, dict):
        return set()
    names = set()
    for key, value in data.items():
        names.add(prefix + key)
        names |= _present(value, f"{prefix}{key}.")
    return names


def test_the_example_config_is_valid_and_shows_every_option() -> None:
    settings = load_settings(REPO / "examples" / "config.yaml")
    shown = _present(settings.model_dump(exclude_unset=True))
    missing = _fields(Settings) - shown
    assert not missing, f"examples/config.yaml does not show: {sorted(missing)}"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def test_each_sharp_library_is_imported_by_one_module_only() -> None:
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative.startswith("testing/"):
            continue  # test fixtures (fleet, dockerd) drive the real tools directly
        for library in _imports(path) & BOUNDARIES.keys():
            if relative not in BOUNDARIES[library]:
                offenders.append(f"{relative} imports {library}")
    assert not offenders, offenders


def test_every_builtin_action_is_known_even_after_one_was_imported_alone() -> None:
    import subprocess
    import sys

    code = ("import maintenancebot.actions.backup_check\n"
            "from maintenancebot.actions import known_actions\n"
            "print(' '.join(known_actions()))")
    names = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True).stdout.split()
    expected = {p.stem for p in (PACKAGE / "actions").glob("[a-z]*.py")}
    assert set(names) == expected


def test_a_run_imports_only_the_actions_it_names() -> None:
    import subprocess
    import sys

    code = ("import sys\nfrom maintenancebot.actions import get_action\n"
            "assert get_action('service') is not None\n"
            "print(' '.join(m.rsplit('.', 1)[1] for m in sys.modules "
            "if m.startswith('maintenancebot.actions.') and m.count('.') == 2))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True).stdout.split()
    actions = {p.stem for p in (PACKAGE / "actions").glob("[a-z]*.py")}
    assert actions & set(loaded) == {"service"}


def test_preparing_a_plan_loads_nothing_that_a_run_needs_only_later() -> None:
    # The CLI opens the first connections once the plan exists (transports.predial), and what
    # loads after that overlaps the handshakes: the engine, the reporting. Nothing here needs
    # the store or SSH either: validating a runbook opens neither.
    import subprocess
    import sys

    code = "import sys, maintenancebot.prepare; print(' '.join(sys.modules))"
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                check=True).stdout.split())
    later = {"maintenancebot.app", "maintenancebot.store", "maintenancebot.engine",
             "maintenancebot.reporting", "maintenancebot.transports.ssh", "sqlite3"}
    assert "maintenancebot.plan" in loaded and not loaded & later, loaded & later
