"""Money and accounting in distributed mode: a real worker (tiny models, private Redis, PostgreSQL)
adds each chunk's figures and cost to its job in the step that counts the chunk, a budget stops the
job with its chunks whole, and a larger budget goes on from there without annotating anything twice."""

import json
from collections import Counter
from pathlib import Path

import pytest

from imagemill.core.jobs import JobRegistry, JobState
from imagemill.core.tasks import Task
from tests.fixtures.cli import run_cli, run_main
from tests.fixtures.distributed import job_id_of, rows, submitted, upload_photos, wait_for
from tests.fixtures.s3 import free_port
from tests.fixtures.workers import start_worker
from tests.test_metrics import parse, scrape, value, wait_for_endpoint


@pytest.mark.slow  # a real worker process, Redis and PostgreSQL
def test_a_job_over_its_budget_stops_with_whole_chunks_and_goes_on_under_a_larger_one_without_duplicates(
    dist_env: dict[str, str], bucket: str, pg_url: str, workers: list, tmp_path: Path
) -> None:
    keys = upload_photos(dist_env["IMAGEMILL_S3_ENDPOINT_URL"], bucket, "budget/", 24)
    port = free_port()
    env = {
        **dist_env,
        "IMAGEMILL_COST_PER_HOUR": "3600",  # one per second of a chunk: every chunk costs something
        "IMAGEMILL_METRICS_PORT": str(port),
        "IMAGEMILL_METRICS_ADDR": "127.0.0.1",
        "IMAGEMILL_TEST_FAULTS": json.dumps({"sleep_per_image_s": 0.05}),
    }
    workers.append(start_worker(env, tmp_path / "worker.log").wait_ready())
    wait_for_endpoint(port, workers[0])
    source = f"s3://{bucket}/budget/"
    first = run_cli("submit", source, "--tasks", "moderation", "--chunk-size", "4", "--budget", "0.05", "--wait",
                    env=env)  # fmt: skip
    assert first.returncode == 1, first.stderr + workers[0].log[-3000:]  # it did not end done
    job_id = job_id_of(first.stdout)
    registry = JobRegistry(env["IMAGEMILL_BROKER_URL"])

    def every_chunk_accounted() -> bool:  # the chunks still queued when it stopped are dropped unread
        job = registry.get(job_id)
        return job is not None and job.listing_done and job.chunks_done + job.chunks_cancelled == job.chunks_total

    wait_for(every_chunk_accounted, 60, "the chunks queued after the job stopped to be dropped")
    job = registry.get(job_id)
    assert job is not None and job.state == JobState.OVER_BUDGET
    assert job.error and "budget" in job.error
    assert job.cost is not None and job.cost >= 0.05
    # chunks in flight finished whole; the rest were not run
    written = rows(pg_url, job_id)
    assert 0 < len(written) < len(keys)
    assert len(written) == 4 * job.chunks_done == job.processed
    assert job.chunks_cancelled > 0

    # the chunks' figures are the job's (one worker's), added up in the registry
    status = run_cli("status", job_id, "--json", env=env)
    document = json.loads(status.stdout)
    accounting = document["accounting"]
    assert accounting["images"] == job.processed
    parts = accounting["starvation_s"] + accounting["model_s"] + accounting["stage_seconds"]["write"]
    assert parts == pytest.approx(accounting["wall_s"], rel=0.10)
    assert accounting["bound"] and "-bound" in accounting["bound"]
    assert list(document["workers"]) and document["cost_per_1000"] == pytest.approx(job.cost * 1000 / job.processed)
    shown = run_cli("status", job_id, env=env).stdout
    assert "over_budget" in shown and "per image" in shown and "bound" in shown
    assert f"{job.cost:,.2f}" in run_cli("jobs", env=env).stdout

    # a larger budget goes on: what the sink holds is skipped, the rest annotated once
    more = run_cli("budget", job_id, "1000", "--wait", env=env)
    assert more.returncode == 0, more.stderr + workers[0].log[-3000:]
    second = submitted(more)
    going_on = registry.get(second)
    assert going_on is not None and going_on.state == JobState.DONE and going_on.continues == job_id
    assert going_on.skipped == len(written) and going_on.processed == len(keys) - len(written)
    # this bucket's rows only: the records table is the session's, shared with other tests' jobs
    everything = Counter(uri for uri, *_ in rows(pg_url) if uri.startswith(f"s3://{bucket}/"))
    assert sorted(everything) == sorted(f"s3://{bucket}/{key}" for key in keys)
    assert set(everything.values()) == {1}  # nothing annotated twice

    # the workers' rates for this pipeline are what `estimate` predicts the next run from
    estimate = run_cli("estimate", source, "--tasks", "moderation", "--workers", "2", "--json", env=env)
    predicted = json.loads(estimate.stdout)
    assert predicted["images"] == len(keys) and predicted["samples"] >= job.chunks_done + going_on.chunks_done
    assert predicted["prediction"]["sources"] == ["worker"] and predicted["prediction"]["seconds"] > 0

    # the worker's endpoint: seconds by stage, starvation, busy share, cost and images per task and lane
    samples = parse(scrape(port))
    assert value(samples, "imagemill_image_stage_seconds_total", stage="decode", task="") > 0
    assert value(samples, "imagemill_image_stage_seconds_total", stage="model", task="moderation") > 0
    assert value(samples, "imagemill_decode_starvation_seconds_total") > 0
    assert 0 < value(samples, "imagemill_accelerator_busy_ratio") <= 1
    assert value(samples, "imagemill_cost_total") == pytest.approx(job.cost + (going_on.cost or 0), rel=1e-6)
    images = {"task": "moderation", "queue": "imagemill", "lane": "normal"}
    assert value(samples, "imagemill_task_images_total", **images) == len(keys)


def over_budget_job(registry: JobRegistry) -> str:
    registry.create("job1", "s3://b/p/", (Task.MODERATION,), "postgresql://db/x", "imagemill", budget=1.0)
    registry.add_queued("job1", listed=8, queued=8)
    registry.chunk_done("job1", "job1/000000", {"annotated": 4}, figures={"images": 4, "cost": 1.5})
    assert registry.state("job1") == JobState.OVER_BUDGET
    return "job1"


def test_a_budget_that_would_not_go_on_is_one_line_and_exit_2(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("IMAGEMILL_BROKER_URL", redis_url)
    registry = JobRegistry(redis_url)
    job_id = over_budget_job(registry)
    code, lines = run_main(["budget", job_id, "1.2"], monkeypatch, capsys)
    assert (code, lines) == (2, ["error: job job1 has spent 1.50: a budget that goes on must be above that"])
    registry.create("job2", "s3://b/q/", (Task.MODERATION,), "postgresql://db/x", "imagemill")
    registry.end_listing("job2", 0)
    code, lines = run_main(["budget", "job2", "5"], monkeypatch, capsys)
    assert (code, lines) == (2, ["error: job job2 is done: only a running job or one over its budget takes a budget"])


def test_a_running_jobs_budget_changes_in_place(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("IMAGEMILL_BROKER_URL", redis_url)
    registry = JobRegistry(redis_url)
    registry.create("job3", "s3://b/r/", (Task.MODERATION,), "postgresql://db/x", "imagemill")
    code, _ = run_main(["budget", "job3", "7.5"], monkeypatch, capsys)
    assert code == 0 and registry.get("job3").budget == 7.5 and registry.state("job3") == JobState.RUNNING
