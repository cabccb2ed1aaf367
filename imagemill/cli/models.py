"""`imagemill models download`: fetch the configured models for machines without internet."""

from pathlib import Path
from typing import Annotated

import typer

from imagemill.cli.annotate import ALL_TASKS, tasks_option
from imagemill.cli.display import console, fail
from imagemill.core.tasks import TASKS

app = typer.Typer(help="Manage the models imagemill runs.", no_args_is_help=True)

# weight formats other than safetensors (pickles, TF, Flax, ONNX): not fetched
UNSAFE_WEIGHTS = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.h5", "*.msgpack", "*.onnx", "*.tflite"]


@app.command("download")
def download(
    to: Annotated[
        Path | None, typer.Option(help="Save each model in DIR/<name> (default: the Hugging Face cache).")
    ] = None,
    tasks: Annotated[str, typer.Option(help="Whose models to fetch.")] = ALL_TASKS,
) -> None:
    """Download the configured models (IMAGEMILL_*_MODEL) from the Hugging Face hub."""
    from imagemill.core.settings import get_settings  # pydantic-settings: when the command runs, not for `--help`

    settings = get_settings()
    # the hub client is the worker extra's: imported once the settings are known good
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    exports = []
    chosen = tasks_option(tasks)
    fetched: set[str] = set()
    for task in chosen:
        spec = TASKS[task]
        if spec.model_setting in fetched:
            continue  # another task's model (the embedding is the tags model's): fetched once
        fetched.add(spec.model_setting)
        name = settings.model(task)
        if Path(name).is_dir():
            console.print(f"{task}: {name} is a local directory already; nothing to fetch")
            continue
        target = to / name.replace("/", "--") if to else None
        console.print(f"{task}: fetching {name}…")
        try:
            # safetensors only: the workers load nothing else (no pickled weights)
            path = snapshot_download(
                name, revision=settings.revision(task), local_dir=target, ignore_patterns=UNSAFE_WEIGHTS
            )
        except (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled, OSError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            fail(f"cannot download {name}: {reason}", code=1)
        exports.append(f"export {spec.model_variable}={path}")
    if exports:
        console.print("Models ready. To use these copies on a machine without internet:")
        typer.echo("\n".join(exports))
