"""Flattening a host-side package into one program text (`actions/_bundle.py`): the shipped
safe_delete program behaves exactly as the modules the other tests import, and a package whose
meaning would change once flattened is refused before anything is sent."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import pytest

from maintenancebot.actions._bundle import BundleError, bundle
from maintenancebot.actions.remote import safe_delete as remote_program
from maintenancebot.actions.remote.safe_delete import handle
from maintenancebot.actions.safe_delete import program
from tests.trees import MOVABLE, build_hostile


def run_text(text: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-I", "-c", text], input=stdin, capture_output=True,
                          text=True, timeout=60, check=False)


def package(tmp_path: Path, **modules: str) -> Path:
    root = tmp_path / "pkg"
    root.mkdir()
    for name, text in modules.items():
        (root / f"{name}.py").write_text(text)
    return root


def test_the_shipped_program_has_every_module_and_no_relative_import() -> None:
    text = program()
    tree = ast.parse(text)
    assert not [node for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level]
    modules = [item.name for item in resources.files(remote_program).iterdir()
               if item.name.endswith(".py")]
    assert len(modules) > 1
    defined = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert {"handle", "main", "open_chain", "apply", "run_restore", "run_purge"} <= defined
    assert text.rstrip().endswith('if __name__ == "__main__":\n    main()')


def test_the_shipped_program_answers_as_the_imported_modules_do(tmp_path: Path) -> None:
    root = build_hostile(tmp_path / "base")
    requests = [
        {"op": "plan", "paths": [f"{root}/**"], "within": [str(root)], "now": time.time()},
        {"op": "plan", "paths": [f"{root}/**"], "within": ["/etc"]},
        {"op": "trash", "paths": [f"{root}/**"], "within": [str(root)], "trash_id": ["../x", "0"]},
        {"op": "no such op"},
    ]
    answers = []
    for request in requests:
        done = run_text(program(), json.dumps(request))
        answers.append(json.loads(done.stdout))
        assert answers[-1] == json.loads(json.dumps(handle(request))), request
        assert done.returncode == (0 if answers[-1]["ok"] else 1), done.stderr
    assert answers[0]["count"] == len(MOVABLE)
    assert [answer["ok"] for answer in answers] == [True, False, False, False]
    garbled = run_text(program(), "not json")
    assert garbled.returncode == 1 and "bad request" in json.loads(garbled.stdout)["error"]


def test_modules_come_after_what_they_import_and_the_entry_point_last(tmp_path: Path) -> None:
    root = package(
        tmp_path,
        __init__="from .words import greet\nfrom .base import NAME\n\n"
                 "if __name__ == '__main__':\n    print(greet(NAME))\n",
        words="from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from .base import T\n"
              "from .base import (\n    PREFIX,\n)\n\n\ndef greet(name: 'T') -> 'T':\n"
              "    return PREFIX + name\n",
        base="PREFIX = 'hello '\nNAME = 'host'\nif False:\n    T = str\n",
        unused="LATE = 1\n")
    text = bundle(root)
    assert text.index("PREFIX = ") < text.index("def greet") < text.index("__main__")
    assert text.index("LATE = 1") < text.index("__main__")
    assert bundle(root) == text
    done = run_text(text)
    assert (done.returncode, done.stdout) == (0, "hello host\n"), done.stderr


@pytest.mark.parametrize(("modules", "message"), [
    ({"__init__": "from . import a\n", "a": "X = 1\n"}, "only `from .<sibling module>"),
    ({"__init__": "from ..a import X\n", "a": "X = 1\n"}, "only `from .<sibling module>"),
    ({"__init__": "from .missing import X\n"}, "only `from .<sibling module>"),
    ({"__init__": "from .a import X as Y\n", "a": "X = 1\n"}, "cannot rename"),
    ({"__init__": "from .a import *\n", "a": "X = 1\n"}, "cannot rename"),
    ({"__init__": "from .a import f\n", "a": "def f(): pass\n", "b": "f = 2\n"},
     "f is defined in both"),
    ({"__init__": "from .a import X\n", "a": "from .b import Y\nX = 1\n",
      "b": "from .a import X\nY = 2\n"}, "cycle"),
    ({"a": "X = 1\n"}, "no __init__.py"),
], ids=["module-import", "parent", "missing", "alias", "star", "duplicate", "cycle", "no-entry"])
def test_a_package_that_would_change_meaning_once_flattened_is_refused(
        tmp_path: Path, modules: dict[str, str], message: str) -> None:
    with pytest.raises(BundleError, match=message.replace("(", r"\(")):
        bundle(package(tmp_path, **modules))
