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
import webdataset
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console
from typer.testing import CliRunner

from imagemill.cli import app, display
from imagemill.core.errors import ErrorKind, UserError
from imagemill.core.schemas import Embedding, ImageInfo, Record, RecordError
from imagemill.core.sinks import open_sink
from imagemill.core.sinks import read_records as read_stored
from imagemill.core.sinks.files import read_records
from imagemill.records.near_duplicates import (
    Embeddings,
    ImageFacts,
    Plan,
    against,
    choose_plan,
    collect,
    components,
    group,
    parquet_embeddings,
    similar_pairs,
)
from tests.fixtures.cli import run_cli
from tests.fixtures.images import photo_jpeg, write_near_duplicates

# The tiny CLIP's random weights put every photo near one direction (distinct photos measured at
# cosine 0.58-0.98), but its embedding is a deterministic function of the 64-pixel input, which a
# resized or recompressed copy reproduces almost exactly (measured ≥ 0.9999). So copies group and
# distinct photos do not at 0.99, not at the 0.95 that suits real CLIP/SigLIP embeddings; the test
# asserts that margin first, so a change to the tiny model that closes it fails by name.
TINY_CLIP_THRESHOLD = 0.99


@pytest.mark.slow
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
    with open_sink(str(source)) as writer:
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
    import imagemill.records.near_duplicates as near

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
    with open_sink(url) as store:
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


# -- at a million: the plan, the approximate search, the corpus check --------------------------------


def planted(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """n random unit vectors, every 25th followed by a near-copy of itself (cosine ≈ 0.98)."""
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n, dim)).astype(np.float32)
    originals = np.arange(0, n - 1, 25)
    vectors[originals + 1] = vectors[originals] + rng.normal(scale=0.2 / np.sqrt(dim), size=(len(originals), dim))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


def embedded(vectors: np.ndarray, prefix: str = "s3://b/") -> Embeddings:
    images = [ImageFacts(f"{prefix}{i:06d}.jpg", "e", 64, 64, 100) for i in range(len(vectors))]
    return Embeddings(vectors.copy(), images, "clip")


@pytest.mark.parametrize(
    ("method", "n", "faiss", "gpus", "cuda", "expected"),
    [
        ("auto", 10_000, True, 0, False, Plan("exact", "cpu", "numpy")),
        ("auto", 1_000_000, True, 0, False, Plan("ivf", "cpu", "faiss")),
        ("auto", 1_000_000, True, 0, True, Plan("exact", "cuda", "torch")),  # a GPU: exact is minutes
        ("exact", 1_000_000, True, 0, False, Plan("exact", "cpu", "numpy")),
        ("approximate", 10, True, 1, True, Plan("ivf", "cuda", "faiss")),  # faiss-gpu sees a GPU
        ("approximate", 10, True, 0, True, Plan("ivf", "cpu", "faiss")),  # faiss-cpu beside a GPU
    ],
)
def test_the_search_is_chosen_by_size_method_and_the_gpus_faiss_and_torch_see(
    method: str, n: int, faiss: bool, gpus: int, cuda: bool, expected: Plan
) -> None:
    assert choose_plan(method, n, faiss=faiss, faiss_gpus=gpus, cuda=cuda) == expected


def test_an_approximate_search_without_faiss_is_one_line_naming_the_extra() -> None:
    with pytest.raises(UserError, match=r"needs faiss \(not installed\): pip install 'imagemill\[dedup\]'") as caught:
        choose_plan("auto", 2_000_000, faiss=False, faiss_gpus=0, cuda=False)
    assert "\n" not in str(caught.value)


@pytest.mark.slow  # faiss's index: seconds on a busy machine
def test_the_approximate_search_finds_the_planted_groups_the_exact_one_finds() -> None:
    found = embedded(planted(2_000, 32))
    exact = group(found, 0.95)
    approximate = group(found, 0.95, plan=Plan("ivf", "cpu", "faiss"))
    assert len(exact) == 80 and all(g.size == 2 for g in exact)
    assert [g.model_dump() for g in approximate] == [g.model_dump() for g in exact]


@pytest.mark.parametrize("plan", [Plan("exact", "cpu", "numpy"), Plan("ivf", "cpu", "faiss")])
def test_against_names_the_new_images_that_duplicate_the_corpus_and_not_the_corpus_s_own(plan: Plan) -> None:
    corpus_vectors = planted(2_000, 32)  # the corpus holds duplicates of its own: not reported
    rng = np.random.default_rng(7)
    copies = corpus_vectors[[3, 502, 1_234]] + rng.normal(scale=0.2 / np.sqrt(32), size=(3, 32))
    new_vectors = np.concatenate([planted(300, 32, seed=9), copies]).astype(np.float32)
    new_vectors /= np.linalg.norm(new_vectors, axis=1, keepdims=True)
    matched = against(embedded(corpus_vectors), embedded(new_vectors, "s3://new/"), 0.95, plan)
    assert [m.uri for m in matched] == ["s3://new/000300.jpg", "s3://new/000301.jpg", "s3://new/000302.jpg"]
    assert [m.matches[0].uri for m in matched] == ["s3://b/000003.jpg", "s3://b/000502.jpg", "s3://b/001234.jpg"]
    assert all(0.95 <= m.matches[0].similarity < 1 for m in matched)


def test_a_parquet_file_is_read_as_columns_into_the_embeddings_the_records_give(tmp_path: Path) -> None:
    vectors = planted(40, 16)
    records = [
        Record(
            uri=f"s3://b/{i:04d}.jpg", etag=f"e{i}", bytes=1000 + i,
            image=ImageInfo(width=10 + i, height=20, format="PNG"),
            embedding=Embedding.of(v, model="clip"), signature="s",
        )
        for i, v in enumerate(vectors)
    ] + [
        Record(uri="s3://b/plain.jpg", signature="s"),
        Record(uri="s3://b/bad.jpg", signature="s", error=RecordError(kind=ErrorKind.TRUNCATED, message="cut")),
    ]  # fmt: skip
    path = tmp_path / "r.parquet"
    with open_sink(str(path)) as sink:
        sink.write(records)
    columns, built = parquet_embeddings(str(path)), collect([read_records(path)])
    assert columns.images == built.images and np.array_equal(columns.vectors, built.vectors)
    assert (columns.without_embedding, columns.failed, columns.without_embedding_shown) == (1, 1, ["s3://b/plain.jpg"])


@pytest.mark.slow  # the command asks torch whether it sees a GPU: importing it takes seconds
def test_dedup_against_a_corpus_writes_one_line_per_new_duplicate(tmp_path: Path) -> None:
    corpus, new = tmp_path / "corpus.jsonl", tmp_path / "new.jsonl"
    vectors = planted(50, 16)
    corpus.write_text(
        "".join(
            Record(uri=f"s3://b/{i}.jpg", embedding=Embedding.of(v, model="clip"), signature="s").model_dump_json()
            + "\n"
            for i, v in enumerate(vectors)
        )
    )
    fresh = [Embedding.of(vectors[7], model="clip"), Embedding.of(planted(1, 16, seed=3)[0], model="clip")]
    new.write_text(
        "".join(
            Record(uri=f"s3://new/{i}.jpg", embedding=e, signature="s").model_dump_json() + "\n"
            for i, e in enumerate(fresh)
        )
    )
    out = tmp_path / "dupes.jsonl"
    result = CliRunner().invoke(app, ["dedup", str(new), "--against", str(corpus), "--out", str(out), "-q"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(line["uri"], [m["uri"] for m in line["matches"]]) for line in lines] == [
        ("s3://new/0.jpg", ["s3://b/7.jpg"])
    ]
    assert "1 of 2 new images duplicate the corpus's" in result.stderr


# -- marks written back into the store ----------------------------------------------------------------


@pytest.mark.slow  # the command asks torch whether it sees a GPU: importing it takes seconds
@pytest.mark.parametrize("store", ["jsonl", "parquet", "postgresql"])
def test_write_back_marks_every_record_so_an_export_keeps_one_per_group_from_the_store_alone(
    store: str, pg_url: str, tmp_path: Path
) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    vectors = {"a": [1, 0, 0], "b": [0.999, 0.04, 0], "c": [0, 1, 0], "d": [0, 0, 1]}
    records = []
    for n, (name, vector) in enumerate(vectors.items()):
        (photos / f"{name}.jpg").write_bytes(photo_jpeg(64, 48, seed=n))
        size = (640, 480) if name == "a" else (64, 48)  # a is the larger of a and b: their representative
        records.append(record((photos / f"{name}.jpg").as_uri(), vector, size).model_copy(update={"etag": None}))
    (photos / "plain.jpg").write_bytes(photo_jpeg(64, 48, seed=9))
    records.append(Record(uri=(photos / "plain.jpg").as_uri(), signature="s"))  # no embedding: never marked
    url = {"jsonl": str(tmp_path / "r.jsonl"), "parquet": str(tmp_path / "r.parquet")}.get(
        store, f"{pg_url}?table=marks_{secrets.token_hex(4)}"
    )
    with open_sink(url) as sink:
        sink.write(records, "job/000000")
    runner = CliRunner()

    def dedup(threshold: str) -> dict[str, tuple[str | None, bool] | None]:
        args = ["dedup", url, "--threshold", threshold, "--write-back", "--out", str(tmp_path / "g.jsonl"), "-q"]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        assert "4 records marked with their group and role" in result.stderr
        stored = [r for batch in read_stored(url) for r in batch]
        assert len(stored) == len(records)  # rewritten or updated in place: no record more, none less
        return {Path(r.uri).name[0]: None if r.dedup is None else (r.dedup.group, r.dedup.representative)
                for r in stored}  # fmt: skip

    a = (photos / "a.jpg").as_uri()
    assert dedup("0.95") == {"a": (a, True), "b": (a, False), "c": (None, True), "d": (None, True), "p": None}
    out = tmp_path / "kept"
    exported = runner.invoke(
        app, ["export", url, "--format", "webdataset", "--out", str(out), "--where", "not duplicate", "-q"]
    )
    assert exported.exit_code == 0, exported.output
    assert "1 records carry no dedup mark" in exported.stderr  # plain.jpg: counted as no duplicate, said so
    samples = webdataset.WebDataset(str(out / "shard-000000.tar"), shardshuffle=False)
    assert sorted(Path(json.loads(s["json"])["uri"]).name for s in samples) == ["a.jpg", "c.jpg", "d.jpg", "plain.jpg"]
    # a stricter dedup replaces the marks: b is alone now
    assert dedup("0.99999")["b"] == (None, True)


def test_write_back_to_an_object_store_is_refused_before_anything_is_read(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["dedup", f"file://{tmp_path}/", "--write-back", "--out", "g.jsonl"])
    assert result.exit_code == 2 and result.stderr.count("error:") == 1
    assert "--write-back: marks go back to a .jsonl or .parquet file or a postgresql:// store" in result.stderr
