"""The layer contract (DESIGN.md section 3, written in pyproject.toml's [tool.importlinter]): each
layer imports only from the layers below it, siblings only as the contract says, HTTP stays in
api, and our modules import each other at the top of a module. A broken contract fails with
import-linter's report: which import, in which file, on which line."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import grimp
import pytest

from tests.import_contracts import DeferredImportsContract

REPO = Path(__file__).resolve().parents[1]


def test_the_layer_contracts_hold():
    # A process of its own, from the repository root (where the configuration and our contract
    # type are found), without import-linter's cache folder.
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "from importlinter.cli import lint_imports_command; lint_imports_command(['--no-cache'])",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture
def package(tmp_path, monkeypatch):
    """A small package `layersample` with imports at the top, inside functions and for typing."""
    root = tmp_path / "layersample"
    (root / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "base.py": "VALUE = 1\n",
        "sub/__init__.py": "",
        "sub/leaf.py": "LEAF = 2\n",
        "top.py": """
            from typing import TYPE_CHECKING

            from layersample import base

            if TYPE_CHECKING:
                from layersample.sub import leaf


            def lazy():
                import json  # third-party and standard library: not ours, not checked

                from layersample.sub import leaf

                return leaf.LEAF + json.loads("1")


            class Holder:
                def method(self):
                    from . import base

                    return base
        """,
        "allowed.py": """
            def engine():
                from layersample.sub.leaf import LEAF

                return LEAF
        """,
        "sub/cli.py": """
            def command():
                from layersample import top

                return top
        """,
    }
    for name, text in files.items():
        (root / name).write_text(textwrap.dedent(text))
    monkeypatch.syspath_prepend(str(tmp_path))
    return grimp.build_graph("layersample", cache_dir=None)


def _check(graph, **options):
    contract = DeferredImportsContract(
        name="deferred", session_options={}, contract_options={"containers": ["layersample"], **options}
    )
    return contract.check(graph, verbose=False)


def test_the_deferred_import_contract_finds_imports_inside_functions(package):
    check = _check(package)
    found = {(v.importer, v.imported, v.line) for v in check.metadata["violations"]}
    assert not check.kept
    assert found == {
        ("layersample.top", "layersample.sub.leaf", 13),  # `from package import module`
        ("layersample.top", "layersample.base", 20),  # relative, in a method
        ("layersample.allowed", "layersample.sub.leaf", 3),
        ("layersample.sub.cli", "layersample.top", 3),
    }


def test_the_deferred_import_contract_allows_what_it_names(package):
    check = _check(
        package,
        allowed_in=["layersample.sub"],
        allowed=["layersample.allowed -> layersample.sub", "layersample.top -> layersample.gone"],
    )
    found = {(v.importer, v.imported) for v in check.metadata["violations"]}
    assert found == {("layersample.top", "layersample.sub.leaf"), ("layersample.top", "layersample.base")}
    # An allowance that matches nothing any more is reported, so that it does not linger.
    assert check.warnings == [
        "allowed deferred import layersample.top -> layersample.gone is not in the code any more: "
        "remove it from the contract"
    ]
