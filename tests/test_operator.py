"""What operators tripped over (issue 17), each as an operator meets it: the command, its output and
exit status, against real parts (tiny models, Redis, PostgreSQL, the S3 server, a real worker)."""

import io
import json
import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest
import redis
from PIL import Image
from psycopg import sql
from redbeat import RedBeatSchedulerEntry
from typer.testing import CliRunner

from imagemill.cli import app as cli_app
from imagemill.core.credentials import with_own_credentials, without_credentials
from imagemill.core.errors import ErrorKind
from imagemill.core.jobs import JobRegistry, JobState
from imagemill.core.settings import Settings
from imagemill.core.sinks import open_sink
from imagemill.core.sinks.files import JsonlSink
from imagemill.core.sinks.s3tags import ObjectTagsSink
from imagemill.core.tasks import Task
from imagemill.local.run import LocalRun
from imagemill.pipeline.engine import Engine
from imagemill.pipeline.prepare.decode import decode
from imagemill.pipeline.run import run
from imagemill.pipeline.sources import open_source
from imagemill.producer.beat import SCHEDULE_KEY_PREFIX, make_producer_app
from imagemill.producer.scans import scan
from tests.fixtures.cli import REPO, run_cli
from tests.fixtures.distributed import submitted, upload_photos, wait_for
from tests.fixtures.faults import FAULTS_DIR
from tests.fixtures.images import write_photos
from tests.fixtures.postgres import private_postgres
from tests.fixtures.workers import start_worker

UNREACHABLE_REDIS = "redis://127.0.0.1:9/0"  # nothing listens: a command that asks Redis fails differently


def imagemill(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`imagemill ARGS` as in a pipe or a CI log: no terminal and no COLUMNS, so 80 columns."""
    full_env = {**os.environ, **(env or {}), "PYTHONPATH": os.pathsep.join([FAULTS_DIR, str(REPO)])}
    full_env.pop("COLUMNS", None)
    return subprocess.run(
        [sys.executable, "-m", "imagemill", *args], env=full_env, capture_output=True, text=True, timeout=120
    )


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The command failed with exit 2 and said why in exactly one `error:` line, nothing else."""
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert result.stdout == ""
    return lines[0]


# 1. s3tags:// with a folder or a manifest -----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["folder", "manifest"])
def test_s3tags_sink_with_a_folder_or_manifest_source_is_refused_before_anything_is_enqueued(
    tmp_path: Path, kind: str
) -> None:
    photos = write_photos(tmp_path / "photos", 2, 32, 24)
    source = tmp_path / "photos"
    if kind == "manifest":
        source = tmp_path / "list.txt"
        source.write_text("\n".join(str(p) for p in photos) + "\n")
    # Redis is unreachable: the refusal comes before the job registry (or the S3 check) is asked anything
    result = imagemill("submit", str(source), "--sink", "s3tags://", env={"IMAGEMILL_BROKER_URL": UNREACHABLE_REDIS})
    line = one_error_line(result)
    assert "s3tags://" in line and "s3://bucket/prefix SOURCE" in line and str(source) in line


@pytest.fixture(scope="module")
def moderation_engine(tiny_models: dict[str, Path]) -> Iterator[Engine]:
    settings = Settings(moderation_model=str(tiny_models["moderation"]), device="cpu", batch_size=4)
    with Engine(settings, (Task.MODERATION,)) as engine:
        yield engine


def test_records_a_sink_cannot_write_are_counted_as_failed_not_written(
    moderation_engine: Engine, tmp_path: Path
) -> None:
    write_photos(tmp_path / "photos", 3, 32, 24)
    refs = list(open_source(str(tmp_path / "photos"), Settings()).refs())
    # a chunk of local files reaching the object-tags sink (a job submitted before the refusal existed)
    ran = run(refs, moderation_engine, ObjectTagsSink(), chunk="job/000000")
    assert dict(ran.outcomes) == {ErrorKind.NOT_WRITTEN.value: 3}  # the job's `failed` shows them


# 2. whole job ids in a pipe, and --json -----------------------------------------------------------------------


def test_jobs_and_status_show_whole_ids_in_a_pipe_and_as_json(redis_url: str) -> None:
    registry = JobRegistry(redis_url)
    source = "s3://a-bucket-with-a-long-name/and/a/deep/prefix/of/photos/2026/11/"
    ids = [f"{i:x}" * 12 for i in range(10, 13)]
    for job_id in ids:
        registry.create(job_id, source, (Task.MODERATION,), "postgresql://im:pw@db/annotations", "imagemill")
    env = {"IMAGEMILL_BROKER_URL": redis_url}

    listing = imagemill("jobs", env=env)
    assert listing.returncode == 0, listing.stderr
    assert all(job_id in listing.stdout for job_id in ids), listing.stdout

    documents = json.loads(imagemill("jobs", "--json", env=env).stdout)
    assert sorted(d["id"] for d in documents) == sorted(ids)
    one = json.loads(imagemill("status", ids[0], "--json", env=env).stdout)
    assert (one["id"], one["state"], one["source"], one["processed"]) == (ids[0], "running", source, 0)
    assert one["sink"] == "postgresql://im@db/annotations"


# 3. progress per image ------------------------------------------------------------------------------------------


class RecordingProgress:
    """Stands in for the Rich progress bar: remembers each advance and the records written by then."""

    def __init__(self) -> None:
        self.advances: list[float] = []
        self.at_first_write: int | None = None

    def advance(self, _task: Any, advance: float = 1) -> None:
        self.advances.append(advance)

    def update(self, _task: Any, **_: Any) -> None:
        pass


def test_the_local_progress_bar_advances_once_per_image_before_the_write(
    model_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_photos(tmp_path / "photos", 52, 48, 32)
    bar = RecordingProgress()
    write = JsonlSink.write

    def noting_write(self: JsonlSink, records: Any, chunk: str = "") -> None:
        if bar.at_first_write is None:
            bar.at_first_write = len(bar.advances)
        write(self, records, chunk)

    monkeypatch.setattr(JsonlSink, "write", noting_write)
    settings = Settings()
    # what `imagemill annotate` hands the local run: the bar moves on each record as it leaves the engine
    local = LocalRun(str(tmp_path / "photos"), (Task.MODERATION,), tmp_path / "out.jsonl", settings)
    outcomes = local.run(on_record=lambda _: bar.advance(0)).outcomes
    assert outcomes["annotated"] == 52
    assert bar.advances == [1] * 52  # one step per image as it leaves the engine
    # 52 records are one write batch (64): the bar had moved 52 times before anything was written
    assert bar.at_first_write == 52


# 4. no password in Redis ------------------------------------------------------------------------------------------


def test_stored_sink_urls_have_no_password_and_a_worker_adds_its_own() -> None:
    given = "postgresql://imagemill:s3cr/t@pw@db.internal:5432/annotations?table=t&password=x2&sslmode=require"
    stored = without_credentials(given)
    assert stored == "postgresql://imagemill@db.internal:5432/annotations?table=t&sslmode=require"
    own = "postgres://imagemill:w0rker@DB.internal:5432/annotations"
    assert (
        with_own_credentials(stored, own)
        == "postgresql://imagemill:w0rker@db.internal:5432/annotations?table=t&sslmode=require"
    )
    # another server, database or user: not ours to give; libpq's PGPASSWORD/PGPASSFILE/service apply
    for other in (
        "postgresql://imagemill:w@other/annotations",
        "postgresql://imagemill:w@db.internal:5432/x",
        "postgresql://admin:w@db.internal:5432/annotations",
        None,
    ):
        assert with_own_credentials(stored, other) == stored
    assert without_credentials("s3://bucket/prefix/") == "s3://bucket/prefix/"
    assert without_credentials("s3tags://?prefix=img-") == "s3tags://?prefix=img-"


# 5. file:// manifest entries are incremental ------------------------------------------------------------------


def test_a_file_uri_in_a_manifest_is_the_same_ref_as_its_path(tmp_path: Path) -> None:
    (photo,) = write_photos(tmp_path / "photos", 1, 32, 24)
    manifest = tmp_path / "list.jsonl"
    manifest.write_text(json.dumps({"uri": photo.as_uri()}) + "\n" + json.dumps({"uri": str(photo)}) + "\n")
    by_uri, by_path = open_source(str(manifest), Settings()).refs()
    assert by_uri == by_path and by_uri.etag is not None and by_uri.size == photo.stat().st_size


@pytest.mark.slow
def test_a_manifest_of_file_uris_is_skipped_on_the_second_run(model_env: dict[str, str], tmp_path: Path) -> None:
    photos = write_photos(tmp_path / "photos", 3, 32, 24)
    manifest = tmp_path / "list.txt"
    manifest.write_text("".join(p.as_uri() + "\n" for p in photos))
    out = tmp_path / "out.jsonl"
    first = run_cli("annotate", str(manifest), "--tasks", "moderation", "--out", str(out), "-q")
    assert first.returncode == 0, first.stderr
    second = run_cli("annotate", str(manifest), "--tasks", "moderation", "--out", str(out), "-q")
    assert second.returncode == 0, second.stderr
    assert re.search(r"annotated\W+0\b", second.stderr) and re.search(r"skipped\W+3\b", second.stderr), second.stderr


# 8. inputs refused -------------------------------------------------------------------------------------------------


def test_retry_with_an_unknown_error_kind_is_refused() -> None:
    line = one_error_line(
        imagemill("retry", "0123456789ab", "--kind", "nonsense", env={"IMAGEMILL_BROKER_URL": UNREACHABLE_REDIS})
    )
    assert "nonsense" in line and "worker_lost" in line


def test_an_unknown_task_in_routes_is_refused_naming_the_variable() -> None:
    line = one_error_line(imagemill("jobs", env={"IMAGEMILL_ROUTES": '{"captoin": "gpu-big"}'}))
    assert line.startswith("error: IMAGEMILL_ROUTES=") and "captoin" in line and "caption" in line


def test_schedule_add_with_a_bucket_that_does_not_exist_is_refused(s3_endpoint: str) -> None:
    env = {"IMAGEMILL_S3_ENDPOINT_URL": s3_endpoint, "IMAGEMILL_BROKER_URL": UNREACHABLE_REDIS}
    args = ("schedule", "add", "hourly", "s3://no-such-bucket-here/photos/", "--sink", "postgresql://im@db/a")
    line = one_error_line(imagemill(*args, env=env))
    assert "no-such-bucket-here does not exist" in line


# 9. messages that point the right way ---------------------------------------------------------------------------


def heic_bytes() -> bytes:
    # encoded by the heic extra (pillow-heif), which the dev install has
    import pillow_heif

    pillow_heif.register_heif_opener()
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 40, 40)).save(buffer, format="HEIF")
    return buffer.getvalue()


def test_a_heic_photo_decodes_with_the_heic_extra() -> None:
    decoded = decode(heic_bytes(), max_pixels=10**8)
    assert (decoded.width, decoded.height, decoded.format) == (64, 48, "HEIF")


def test_a_heic_photo_without_the_plugin_is_unsupported_naming_the_extra(tmp_path: Path) -> None:
    (tmp_path / "a.heic").write_bytes(heic_bytes())
    # a Python without pillow-heif: its import is blocked before imagemill loads
    script = (
        "import sys; sys.modules['pillow_heif'] = None\n"
        "from imagemill.core.errors import ImageError\n"
        "from imagemill.pipeline.prepare.decode import decode\n"
        "try:\n    decode(open(sys.argv[1], 'rb').read(), max_pixels=10**8)\n"
        "except ImageError as exc:\n    print(exc.kind.value, exc.message)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "a.heic")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=True,
    ).stdout
    assert out.startswith("unsupported ") and "imagemill[heic]" in out


@pytest.mark.slow
def test_a_caption_model_path_that_does_not_exist_says_no_such_directory(tmp_path: Path) -> None:
    write_photos(tmp_path / "photos", 1, 32, 24)
    result = run_cli(
        "annotate",
        str(tmp_path / "photos"),
        "--tasks",
        "caption",
        "--out",
        str(tmp_path / "o.jsonl"),
        env={"IMAGEMILL_CAPTION_MODEL": "/nonexistent"},
    )
    assert result.returncode == 3
    assert result.stderr.strip().splitlines()[-1] == (
        "error: cannot load the caption model '/nonexistent': no such directory (IMAGEMILL_CAPTION_MODEL)"
    )


def test_an_unknown_device_exits_2_with_the_choices(tmp_path: Path) -> None:
    line = one_error_line(imagemill("annotate", str(tmp_path), "--device", "tpu"))
    assert line == "error: --device tpu: expected auto, cpu, cuda or cuda:N"


def test_help_shows_flags_as_switches_and_every_sink_scheme() -> None:
    help_text = imagemill("submit", "--help").stdout
    rows = [row.strip("│ ") for row in help_text.splitlines()]
    flag_rows = [row for row in rows if row.startswith(("--wait ", "--force ", "--help "))]
    assert len(flag_rows) == 3 and not any("<bool>" in row for row in flag_rows), help_text
    assert "<str>" in help_text  # options that take a value still show its type
    flat = " ".join(help_text.replace("│", " ").split())
    for scheme in ("postgresql://", "s3://", "file://", "s3tags://"):
        assert scheme in flat, help_text


# 4, 6, 7 with a real worker --------------------------------------------------------------------------------------


def password_role(pg_url: str) -> tuple[str, str, str]:
    """A login role with a password in the test database, and a table of its own; (sink URL, password, table)."""
    suffix = secrets.token_hex(4)
    role, password, table = f"imagemill_ops_{suffix}", f"Pw-{secrets.token_hex(8)}", f"ops_{suffix}"
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(role), sql.Literal(password)))
        conn.execute(sql.SQL("GRANT USAGE, CREATE ON SCHEMA public TO {}").format(sql.Identifier(role)))
    # the store's schema-version table is one per database, made by whoever came first (the owner
    # here, as a DBA would): the role gets to read and stamp it, as the README's Security section says
    with open_sink(pg_url) as store:
        store.check()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(sql.SQL("GRANT SELECT, INSERT, UPDATE ON imagemill_meta TO {}").format(sql.Identifier(role)))
    parts = urlsplit(pg_url)
    sink = f"postgresql://{role}:{password}@{parts.hostname}:{parts.port or 5432}{parts.path}?table={table}"
    return sink, password, table


def redis_dump(redis_url: str) -> dict[str, str]:
    """Every key in Redis with everything it holds (strings, hashes, lists, sets, sorted sets, streams), as text."""
    client = redis.Redis.from_url(redis_url)
    dump = {}
    for key in client.scan_iter(count=1000):
        kind = client.type(key).decode()
        readers = {
            "string": lambda k: client.get(k),
            "hash": lambda k: client.hgetall(k),
            "list": lambda k: client.lrange(k, 0, -1),
            "set": lambda k: client.smembers(k),
            "zset": lambda k: client.zrange(k, 0, -1, withscores=True),
            "stream": lambda k: client.xrange(k),
        }
        value = readers[kind](key)
        dump[key.decode(errors="replace")] = repr(value)
    return dump


def test_a_json_worker_whose_pool_child_is_killed_logs_only_json_and_redis_never_holds_the_sink_password(
    dist_env, bucket, redis_url, pg_url, workers, tmp_path: Path
) -> None:
    sink, password, table = password_role(pg_url)
    names = ["a.jpg", "b.jpg", "c.jpg", "poison.jpg"]
    upload_photos(dist_env["IMAGEMILL_S3_ENDPOINT_URL"], bucket, "ops/", 0, names)
    env = {
        **dist_env,
        "IMAGEMILL_SINK": sink,  # the worker's own: the password reaches it only through its environment
        "IMAGEMILL_LOG_FORMAT": "json",
        "IMAGEMILL_MAX_WORKER_LOSSES": "1",
        "IMAGEMILL_TEST_FAULTS": json.dumps({"crash_on_uri": "poison"}),
    }
    worker = start_worker(env, tmp_path / "worker.log").wait_ready()
    workers.append(worker)
    result = run_cli(
        "submit",
        f"s3://{bucket}/ops/",
        "--tasks",
        "moderation",
        "--chunk-size",
        "2",
        "--sink",
        sink,
        "--wait",
        env={**env, "IMAGEMILL_SINK": ""},
        timeout=240,
    )
    job_id = submitted(result)
    job = JobRegistry(redis_url).get(job_id)
    assert job.state == JobState.DONE and job.failed_by_kind == {"worker_lost": 2}, job
    with psycopg.connect(pg_url) as conn:
        written = conn.execute(sql.SQL("select count(*) from {}").format(sql.Identifier(table))).fetchone()[0]
    assert written == 4

    # 4: the job, its chunks, the queue, the signatures, Celery's own keys: no password anywhere in Redis
    dump = redis_dump(redis_url)
    assert dump and not [key for key, value in dump.items() if password in key or password in value]
    assert without_credentials(sink) in dump[JobRegistry.key(job_id)]

    # 7: the pool child was SIGKILLed; every line the worker wrote is JSON, the loss carries the job id
    lines = [line for line in worker.log.splitlines() if line.strip()]
    entries = []
    for line in lines:
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"not JSON: {line!r}")
    lost = [e for e in entries if "signal 9" in e["message"] or "WorkerLostError" in json.dumps(e)]
    assert lost and all(e["job_id"] == job_id for e in lost), lost

    # 6: idle, it exits at once on SIGTERM, not after IMAGEMILL_SOFT_SHUTDOWN_TIMEOUT (60 s)
    started = time.monotonic()
    assert worker.stop(timeout=60) == 0
    assert time.monotonic() - started < 6, worker.log[-3000:]


def test_a_schedule_keeps_no_sink_password_in_redis_and_its_scan_logs_in_with_the_beats_own(
    redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`schedule add --sink postgresql://user:password@…`: the schedule in Redis names the sink
    without the password, and the scan the beat fires with it logs in with the beat's IMAGEMILL_SINK
    (on a server that asks for passwords: trust auth would let a scan without one pass)."""
    folder = tmp_path / "photos"
    write_photos(folder, 2, 32, 24)
    password = f"Pw-{secrets.token_hex(8)}"
    with private_postgres(passwords=True) as server:
        with server.admin() as admin:
            admin.execute(sql.SQL("CREATE ROLE scheduler LOGIN PASSWORD {}").format(sql.Literal(password)))
            admin.execute("CREATE DATABASE annotations OWNER scheduler")
        sink = f"postgresql://scheduler:{password}@127.0.0.1:{server.port}/annotations"
        with pytest.raises(psycopg.OperationalError, match=r"no password supplied|password authentication failed"):
            psycopg.connect(without_credentials(sink), connect_timeout=5).close()

        monkeypatch.setenv("IMAGEMILL_BROKER_URL", redis_url)
        monkeypatch.delenv("IMAGEMILL_SINK", raising=False)
        added = CliRunner().invoke(
            cli_app, ["schedule", "add", "nightly", str(folder), "--tasks", "moderation", "--sink", sink]
        )
        assert added.exit_code == 0, added.output
        dump = redis_dump(redis_url)
        key = f"{SCHEDULE_KEY_PREFIX}nightly"
        assert not [k for k, value in dump.items() if password in k or password in value]
        assert without_credentials(sink) in dump[key]

        # what the beat's worker runs when the schedule fires: the stored arguments, its own environment
        monkeypatch.setenv("IMAGEMILL_SINK", sink)
        entry = RedBeatSchedulerEntry.from_key(key, app=make_producer_app(Settings()))
        fired = scan(*entry.args)
        assert fired["chunks"] == 1
        job = JobRegistry(redis_url).get(fired["job_id"])
        assert job is not None and job.sink == without_credentials(sink)
        assert not [k for k, value in redis_dump(redis_url).items() if password in k or password in value]


def test_a_busy_worker_stopped_finishes_its_chunk_and_exits_without_waiting_out_the_timeout(
    dist_env, bucket, redis_url, workers, tmp_path: Path
) -> None:
    upload_photos(dist_env["IMAGEMILL_S3_ENDPOINT_URL"], bucket, "busy/", 4)
    env = {**dist_env, "IMAGEMILL_TEST_FAULTS": json.dumps({"sleep_per_image_s": 0.5})}  # a 2 s chunk
    worker = start_worker(env, tmp_path / "worker.log").wait_ready()
    workers.append(worker)
    job_id = submitted(run_cli("submit", f"s3://{bucket}/busy/", "--tasks", "moderation", "--chunk-size", "4", env=env))
    registry = JobRegistry(redis_url)
    wait_for(lambda: registry.get(job_id).started_at is not None, 60, "the chunk to start")
    started = time.monotonic()
    assert worker.stop(timeout=90) == 0
    assert time.monotonic() - started < 20  # the chunk's own seconds, not the 60 s timeout
    job = registry.get(job_id)
    assert (job.state, job.annotated, job.chunks_done) == (JobState.DONE, 4, 1)
