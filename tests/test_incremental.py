"""Incremental runs and scheduled scans: only new or changed images are annotated again."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imagemill.cli.schedules import parse_every
from imagemill.core.jobs import JobRegistry, JobState
from imagemill.core.sinks.files import read_records
from imagemill.local.run import WRITE_EVERY
from imagemill.producer.beat import SCHEDULE_KEY_PREFIX
from tests.fixtures.cli import REPO, run_cli
from tests.fixtures.distributed import rows, submitted, upload_photos, wait_for
from tests.fixtures.faults import FAULTS_DIR, with_faults
from tests.fixtures.images import photo_jpeg, write_mixed
from tests.fixtures.workers import start_worker

pytestmark = pytest.mark.slow  # whole local and distributed runs, repeated


def summary_count(stderr: str, label: str) -> int:
    match = re.search(rf"{label}\s*│\s*([\d,]+)", stderr)
    return int(match.group(1).replace(",", "")) if match else 0


def test_annotate_again_skips_what_the_output_holds_and_redoes_changes_and_errors(
    model_env: dict[str, str], tmp_path: Path
) -> None:
    folder = tmp_path / "photos"
    cases = write_mixed(folder)
    broken = sum(1 for c in cases if c.expected_error)
    out = tmp_path / "out.jsonl"
    first = run_cli("annotate", str(folder), "--tasks", "moderation", "--out", str(out), env=model_env)
    assert first.returncode == 0, first.stderr

    (folder / "new.jpg").write_bytes(photo_jpeg(200, 150, seed=9))
    changed = folder / "photo_medium.jpg"
    changed.write_bytes(photo_jpeg(640, 480, seed=5))
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))  # a new version: a new etag
    second = run_cli("annotate", str(folder), "--tasks", "moderation", "--out", str(out), env=model_env)
    assert second.returncode == 0, second.stderr
    good = len(cases) - broken
    assert summary_count(second.stderr, "skipped") == good - 1
    assert summary_count(second.stderr, "annotated") == 2  # the new and the changed photo
    records = read_records(out)
    assert len(records) == len({r.uri for r in records}) == len(cases) + 1  # one record per image

    forced = run_cli("annotate", str(folder), "--tasks", "moderation", "--out", str(out), "--force", env=model_env)
    assert summary_count(forced.stderr, "skipped") == 0 and summary_count(forced.stderr, "annotated") == good + 1


def test_a_threshold_that_changes_outputs_changes_the_signature_so_everything_is_redone(
    model_env: dict[str, str], tmp_path: Path
) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.jpg").write_bytes(photo_jpeg(120, 90, seed=i))
    out = tmp_path / "out.parquet"
    assert run_cli("annotate", str(folder), "--tasks", "moderation", "--out", str(out), env=model_env).returncode == 0
    before = {r.signature for r in read_records(out)}
    env = {**model_env, "IMAGEMILL_MODERATION_THRESHOLDS": '{"nsfw": 0.9}'}
    again = run_cli("annotate", str(folder), "--tasks", "moderation", "--out", str(out), env=env)
    assert summary_count(again.stderr, "skipped") == 0 and summary_count(again.stderr, "annotated") == 3
    after = read_records(out)
    assert len(after) == 3 and len({r.signature for r in after}) == 1 and after[0].signature not in before


def test_submit_again_skips_objects_the_sink_already_holds(dist_env, bucket, pg_url, workers, tmp_path: Path) -> None:
    keys = upload_photos(dist_env["IMAGEMILL_S3_ENDPOINT_URL"], bucket, "inc/", 6)
    workers.append(start_worker(dist_env, tmp_path / "worker.log").wait_ready())
    args = ("submit", f"s3://{bucket}/inc/", "--tasks", "moderation", "--wait")
    first = submitted(run_cli(*args, env=dist_env))
    upload_photos(dist_env["IMAGEMILL_S3_ENDPOINT_URL"], bucket, "inc/", 0, ["late.jpg"])
    second = submitted(run_cli(*args, env=dist_env))
    registry = JobRegistry(dist_env["IMAGEMILL_BROKER_URL"])
    job = registry.get(second)
    assert second != first and job.state == JobState.DONE
    assert (job.listed, job.skipped, job.annotated) == (len(keys) + 1, len(keys), 1)
    assert [r[0] for r in rows(pg_url, second)] == [f"s3://{bucket}/inc/late.jpg"]
    forced = registry.get(submitted(run_cli(*args, "--force", env=dist_env)))
    assert (forced.skipped, forced.annotated) == (0, len(keys) + 1)


@pytest.mark.parametrize(("text", "seconds"), [("45s", 45), ("15m", 900), ("1h30m", 5400), ("1d", 86400)])
def test_schedule_intervals_parse(text: str, seconds: int) -> None:
    assert parse_every(text).total_seconds() == seconds


@pytest.mark.parametrize("text", ["", "1x", "h", "10", "1h 2q"])
def test_bad_schedule_intervals_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="--every"):
        parse_every(text)


def start_beats(env: dict[str, str], tmp_path: Path, names: tuple[str, ...]) -> list[tuple[subprocess.Popen, Path]]:
    """`imagemill beat` processes, each logging to tmp_path/<name>.log."""
    beats = []
    for name in names:
        path = tmp_path / f"{name}.log"
        process = subprocess.Popen(
            [sys.executable, "-m", "imagemill", "beat"],
            env={**os.environ, **env, "PYTHONPATH": str(REPO)},
            stdout=path.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        beats.append((process, path))
    return beats


def stop_beats(beats: list[tuple[subprocess.Popen, Path]]) -> None:
    for process, _ in beats:  # all signalled before any is waited for: no takeover during teardown
        process.terminate()
    for process, _ in beats:
        process.wait(timeout=30)


def firings(beats: list[tuple[subprocess.Popen, Path]], name: str = "nightly") -> list[int]:
    return [path.read_text().count(f"Sending due task {name}") for _, path in beats]


def test_scheduled_scans_annotate_only_what_was_added_between_firings_and_a_second_beat_waits(
    dist_env, bucket, pg_url, workers, tmp_path: Path
) -> None:
    keys = upload_photos(dist_env["IMAGEMILL_S3_ENDPOINT_URL"], bucket, "sched/", 4)
    env = {**dist_env, "IMAGEMILL_BEAT_INTERVAL_S": "1"}
    added = run_cli(
        "schedule", "add", "nightly", f"s3://{bucket}/sched/", "--every", "3s", "--tasks", "moderation", env=env
    )
    assert added.returncode == 0, added.stderr
    workers.append(start_worker(env, tmp_path / "worker.log").wait_ready())
    beats = start_beats(env, tmp_path, ("beat-a", "beat-b"))
    registry = JobRegistry(env["IMAGEMILL_BROKER_URL"])
    try:

        def finished_jobs():
            return [j for j in registry.recent(50) if j.state == JobState.DONE]

        wait_for(lambda: any(j.annotated == 4 for j in finished_jobs()), 120, "the first scan to annotate everything")
        upload_photos(env["IMAGEMILL_S3_ENDPOINT_URL"], bucket, "sched/", 0, ["new-1.jpg", "new-2.jpg"])
        wait_for(
            lambda: any(j.annotated == 2 and j.skipped == 4 for j in finished_jobs()), 120, "a scan of the new objects"
        )
        listing = run_cli("schedule", "list", env=env)
        assert "nightly" in listing.stdout and "0:00:03" in listing.stdout
        # checked while both still run: the lock is held, and only its holder has fired (at least twice)
        assert registry.redis.exists(f"{SCHEDULE_KEY_PREFIX}lock")
        fired = firings(beats)
        assert sorted(fired)[0] == 0 and sorted(fired)[1] >= 2, fired
    finally:
        stop_beats(beats)
    uris = [r[0] for r in rows(pg_url)]
    expected = [f"s3://{bucket}/{k}" for k in keys] + [f"s3://{bucket}/sched/new-{i}.jpg" for i in (1, 2)]
    assert sorted(u for u in uris if u.startswith(f"s3://{bucket}/sched/")) == sorted(expected)
    removed = run_cli("schedule", "remove", "nightly", env=env)
    assert removed.returncode == 0 and "nightly" not in run_cli("schedule", "list", env=env).stdout


def test_when_the_beat_holding_the_lock_stops_the_waiting_one_takes_over(dist_env, bucket, tmp_path: Path) -> None:
    """No worker needed: firing is beat's part (the scans it sends wait in the queue)."""
    env = {**dist_env, "IMAGEMILL_BEAT_INTERVAL_S": "1"}
    added = run_cli("schedule", "add", "nightly", f"s3://{bucket}/x/", "--every", "1s", env=env)
    assert added.returncode == 0, added.stderr
    beats = start_beats(env, tmp_path, ("beat-a", "beat-b"))
    try:
        wait_for(lambda: max(firings(beats)) >= 2, 120, "one beat to fire twice")
        fired = firings(beats)
        assert min(fired) == 0, fired  # the other waits for the lock
        holder, standby = beats if fired[0] else beats[::-1]
        holder[0].terminate()
        holder[0].wait(timeout=30)
        wait_for(lambda: "Sending due task nightly" in standby[1].read_text(), 120, "the waiting beat to take over")
    finally:
        stop_beats(beats)


FIRING = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): \w+/\w+\] Scheduler: Sending due task nightly", re.M)


def timed_firings(beats: list[tuple[subprocess.Popen, Path]]) -> dict[str, list[str]]:
    """Each beat's firings of `nightly`, by the time its log gives them: who sent what, when."""
    return {path.stem: FIRING.findall(path.read_text()) for _, path in beats}


def test_a_beat_whose_lock_lapsed_fires_nothing_while_the_other_holds_it_then_stands_by(
    redis_url: str, tmp_path: Path
) -> None:
    """A beat paused (SIGSTOP: a long GC, a frozen VM) past its lock's timeout loses the lock to the
    waiting beat. Resumed, it must not fire while the other holds the lock, and it must wait for
    the lock again, so that it takes over when the other one stops."""
    photos, out = tmp_path / "photos", tmp_path / "out"
    photos.mkdir()
    out.mkdir()
    env = {"IMAGEMILL_BROKER_URL": redis_url, "IMAGEMILL_BEAT_INTERVAL_S": "0.5", "IMAGEMILL_BEAT_LOCK_TIMEOUT_S": "4"}
    added = run_cli("schedule", "add", "nightly", str(photos), "--every", "1s", "--sink", out.as_uri(), env=env)
    assert added.returncode == 0, added.stderr
    beats = start_beats(env, tmp_path, ("beat-a", "beat-b"))
    try:
        wait_for(lambda: max(firings(beats)) >= 2, 120, "one beat to fire twice")
        assert min(firings(beats)) == 0, timed_firings(beats)
        holder, standby = beats if firings(beats)[0] else beats[::-1]
        os.killpg(holder[0].pid, signal.SIGSTOP)  # the whole `imagemill beat`: its worker and beat process
        fired_before_the_pause = firings([holder])[0]
        wait_for(lambda: firings([standby])[0] >= 1, 120, "the waiting beat to take the lapsed lock")
        logged_before_the_resume = len(holder[1].read_text())
        os.killpg(holder[0].pid, signal.SIGCONT)
        # its first tick after the pause renews the lock, or finds it gone, and says so
        wait_for(lambda: "lock" in holder[1].read_text()[logged_before_the_resume:], 120, "the resumed beat to tick")
        after_resume = firings([standby])[0]
        wait_for(lambda: firings([standby])[0] >= after_resume + 2, 120, "the new holder to go on firing")
        assert firings([holder])[0] == fired_before_the_pause, (
            f"fired while the other held the lock: {timed_firings(beats)}"
        )

        standby[0].terminate()  # the new holder goes (releasing the lock): the resumed beat stood by for it
        standby[0].wait(timeout=30)
        wait_for(lambda: firings([holder])[0] > fired_before_the_pause, 120, "the resumed beat to take the lock back")
    finally:
        for process, _ in beats:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGCONT)
        stop_beats(beats)


def ctrl_c_as_in_a_terminal() -> None:
    """In the child before exec: SIGINT back to its default, as a terminal's foreground job has it.

    A runner started in the background (`cmd &` in a script, nohup, some CI agents) ignores SIGINT,
    and children inherit that: Python then never turns Ctrl-C into KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_an_interrupted_run_leaves_the_earlier_output_untouched(model_env: dict[str, str], tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(5):
        (folder / f"{i}.jpg").write_bytes(photo_jpeg(120, 90, seed=i))
    out = tmp_path / "out.jsonl"
    args = ("annotate", str(folder), "--tasks", "moderation", "--out", str(out))
    assert run_cli(*args, env=model_env).returncode == 0
    before = out.read_bytes()
    partial = out.with_name(f".{out.name}.partial")
    slow = with_faults(model_env, {"sleep_per_image_s": 2})  # the run is still going when Ctrl-C comes
    run = subprocess.Popen(
        [sys.executable, "-m", "imagemill", *args, "--force", "-q"],
        env={**os.environ, **slow, "PYTHONPATH": os.pathsep.join([FAULTS_DIR, str(REPO)])},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=ctrl_c_as_in_a_terminal,
    )
    try:
        wait_for(partial.exists, 120, "the run to open its output")  # models loaded, annotating
        assert run.poll() is None
        run.send_signal(signal.SIGINT)
        _, stderr = run.communicate(timeout=60)
    finally:
        run.kill()
        run.wait()
    assert run.returncode == 130, stderr
    assert out.read_bytes() == before  # a run that did not complete never replaces the output


def test_a_local_run_killed_mid_write_leaves_the_earlier_output_intact(
    model_env: dict[str, str], tmp_path: Path
) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    count = 2 * WRITE_EVERY + 2  # annotate writes every WRITE_EVERY records: two writes, then the rest
    for i in range(count):
        (folder / f"{i:03}.jpg").write_bytes(photo_jpeg(64, 48, seed=i))
    out = tmp_path / "out.jsonl"
    args = ("annotate", str(folder), "--tasks", "moderation", "--out", str(out))
    assert run_cli(*args, env=model_env).returncode == 0
    before = out.read_bytes()
    partial = out.with_name(f".{out.name}.partial")
    slow = with_faults(model_env, {"sleep_per_image_s": 0.1})  # a write every ~6 s
    run = subprocess.Popen(
        [sys.executable, "-m", "imagemill", *args, "--force", "-q"],
        env={**os.environ, **slow, "PYTHONPATH": os.pathsep.join([FAULTS_DIR, str(REPO)])},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # mid-write: the first batch's records are on disk, the rest are still to come
        wait_for(lambda: partial.exists() and partial.read_bytes().count(b"\n") >= 1, 120, "a first written batch")
        assert run.poll() is None
        run.send_signal(signal.SIGKILL)
    finally:
        run.kill()
        run.wait()
    assert out.read_bytes() == before  # the old output, byte for byte
    assert partial.read_bytes().count(b"\n") < count  # what was written stayed beside it, unfinished
