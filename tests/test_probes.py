"""`imagemill score`: a linear or LAION-shaped MLP head, built here, applied to stored embeddings;
the named score kept in each record and usable in `--where`."""

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file
from typer.testing import CliRunner

from imagemill.cli import app
from imagemill.core.errors import UserError
from imagemill.core.schemas import Embedding, Record
from imagemill.core.sinks.files import read_records
from imagemill.records.filters import parse_where
from imagemill.records.probes import load_head

DIM = 12


def records_file(path: Path, count: int = 6) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    vectors = [v / np.linalg.norm(v) for v in rng.normal(size=(count, DIM)).astype(np.float32)]
    records = [
        Record(uri=f"s3://b/{i}.jpg", embedding=Embedding.of(v, model="clip"), signature="s")
        for i, v in enumerate(vectors)
    ]
    records.append(Record(uri="s3://b/plain.jpg", signature="s"))  # no embedding: kept, not scored
    path.write_text("".join(r.model_dump_json() + "\n" for r in records))
    return vectors


def laion_shaped(path: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """LAION's aesthetic predictor in miniature: Linear, Dropout, Linear, Dropout, Linear, Linear."""
    rng = np.random.default_rng(2)
    shapes = {"layers.0": (16, DIM), "layers.2": (8, 16), "layers.4": (4, 8), "layers.5": (1, 4)}
    layers = [
        (rng.normal(size=s).astype(np.float32), rng.normal(size=s[0]).astype(np.float32)) for s in shapes.values()
    ]
    tensors = {}
    for name, (weight, bias) in zip(shapes, layers, strict=True):
        tensors[f"{name}.weight"], tensors[f"{name}.bias"] = weight, bias
    save_file(tensors, str(path))
    return layers


def test_score_adds_each_head_s_score_to_the_records_and_where_can_filter_on_it(tmp_path: Path) -> None:
    vectors = records_file(tmp_path / "r.jsonl")
    layers = laion_shaped(tmp_path / "aesthetic.safetensors")
    linear = np.random.default_rng(3).normal(size=DIM).astype(np.float32)
    save_file({"weight": linear}, str(tmp_path / "linear.safetensors"))  # one flat weight, no bias
    out = tmp_path / "scored.parquet"
    result = CliRunner().invoke(
        app,
        ["score", str(tmp_path / "r.jsonl"), "--head", f"aesthetic={tmp_path / 'aesthetic.safetensors'}",
         "--head", f"linear={tmp_path / 'linear.safetensors'}", "--out", str(out), "-q"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "6 records scored" in result.stderr and "1 records without an embedding" in result.stderr
    scored = {r.uri: r for r in read_records(out)}
    assert scored["s3://b/plain.jpg"].scores is None
    for i, vector in enumerate(vectors):
        expected = vector
        for weight, bias in layers:
            expected = expected @ weight.T + bias
        record = scored[f"s3://b/{i}.jpg"]
        assert record.scores is not None
        assert record.scores["aesthetic"] == pytest.approx(float(expected[0]), abs=1e-5)
        assert record.scores["linear"] == pytest.approx(float(vector @ linear), abs=1e-5)
    median = float(np.median([r.scores["aesthetic"] for r in scored.values() if r.scores]))
    where = parse_where([f"score.aesthetic > {median}"])
    assert 0 < sum(where(r) for r in scored.values()) < 6 and not where(scored["s3://b/plain.jpg"])


def test_a_head_whose_layers_do_not_chain_or_fit_is_one_line(tmp_path: Path) -> None:
    save_file(
        {"a.0.weight": np.ones((4, DIM), np.float32), "a.1.weight": np.ones((1, 5), np.float32)}, str(tmp_path / "h")
    )
    with pytest.raises(UserError, match=r"a\.1\.weight takes 5 inputs, the layer before gives 4"):
        load_head("h", tmp_path / "h")
    records_file(tmp_path / "r.jsonl")
    save_file({"weight": np.ones((1, DIM + 1), np.float32)}, str(tmp_path / "wide.safetensors"))
    result = CliRunner().invoke(
        app,
        [
            "score",
            str(tmp_path / "r.jsonl"),
            "--head",
            f"w={tmp_path / 'wide.safetensors'}",
            "--out",
            str(tmp_path / "o.jsonl"),
            "-q",
        ],
    )
    assert result.exit_code == 2 and result.stderr.count("error:") == 1 and "takes 13 values" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h", "r.jsonl", "wide.safetensors"]  # nothing left
