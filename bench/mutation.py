"""`python -m bench.mutation`: mutation testing (cosmic-ray) of the modules that carry the README's
guarantees, each against only its fast targeted tests, with a killed / survived / equivalent report.

    python -m bench.mutation --budget-min 40 --out bench/results
    python -m bench.mutation --modules moderation,decode --out bench/results

Never in CI: it mutates a private export of HEAD (`git archive`, never the working tree) and runs
the tests once per mutant. Each surviving mutant is either listed in EQUIVALENT (with why no test
can tell it apart) or is a missing test; entries no survivor matched are reported stale. The time box
stops between mutants; the report says what ran.
"""

import argparse
import json
import os
import re
import shlex
import sqlite3
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Target:
    """One guarantee module: the functions whose mutants count, and the tests that must kill them."""

    path: str
    functions: frozenset[str]
    tests: str  # pytest arguments


TARGETS = {
    "moderation": Target(
        "imagemill/pipeline/models/moderation.py",
        frozenset({"_judge"}),
        "--noconftest tests/test_models.py -k judging",
    ),
    "decode": Target(
        "imagemill/pipeline/decode.py",
        frozenset({"decode", "from_image", "_check_pixels", "_open", "_load"}),
        "--noconftest tests/test_decode.py",
    ),
    "storage-limits": Target(
        "imagemill/core/storage.py",
        frozenset({"read", "_too_large", "_within_limit", "_read_file", "_read_s3"}),
        # the stubs test: boto3's type stubs are a dev dependency, imported only `if TYPE_CHECKING`
        "tests/test_byte_limits.py tests/test_install.py::test_every_module_imports_without_the_dev_only_type_stubs"
        " -k 'not real_run'",
    ),
    "message-validation": Target(
        "imagemill/core/schemas.py",
        frozenset({"ChunkMessage", "ImageRef", "_problem_only_when_set"}),
        "--noconftest tests/test_chunk_message.py",
    ),
    "incremental-skip": Target(
        "imagemill/pipeline/incremental.py",
        frozenset({"mark_existing", "skip_existing"}),
        "--noconftest tests/test_incremental_skip.py",
    ),
    # every method of the registry and the Job it reads back; the Lua scripts are strings, which
    # cosmic-ray does not mutate (the tests break them by hand: the chunk-done dedup, the done check)
    "job-registry": Target(
        "imagemill/core/jobs.py",
        frozenset(
            {
                "from_hash",
                "expires_at",
                "processed",
                "new_job_id",
                "__init__",
                "key",
                "job_keys",
                "create",
                "claim",
                "heartbeat",
                "take_over",
                "get",
                "recent",
                "prune",
                "state",
                "add_queued",
                "end_listing",
                "chunk_started",
                "_set",
                "chunk_done",
                "begin_attempt",
                "end_attempt",
                "publish_signature",
                "signature_for",
                "count_rejected",
                "rejected",
                "chunk_cancelled",
                "cancel",
                "fail",
                "_transition",
                "_transaction",
                "_text",
            }
        ),
        "tests/test_job_registry.py tests/test_job_retention.py",
    ),
    "postgres-writes": Target(
        "imagemill/core/stores/postgres.py",
        frozenset(
            {
                "write",
                "_row",
                "_without_nul",
                "_upsert_sql",
                "_stored_key",
                "_stored_ok_keys",
                "existing_keys",
                "_ensure_schema",
                "_check_version",
            }
        ),
        # with the migration and view tests of test_current_records (not its 30 s resubmission run)
        "tests/test_postgres_store.py tests/test_current_records.py -k 'not resubmit'",
    ),
    "file-writes": Target(
        "imagemill/core/stores/files.py",
        frozenset(
            {
                "__init__",
                "existing_keys",
                "keep",
                "close",
                "abort",
                "_open",
                "_close",
                "write",
                "_flush",
                "write_table",
                "parquet_row",
                "parquet_schema",
                "writer_options",
                "open_file_writer",
                "encode_records",
            }
        ),
        "--noconftest tests/test_record_files.py tests/test_store_capabilities.py -k 'not s3 and not sink'",
    ),
    "object-writes": Target(
        "imagemill/core/stores/objects.py",
        frozenset(
            {
                "__init__",
                "from_url",
                "key_for",
                "path_for",
                "write",
                "chunk_object_name",
                "check_format",
                "split_format",
                "normalise_prefix",
                "_write_atomically",
                "_fsync_directory",
            }
        ),
        # not the read-paging test (13 s, writes nothing); the stubs test for its `if TYPE_CHECKING` import
        "tests/test_object_sinks.py tests/test_install.py::test_every_module_imports_without_the_dev_only_type_stubs"
        " -k 'not more_than_a_thousand'",
    ),
}

# Survivors no test can tell apart from the original, keyed by (target, operator, the mutated line as
# cosmic-ray wrote it, stripped), with why: a table of data, kept beside this file. A survivor not
# listed there is a missing test.
EQUIVALENTS_FILE = Path(__file__).with_name("mutation_equivalents.toml")


def load_equivalents(path: Path = EQUIVALENTS_FILE) -> dict[tuple[str, str, str], str]:
    """The equivalent mutants of the table at `path`."""
    with path.open("rb") as handle:
        entries = tomllib.load(handle)["equivalent"]
    return {(e["target"], e["operator"], e["mutant"]): e["why"] for e in entries}


EQUIVALENT = load_equivalents()


# Two kinds of mutant no test can notice, recognised by their shape wherever they occur.
LOCAL_ANNOTATION = re.compile(r"^(\w+): (.+?) = (.*)$")
BARE_STAR = re.compile(r"(?<=[(,\s])\*(?=\s*,)")


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
    """The line a mutant wrote (the first `+` line of cosmic-ray's diff), stripped."""
    for line in (diff or "").splitlines():
        if line.startswith("+") and not line.startswith("+++"):
            return line[1:].strip()
    return ""


def export_head(into: Path) -> None:
    """HEAD's files (committed code and tests only) into `into`."""
    archive = subprocess.run(["git", "archive", "HEAD"], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)


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


def outcomes(session: Path, tree: Path, name: str, target: Target) -> dict[str, object]:
    lines = (tree / target.path).read_text().splitlines()
    query = (
        "SELECT s.operator_name, s.start_pos_row, s.definition_name, r.test_outcome, r.worker_outcome, r.diff"
        " FROM mutation_specs s LEFT JOIN work_results r ON r.job_id = s.job_id ORDER BY s.start_pos_row"
    )
    counts = {"killed": 0, "survived": 0, "equivalent": 0, "incompetent": 0, "not run": 0}
    survivors, equivalents = [], []
    matched: set[tuple[str, str, str]] = set()
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
            elif why := EQUIVALENT.get((name, operator, mutant)) or (
                function and equivalent_by_shape(operator, text, mutant)
            ):
                matched.add((name, operator, mutant))
                counts["equivalent"] += 1
                equivalents.append({**entry, "why": why})
            else:
                counts["survived"] += 1
                survivors.append(entry)
    # only a whole run can say an entry matches nothing: the code it named changed, or a test now kills it
    stale = (
        []
        if counts["not run"]
        else [
            {"operator": op, "mutant": mutant, "why": why}
            for (target_name, op, mutant), why in EQUIVALENT.items()
            if target_name == name and (target_name, op, mutant) not in matched
        ]
    )
    return {
        "module": target.path,
        "tests": target.tests,
        **counts,
        "survivors": survivors,
        "equivalents": equivalents,
        "stale": stale,
    }


def mutate(name: str, target: Target, tree: Path, deadline: float) -> dict[str, object]:
    work = tree.parent / f"{name}.sqlite"
    cfg = tree.parent / f"{name}.toml"
    cfg.write_text(config(tree, target))
    baseline = run(
        [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *shlex.split(target.tests)], tree
    )
    if baseline.returncode != 0:
        return {"module": target.path, "tests": target.tests, "error": "baseline tests fail: " + baseline.stdout[-800:]}
    run(["cosmic-ray", "init", str(cfg), str(work)], tree)
    total = keep_only(work, target.functions)
    started = time.monotonic()
    env = {**os.environ, "PYTHONPATH": str(tree)}
    exec_ = subprocess.Popen(["cosmic-ray", "exec", str(cfg), str(work)], cwd=tree, env=env)
    try:
        exec_.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        exec_.terminate()
        exec_.wait()
    result = outcomes(work, tree, name, target)
    return {**result, "mutants": total, "seconds": round(time.monotonic() - started, 1)}


def recheck(folder: Path, name: str, target: Target, deadline: float) -> int:
    """Run each survivor of a kept session again against HEAD's tests (`cosmic-ray mutate-and-test` on
    a fresh export), recording the new outcome: tests added since the session may now kill it."""
    fresh = folder / "recheck"
    if not fresh.exists():
        fresh.mkdir()
        export_head(fresh)
    command = f"{sys.executable} -m pytest -x -q -p no:cacheprovider {target.tests}"
    rechecked = 0
    with sqlite3.connect(folder / f"{name}.sqlite") as db:
        query = (
            "SELECT s.job_id, s.operator_name, s.occurrence FROM mutation_specs s JOIN work_results r"
            " ON r.job_id = s.job_id WHERE lower(r.test_outcome) = 'survived'"
        )
        for job_id, operator, occurrence in db.execute(query).fetchall():
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
        "| module | tests | mutants | killed | survived | equivalent | incompetent | not run | seconds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    modules = report["modules"]
    assert isinstance(modules, dict)
    for name, r in modules.items():
        if "error" in r:
            out.append(f"| {name} | `{r['tests']}` | — | {r['error']} | | | | | |")
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
            out += ["", f"## {name}: stale entries of mutation_equivalents.toml (no surviving mutant matches)", ""]
            out += [f"- {s['operator']}: `{s['mutant']}`" for s in r["stale"]]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", default=",".join(TARGETS), help=f"comma-separated: {', '.join(TARGETS)}")
    parser.add_argument("--budget-min", type=float, default=40.0, help="stop starting mutants after this")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument(
        "--keep", type=Path, help="keep the export and the cosmic-ray sessions in this folder (a report can be remade)"
    )
    parser.add_argument("--report-from", type=Path, help="remake the report from a --keep folder; mutate nothing")
    parser.add_argument(
        "--recheck", action="store_true", help="with --report-from: run the survivors again against HEAD's tests"
    )
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.modules.split(",") if n.strip()]
    unknown = sorted(set(names) - set(TARGETS))
    if unknown:
        parser.error(f"unknown modules {unknown}; known: {', '.join(TARGETS)}")
    deadline = time.monotonic() + args.budget_min * 60
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    version = subprocess.run(["cosmic-ray", "--version"], capture_output=True, text=True).stdout.split()[-1]
    modules: dict[str, object] = {}
    if args.report_from:
        current = head.strip()
        head = (args.report_from / "HEAD").read_text().strip()
        if args.recheck:
            head += f"; survivors run again at {current}"
        tree = args.report_from / "tree"
        for name in names:
            session = args.report_from / f"{name}.sqlite"
            if session.exists() and args.recheck:
                print(f"{name}: {recheck(args.report_from, name, TARGETS[name], deadline)} survivors run again")
            if session.exists():
                with sqlite3.connect(session) as db:
                    total = int(db.execute("SELECT count(*) FROM work_items").fetchone()[0])
                modules[name] = {**outcomes(session, tree, name, TARGETS[name]), "mutants": total, "seconds": "—"}
    with tempfile.TemporaryDirectory(prefix="imagemill-mutation-") as temp:
        tree = (args.keep or Path(temp)) / "tree"
        tree.mkdir(parents=True, exist_ok=bool(args.report_from))
        if not args.report_from:
            export_head(tree)
            (tree.parent / "HEAD").write_text(head)
        for name in [] if args.report_from else names:
            if time.monotonic() >= deadline:
                modules[name] = {"module": TARGETS[name].path, "tests": TARGETS[name].tests, "error": "time box spent"}
                continue
            modules[name] = mutate(name, TARGETS[name], tree, deadline)
            print(
                json.dumps(
                    {name: {k: v for k, v in modules[name].items() if k not in ("survivors", "equivalents", "stale")}}
                )
            )
    when = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    report = {
        "when": when,
        "head": head.strip(),
        "command": "python -m bench.mutation " + " ".join(argv if argv is not None else sys.argv[1:]),
        "tool_version": version,
        "budget_min": args.budget_min,
        "machine": f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end",
        "modules": modules,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{when}-mutation.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"{when}-mutation.md").write_text(markdown(report))
    print(args.out / f"{when}-mutation.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
