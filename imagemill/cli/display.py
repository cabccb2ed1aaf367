"""What the CLI shows a person: one-line errors, the progress bar, the end-of-run summary."""

import importlib.util
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NoReturn, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from imagemill.cli import flags  # noqa: F401  flags read as switches in every command's --help
from imagemill.core.accounting import MODEL_PREFIX, Figures, bound
from imagemill.core.errors import UserError

console = Console(stderr=True)  # progress, summaries and errors
stdout = Console()  # a command's own answer (status, jobs), for pipes and scripts
T = TypeVar("T")

# what `pip install 'imagemill[worker]'` adds; a command that needs one of them without it gets a hint
WORKER_EXTRA_MODULES = frozenset(
    {"torch", "transformers", "safetensors", "huggingface_hub", "sentencepiece", "tokenizers", "prometheus_client"}
)
WORKER_EXTRA_INSTALL = "pip install 'imagemill[worker]'"
# what a worker process cannot start without (`imagemill.worker.celery` imports them, or its models need them)
WORKER_START_MODULES = ("torch", "transformers", "prometheus_client")


def report(message: str) -> None:
    """One red `error:` line per line of `message`, on stderr."""
    for line in message.splitlines() or [""]:
        # escaped: messages hold brackets (`imagemill[worker]`, JSON) that are not rich markup
        console.print(f"[bold red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)


def fail(message: str, code: int = 2) -> NoReturn:
    report(message)
    raise typer.Exit(code)


def missing_extra(exc: ImportError) -> str | None:
    """The one-line hint when a module the worker extra installs is absent, else None (an installed
    but broken torch is a real error, not a missing extra)."""
    root = (exc.name or "").partition(".")[0]
    if not isinstance(exc, ModuleNotFoundError) or root not in WORKER_EXTRA_MODULES:
        return None
    try:
        if importlib.util.find_spec(root) is not None:
            return None
    except (ImportError, ValueError):
        pass
    return f"the models need the worker extra, which is not installed (no module {root!r}): {WORKER_EXTRA_INSTALL}"


def worker_extra_missing() -> str | None:
    """The one-line hint when the worker extra is not installed, else None. Looked up, never imported:
    the worker's supervisor must not import torch (CUDA would start in a process that forks)."""
    for root in WORKER_START_MODULES:
        try:
            found = importlib.util.find_spec(root) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            return (
                f"the workers need the worker extra, which is not installed (no module {root!r}): "
                f"{WORKER_EXTRA_INSTALL}"
            )
    return None


def run_reporting_errors(action: Callable[[], T]) -> T:
    """Run `action`; a UserError becomes one red line and its exit code."""
    try:
        return action()
    except UserError as exc:
        fail(str(exc), exc.exit_code)


class RateColumn(ProgressColumn):
    """Items a second, named for what is counted: images, or records for the commands that read them."""

    def __init__(self, unit: str = "img") -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.1f} {self.unit}/s" if speed else f"– {self.unit}/s", style="cyan")


@contextmanager
def progress_bar(description: str, *, disable: bool = False, unit: str = "img") -> Iterator[tuple[Progress, TaskID]]:
    """A bar of items (images unless `unit` says otherwise) done / total; the total grows while the
    source is still being listed."""
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(unit),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=disable,
        speed_estimate_period=10.0,
    )
    with progress:
        yield progress, progress.add_task(description, total=None)


def summary_table(title: str, outcomes: Counter[str], elapsed_s: float, extra: dict[str, str] | None = None) -> Table:
    """Annotated, failed by error kind, elapsed and images/s."""
    done = sum(n for kind, n in outcomes.items() if kind != "skipped")
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("annotated", f"{outcomes.get('annotated', 0):,}")
    if outcomes.get("skipped"):
        table.add_row("skipped", f"{outcomes['skipped']:,}")
    failed = {kind: n for kind, n in outcomes.items() if kind not in ("annotated", "skipped")}
    table.add_row("failed", f"{sum(failed.values()):,}")
    for kind, count in sorted(failed.items()):
        table.add_row(f"  {kind}", f"{count:,}")
    table.add_row("elapsed", f"{elapsed_s:,.1f} s")
    table.add_row("images/s", f"{done / elapsed_s:,.1f}" if elapsed_s > 0 else "–")
    for key, value in (extra or {}).items():
        table.add_row(key, value)
    return table


def accounting_rows(figures: Figures | None, cost: float | None, processed: int) -> dict[str, str]:
    """The accounting's rows of a summary or `status`: seconds per image in each stage, the
    accelerator's busy share, the models' wait for input, the bounding stage, and the cost."""
    rows: dict[str, str] = {}
    if figures is not None and figures.images:
        per_image = figures.per_image()
        rows["per image"] = " · ".join(
            f"{name.removeprefix(MODEL_PREFIX)} {seconds * 1000:,.1f} ms" for name, seconds in per_image.items()
        )
        busy = figures.busy_ratio
        if busy is not None:
            cpu = figures.accelerator == "cpu"
            what = "of the process's CPU in the models" if cpu else "of the wall time computing"
            rows["accelerator busy"] = f"{busy:.0%} {what} ({figures.accelerator})"
        starved = figures.starved_ratio
        rows["waiting for input"] = f"{figures.starved_s:,.1f} s" + (f" ({starved:.0%})" if starved is not None else "")
        verdict = bound(figures)
        if verdict:
            rows["bound"] = verdict
    if cost is not None:
        rows["cost"] = f"{cost:,.4f}" + (f" ({cost * 1000 / processed:,.4f} per 1,000 images)" if processed else "")
    return rows
