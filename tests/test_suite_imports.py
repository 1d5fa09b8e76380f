"""The test suite's own layering: test modules import the helper modules, never each other or conftest.py."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
HELPER_MODULES = {"helpers", "slurm_cluster", "tiny_datasets"}


def imported_test_modules(source: str) -> list[str]:
    """The modules of this package (`tests`) that `source` imports, by name."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            found += [node.module.split(".")[0]] if node.module else [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "tests":
            parts = node.module.split(".")
            found += [parts[1]] if len(parts) > 1 else [alias.name for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [alias.name.split(".")[1] for alias in node.names if alias.name.startswith("tests.")]
    return found


def test_the_checker_sees_every_way_to_import_a_test_module():
    source = (
        "from .test_generate import mdsd3\nfrom . import conftest\nfrom tests.test_images import png_header\n"
        "import tests.test_cli\nfrom tests import test_api\nfrom .helpers import mdsd3\nfrom mdsd3_cli import cli\n"
    )
    assert imported_test_modules(source) == [
        "test_generate",
        "conftest",
        "test_images",
        "test_cli",
        "test_api",
        "helpers",
    ]


def test_no_test_module_imports_another_test_module():
    wrong = {
        path.name: sorted(set(imported_test_modules(path.read_text())) - HELPER_MODULES)
        for path in sorted(TESTS.glob("*.py"))
    }
    assert {name: modules for name, modules in wrong.items() if modules} == {}
