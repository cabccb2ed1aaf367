"""`imagemill estimate SOURCE --tasks …`: how long and how much, before running.

Counts the source and predicts from the rates this pool measured for the pipeline (`core.rates`).
"""

import json
from typing import TYPE_CHECKING, Annotated, Any

import typer

from imagemill.cli.annotate import ALL_TASKS, SOURCE_HELP, tasks_option
from imagemill.cli.display import console, run_reporting_errors, stdout
from imagemill.core.redaction import redact_url

if TYPE_CHECKING:  # pydantic-settings and redis: imported when the command runs
    from imagemill.core.rates import RateSample
    from imagemill.core.settings import Settings

COUNT_LIMIT = 1_000_000


def estimate(
    source: Annotated[str, typer.Argument(help=SOURCE_HELP)],
    tasks: Annotated[str, typer.Option(help="Comma-separated: caption, moderation, tags, embedding.")] = ALL_TASKS,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes (GPUs) the job would run on.")] = 1,
    limit: Annotated[
        int,
        typer.Option(
            min=1,
            help="Count at most this many; a larger S3 prefix is sampled (a few of its sub-prefixes counted), "
            "anything else estimated for this many.",
        ),
    ] = COUNT_LIMIT,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document on stdout, for scripts.")] = False,
) -> None:
    """Count SOURCE and predict the time and cost of annotating it, from the rates this pool has
    measured for the same pipeline (workers' chunks in Redis, local runs in IMAGEMILL_RATES_FILE)."""
    from imagemill.core.settings import get_settings  # pydantic-settings: when the command runs, not for `--help`

    chosen = tasks_option(tasks)
    settings = get_settings()
    document = run_reporting_errors(lambda: _estimate(source, chosen, workers, limit, settings))
    if as_json:
        typer.echo(json.dumps(document))
        return
    _show(document)


def _estimate(spec: str, tasks: tuple[Any, ...], workers: int, limit: int, settings: "Settings") -> dict[str, Any]:
    # boto3 (S3 sources) and the registry's redis: loaded when an estimate runs
    from imagemill.core.pipeline_key import pipeline_key
    from imagemill.core.rates import pooled, predict, read_from_file
    from imagemill.pipeline.sources import open_source
    from imagemill.pipeline.sources.counting import count_images

    opened = open_source(spec, settings)
    counted = count_images(opened, limit)
    count = counted.images
    key = pipeline_key(tasks, settings)
    samples = read_from_file(settings.rates_file, key) + _pool_samples(settings, key)
    rate = pooled(samples)
    document: dict[str, Any] = {
        "source": str(opened),
        "tasks": [task.value for task in tasks],
        "images": count,
        "counted_all": counted.exact,
        "how_counted": counted.how,
        "pipeline": key,
        "samples": len(samples),
        "workers": workers,
        "cost_per_hour": settings.cost_per_hour,
        "prediction": None,
    }
    if rate is None or not count:
        return document
    prediction = predict(count, rate, workers, settings.cost_per_hour)
    document["rate"] = {"images_per_s": rate.per_s, "low": rate.low, "high": rate.high, "images": rate.images}
    document["prediction"] = {
        "seconds": prediction.seconds,
        "fastest_s": prediction.fastest_s,
        "slowest_s": prediction.slowest_s,
        "cost": prediction.cost,
        "cost_low": prediction.cost_low,
        "cost_high": prediction.cost_high,
        "sources": sorted({sample.where for sample in samples}),
    }
    return document


def _pool_samples(settings: "Settings", key: str) -> "list[RateSample]":
    """The workers' samples from Redis; none (not an error) when no registry answers."""
    import redis  # the registry's client: only when an estimate asks the pool

    from imagemill.core.connections import redis_client  # with redis, when the pool is asked
    from imagemill.core.rates import read_from_redis

    client = redis_client(settings.registry_url, probe=True)
    try:
        return read_from_redis(client, key)
    except redis.RedisError:
        return []
    finally:
        client.close()


def _show(document: dict[str, Any]) -> None:
    count = document["images"]
    counted = f"{count:,} images" if document["counted_all"] else f"{count:,} images ({document['how_counted']})"
    stdout.print(f"{redact_url(document['source'])}: {counted}, tasks {', '.join(document['tasks'])}", highlight=False)
    prediction = document["prediction"]
    if prediction is None:
        reason = "no image to annotate" if not count else "no run of this pipeline has been measured on this pool yet"
        stdout.print(f"no estimate: {reason}; annotate a sample first (imagemill annotate or a job)", highlight=False)
        return
    rate = document["rate"]
    workers = document["workers"]
    stdout.print(
        f"predicted: {_duration(prediction['seconds'])} on {workers} process{'es' if workers > 1 else ''} "
        f"(spread {_duration(prediction['fastest_s'])} – {_duration(prediction['slowest_s'])}), "
        f"from {rate['images_per_s']:,.1f} images/s per process over {document['samples']} measured runs or chunks "
        f"({rate['low']:,.1f}–{rate['high']:,.1f}); model loading not included",
        highlight=False,
    )
    if prediction["cost"] is not None:
        stdout.print(
            f"cost: {_money(prediction['cost'])} ({_money(prediction['cost_low'])} – "
            f"{_money(prediction['cost_high'])}) at {_money(document['cost_per_hour'])} per process-hour",
            highlight=False,
        )
    else:
        console.print("cost: set IMAGEMILL_COST_PER_HOUR for one", highlight=False)


def _money(amount: float) -> str:
    """Two decimals, or four significant digits below one (a small run's cost is not 0.00)."""
    return f"{amount:,.2f}" if amount >= 1 or amount == 0 else f"{amount:.4g}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:,.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:,.1f} min"
    return f"{seconds / 3600:,.1f} h"
