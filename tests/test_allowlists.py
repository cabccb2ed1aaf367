"""Workers read and write only where IMAGEMILL_ALLOWED_SOURCES and IMAGEMILL_ALLOWED_SINKS say.

A prefix admits whole path segments of the normalised location: a bucket is not a prefix of a
longer bucket name, a folder not of a longer folder name, and `..`, percent-encoding or a link
never lead out of an allowed folder. Each reference of a chunk is checked; a chunk with one outside
fails whole, naming the setting, before anything is read or written.
"""

import os
from pathlib import Path

import pytest
import yaml

from imagemill.core.jobs import Job, JobRegistry, JobState
from imagemill.core.schemas import ImageRef
from imagemill.core.settings import Settings, SettingsError, get_settings
from imagemill.worker.confinement import NotAllowed, check_chunk
from imagemill.worker.retries import ChunkTask
from tests.fixtures.cli import run_cli
from tests.fixtures.distributed import submitted, wait_for
from tests.fixtures.images import photo_jpeg
from tests.fixtures.workers import WorkerProcess, start_worker

PG_SINK = "postgresql://imagemill@db.internal/annotations"
REPO = Path(__file__).resolve().parents[1]


def settings(sources: str | None = None, sinks: str | None = None) -> Settings:
    given = {"allowed_sources": sources, "allowed_sinks": sinks}
    return Settings(**{name: value for name, value in given.items() if value is not None})


def refs(*uris: str) -> list[ImageRef]:
    return [ImageRef(uri=uri) for uri in uris]


def refusal(uris: list[str], sink: str, allowed: Settings) -> str | None:
    """None when the chunk may run, else the one line it fails with."""
    try:
        check_chunk(refs(*uris), sink, allowed)
    except NotAllowed as exc:
        return str(exc)
    return None


@pytest.mark.parametrize(
    ("uri", "admitted"),
    [
        ("s3://photos/a.jpg", True),
        ("s3://photos/2026/05/a.jpg", True),
        ("s3://photos-evil/a.jpg", False),  # a longer bucket name is another bucket
        ("s3://photo/a.jpg", False),
        ("s3://other/a.jpg", False),
        ("s3://photos/../other/a.jpg", False),  # a server that folds `..` would read another bucket
    ],
)
def test_a_bucket_admits_its_own_objects_only(uri: str, admitted: bool) -> None:
    allowed = settings(sources="s3://photos")
    assert (refusal([uri], PG_SINK, allowed) is None) is admitted


@pytest.mark.parametrize(
    ("uri", "admitted"),
    [
        ("s3://photos/incoming/a.jpg", True),
        ("s3://photos/incoming/deep/a.jpg", True),
        ("s3://photos/incoming2/a.jpg", False),
        ("s3://photos/incoming-evil/a.jpg", False),
        ("s3://photos/private/a.jpg", False),
        ("s3://photos/incoming/../private/a.jpg", False),
        ("s3://photos/a.jpg", False),
    ],
)
def test_a_key_prefix_admits_whole_segments_under_it(uri: str, admitted: bool) -> None:
    allowed = settings(sources="s3://photos/incoming/")
    assert (refusal([uri], PG_SINK, allowed) is None) is admitted


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """data/ (allowed), data2/, secret/, and data/escape, a link out of data/ to secret/."""
    for name in ("data", "data2", "secret"):
        (tmp_path / name).mkdir()
    (tmp_path / "data" / "escape").symlink_to(tmp_path / "secret")
    return tmp_path


@pytest.mark.parametrize(
    ("ref", "admitted"),
    [
        ("file://{t}/data/a.jpg", True),
        ("file://{t}/data/sub/a.jpg", True),
        ("{t}/data/a.jpg", True),  # a bare path, as a manifest may list it
        ("file://{t}/data2/a.jpg", False),  # a longer folder name is another folder
        ("{t}/data2/a.jpg", False),
        ("file://{t}/data/../secret/a.jpg", False),
        ("file://{t}/data/%2e%2e/secret/a.jpg", False),  # percent-encoded `..`: the reader decodes it
        ("file://{t}/data/escape/a.jpg", False),  # a link out of the folder
        ("file:///etc/passwd", False),
        ("/etc/passwd", False),
        ("data/a.jpg", False),  # relative: to the worker's own directory
    ],
)
def test_a_folder_admits_the_files_under_it_as_the_file_system_resolves_them(
    tree: Path, ref: str, admitted: bool
) -> None:
    allowed = settings(sources=f"file://{tree}/data")
    assert (refusal([ref.format(t=tree)], PG_SINK, allowed) is None) is admitted


def test_a_folder_may_be_listed_as_a_bare_path_or_behind_a_link(tree: Path) -> None:
    (tree / "mounted").symlink_to(tree / "data")
    for entry in (f"{tree}/data/", f"file://{tree}/mounted/"):
        assert refusal([f"file://{tree}/data/a.jpg"], PG_SINK, settings(sources=entry)) is None, entry


def test_every_reference_of_a_chunk_is_checked_and_the_refusal_names_the_setting_and_the_references() -> None:
    allowed = settings(sources="s3://photos/")
    outside = ["file:///etc/passwd", "s3://private/a.jpg", "s3://private/b.jpg", "s3://private/c.jpg"]
    message = refusal(["s3://photos/a.jpg", *outside, "s3://photos/b.jpg"], PG_SINK, allowed)
    assert message == (
        "IMAGEMILL_ALLOWED_SOURCES does not allow this chunk to read file:///etc/passwd, s3://private/a.jpg, "
        "s3://private/b.jpg and 1 more (it allows s3://photos/)"
    )


def test_a_bad_manifest_line_reads_nothing_and_is_not_refused() -> None:
    # its record says why the line names no image; its `uri` names the line, not a place
    chunk = [ImageRef(uri="manifest:today.jsonl#L2", problem="no uri on this line"), *refs("s3://photos/a.jpg")]
    check_chunk(chunk, PG_SINK, settings(sources="s3://photos/"))


def test_unset_lists_admit_remote_stores_and_no_local_path(tmp_path: Path) -> None:
    unset = settings()
    assert refusal(["s3://any-bucket/a.jpg"], PG_SINK, unset) is None
    for sink in (PG_SINK, "postgres://u@elsewhere:6543/x", "s3://any-bucket/out/?format=parquet", "s3tags://"):
        assert refusal(["s3://any-bucket/a.jpg"], sink, unset) is None, sink
    assert refusal([f"file://{tmp_path}/a.jpg"], PG_SINK, unset) == (
        f"IMAGEMILL_ALLOWED_SOURCES does not allow this chunk to read file://{tmp_path}/a.jpg "
        "(unset, it allows any s3:// object and no local path)"
    )
    for sink in (f"file://{tmp_path}/out/", f"{tmp_path}/out.jsonl"):
        assert refusal(["s3://any-bucket/a.jpg"], sink, unset) == (
            f"IMAGEMILL_ALLOWED_SINKS does not allow this chunk to write to {sink} "
            "(unset, it allows any postgresql://, s3:// or s3tags:// store and no local path)"
        )


@pytest.mark.parametrize(
    ("sink", "admitted"),
    [
        ("postgresql://imagemill@db.internal/annotations", True),
        ("postgresql://imagemill:pw@DB.internal:5432/annotations?table=records", True),
        ("postgres://other@db.internal/annotations", True),  # the user does not move the records
        ("postgresql://imagemill@db.internal/other", False),
        ("postgresql://imagemill@db.internal:5433/annotations", False),
        ("postgresql://imagemill@db.internal.evil/annotations", False),
        ("postgresql://imagemill@db.internal/annotations?host=evil.example", False),  # libpq reads host= last
        ("postgresql://imagemill@db.internal/annotations?hostaddr=203.0.113.9", False),
        ("postgresql://imagemill@db.internal/annotations?dbname=other", False),
        ("s3://records/out/", True),
        ("s3://records/out/2026/?format=parquet", True),
        ("s3://records/out2/", False),
        ("s3://records/", False),
        ("s3://records-evil/out/", False),
        ("s3://records/out/../../other/", False),
        ("file:///shared/out/", True),
        ("file:///shared/out/../../etc/", False),
        ("file:///shared/output/", False),
        ("/shared/out/records.jsonl", True),
        ("redis://db.internal/0", False),  # no store writes there
    ],
)
def test_a_sink_is_admitted_by_the_server_database_bucket_or_folder_it_writes(sink: str, admitted: bool) -> None:
    allowed = settings(sinks="postgresql://db.internal/annotations,s3://records/out/,file:///shared/out")
    assert (refusal(["s3://photos/a.jpg"], sink, allowed) is None) is admitted


def test_tags_are_written_only_onto_objects_under_an_allowed_s3tags_prefix() -> None:
    allowed = settings(sinks="s3tags://photos/")
    assert refusal(["s3://photos/a.jpg", "s3://photos/b/c.jpg"], "s3tags://", allowed) is None
    assert refusal(["s3://photos/a.jpg", "s3://photos-evil/a.jpg"], "s3tags://?prefix=x-", allowed) == (
        "IMAGEMILL_ALLOWED_SINKS does not allow this chunk to tag s3://photos-evil/a.jpg (it allows s3tags://photos/)"
    )
    assert refusal(["s3://photos/a.jpg"], "s3tags://", settings(sinks=PG_SINK)) is not None


def test_a_refusal_is_a_permanent_fault_of_the_chunk_task() -> None:
    # never retried: Celery fails the task at once and `ChunkTask.on_failure` fails the job with the message
    assert issubclass(NotAllowed, ChunkTask.dont_autoretry_for) and issubclass(NotAllowed, ChunkTask.throws)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for key in list(os.environ):
        if key.upper().startswith("IMAGEMILL_"):
            monkeypatch.delenv(key)
    return monkeypatch


@pytest.mark.parametrize(
    ("variable", "value", "line"),
    [
        (
            "IMAGEMILL_ALLOWED_SOURCES",
            "s3://photos/, ftp://x/",
            "IMAGEMILL_ALLOWED_SOURCES='s3://photos/, ftp://x/': ftp://x/: expected s3://bucket/prefix/, "
            "file:///dir/ or /dir/",
        ),
        (
            "IMAGEMILL_ALLOWED_SOURCES",
            "photos/",
            "IMAGEMILL_ALLOWED_SOURCES='photos/': photos/: expected s3://bucket/prefix/, file:///dir/ or /dir/",
        ),
        (
            "IMAGEMILL_ALLOWED_SOURCES",
            "s3://photos/a/../b/",
            "IMAGEMILL_ALLOWED_SOURCES='s3://photos/a/../b/': s3://photos/a/../b/: "
            "expected s3://bucket/prefix/ without '.' or '..' segments",
        ),
        (
            "IMAGEMILL_ALLOWED_SOURCES",
            "",
            "IMAGEMILL_ALLOWED_SOURCES='': expected at least one URI prefix; unset it for the default",
        ),
        (
            "IMAGEMILL_ALLOWED_SINKS",
            "postgresql://u:s3cret@/annotations",
            "IMAGEMILL_ALLOWED_SINKS='postgresql://u:***@/annotations': postgresql://u:***@/annotations: "
            "expected the database server named, postgresql://host[:port]/db, or postgresql:// for any",
        ),
    ],
)
def test_a_bad_prefix_is_one_line_naming_the_variable(
    clean_env: pytest.MonkeyPatch, variable: str, value: str, line: str
) -> None:
    clean_env.setenv(variable, value)
    with pytest.raises(SettingsError) as caught:
        get_settings()
    assert str(caught.value).splitlines() == [line]


def test_a_worker_fails_a_job_outside_its_allow_lists_at_once_and_reads_and_writes_nothing(
    dist_env: dict[str, str], redis_url: str, workers: list[WorkerProcess], tmp_path: Path
) -> None:
    allowed, outside = tmp_path / "allowed", tmp_path / "photos"
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    for folder in (allowed, outside, out, elsewhere):
        folder.mkdir()
    (allowed / "a.jpg").write_bytes(photo_jpeg(64, 48))
    (outside / "a.jpg").write_bytes(photo_jpeg(64, 48))
    # a worker that opened this to read it would wait for a writer forever, and the job would never fail
    os.mkfifo(outside / "b.jpg")
    env = {**dist_env, "IMAGEMILL_ALLOWED_SOURCES": allowed.as_uri(), "IMAGEMILL_ALLOWED_SINKS": out.as_uri()}
    workers.append(start_worker(env, tmp_path / "worker.log").wait_ready())
    registry = JobRegistry(redis_url)

    def failed_job(source: Path, sink: Path) -> Job:
        # the producer has no allow-lists: what a broker message names reaches the worker as it is
        job_id = submitted(run_cli("submit", str(source), "--tasks", "moderation", "--sink", sink.as_uri(), env=env))
        wait_for(lambda: registry.get(job_id).state != JobState.RUNNING, 120, "the job to end")
        job = registry.get(job_id)
        assert job.state == JobState.FAILED and (job.annotated, job.failed, job.chunks_done) == (0, 0, 0), job
        return job

    read_outside = failed_job(outside, out)
    assert "IMAGEMILL_ALLOWED_SOURCES does not allow this chunk to read" in (read_outside.error or "")
    assert f"{outside.as_uri()}/a.jpg" in (read_outside.error or "")
    write_outside = failed_job(allowed, elsewhere)
    assert f"IMAGEMILL_ALLOWED_SINKS does not allow this chunk to write to {elsewhere.as_uri()}" in (
        write_outside.error or ""
    )
    assert [*out.rglob("*"), *elsewhere.rglob("*")] == []  # nothing written anywhere

    within = run_cli("submit", str(allowed), "--tasks", "moderation", "--sink", out.as_uri(), "--wait", env=env)
    assert within.returncode == 0, within.stderr + workers[0].log[-3000:]
    assert [path.suffix for path in out.rglob("*") if path.is_file()] == [".jsonl"]


def test_the_shipped_deployments_allow_the_source_and_sink_they_ship_and_nothing_local() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    compose_env = compose["x-imagemill-env"]
    k8s = [
        doc
        for name in ("configmap.yaml", "secret.example.yaml")
        for doc in yaml.safe_load_all((REPO / "deploy" / "k8s" / name).read_text())
        if doc
    ]
    k8s_env = {k: v for doc in k8s for k, v in {**doc.get("data", {}), **doc.get("stringData", {})}.items()}
    for env in (compose_env, k8s_env):
        shipped = settings(env["IMAGEMILL_ALLOWED_SOURCES"], env["IMAGEMILL_ALLOWED_SINKS"])
        assert refusal(["s3://photos/2026/a.jpg"], env["IMAGEMILL_SINK"], shipped) is None
        assert refusal(["file:///etc/passwd"], env["IMAGEMILL_SINK"], shipped) is not None
        assert refusal(["s3://photos/a.jpg"], "file:///tmp/", shipped) is not None
