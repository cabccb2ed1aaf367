"""Rules of the code that review would otherwise check by eye: an import inside a function says why
it is there (a heavy or optional library kept out of start-up, a child process's order), on its line
or just above."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHECKED = ("imagemill", "bench", "tools")
IMPORT = ("from ", "import ")  # the package, the benchmarks and the developer tools


def unexplained_imports(path: Path) -> list[str]:
    """`file:line` of each import inside a function with no comment on its line, on a line of its
    block of imports, or just above that block."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found = []
    for function in ast.walk(ast.parse("\n".join(lines))):
        if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(function):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            block = lines[node.lineno - 1 : node.end_lineno]
            above = node.lineno - 2
            while above >= 0 and (
                lines[above].strip().startswith(IMPORT)
                or (not lines[above].strip() and above > 0 and lines[above - 1].strip().startswith(IMPORT))
            ):
                block.append(lines[above])  # the imports it is listed with (isort's groups, blank lines between)
                above -= 1
            explained = any("#" in line for line in block) or (above >= 0 and lines[above].strip().startswith("#"))
            if not explained:
                found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    return found


def test_every_import_inside_a_function_says_why() -> None:
    files = sorted(path for folder in CHECKED for path in (REPO / folder).rglob("*.py") if "results" not in path.parts)
    assert [where for path in files for where in unexplained_imports(path)] == []
