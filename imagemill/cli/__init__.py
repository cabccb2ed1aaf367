"""The `imagemill` command line: one Typer app, a module per command group.

Faults the user can fix print one line and exit non-zero; tracebacks are for bugs. `main` is the
installed entry point: it runs the app and turns the faults no command catches itself (a bad
IMAGEMILL_* setting, a missing optional dependency) into that one line too.
"""

import sys
from typing import Annotated

import typer

import imagemill
from imagemill.cli import (
    annotate,
    dedup,
    deploy,
    estimate,
    export,
    jobs,
    models,
    retag,
    review,
    schedules,
    score,
    watch,
    worker,
)
from imagemill.cli.display import missing_extra, report
from imagemill.core.errors import UserError

app = typer.Typer(
    name="imagemill",
    help="Annotate images in bulk: captions, moderation scores and tags.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"imagemill {imagemill.__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Show the version and exit."),
    ] = False,
) -> None:
    """Annotate images in bulk: captions, moderation scores and tags."""


app.command("annotate")(annotate.annotate)
app.add_typer(models.app, name="models")
app.command("submit")(jobs.submit)
app.command("status")(jobs.status)
app.command("jobs")(jobs.jobs)
app.command("cancel")(jobs.cancel)
app.command("retry")(jobs.retry)
app.command("watch")(watch.watch)
app.command("budget")(jobs.budget)
app.command("estimate")(estimate.estimate)
app.command("worker")(worker.worker)
app.add_typer(schedules.app, name="schedule")
app.command("beat")(schedules.beat)
app.command("review")(review.review)
app.command("retag")(retag.retag)
app.command("export")(export.export_command)
app.command("dedup")(dedup.dedup)
app.command("score")(score.score)
app.add_typer(deploy.app, name="deploy")


def main() -> None:
    """Run the CLI. A UserError from anywhere (a bad IMAGEMILL_* setting included), a missing worker
    extra or an unreachable Redis is one `error:` line per fault and a non-zero exit, not a traceback."""
    try:
        app()
    except UserError as exc:
        report(str(exc))
        raise SystemExit(exc.exit_code) from None
    except ImportError as exc:
        hint = missing_extra(exc)
        if hint is None:
            raise
        report(hint)
        raise SystemExit(2) from None
    except Exception as exc:
        # redis is looked up, not imported: only a command that spoke to Redis loaded it (`--help` must not)
        redis = sys.modules.get("redis")
        if redis is None or not isinstance(exc, redis.ConnectionError):
            raise
        report(f"cannot reach Redis: {exc}")  # a command that did not check Redis first
        raise SystemExit(2) from None
