"""The README's Guarantees section names, for every promise, the tests that exercise it: each named
test file and test function exists, and each line of the failure table names at least one."""

import ast
import functools
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
REFERENCE = re.compile(r"`(test_\w+\.py)(?:::(test_\w+))?(?:\[[^\]]*\])?`")


def guarantees() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    start = readme.index("\n## Guarantees\n")
    return readme[start : readme.index("\n## ", start + 1)]


@functools.cache  # the section names some files many times: each is parsed once
def functions_in(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)}


def test_every_test_the_guarantees_name_exists() -> None:
    references = REFERENCE.findall(guarantees())
    assert len(references) >= 30  # the section names its tests; an edit that drops them fails here
    missing = [
        f"{file}::{name}" if name else file
        for file, name in references
        if not (TESTS / file).is_file() or (name and name not in functions_in(TESTS / file))
    ]
    assert missing == []


def test_every_promise_and_every_failure_row_names_a_test() -> None:
    section = guarantees()
    promises = re.split(r"\n- \*\*", section)[1:]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| failure")]
    rows = [row for row in rows if not set(row) <= set("|- ")]
    assert len(promises) >= 5 and len(rows) >= 10
    assert [p.split("**")[0] for p in promises if not REFERENCE.search(p)] == []
    assert [row.split("|")[1].strip() for row in rows if not REFERENCE.search(row.split("|")[-2])] == []
