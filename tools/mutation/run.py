"""`python -m tools.mutation`: mutation testing (cosmic-ray) of the modules that carry the README's
guarantees, each against only its fast targeted tests, with a killed / survived / equivalent report.

    python -m tools.mutation --budget-min 40 --out bench/results
    python -m tools.mutation --modules moderation,decode --out bench/results
    python -m tools.mutation --check-equivalents

Never in CI: it mutates a private export of HEAD (`git archive`, never the working tree) and runs
the tests once per mutant. Each surviving mutant is either in the equivalents table (with why no test
can tell it apart) or is a missing test. An entry of the table that names no mutant of its target, or
one a test now kills, is stale: the tool names it and exits 1 (before mutating, when no mutant matches).
The time box stops between mutants; the report says what ran.
"""

import argparse
import json
import os
import shlex
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from bench.report import save_results
from tools.mutation.equivalents import (
    Mutant,
    StaleEntries,
    describe,
    equivalent_by_shape,
    load,
    mutant_lines,
    mutated_line,
    unmatched,
    why_equivalent,
)
from tools.mutation.targets import TARGETS, Target

ROOT = Path(__file__).resolve().parents[2]


def export_head(into: Path) -> None:
    """HEAD's files (committed code and tests only) into `into`."""
    archive = subprocess.run(["git", "archive", "HEAD"], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)


def restore(tree: Path, target: Target) -> None:
    """Put the target's module back as the export's commit holds it: a `cosmic-ray exec` stopped by
    the time box leaves the mutant it was running in the file, and every mutant run over that would
    be that mutant's and its own (a kept folder resumed over one once read 157 spurious kills)."""
    commit = (tree.parent / "HEAD").read_text().strip()
    original = subprocess.run(["git", "show", f"{commit}:{target.path}"], cwd=ROOT, capture_output=True, check=True)
    (tree / target.path).write_bytes(original.stdout)


def run(cmd: list[str], cwd: Path, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def config(tree: Path, target: Target) -> str:
    command = f"{sys.executable} -m pytest -x -q -p no:cacheprovider {target.tests}"
    return "\n".join(
        [
            "[cosmic-ray]",
            f'module-path = "{tree / target.path}"',
            "timeout = 300.0",
            "excluded-modules = []",
            f"test-command = {json.dumps(command)}",
            "",
            "[cosmic-ray.distributor]",
            'name = "local"',
            "",
        ]
    )


def keep_only(session: Path, functions: frozenset[str]) -> int:
    """Drop the mutants in functions outside the guarantee's; returns how many are left."""
    with sqlite3.connect(session) as db:
        marks = ",".join("?" * len(functions))
        # top-level code (no definition: constants, module flags) always counts
        outside = (
            f"SELECT job_id FROM mutation_specs WHERE definition_name IS NOT NULL AND definition_name NOT IN ({marks})"
        )
        jobs = [row[0] for row in db.execute(outside, tuple(functions))]
        db.executemany("DELETE FROM mutation_specs WHERE job_id = ?", [(j,) for j in jobs])
        db.executemany("DELETE FROM work_items WHERE job_id = ?", [(j,) for j in jobs])
        return int(db.execute("SELECT count(*) FROM work_items").fetchone()[0])


def check_equivalents(session: Path, tree: Path, name: str, target: Target) -> None:
    """Raise StaleEntries when an entry of the table for `name` names no mutant of the session's (the
    mutants made in memory from the session's specs, nothing run)."""
    table = load()
    operators = {operator for target_name, operator, _, _ in table if target_name == name}
    if not operators:
        return
    with sqlite3.connect(session) as db:
        specs = db.execute(
            "SELECT operator_name, operator_args, occurrence, start_pos_row FROM mutation_specs"
        ).fetchall()
    # only the operators the table names: each mutant made costs a parse of the module
    present = mutant_lines((tree / target.path).read_text(encoding="utf-8"), [s for s in specs if s[0] in operators])
    stale = unmatched(table, name, present)
    if stale:
        raise StaleEntries(stale, f"no mutant of {target.path} matches them: the line or the operator changed")


def outcomes(session: Path, tree: Path, name: str, target: Target) -> dict[str, object]:
    table = load()
    lines = (tree / target.path).read_text().splitlines()
    query = (
        "SELECT s.operator_name, s.start_pos_row, s.definition_name, r.test_outcome, r.worker_outcome, r.diff"
        " FROM mutation_specs s LEFT JOIN work_results r ON r.job_id = s.job_id ORDER BY s.start_pos_row"
    )
    counts = {"killed": 0, "survived": 0, "equivalent": 0, "incompetent": 0, "not run": 0}
    survivors, equivalents = [], []
    matched: set[Mutant] = set()
    with sqlite3.connect(session) as db:
        for operator, row, function, test_outcome, worker_outcome, diff in db.execute(query):
            text = lines[row - 1].strip() if 0 < row <= len(lines) else ""
            mutant = mutated_line(diff)
            entry = {"operator": operator, "line": row, "function": function, "code": text, "mutant": mutant}
            test_outcome, worker_outcome = (test_outcome or "").lower(), (worker_outcome or "").lower()
            if not test_outcome:
                counts["not run"] += 1
            elif test_outcome == "killed":
                counts["killed"] += 1
            elif test_outcome == "incompetent" or worker_outcome not in ("normal", ""):
                counts["incompetent"] += 1  # the mutant does not run (a type error at import): not a test gap
            elif why := why_equivalent(table, name, (operator, mutant, row)) or (
                function and equivalent_by_shape(operator, text, mutant)
            ):
                matched.add((operator, mutant, row))
                counts["equivalent"] += 1
                equivalents.append({**entry, "why": why})
            else:
                counts["survived"] += 1
                survivors.append(entry)
    # only a whole run can say an entry matches no survivor: the code it named changed, or a test now kills it
    stale = [] if counts["not run"] else unmatched(table, name, matched)
    return {
        "module": target.path,
        "tests": target.tests,
        **counts,
        "survivors": survivors,
        "equivalents": equivalents,
        "stale": [{"operator": key[1], "mutant": key[2], "line": key[3], "why": table[key]} for key in stale],
    }


def init(name: str, target: Target, tree: Path) -> Path:
    """A cosmic-ray session of the target's mutants (its functions' and its top level's); checks the
    equivalents table against them first."""
    work, cfg = tree.parent / f"{name}.sqlite", tree.parent / f"{name}.toml"
    cfg.write_text(config(tree, target))
    run(["cosmic-ray", "init", str(cfg), str(work)], tree)
    keep_only(work, target.functions)
    check_equivalents(work, tree, name, target)
    return work


def mutate(name: str, target: Target, tree: Path, deadline: float) -> dict[str, object]:
    """Run the target's mutants in `tree`; a session already there (a `--keep` folder given again)
    goes on with the mutants it has not run."""
    work = tree.parent / f"{name}.sqlite"
    if not work.exists():
        baseline = run(
            [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *shlex.split(target.tests)], tree
        )
        if baseline.returncode != 0:
            return {
                "module": target.path,
                "tests": target.tests,
                "error": "baseline tests fail: " + baseline.stdout[-800:],
            }
        work = init(name, target, tree)
    with sqlite3.connect(work) as db:
        total = int(db.execute("SELECT count(*) FROM work_items").fetchone()[0])
    restore(tree, target)
    started = time.monotonic()
    env = {**os.environ, "PYTHONPATH": str(tree)}
    exec_ = subprocess.Popen(["cosmic-ray", "exec", str(tree.parent / f"{name}.toml"), str(work)], cwd=tree, env=env)
    try:
        exec_.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        exec_.terminate()
        exec_.wait()
        restore(tree, target)
    result = outcomes(work, tree, name, target)
    return {**result, "mutants": total, "seconds": round(time.monotonic() - started, 1)}


def recheck(folder: Path, name: str, target: Target, deadline: float) -> int:
    """Run each unexplained survivor of a kept session again against HEAD's tests (`cosmic-ray
    mutate-and-test` on a fresh export), recording the new outcome: tests added since the session may
    now kill it. Survivors the equivalents table (or their shape) explains are not run again."""
    fresh = folder / "recheck"
    if not fresh.exists():
        fresh.mkdir()
        export_head(fresh)
    command = f"{sys.executable} -m pytest -x -q -p no:cacheprovider {target.tests}"
    table, lines = load(), (folder / "tree" / target.path).read_text().splitlines()
    rechecked = 0
    with sqlite3.connect(folder / f"{name}.sqlite") as db:
        query = (
            "SELECT s.job_id, s.operator_name, s.occurrence, s.start_pos_row, s.definition_name, r.diff"
            " FROM mutation_specs s JOIN work_results r ON r.job_id = s.job_id"
            " WHERE lower(r.test_outcome) = 'survived'"
        )
        for job_id, operator, occurrence, row, function, diff in db.execute(query).fetchall():
            mutant, code = mutated_line(diff), lines[row - 1].strip() if 0 < row <= len(lines) else ""
            if why_equivalent(table, name, (operator, mutant, row)) or (
                function and equivalent_by_shape(operator, code, mutant)
            ):
                continue
            if time.monotonic() >= deadline:
                break
            args = ["cosmic-ray", "mutate-and-test", str(fresh / target.path), operator, str(occurrence), command]
            done = run(args, fresh)
            outcome = json.loads(done.stdout.strip().splitlines()[-1]).get("test_outcome", "") if done.stdout else ""
            if str(outcome).lower() == "killed":
                db.execute("UPDATE work_results SET test_outcome = 'KILLED' WHERE job_id = ?", (job_id,))
            rechecked += 1
    return rechecked


def markdown(report: dict[str, object]) -> str:
    out = [
        f"# Mutation testing — {report['when']}",
        "",
        f"`{report['command']}` (cosmic-ray {report['tool_version']}) over an export of HEAD {report['head']};",
        f"time box {report['budget_min']} min on {report['machine']}.",
        "",
        *[f"{note}\n" for note in report.get("notes", [])],
        "| module | tests | mutants | killed | survived | equivalent | incompetent | not run | seconds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    modules = report["modules"]
    assert isinstance(modules, dict)
    for name, r in modules.items():
        if "error" in r:
            out.append(f"| {name} | `{r['tests']}` | — | {r['error'].splitlines()[0]} | | | | | |")
            continue
        out.append(
            f"| {name} (`{r['module']}`) | `{r['tests']}` | {r['mutants']} | {r['killed']} | {r['survived']} |"
            f" {r['equivalent']} | {r['incompetent']} | {r['not run']} | {r['seconds']} |"
        )
    for name, r in modules.items():
        for title, key in (("Survivors (missing tests)", "survivors"), ("Equivalent survivors", "equivalents")):
            if r.get(key):
                out += ["", f"## {name}: {title}", ""]
                for s in r[key]:
                    why = f" — {s['why']}" if "why" in s else ""
                    out.append(
                        f"- line {s['line']} `{s['function']}` {s['operator']}: `{s['code']}` → `{s['mutant']}`{why}"
                    )
        if r.get("stale"):
            out += ["", f"## {name}: stale entries of equivalents.toml (no surviving mutant matches)", ""]
            for s in r["stale"]:
                where = f" (line {s['line']})" if s.get("line") else ""
                out.append(f"- {s['operator']}{where}: `{s['mutant']}`")
    return "\n".join(out) + "\n"


def check_only(names: list[str]) -> int:
    """`--check-equivalents`: every named target's mutants made in memory against the table; 1 if stale."""
    stale: list[str] = []
    with tempfile.TemporaryDirectory(prefix="imagemill-mutation-") as temp:
        tree = Path(temp) / "tree"
        tree.mkdir()
        export_head(tree)
        for name in names:
            try:
                init(name, TARGETS[name], tree)
            except StaleEntries as exc:
                stale.append(str(exc))
    print("\n".join(stale) or f"every entry of the equivalents table names a mutant of {', '.join(names)}")
    return 1 if stale else 0


def without_notes(argv: list[str]) -> list[str]:
    """The arguments as the report's command shows them: the notes are printed apart."""
    kept: list[str] = []
    for i, arg in enumerate(argv):
        if arg == "--note" or arg.startswith("--note=") or (i and argv[i - 1] == "--note"):
            continue
        kept.append(arg)
    return kept


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.mutation", description=__doc__.splitlines()[0])
    parser.add_argument("--modules", default=",".join(TARGETS), help=f"comma-separated: {', '.join(TARGETS)}")
    parser.add_argument("--budget-min", type=float, default=40.0, help="stop starting mutants after this")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument(
        "--keep",
        type=Path,
        help="keep the export and the cosmic-ray sessions in this folder (a report can be remade); given a folder"
        " kept before, its sessions go on with the mutants not yet run, over the export it holds",
    )
    parser.add_argument(
        "--report-from",
        type=Path,
        action="append",
        default=[],
        help="remake the report from a --keep folder; mutate nothing (repeatable: each module from the last folder"
        " that has its session)",
    )
    parser.add_argument(
        "--recheck", action="store_true", help="with --report-from: run the survivors again against HEAD's tests"
    )
    parser.add_argument("--note", action="append", default=[], help="a paragraph for the report (repeatable)")
    parser.add_argument(
        "--check-equivalents",
        action="store_true",
        help="only check that every entry of the equivalents table names a mutant (seconds; runs no test)",
    )
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.modules.split(",") if n.strip()]
    unknown = sorted(set(names) - set(TARGETS))
    if unknown:
        parser.error(f"unknown modules {unknown}; known: {', '.join(TARGETS)}")
    if args.check_equivalents:
        return check_only(names)
    deadline = time.monotonic() + args.budget_min * 60
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    version = subprocess.run(["cosmic-ray", "--version"], capture_output=True, text=True).stdout.split()[-1]
    modules: dict[str, object] = {}
    if args.report_from:
        current = head.strip()
        heads: dict[str, list[str]] = {}
        for name in names:
            folder = next((f for f in reversed(args.report_from) if (f / f"{name}.sqlite").exists()), None)
            if folder is None:
                continue
            session = folder / f"{name}.sqlite"
            if args.recheck:
                print(f"{name}: {recheck(folder, name, TARGETS[name], deadline)} survivors run again")
            with sqlite3.connect(session) as db:
                total = int(db.execute("SELECT count(*) FROM work_items").fetchone()[0])
            modules[name] = {
                **outcomes(session, folder / "tree", name, TARGETS[name]),
                "mutants": total,
                "seconds": "—",
            }
            heads.setdefault((folder / "HEAD").read_text().strip(), []).append(name)
        head = (
            next(iter(heads))
            if len(heads) == 1
            else "; ".join(f"{commit} ({', '.join(of)})" for commit, of in heads.items())
        )
        if args.recheck:
            head += f"; survivors run again at {current}"
    with tempfile.TemporaryDirectory(prefix="imagemill-mutation-") as temp:
        tree = (args.keep or Path(temp)) / "tree"
        resumed = not args.report_from and tree.exists()
        if resumed:  # a kept folder again: its export and sessions go on
            head = (tree.parent / "HEAD").read_text()
        tree.mkdir(parents=True, exist_ok=bool(args.report_from) or resumed)
        if not args.report_from and not resumed:
            export_head(tree)
            (tree.parent / "HEAD").write_text(head)
        for name in [] if args.report_from else names:
            if time.monotonic() >= deadline:
                modules[name] = {"module": TARGETS[name].path, "tests": TARGETS[name].tests, "error": "time box spent"}
                continue
            try:
                modules[name] = mutate(name, TARGETS[name], tree, deadline)
            except StaleEntries as exc:  # reported, and the run exits 1; the other targets still run
                modules[name] = {"module": TARGETS[name].path, "tests": TARGETS[name].tests, "error": str(exc)}
                modules[name]["stale"] = [
                    {"operator": op, "mutant": mutant, "line": line} for _, op, mutant, line in exc.entries
                ]
            print(
                json.dumps(
                    {name: {k: v for k, v in modules[name].items() if k not in ("survivors", "equivalents", "stale")}}
                )
            )
    now = datetime.now(UTC)
    report = {
        "when": f"{now:%Y%m%d-%H%M%S}",
        "head": head.strip(),
        "command": "python -m tools.mutation " + shlex.join(without_notes(argv if argv is not None else sys.argv[1:])),
        "tool_version": version,
        "budget_min": args.budget_min,
        "machine": f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end",
        "notes": args.note,
        "modules": modules,
    }
    print(save_results(args.out, "mutation", report, markdown(report), now))
    stale = [(name, s) for name, r in modules.items() for s in r.get("stale", [])]
    for name, entry in stale:
        print(f"stale: {describe((name, entry['operator'], entry['mutant'], entry['line']))}", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
