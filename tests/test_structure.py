"""The package's shape: module size, one home for metadata reads, and declared dependencies = imports."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "gatenorm_edge"
MAX_MODULE_LINES = 450
IMPORT_NAMES = {"llama-cpp-python": "llama_cpp"}  # distributions whose module is named otherwise


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_no_module_is_over_450_lines() -> None:
    long = {str(path.relative_to(ROOT)): n for path in _modules() if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert long == {}


def test_metadata_is_read_in_one_place() -> None:
    """Outside sources/ and gguf_layout.py, at most 3 raw metadata reads (inspect's name and provenance)."""
    reads = []
    for path in _modules():
        relative = path.relative_to(PACKAGE)
        if relative.parts[0] == "sources" or relative.name == "gguf_layout.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\.arch_value\(|\.value\((?:\"|f\"|Keys|key)", line):
                reads.append(f"{relative}:{number}")
    assert len(reads) <= 3, reads


def _imported_distributions() -> set[str]:
    modules = set()
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    return {m for m in modules if m not in sys.stdlib_module_names and m != "gatenorm_edge"}


def test_declared_dependencies_are_the_imported_ones() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def module(requirement: str) -> str:
        name = re.split(r"[<>=\[ ;]", requirement, maxsplit=1)[0]
        return IMPORT_NAMES.get(name, name.replace("-", "_"))

    required = {module(r) for r in project["dependencies"]}
    optional = {module(r) for r in project["optional-dependencies"]["plot"]}
    imported = _imported_distributions()
    assert required == imported - optional, (required, imported)


def test_the_cli_starts_without_numpy_or_llama_cpp() -> None:
    """`--help` stays fast: the command modules import the heavy ones only when a command runs."""
    import subprocess

    code = "import sys, gatenorm_edge.cli; print(sorted(m for m in ('numpy', 'llama_cpp', 'gguf') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_task_names_have_one_home() -> None:
    from gatenorm_edge.harness.zeroshot import TASKS
    from gatenorm_edge.options import TASK_NAMES

    assert tuple(TASKS) == TASK_NAMES


def test_pyflakes_finds_nothing() -> None:
    """ruff's F rules (pyflakes: unused imports and names, undefined names) over everything we ship and run."""
    import subprocess

    folders = [str(ROOT / name) for name in ("gatenorm_edge", "tools", "tests", "bench")]
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--select", "F", "--no-cache", *folders],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
