"""Near-duplicates: `imagemill dedup` groups resized and recompressed copies of test photos through
real embeddings; on constructed vectors, connected components of pairs at or above the threshold,
the largest image as representative, tiles smaller than n giving the same groups."""

import io
import json
import secrets
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console
from typer.testing import CliRunner

from imagemill.cli import app, display
from imagemill.core.errors import ErrorKind, UserError
from imagemill.core.schemas import Embedding, ImageInfo, Record, RecordError
from imagemill.core.stores import open_writer
from imagemill.core.stores.files import read_records
from imagemill.pipeline.near_duplicates import Embeddings, collect, components, group, similar_pairs
from tests.fixtures.cli import run_cli
from tests.fixtures.images import write_near_duplicates

# The tiny CLIP's random weights put every photo near one direction (distinct photos measured at
# cosine 0.58-0.98), but its embedding is a deterministic function of the 64-pixel input, which a
# resized or recompressed copy reproduces almost exactly (measured ≥ 0.9999). So copies group and
# distinct photos do not at 0.99, not at the 0.95 that suits real CLIP/SigLIP embeddings; the test
# asserts that margin first, so a change to the tiny model that closes it fails by name.
TINY_CLIP_THRESHOLD = 0.99


def test_dedup_groups_resized_and_recompressed_copies_under_their_original(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    folder = tmp_path / "photos"
    copies = write_near_duplicates(folder, 4)
    (folder / "notes.txt.jpg").write_bytes(b"not an image")  # an error record: counted, not compared
    env = {"IMAGEMILL_TAGS_MODEL": str(tiny_models["tags"]), "IMAGEMILL_DEVICE": "cpu"}
    records = tmp_path / "records.jsonl"
    annotated = run_cli("annotate", str(folder), "--tasks", "embedding", "--out", str(records), "-q", env=env)
    assert annotated.returncode == 0, annotated.stderr

    found = collect([read_records(records)])
    names = [image.uri.rsplit("/", 1)[-1] for image in found.images]
    family = [name.split("_")[1].split(".")[0] for name in names]
    alike = found.vectors @ found.vectors.T
    same = np.equal.outer(family, family)
    assert alike[same].min() > TINY_CLIP_THRESHOLD > alike[~same].max()

    out = tmp_path / "groups.jsonl"
    runner = CliRunner()
    result = runner.invoke(app, ["dedup", str(records), "--threshold", str(TINY_CLIP_THRESHOLD), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "4 groups holding 12 images" in result.stderr and "1 error records" in result.stderr
    groups = [json.loads(line) for line in out.read_text().splitlines()]
    by_representative = {
        g["representative"].rsplit("/", 1)[-1]: [m["uri"].rsplit("/", 1)[-1] for m in g["members"]] for g in groups
    }
    assert {rep: sorted(members[1:]) for rep, members in by_representative.items()} == {
        original: sorted(names) for original, names in copies.items()
    }
    assert all(g["members"][0]["width"] == 640 and g["size"] == 3 for g in groups)
    # at the threshold for real embeddings the tiny model's distinct photos merge: the margin above matters
    loose = runner.invoke(app, ["dedup", str(records), "--out", str(tmp_path / "loose.jsonl"), "-q"])
    assert loose.exit_code == 0 and "4 groups" not in loose.stderr


def test_dedup_refuses_a_bad_threshold_and_an_unreadable_source_in_one_line(tmp_path: Path) -> None:
    runner = CliRunner()
    bad = runner.invoke(app, ["dedup", str(tmp_path / "none.jsonl"), "--threshold", "1.5", "--out", "g.jsonl"])
    assert bad.exit_code == 2 and bad.stderr.count("error:") == 1 and "--threshold must be above 0" in bad.stderr
    gone = runner.invoke(app, ["dedup", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "g.jsonl"), "-q"])
    assert gone.exit_code == 2 and gone.stderr.count("error:") == 1 and "no such file" in gone.stderr
    assert not list(tmp_path.iterdir())


def record(uri: str, vector: list[float], size: tuple[int, int] = (100, 100), nbytes: int = 1000) -> Record:
    return Record(
        uri=uri,
        etag="e",
        bytes=nbytes,
        image=ImageInfo(width=size[0], height=size[1], format="JPEG"),
        embedding=Embedding.of(vector, model="clip"),
        signature="s",
    )


def grouped(records: list[Record], threshold: float, block: int = 4096) -> list[list[str]]:
    """Each group's uris, representative first."""
    return [[m.uri for m in g.members] for g in group(collect([records]), threshold, block)]


def test_the_progress_of_dedup_counts_records_a_second_not_images(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "records.jsonl"
    with open_writer(str(source)) as writer:
        writer.write([record("file:///a.jpg", [1, 0]), record("file:///b.jpg", [0, 1])])
    shown = io.StringIO()
    monkeypatch.setattr(display, "console", Console(file=shown, force_terminal=True, width=200))
    result = CliRunner().invoke(app, ["dedup", str(source), "--out", str(tmp_path / "groups.jsonl")])
    assert result.exit_code == 0, result.output
    assert "records/s" in shown.getvalue() and "img/s" not in shown.getvalue()


def test_a_chain_of_similar_pairs_is_one_group_even_where_its_ends_are_not_alike() -> None:
    # a ~ b and b ~ c at cos 0.96, a and c at cos 0.84: connected components, not cliques
    angle = np.arccos(0.96)
    vectors = {name: [np.cos(k * angle), np.sin(k * angle), 0.0] for k, name in enumerate("abc")}
    vectors["far"] = [0.0, 0.0, 1.0]
    records = [record(f"file:///{name}.jpg", v) for name, v in vectors.items()]
    # same sizes: the first uri represents; the others follow by similarity to it
    assert grouped(records, 0.95) == [["file:///a.jpg", "file:///b.jpg", "file:///c.jpg"]]
    assert grouped(records, 0.97) == []


def test_the_threshold_is_inclusive() -> None:
    # cos = 0.5 exactly in float32: (1,0,0,0) against (½,½,½,½)
    records = [record("file:///a.jpg", [1, 0, 0, 0]), record("file:///b.jpg", [0.5, 0.5, 0.5, 0.5])]
    assert len(grouped(records, 0.5)) == 1
    assert grouped(records, float(np.nextafter(np.float32(0.5), np.float32(1)))) == []


def test_the_representative_is_the_largest_image_then_the_most_bytes_then_the_first_uri() -> None:
    same = [1.0, 0.0]
    by_pixels = [
        record("file:///small.jpg", same, (100, 100), 9000),
        record("file:///big.jpg", same, (200, 100), 10),
    ]
    assert grouped(by_pixels, 0.95)[0][0] == "file:///big.jpg"
    by_bytes = [record("file:///a.jpg", same, (100, 100), 10), record("file:///b.jpg", same, (100, 100), 20)]
    assert grouped(by_bytes, 0.95)[0][0] == "file:///b.jpg"
    by_uri = [record("file:///b.jpg", same), record("file:///a.jpg", same)]
    assert grouped(by_uri, 0.95)[0][0] == "file:///a.jpg"


def test_members_carry_their_similarity_to_the_representative_and_singletons_are_left_out() -> None:
    records = [
        record("file:///copy.jpg", [0.99, 0.141, 0]),
        record("file:///original.jpg", [1, 0, 0], (400, 300)),
        record("file:///alone.jpg", [0, 0, 1]),
    ]
    (only,) = group(collect([records]), 0.95)
    assert only.representative == "file:///original.jpg" and only.size == 2
    assert [m.similarity for m in only.members] == [pytest.approx(1.0), pytest.approx(0.99, abs=1e-3)]


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 60),
    block=st.integers(1, 70),
    seed=st.integers(0, 2**32 - 1),
    threshold=st.sampled_from([0.5, 0.8, 0.95]),
)
def test_tiles_smaller_than_n_give_the_groups_of_one_tile(n: int, block: int, seed: int, threshold: float) -> None:
    rng = np.random.default_rng(seed)
    # few distinct directions, jittered: many pairs across tile borders
    centres = rng.normal(size=(max(1, n // 4), 8)).astype(np.float32)
    vectors = centres[rng.integers(0, len(centres), n)] + rng.normal(scale=0.2, size=(n, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    one_tile = components(n, similar_pairs(vectors, threshold, block=n))
    tiled = components(n, similar_pairs(vectors, threshold, block=block))
    # the same partition (labels may be numbered differently)
    assert np.array_equal(one_tile[:, None] == one_tile[None, :], tiled[:, None] == tiled[None, :])
    # and the partition is the brute-force one: pairs at or above the threshold, closed transitively
    linked = vectors @ vectors.T >= np.float32(threshold)
    closure = linked.copy()
    for k in range(n):
        closure |= closure[:, k : k + 1] & closure[k : k + 1, :]
    assert np.array_equal(closure, one_tile[:, None] == one_tile[None, :])


def test_pending_pairs_are_folded_without_changing_the_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    import imagemill.pipeline.near_duplicates as near

    vectors = np.repeat(np.eye(3, dtype=np.float32), 40, axis=0)  # three groups of 40: 2,340 pairs
    unfolded = components(len(vectors), similar_pairs(vectors, 0.9, block=7))
    monkeypatch.setattr(near, "_PENDING_PAIRS", 10)
    folded = components(len(vectors), similar_pairs(vectors, 0.9, block=7))
    assert np.array_equal(unfolded, folded) and len(np.unique(folded)) == 3


def test_records_without_embeddings_or_with_errors_are_counted_not_grouped() -> None:
    plain = Record(uri="file:///plain.jpg", signature="s")
    broken = Record(uri="file:///x.jpg", error=RecordError(kind=ErrorKind.TRUNCATED, message="cut"), signature="s")
    found: Embeddings = collect([[plain, broken, record("file:///a.jpg", [1, 0])]])
    assert (len(found.images), found.without_embedding, found.without_embedding_shown, found.failed) == (
        1,
        1,
        ["file:///plain.jpg"],
        1,
    )


def test_embeddings_of_two_models_are_refused_in_one_line() -> None:
    other = record("file:///b.jpg", [1, 0]).model_copy(update={"embedding": Embedding.of([1, 0, 0], model="siglip")})
    with pytest.raises(UserError, match=r"file:///b.jpg has an embedding of siglip \(dim 3\), others of clip"):
        collect([[record("file:///a.jpg", [1, 0])], [other]])


@pytest.mark.parametrize("threshold", [0.0, -0.5, 1.5])
def test_a_threshold_outside_0_to_1_is_refused(threshold: float) -> None:
    with pytest.raises(UserError, match="--threshold must be above 0 and at most 1"):
        group(collect([[record("file:///a.jpg", [1, 0])]]), threshold)


def test_a_history_counts_each_image_version_once() -> None:
    # one image annotated under two signatures, and its replacement (another etag) under one
    a = record("file:///a.jpg", [1, 0])
    records = [a, a.model_copy(update={"signature": "s2"}), a.model_copy(update={"etag": "e2"})]
    assert len(collect([records]).images) == 3
    kept = collect([records], one_per_image=True)
    assert [(i.uri, i.etag) for i in kept.images] == [("file:///a.jpg", "e"), ("file:///a.jpg", "e2")]


def test_without_the_dedup_extra_it_says_how_to_get_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "scipy", None)
    result = CliRunner().invoke(app, ["dedup", str(tmp_path / "records.jsonl"), "--out", str(tmp_path / "g.jsonl")])
    assert result.exit_code == 2 and "pip install 'imagemill[dedup]'" in result.stderr


def test_dedup_reads_the_current_records_of_postgresql_unless_history(pg_url: str, tmp_path: Path) -> None:
    # x.jpg was a copy of y.jpg until it was replaced by another picture: now nothing is alike
    old_x = record("file:///x.jpg", [1, 0, 0])
    new_x = record("file:///x.jpg", [0, 1, 0]).model_copy(
        update={"etag": "e2", "processed_at": old_x.processed_at + timedelta(hours=1)}
    )
    url = f"{pg_url}?table=dedup_{secrets.token_hex(4)}"
    with open_writer(url) as store:
        store.write([old_x, record("file:///y.jpg", [1, 0, 0])], "job-1/000000")
        store.write([new_x], "job-2/000000")
    runner = CliRunner()
    current = runner.invoke(app, ["dedup", url, "--out", str(tmp_path / "current.jsonl"), "-q"])
    assert current.exit_code == 0, current.output
    assert (tmp_path / "current.jsonl").read_text() == ""
    history = runner.invoke(app, ["dedup", url, "--history", "--out", str(tmp_path / "history.jsonl"), "-q"])
    assert history.exit_code == 0, history.output
    (line,) = (tmp_path / "history.jsonl").read_text().splitlines()
    assert [(m["uri"], m["etag"]) for m in json.loads(line)["members"]] == [
        ("file:///x.jpg", "e"),
        ("file:///y.jpg", "e"),
    ]
