"""The C accelerator's sources (src/loopscope/_c): files kept small, every one of them built.

setup.py names the sources one by one (an sdist is built from that list), so a file added
to the folder but not to setup.py would be silently left out of the module; and the
module's init imports ``loopscope._stats`` for the bucket bounds, which must not import
anything of loopscope's in turn.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "loopscope"
C_DIR = PACKAGE / "_c"
MAX_LINES = 700


def _c_files() -> list[Path]:
    return sorted(C_DIR.glob("*.[ch]"))


def _setup_file_names() -> set[str]:
    """The base names of the .c and .h files named by setup.py's string literals."""
    names = set()
    for node in ast.walk(ast.parse((ROOT / "setup.py").read_text())):
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and node.value.endswith((".c", ".h"))
        ):
            names.add(node.value.rsplit("/", 1)[-1])
    return names


def test_the_sources_are_in_their_folder() -> None:
    assert any(path.suffix == ".c" for path in _c_files())
    left = sorted(path.name for path in PACKAGE.glob("*.[ch]"))
    assert not left, f"C sources directly in src/loopscope (move them to _c/): {left}"


@pytest.mark.parametrize("path", _c_files(), ids=lambda path: path.name)
def test_each_file_is_at_most_700_lines(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.name} has {lines} lines; split it by concern"


def test_setup_py_builds_every_source_and_depends_on_every_header() -> None:
    on_disk = {path.name for path in _c_files()}
    named = _setup_file_names()
    assert on_disk - named == set(), "in src/loopscope/_c but not in setup.py"
    assert named - on_disk == set(), "in setup.py but not in src/loopscope/_c"


def test_stats_imports_nothing_of_loopscope() -> None:
    """_speedups' init imports loopscope._stats (BUCKETS): no cycle back to _speedups."""
    tree = ast.parse((PACKAGE / "_stats.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"_stats imports .{node.module} (line {node.lineno})"
            assert not (node.module or "").startswith("loopscope"), node.module
        elif isinstance(node, ast.Import):
            for alias in node.names:
                assert not alias.name.startswith("loopscope"), alias.name
