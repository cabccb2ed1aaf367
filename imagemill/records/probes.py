"""Probes over stored embeddings: a linear or small MLP head (the shape of LAION's aesthetic
predictor) applied to each record's embedding, a named score per record; no image read.

A head is a safetensors file of linear layers, `NAME.weight` (out x in) and optional `NAME.bias`,
applied in the order of the numbers in their names (`layers.0`, `layers.2`, … as PyTorch's
`nn.Sequential` saves them; LAION's Dropouts hold no weights and are identity at inference, and it
has no activations between its layers, so neither does this). The last layer has one output.
"""

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from imagemill.core.errors import UserError
from imagemill.core.redaction import redact_url
from imagemill.core.schemas import Record
from imagemill.core.sinks import open_sink, read_records

RECORD_BATCH = 4096
EXAMPLES = 5
_NUMBERS = re.compile(r"\d+")


@dataclass(frozen=True)
class Head:
    """Linear layers applied in order: `score(vectors)` gives one number per row."""

    name: str
    layers: tuple[tuple[npt.NDArray[np.float32], npt.NDArray[np.float32] | None], ...]

    @property
    def dim(self) -> int:
        return int(self.layers[0][0].shape[1])

    def score(self, vectors: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        values = vectors.astype(np.float32, copy=False)
        for weight, bias in self.layers:
            values = values @ weight.T
            if bias is not None:
                values = values + bias
        return values.reshape(-1).astype(np.float64)


def parse_head(text: str) -> tuple[str, Path]:
    """`aesthetic=heads/aesthetic.safetensors` -> (name, path); UserError (one line) otherwise."""
    name, _, path = text.partition("=")
    if not name.strip() or not path.strip() or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", name.strip()):
        raise UserError(f"--head {text}: expected NAME=FILE.safetensors, NAME letters, digits, _ or -")
    return name.strip(), Path(path.strip())


def load_head(name: str, path: Path) -> Head:
    """The head in a safetensors file; UserError (one line) for a file that cannot be read or whose
    layers do not chain (each layer's inputs the previous one's outputs, one output at the end)."""
    try:
        from safetensors.numpy import load_file  # the worker extra's; only probes need it here
    except ModuleNotFoundError:
        raise UserError("imagemill score needs safetensors: pip install 'imagemill[worker]'") from None
    try:
        tensors = load_file(str(path))
    except (OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"--head {name}={path}: cannot read it as safetensors ({exc})") from None
    weights = sorted((key for key in tensors if key.endswith("weight")), key=_order)
    layers: list[tuple[npt.NDArray[np.float32], npt.NDArray[np.float32] | None]] = []
    for key in weights:
        weight = np.asarray(tensors[key], dtype=np.float32)
        if weight.ndim == 1:  # a single output's weights saved flat
            weight = weight.reshape(1, -1)
        bias_key = key.removesuffix("weight") + "bias"
        bias = np.asarray(tensors[bias_key], dtype=np.float32).reshape(-1) if bias_key in tensors else None
        if weight.ndim != 2 or (bias is not None and bias.shape[0] != weight.shape[0]):
            raise UserError(f"--head {name}={path}: {key} is not a linear layer's weight (out x in)")
        if layers and layers[-1][0].shape[0] != weight.shape[1]:
            raise UserError(
                f"--head {name}={path}: {key} takes {weight.shape[1]} inputs, the layer before gives"
                f" {layers[-1][0].shape[0]}"
            )
        layers.append((weight, bias))
    if not layers:
        raise UserError(f"--head {name}={path}: holds no layer weights (…weight tensors)")
    if layers[-1][0].shape[0] != 1:
        raise UserError(f"--head {name}={path}: its last layer gives {layers[-1][0].shape[0]} outputs, not one score")
    return Head(name, tuple(layers))


def _order(key: str) -> tuple[int, ...]:
    return tuple(int(number) for number in _NUMBERS.findall(key))


@dataclass
class ScoreCounts:
    """What a scoring did: records scored, and records passed over for want of an embedding."""

    scored: int = 0
    without_embedding: int = 0
    examples: list[str] = field(default_factory=list)


def score(
    records: str,
    heads: list[Head],
    out: Path | None,
    *,
    history: bool = False,
    advance: Callable[[int], None] = lambda n: None,
) -> tuple[ScoreCounts, str]:
    """Each head's score on every record of RECORDS with an embedding, added to the record's
    `scores` (others kept); written to `out` (a .jsonl/.parquet file: every record, those without an
    embedding as they were) or, for a postgresql:// RECORDS without `out`, back to the store (rows
    of the same key, the scored ones only). The counts and where the records went."""
    target = str(out) if out is not None else _in_place(records)
    counts = ScoreCounts()
    sink = open_sink(target)
    sink.check()
    in_place = out is None
    try:
        for number, batch in enumerate(read_records(records, history=history, batch_size=RECORD_BATCH)):
            scored = list(_scored(batch, heads, counts))
            sink.write([r for r, changed in scored if changed or not in_place], f"score/{number:06d}")
            advance(len(batch))
    except UserError:
        partial = sink.abort()  # a fault the user can fix leaves nothing behind
        if partial is not None:
            partial.unlink(missing_ok=True)
        raise
    except BaseException:
        sink.abort()
        raise
    sink.close()
    if not counts.scored:
        raise UserError(f"no record of {redact_url(records)} has an embedding: annotate with --tasks embedding")
    return counts, target


def _in_place(records: str) -> str:
    if records.startswith(("postgresql://", "postgres://")):
        return records
    raise UserError(
        f"--out is needed: scores are written back only to a postgresql:// store, and {redact_url(records)} is not one"
    )


def _scored(batch: list[Record], heads: list[Head], counts: ScoreCounts) -> Iterator[tuple[Record, bool]]:
    embedded = [record for record in batch if record.embedding is not None]
    for record in batch:
        if record.embedding is None:
            counts.without_embedding += 1
            if len(counts.examples) < EXAMPLES:
                counts.examples.append(record.uri)
    if not embedded:
        yield from ((record, False) for record in batch)
        return
    vectors = np.stack([record.embedding.array() for record in embedded if record.embedding is not None])
    values: dict[str, npt.NDArray[np.float64]] = {}
    for head in heads:
        if vectors.shape[1] != head.dim:
            raise UserError(
                f"--head {head.name}: takes {head.dim} values, but the embeddings of {embedded[0].uri}"
                f" have {vectors.shape[1]}"
            )
        values[head.name] = head.score(vectors)
    position = {id(record): i for i, record in enumerate(embedded)}
    counts.scored += len(embedded)
    for record in batch:
        if id(record) not in position:
            yield record, False
            continue
        i = position[id(record)]
        scores = {**(record.scores or {}), **{name: round(float(v[i]), 6) for name, v in values.items()}}
        yield record.model_copy(update={"scores": scores}), True
