"""The equivalents table (`equivalents.toml`): surviving mutants no test can tell apart from the original,
each with why; the two shapes equivalent wherever they occur; and the check that every entry still names
a mutant of its target (an entry that names none is stale: the tool refuses to go on with it)."""

import difflib
import json
import re
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path

from tools.mutation.targets import TARGETS

TABLE = Path(__file__).with_name("equivalents.toml")

# (target, cosmic-ray's operator, the mutated line as cosmic-ray writes it (stripped), the line number or 0 for
# any line: a number only where the same mutated text occurs on several lines that are not all equivalent)
Key = tuple[str, str, str, int]
Mutant = tuple[str, str, int]  # (operator, mutated line, line number)


class StaleEntries(Exception):
    """Entries of the table that name no mutant (or a target that does not exist); the message names each."""

    def __init__(self, entries: Iterable[Key], reason: str) -> None:
        self.entries = sorted(entries)
        named = "\n".join(f"  {describe(entry)}" for entry in self.entries)
        super().__init__(f"stale entries in {TABLE.name} ({reason}); remove or update them:\n{named}")


def describe(entry: Key) -> str:
    target, operator, mutant, line = entry
    path = TARGETS[target].path if target in TARGETS else "no such target"
    return f"target {target} ({path}{f', line {line}' if line else ''}), {operator}: `{mutant}`"


def load(path: Path = TABLE) -> dict[Key, str]:
    """The table's entries and their reasons; an entry for a target that does not exist is stale."""
    with path.open("rb") as handle:
        entries = tomllib.load(handle)["equivalent"]
    table = {(e["target"], e["operator"], e["mutant"], e.get("line", 0)): e["why"] for e in entries}
    unknown = [key for key in table if key[0] not in TARGETS]
    if unknown:
        raise StaleEntries(unknown, "their target is not in targets.py")
    return table


# Two kinds of mutant no test can notice, recognised by their shape wherever they occur.
LOCAL_ANNOTATION = re.compile(r"^(\w+): (.+?) = (.*)$")
BARE_STAR = re.compile(r"(?:^|(?<=[(,\s]))\*(?=\s*,)")  # a line of its own in a long signature, too


def equivalent_by_shape(operator: str, code: str, mutant: str) -> str | None:
    """Why a mutant is equivalent by its shape alone, or None.

    An operator swapped inside a local variable's annotation (`ops: list[str | int] = …` →
    `list[str + int]`): Python never evaluates the annotations of local variables. A keyword-only
    marker turned positional-only (`*` → `/` in a signature): it survives only where every caller
    passes the parameters before it by position and those after it by keyword, which both allow."""
    if operator.startswith("core/ReplaceBinaryOperator"):
        before, after = LOCAL_ANNOTATION.match(code), LOCAL_ANNOTATION.match(mutant)
        if before and after and before[1] == after[1] and before[3] == after[3] and before[2] != after[2]:
            return "an operator inside a local variable's annotation, which Python never evaluates"
    if operator == "core/ReplaceBinaryOperator_Mul_Div" and BARE_STAR.sub("/", code, count=1) == mutant:
        return "the keyword-only `*` turned positional-only `/`: every caller passes those before it by position"
    return None


def mutated_line(diff: str | None) -> str:
    """The line a mutant wrote (the first `+` line of a unified diff, as cosmic-ray records it), stripped."""
    for line in (diff or "").splitlines():
        if line.startswith("+") and not line.startswith("+++"):
            return line[1:].strip()
    return ""


def mutant_lines(source: str, specs: Iterable[tuple[str, str, int, int]]) -> set[Mutant]:
    """(operator, mutated line, line number) of each mutant of `source`, made in memory without running
    anything: `specs` are cosmic-ray's (operator, its arguments as stored, occurrence, line number)."""
    # cosmic-ray is not a dependency of the project: only the tool's runs import it
    from cosmic_ray.mutating import mutate_code
    from cosmic_ray.plugins import get_operator

    lines = source.split("\n")
    found = set()
    for operator, stored_args, occurrence, row in specs:
        args = json.loads(stored_args) if stored_args else {}
        args = json.loads(args) if isinstance(args, str) else args  # cosmic-ray stores the JSON text as JSON
        mutated = mutate_code(source, get_operator(operator)(**args), occurrence)
        if mutated is not None:
            diff = "\n".join(difflib.unified_diff(lines, mutated.split("\n"), lineterm=""))
            found.add((operator, mutated_line(diff), row))
    return found


def why_equivalent(table: Mapping[Key, str], target: str, mutant: Mutant) -> str | None:
    """The table's reason for this mutant (an entry for its line, else one for any line), or None."""
    operator, text, row = mutant
    return table.get((target, operator, text, row)) or table.get((target, operator, text, 0))


def unmatched(table: Mapping[Key, str], target: str, present: set[Mutant]) -> list[Key]:
    """The table's entries for `target` that match none of the mutants in `present`."""
    anywhere = {(operator, text) for operator, text, _ in present}
    return sorted(
        key
        for key in table
        if key[0] == target
        and ((key[1], key[2], key[3]) not in present if key[3] else (key[1], key[2]) not in anywhere)
    )
