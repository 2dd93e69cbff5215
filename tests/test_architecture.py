"""The layers of DESIGN.md: launch -> stages -> core; no stage imports another."""

import importlib.util
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def test_import_contracts_hold():
    if importlib.util.find_spec("importlinter") is None:
        pytest.fail("import-linter is not installed (pip install -e '.[dev]')")
    # `lint-imports` run by this interpreter: the one on PATH may belong to another Python.
    res = subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command; "
                          "lint_imports_command()"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Contracts: 2 kept, 0 broken" in res.stdout
