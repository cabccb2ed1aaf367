"""`imagemill review [serve|export]`: the review app over the PostgreSQL store, and its decisions as a file.

`serve` (the default) needs the `review` extra (Starlette, uvicorn, Jinja2), imported only then so
that `imagemill --help` and `export` work without it.
"""

import csv
import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from imagemill.cli.display import console, fail, run_reporting_errors
from imagemill.core.errors import UserError
from imagemill.core.redaction import redact_url
from imagemill.core.settings import get_settings
from imagemill.review.settings import get_review_settings, load_tokens
from imagemill.review.store import ReviewStore

REVIEW_EXTRA_MODULES = frozenset({"starlette", "uvicorn", "jinja2", "itsdangerous", "prometheus_client", "anyio"})
REVIEW_EXTRA_INSTALL = "pip install 'imagemill[review]'"
EXPORT_COLUMNS = ("uri", "etag", "decision", "reviewer", "note", "decided_at")


class Action(StrEnum):
    SERVE = "serve"
    EXPORT = "export"


def review(
    action: Annotated[
        Action, typer.Argument(help="serve: run the web app; export: write the decisions to --out.")
    ] = Action.SERVE,
    sink: Annotated[
        str | None, typer.Option(help="The PostgreSQL store: postgresql://…[?table=] [IMAGEMILL_SINK].")
    ] = None,
    host: Annotated[str, typer.Option(help="serve: address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="serve: port to listen on.")] = 8080,
    write_tags: Annotated[
        bool,
        typer.Option(
            "--write-tags", help="serve: also tag each decided S3 object imagemill-review=approved|rejected|escalated."
        ),
    ] = False,
    tokens: Annotated[
        Path | None,
        typer.Option(
            help="serve: a JSON file of reviewer -> token [IMAGEMILL_REVIEW_TOKENS: the JSON or such a path]."
        ),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="export: decisions.csv or decisions.jsonl.")] = None,
    history: Annotated[
        bool,
        typer.Option(
            "--all", help="export: every row of the decision log (undos included), not only those that stand."
        ),
    ] = False,
) -> None:
    """Review flagged images in a browser (reviewers' tokens in IMAGEMILL_REVIEW_TOKENS), or export the decisions."""
    settings = get_settings()
    target = sink or settings.sink
    if not target or not target.startswith(("postgresql://", "postgres://")):
        fail("the review queue reads the PostgreSQL store: pass --sink postgresql://… or set IMAGEMILL_SINK to one")
    if action is Action.EXPORT:
        if out is None:
            fail("export needs --out decisions.csv or --out decisions.jsonl")
        run_reporting_errors(lambda: _export(target, out, history))
        return
    review_settings = get_review_settings()
    if tokens is not None:
        # a path only: tokens on a command line would show in `ps` to everyone on the machine
        review_settings = review_settings.model_copy(update={"tokens": str(tokens)})
    # before anything else: no tokens, no server (and no database connection either)
    run_reporting_errors(lambda: load_tokens(review_settings.tokens))
    try:
        # the review extra: only `serve` needs it
        from imagemill.review.server import build, serve
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] in REVIEW_EXTRA_MODULES:
            fail(
                f"the review app needs the review extra, which is not installed (no module {exc.name!r}):"
                f" {REVIEW_EXTRA_INSTALL}"
            )
        raise
    app = run_reporting_errors(lambda: build(target, settings, review_settings, write_tags))
    console.print(f"review app on http://{host}:{port} over {redact_url(target)}", highlight=False)
    serve(app, host, port, settings, review_settings)


def _export(sink: str, out: Path, everything: bool) -> None:
    suffix = out.suffix.lower()
    if suffix not in {".csv", ".jsonl"}:
        raise UserError(f"--out {out}: expected a .csv or .jsonl file")
    store = ReviewStore(sink)
    store.setup()
    partial = out.with_name(f".{out.name}.partial")
    count = 0
    try:
        with partial.open("w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle) if suffix == ".csv" else None
            if writer is not None:
                writer.writerow(EXPORT_COLUMNS)
            for stored in store.decisions(everything):
                row = stored.as_dict()
                if writer is not None:
                    writer.writerow([row[column] if row[column] is not None else "" for column in EXPORT_COLUMNS])
                else:
                    handle.write(
                        json.dumps({column: row[column] for column in EXPORT_COLUMNS}, ensure_ascii=False) + "\n"
                    )
                count += 1
        partial.replace(out)  # a failed export leaves no half-written file under the real name
    finally:
        partial.unlink(missing_ok=True)
        store.close()
    console.print(f"wrote {count:,} decisions to {out}", highlight=False)
