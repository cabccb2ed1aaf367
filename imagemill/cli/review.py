"""`imagemill review [serve|export]`: the review app over the PostgreSQL sink, and its decisions as a file.

`serve` (the default) needs the `review` extra (Starlette, uvicorn, Jinja2), imported only then so
that `imagemill --help` and `export` work without it.
"""

from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from imagemill.cli.display import console, fail, run_reporting_errors
from imagemill.core.redaction import redact_url

if TYPE_CHECKING:
    from imagemill.core.settings import Settings

REVIEW_EXTRA_MODULES = frozenset({"starlette", "uvicorn", "jinja2", "itsdangerous", "prometheus_client", "anyio"})
REVIEW_EXTRA_INSTALL = "pip install 'imagemill[review]'"


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
    out: Annotated[
        Path | None,
        typer.Option(help="export: decisions.csv or decisions.jsonl (with whether each is about the current version)."),
    ] = None,
    history: Annotated[
        bool,
        typer.Option(
            "--all", help="export: every row of the decision log (undos included), not only those that stand."
        ),
    ] = False,
) -> None:
    """Review flagged images in a browser (IMAGEMILL_REVIEW_TOKENS, or an auth proxy), or export the decisions."""
    # pydantic-settings and psycopg (the review store): loaded when the command runs, not for `--help`
    from imagemill.core.settings import get_settings
    from imagemill.review.settings import get_review_settings, load_tokens

    settings = get_settings()
    review_settings = get_review_settings()
    target = sink or settings.sink
    if not target or not target.startswith(("postgresql://", "postgres://")):
        fail("the review queue reads the PostgreSQL store: pass --sink postgresql://… or set IMAGEMILL_SINK to one")
    if action is Action.EXPORT:
        if out is None:
            fail("export needs --out decisions.csv or --out decisions.jsonl")
        run_reporting_errors(lambda: _export(target, out, history, settings))
        return
    if tokens is not None:
        # a path only: tokens on a command line would show in `ps` to everyone on the machine
        review_settings = review_settings.model_copy(update={"tokens": str(tokens)})
    # before anything else: no reviewers, no server (and no database connection either)
    run_reporting_errors(lambda: load_tokens(review_settings.tokens, required=review_settings.auth != "proxy"))
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


def _export(sink: str, out: Path, everything: bool, settings: "Settings") -> None:
    from imagemill.review.export import export_decisions  # psycopg: see `review`

    count = export_decisions(sink, out, everything, settings)
    console.print(f"wrote {count:,} decisions to {out}", highlight=False)
