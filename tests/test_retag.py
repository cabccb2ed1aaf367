"""`imagemill retag`: new tags from stored embeddings, with the images gone and no vision tower.

A folder is annotated with tags and embeddings (and, for comparison, with tags alone under the new
vocabulary), then deleted; retag must give every record tags from the new words only, the same
labels the tags task gives, and report records it cannot tag."""

import json
import re
import secrets
import shutil
from pathlib import Path

import psycopg
import pyarrow.parquet as pq
import pytest
import torch
import transformers
from psycopg import sql

from imagemill.core.errors import UserError
from imagemill.core.schemas import Embedding, Record
from imagemill.core.settings import Settings
from imagemill.core.sinks.files import read_records as read_file
from imagemill.core.sinks.postgres import PostgresSink
from imagemill.core.tasks import Task
from imagemill.local.run import annotate_local
from imagemill.pipeline.models import load_runners
from imagemill.pipeline.models import text_tower as text_tower_module
from imagemill.pipeline.models.contrastive import projected
from imagemill.pipeline.models.text_tower import TextTower
from imagemill.pipeline.models.zero_shot import TagOptions
from imagemill.pipeline.signature import pipeline_signature
from imagemill.records import split
from imagemill.records.retag import retag
from imagemill.records.retagger import Retagger
from tests.fixtures.cli import run_cli
from tests.fixtures.images import photo_image, write_photos
from tests.fixtures.tiny_models import build_tags_clip_laion, quiet_transformers

NEW_WORDS = ["dog", "cat", "beach", "snow", "pizza", "car", "tree"]
TOP_K = 3


def settings_for(models: dict[str, Path], model: str = "tags", **overrides: object) -> Settings:
    base: dict[str, object] = {
        "tags_model": str(models[model]),
        "device": "cpu",
        "tags_threshold": 0.0,
        "batch_size": 4,
    }
    return Settings(**{**base, **overrides})  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def annotated(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A folder of 5 photos and one text file annotated with tags and embeddings to Parquet and
    JSONL, and with tags alone under the new vocabulary; the folder then deleted."""
    root = tmp_path_factory.mktemp("retag")
    folder = root / "photos"
    folder.mkdir()
    write_photos(folder, 5, width=160, height=120)
    (folder / "notes.jpg").write_text("not an image")  # its record has an error and no embedding
    vocabulary = root / "new.txt"
    vocabulary.write_text("\n".join(NEW_WORDS) + "\n")
    settings = settings_for(tiny_models)
    paths = {"vocabulary": vocabulary}
    for suffix in ("parquet", "jsonl"):
        paths[suffix] = root / f"annotated.{suffix}"
        annotate_local(str(folder), (Task.TAGS, Task.EMBEDDING), paths[suffix], settings)
    paths["tags_only"] = root / "new-tags.jsonl"
    # fresh settings: a copy would carry the vocabulary the first ones already read
    new_tags = settings_for(tiny_models, tags_vocabulary=vocabulary, tags_top_k=TOP_K)
    annotate_local(str(folder), (Task.TAGS,), paths["tags_only"], new_tags)
    shutil.rmtree(folder)
    return paths


def retag_settings(tiny_models: dict[str, Path], annotated: dict[str, Path], **overrides: object) -> Settings:
    return settings_for(tiny_models, tags_vocabulary=annotated["vocabulary"], tags_top_k=TOP_K, **overrides)


def by_uri(path: Path) -> dict[str, Record]:
    return {record.uri: record for record in read_file(path)}


@pytest.mark.slow
def test_retag_from_parquet_without_the_images_gives_the_tags_task_s_labels(
    annotated: dict[str, Path], model_env: dict[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "retagged.parquet"
    result = run_cli(
        "retag", str(annotated["parquet"]), "--vocabulary", str(annotated["vocabulary"]),
        "--top-k", str(TOP_K), "--threshold", "0", "--out", str(out), env=model_env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    before, after, expected = by_uri(annotated["parquet"]), by_uri(out), by_uri(annotated["tags_only"])
    photos = {uri for uri, record in before.items() if record.embedding is not None}
    assert len(photos) == 5 and set(after) == photos
    for uri, record in after.items():
        assert record.tags is not None
        assert [label.tag for label in record.tags.labels] == [label.tag for label in expected[uri].tags.labels]
        assert record.tags.labels == expected[uri].tags.labels  # the same scoring: the same scores too
        assert {label.tag for label in record.tags.labels} <= set(NEW_WORDS) and len(record.tags.labels) == TOP_K
        assert record.signature != before[uri].signature
        assert record.embedding == before[uri].embedding and record.image == before[uri].image
    # the record it could not tag is named, not guessed
    assert "without an embedding" in result.stderr and "notes.jpg" in result.stderr
    assert "columnar" in result.stderr


def test_retag_from_jsonl_builds_records_and_agrees_with_the_columnar_path(
    annotated: dict[str, Path], tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    settings = retag_settings(tiny_models, annotated)
    done = retag(str(annotated["jsonl"]), settings, tmp_path / "r.jsonl", history=False)
    assert done.path == "json"  # JSONL to JSONL: JSON objects, one record object per old signature
    counts = done.counts
    assert retag(str(annotated["parquet"]), settings, tmp_path / "r.parquet", history=False).path == "columnar"
    assert retag(str(annotated["jsonl"]), settings, tmp_path / "p.parquet", history=False).path == "records"
    assert counts.retagged == 5 and counts.without_embedding == 1 and counts.examples[0].endswith("notes.jpg")
    from_jsonl, from_parquet = by_uri(tmp_path / "r.jsonl"), by_uri(tmp_path / "r.parquet")
    from_records = by_uri(tmp_path / "p.parquet")
    assert {uri: r.tags for uri, r in from_jsonl.items()} == {uri: r.tags for uri, r in from_parquet.items()}
    assert {uri: r.tags for uri, r in from_records.items()} == {uri: r.tags for uri, r in from_parquet.items()}
    assert {r.signature for r in from_jsonl.values()} == {r.signature for r in from_parquet.values()}
    # every field but the replaced ones is the input's, byte for byte through the JSON path
    before = by_uri(annotated["jsonl"])
    for uri, record in from_jsonl.items():
        assert record.model_dump(exclude={"tags", "signature", "processed_at", "task_options"}) == before[
            uri
        ].model_dump(exclude={"tags", "signature", "processed_at", "task_options"})
    # the Parquet output keeps the input's columns, the embedding's fixed-size list included
    assert pq.read_schema(tmp_path / "r.parquet") == pq.read_schema(annotated["parquet"])


def test_only_the_text_tower_is_loaded(
    annotated: dict[str, Path], tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded: list[str] = []
    real = text_tower_module.load_pretrained

    def spy(task: Task, loader: object, *args: object, **kwargs: object) -> object:
        loaded.append(getattr(loader, "__name__", str(loader)))
        return real(task, loader, *args, **kwargs)

    monkeypatch.setattr(text_tower_module, "load_pretrained", spy)
    # the full model, its vision tower or its image processor would have to come through one of these
    for name in ("CLIPModel", "CLIPVisionModel", "CLIPVisionModelWithProjection", "AutoModel", "AutoProcessor"):
        monkeypatch.setattr(transformers, name, None)
    settings = retag_settings(tiny_models, annotated)
    retagger = Retagger(settings, TagOptions(tuple(NEW_WORDS), "a photo of {}.", TOP_K, 0.0), torch.device("cpu"))
    records = read_file(annotated["jsonl"])
    assert len(retagger.records(records)) == 5
    assert loaded == ["AutoConfig", "CLIPTextModelWithProjection", "AutoTokenizer"]
    assert retagger.tower is not None
    names = [name for name, _ in retagger.tower.model.named_parameters()]
    assert names and not [name for name in names if "vision" in name or "visual" in name]


@pytest.fixture(scope="module")
def tags_models(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny tags checkpoints, and a CLIP whose text config's projection_dim is not the model's."""
    with quiet_transformers():
        laion = build_tags_clip_laion(tmp_path_factory.mktemp("models") / "clip-laion")
    return {**tiny_models, "tags_laion": laion}


# the LAION-like checkpoint's fast check is the text tower's own test below; this whole comparison is slow
@pytest.mark.parametrize("model", ["tags", "tags_siglip", pytest.param("tags_laion", marks=pytest.mark.slow)])
def test_the_same_embedding_gets_the_same_labels_from_tags_and_retag(tags_models: dict[str, Path], model: str) -> None:
    settings = settings_for(tags_models, model, tags_top_k=4, tags_threshold=0.0)
    tags_runner, embedding_runner = load_runners(settings, (Task.TAGS, Task.EMBEDDING))
    pictures = [photo_image(96, 64, seed=i) for i in range(4)]
    pixels = tags_runner.batch([tags_runner.preprocess(p) for p in pictures])
    tags, embeddings = tags_runner.infer(pixels), embedding_runner.infer(pixels)
    records = [
        Record(uri=f"s3://b/{i}.jpg", embedding=embedding, signature="sig") for i, embedding in enumerate(embeddings)
    ]
    options = TagOptions(tuple(settings.vocabulary), settings.tags_prompt, 4, 0.0)
    retagged = Retagger(settings, options, torch.device("cpu")).records(records)
    assert [r.tags for r in retagged] == tags


@pytest.mark.parametrize("model", ["tags", "tags_laion"])
def test_the_text_tower_embeds_text_as_the_full_clip_model_does(tags_models: dict[str, Path], model: str) -> None:
    """The text tower alone projects into the model's shared space, whatever its text config says."""
    settings = settings_for(tags_models, model)
    tower = TextTower(settings.tags_model, None, torch.device("cpu"))
    full = transformers.CLIPModel.from_pretrained(settings.tags_model).eval()
    tokens = tower.tokenizer(["a photo of a dog.", "a photo of snow."], padding=True, return_tensors="pt")
    with torch.inference_mode():
        expected = projected(full.get_text_features(**tokens))
        got = tower.features(tokens)
    assert got.shape == expected.shape == (2, full.config.projection_dim)
    assert torch.allclose(got, expected, atol=1e-5)


def test_records_of_another_model_than_the_configured_one_are_refused(
    annotated: dict[str, Path], tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    settings = retag_settings(tiny_models, annotated, tags_model=str(tiny_models["tags_siglip"]))
    with pytest.raises(UserError, match=r"IMAGEMILL_TAGS_MODEL=.*holds other weights") as caught:
        retag(str(annotated["jsonl"]), settings, tmp_path / "r.jsonl", history=False)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "r.jsonl").exists() and not list(tmp_path.iterdir())  # nothing left behind


def test_records_of_two_models_are_refused(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    vector = torch.nn.functional.normalize(torch.ones(32), dim=0).numpy()
    records = [
        Record(uri="s3://b/a.jpg", embedding=Embedding.of(vector, model=str(tiny_models["tags"])), signature="s"),
        Record(uri="s3://b/b.jpg", embedding=Embedding.of(vector, model="other/model"), signature="s"),
    ]
    options = TagOptions(tuple(NEW_WORDS), "a photo of {}.", TOP_K, 0.0)
    with pytest.raises(UserError, match=r"s3://b/b\.jpg: its embedding is from other/model, earlier ones from"):
        Retagger(settings_for(tiny_models), options, torch.device("cpu")).records(records)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--vocabulary", "/nonexistent/tags.txt", "--out", "o.jsonl"],
            "--vocabulary /nonexistent/tags.txt: cannot read",
        ),
        (["--vocabulary", "VOCAB", "--prompt", "a photo", "--out", "o.jsonl"], "must hold {} where the tag goes"),
        (["--vocabulary", "VOCAB"], "--out is needed"),
        (["--vocabulary", "VOCAB", "--history", "PG"], "--history with a postgresql:// store needs --out"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(
    annotated: dict[str, Path], model_env: dict[str, str], tmp_path: Path, args: list[str], message: str
) -> None:
    records = str(annotated["jsonl"])
    if "PG" in args:  # refused before anything is read: no server needed
        args, records = [a for a in args if a != "PG"], "postgresql://localhost/nothing"
    args = [str(annotated["vocabulary"]) if a == "VOCAB" else a for a in args]
    result = run_cli("retag", records, *args, env=model_env, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {result.stderr.strip().removeprefix('error: ')}"]
    assert message in result.stderr


def test_a_jsonl_line_that_is_not_a_record_is_one_line_on_the_json_path(
    annotated: dict[str, Path], tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    broken = tmp_path / "broken.jsonl"
    good = annotated["jsonl"].read_text().splitlines()[0]
    broken.write_text(good + "\n" + json.dumps({"uri": "s3://b/x.jpg", "embedding": {"dim": "many"}}) + "\n")
    with pytest.raises(UserError, match=r"holds a row that is not a record \(") as caught:
        retag(str(broken), retag_settings(tiny_models, annotated), tmp_path / "o.jsonl", history=False)
    assert "\n" not in str(caught.value) and not (tmp_path / "o.jsonl").exists()


def test_records_without_any_embedding_are_one_line(
    annotated: dict[str, Path], tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    plain = tmp_path / "plain.jsonl"
    plain.write_text(by_uri(annotated["tags_only"]).popitem()[1].model_dump_json() + "\n")
    with pytest.raises(UserError, match=r"no record of .* has an embedding \(1 read\)"):
        retag(str(plain), retag_settings(tiny_models, annotated), tmp_path / "o.jsonl", history=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.jsonl"]


def test_a_postgresql_store_gets_new_rows_beside_the_old_ones(
    annotated: dict[str, Path], tiny_models: dict[str, Path], pg_url: str
) -> None:
    url = f"{pg_url}?table=retag_{secrets.token_hex(4)}"
    old = read_file(annotated["parquet"])
    with PostgresSink(url) as store:
        store.write(old)
    done = retag(url, retag_settings(tiny_models, annotated), None, history=False)
    counts = done.counts
    assert counts.retagged == 5 and done.path == "keyed"
    with psycopg.connect(pg_url) as conn:
        table = url.rpartition("table=")[2]
        rows = conn.execute(sql.SQL("SELECT uri, signature FROM {}").format(sql.Identifier(table))).fetchall()
        current = conn.execute(
            sql.SQL("SELECT uri, signature, record FROM {}").format(sql.Identifier(f"{table}_current"))
        ).fetchall()
    old_keys = {(r.uri, r.signature) for r in old}
    assert old_keys <= set(rows) and len(rows) == len(old) + 5  # the old rows are kept
    new_signatures = set(counts.signatures.values())
    tagged = {uri: record for uri, signature, record in current if signature in new_signatures}
    assert len(tagged) == 5 and len(current) == 6  # the text file's error row stays current as it was
    for record in tagged.values():
        assert {label["tag"] for label in record["tags"]["labels"]} <= set(NEW_WORDS)
        # the database's copy of the old row is the whole record: it reads back as one
        assert Record.model_validate(record).embedding is not None
    assert json.dumps(sorted(counts.signatures)) == json.dumps(sorted({r.signature for r in old if r.embedding}))


def test_a_postgresql_store_retagged_to_jsonl_takes_the_json_path_and_agrees_with_the_records_path(
    annotated: dict[str, Path], tiny_models: dict[str, Path], pg_url: str, tmp_path: Path
) -> None:
    url = f"{pg_url}?table=retag_{secrets.token_hex(4)}"
    with PostgresSink(url) as store:
        store.write(read_file(annotated["parquet"]))
    settings = retag_settings(tiny_models, annotated)
    done = retag(url, settings, tmp_path / "r.jsonl", history=False)
    assert done.path == "json" and done.counts.retagged == 5 and done.counts.without_embedding == 1
    assert retag(url, settings, tmp_path / "p.parquet", history=False).path == "records"
    from_json, from_records = by_uri(tmp_path / "r.jsonl"), by_uri(tmp_path / "p.parquet")
    assert from_json.keys() == from_records.keys()
    for uri, record in from_json.items():
        assert record.model_dump(exclude={"processed_at"}) == from_records[uri].model_dump(exclude={"processed_at"})


def test_embeddings_are_written_byte_stream_split_for_fast_reading(annotated: dict[str, Path], tmp_path: Path) -> None:
    """Random-looking floats: no dictionary attempt, byte planes instead (what retag reads most)."""
    metadata = pq.ParquetFile(annotated["parquet"]).metadata.row_group(0)
    encodings = {metadata.column(i).path_in_schema: metadata.column(i).encodings for i in range(metadata.num_columns)}
    assert "BYTE_STREAM_SPLIT" in encodings["embedding.vector.list.element"]
    assert "RLE_DICTIONARY" not in encodings["embedding.vector.list.element"]
    assert "RLE_DICTIONARY" in encodings["tags.labels.list.element.tag"]  # the others keep their dictionaries


# -- retag counts as annotation: a run with the new tags settings skips what retag tagged -----------


def run_signature(settings: Settings, tasks: tuple[Task, ...]) -> str:
    """The signature a run of `tasks` with `settings` gives its records (what the skip matches)."""
    return pipeline_signature(load_runners(settings, tasks))


def test_retagged_records_carry_the_signature_a_run_with_the_new_vocabulary_gives(
    annotated: dict[str, Path], tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    settings = retag_settings(tiny_models, annotated)
    expected = run_signature(retag_settings(tiny_models, annotated), (Task.TAGS, Task.EMBEDDING))
    for name in ("r.jsonl", "r.parquet"):  # the record path and the columnar one
        suffix = name.rpartition(".")[2]
        counts = retag(str(annotated[suffix]), settings, tmp_path / name, history=False).counts
        assert counts.retagged == 5 and counts.own_signature == 0
        retagged = read_file(tmp_path / name)
        assert {r.signature for r in retagged} == {expected}
        # the tags' options are the new ones, so a second retag replaces them again
        assert {json.dumps(r.task_options, sort_keys=True) for r in retagged} == {
            json.dumps(
                {"tags": TagOptions(tuple(NEW_WORDS), "a photo of {}.", TOP_K, 0.0).signature_options(),
                 "embedding": {"normalised": "l2", "dtype": "float32"}},
                sort_keys=True,
            )
        }  # fmt: skip


def test_records_without_their_tasks_options_get_retag_s_own_signature_and_are_counted(
    annotated: dict[str, Path], tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """Records written before `task_options` was kept: retag cannot tell the run's other settings,
    so it gives them a signature no run computes (a run annotates them again) and says how many."""
    older = tmp_path / "older.parquet"
    table = pq.read_table(annotated["parquet"])
    pq.write_table(table.drop_columns(["task_options"]), older)
    settings = retag_settings(tiny_models, annotated)
    counts = retag(str(older), settings, tmp_path / "r.parquet", history=False).counts
    assert counts.retagged == 5 and counts.own_signature == 5
    expected = run_signature(settings, (Task.TAGS, Task.EMBEDDING))
    assert expected not in {r.signature for r in read_file(tmp_path / "r.parquet")}


@pytest.mark.slow
def test_after_retagging_a_postgresql_store_a_run_with_the_new_vocabulary_reads_no_image(
    tiny_models: dict[str, Path], pg_url: str, tmp_path: Path
) -> None:
    """The issue's scan: annotate every task with vocabulary A into PostgreSQL (local mode writes
    it), retag the store to vocabulary B, run again with B: every image is skipped, none re-read,
    and the table holds two rows per image (the first run's and retag's), not three."""
    folder = tmp_path / "photos"
    folder.mkdir()
    write_photos(folder, 3, width=96, height=64)
    old, new = tmp_path / "a.txt", tmp_path / "b.txt"
    old.write_text("house\nriver\nmountain\n")
    new.write_text("\n".join(NEW_WORDS) + "\n")
    url = f"{pg_url}?table=rescan_{secrets.token_hex(4)}"
    tasks = tuple(Task)  # caption, moderation, tags, embedding: the signature covers them all

    def settings(vocabulary: Path) -> Settings:
        return settings_for(
            tiny_models,
            caption_model=str(tiny_models["caption"]),
            moderation_model=str(tiny_models["moderation"]),
            caption_max_new_tokens=4,
            tags_vocabulary=vocabulary,
        )

    assert annotate_local(str(folder), tasks, url, settings(old)) == {"annotated": 3}
    assert retag(url, settings(new), None, history=False).counts.own_signature == 0
    assert annotate_local(str(folder), tasks, url, settings(new)) == {"skipped": 3}
    with PostgresSink(url) as store:
        assert store.count() == 6


def many_records(annotated: dict[str, Path], path: Path, copies: int) -> Path:
    """The annotated JSONL file's records `copies` times over, each copy's uris made its own."""
    lines = annotated["jsonl"].read_bytes().splitlines()
    with path.open("wb") as handle:
        for copy in range(copies):
            handle.writelines(line.replace(b'.jpg"', f'-{copy}.jpg"'.encode()) + b"\n" for line in lines)
    return path


def without_time(path: Path) -> bytes:
    """A JSONL output with each record's processed_at (the time it was written) taken out."""
    return re.sub(rb'"processed_at":"[^"]*"', b"", path.read_bytes())


def test_a_large_jsonl_file_split_over_processes_is_written_as_one_process_writes_it(
    annotated: dict[str, Path], tiny_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(split, "SPLIT_BYTES", 0)  # the tiny records are far below a split's size
    source = many_records(annotated, tmp_path / "many.jsonl", 40)
    one = retag(
        str(source), retag_settings(tiny_models, annotated, retag_processes=1), tmp_path / "1.jsonl", history=False
    )
    three = retag(
        str(source), retag_settings(tiny_models, annotated, retag_processes=3), tmp_path / "3.jsonl", history=False
    )
    assert (one.path, one.processes, three.path, three.processes) == ("json", 1, "json", 3)
    # the same lines in the same order, byte for byte, and the same counts (the examples in order)
    assert without_time(tmp_path / "3.jsonl") == without_time(tmp_path / "1.jsonl")
    assert three.counts == one.counts and one.counts.retagged == 200 and one.counts.without_embedding == 40
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1.jsonl", "3.jsonl", "many.jsonl"]  # no part left


def test_a_split_file_s_bad_line_is_named_by_its_line_in_the_whole_file(
    annotated: dict[str, Path], tiny_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(split, "SPLIT_BYTES", 0)
    source = many_records(annotated, tmp_path / "many.jsonl", 10)
    lines = source.read_bytes().splitlines(keepends=True)
    source.write_bytes(b"".join(lines[:50]) + b"{not json\n" + b"".join(lines[50:]))
    settings = retag_settings(tiny_models, annotated, retag_processes=2)
    with pytest.raises(UserError, match=r"line 51 is not JSON") as caught:
        retag(str(source), settings, tmp_path / "o.jsonl", history=False)
    assert "\n" not in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["many.jsonl"]  # neither the output nor a part


def test_a_large_postgresql_store_split_over_processes_is_written_as_one_process_writes_it(
    annotated: dict[str, Path],
    tiny_models: dict[str, Path],
    pg_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(split, "SPLIT_ROWS", 0)
    url = f"{pg_url}?table=retag_{secrets.token_hex(4)}"
    with PostgresSink(url) as store:
        store.write(read_file(many_records(annotated, tmp_path / "many.jsonl", 20)))
    one = retag(url, retag_settings(tiny_models, annotated, retag_processes=1), tmp_path / "1.jsonl", history=False)
    two = retag(url, retag_settings(tiny_models, annotated, retag_processes=2), tmp_path / "2.jsonl", history=False)
    assert (one.processes, two.path, two.processes) == (1, "json", 2)
    assert without_time(tmp_path / "2.jsonl") == without_time(tmp_path / "1.jsonl")
    assert two.counts == one.counts and one.counts.retagged == 100
