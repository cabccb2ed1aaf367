"""The `imagemill` command line: one Typer app, a module per command group.

Faults the user can fix print one line and exit non-zero; tracebacks are for bugs.
"""

import typer

from imagemill.cli import annotate, jobs, models, schedules, worker

app = typer.Typer(
    name="imagemill",
    help="Annotate images in bulk: captions, moderation scores and tags.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.command("annotate")(annotate.annotate)
app.add_typer(models.app, name="models")
app.command("submit")(jobs.submit)
app.command("status")(jobs.status)
app.command("jobs")(jobs.jobs)
app.command("cancel")(jobs.cancel)
app.command("retry")(jobs.retry)
app.command("worker")(worker.worker)
app.add_typer(schedules.app, name="schedule")
app.command("beat")(schedules.beat)
