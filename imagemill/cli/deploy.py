"""`imagemill deploy keda MANIFEST`: deployment files filled in from the settings.

Owns the command only; what goes into the KEDA trigger is `imagemill.core.keda`'s.
"""

from pathlib import Path
from typing import Annotated

import typer

from imagemill.cli.display import fail, run_reporting_errors
from imagemill.core.keda import render_scaled_object

app = typer.Typer(help="Deployment files filled in from the IMAGEMILL_* settings.", no_args_is_help=True)


@app.command("keda")
def keda(
    manifest: Annotated[Path, typer.Argument(help="The ScaledObject to fill in: deploy/k8s/keda-scaledobject.yaml.")],
) -> None:
    """Print MANIFEST with its Redis trigger pointed at IMAGEMILL_BROKER_URL and IMAGEMILL_QUEUE:
    host and port, database, and TLS exactly when the broker URL is rediss://.

    kubectl apply -f - takes the output."""
    from imagemill.core.settings import get_settings  # pydantic-settings: when the command runs, not for `--help`

    settings = get_settings()
    try:
        text = manifest.read_text(encoding="utf-8")
    except OSError as exc:
        fail(f"cannot read {manifest}: {exc.strerror or exc}")
    typer.echo(run_reporting_errors(lambda: render_scaled_object(text, settings.broker_url, settings.queue)), nl=False)
