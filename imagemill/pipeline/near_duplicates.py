"""Near-duplicate groups from stored embeddings: images whose cosine similarity reaches a threshold,
joined into connected components, each with a representative (the largest image).

Exact: every pair is compared, in tiles of `block` x `block` rows of one matrix product (numpy's
BLAS), so memory is the embeddings (n x dim float32) plus one tile, whatever n is.
"""

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel

from imagemill.core.errors import UserError
from imagemill.core.schemas import Record

DEFAULT_BLOCK = 4096
# pairs kept before they are folded into components: bounds memory when many images are alike
_PENDING_PAIRS = 4_000_000
SHOWN = 5  # uris named in a summary of what was passed over

Vectors = npt.NDArray[np.float32]
Indices = npt.NDArray[np.intp]


class DuplicateMember(BaseModel):
    """One image of a group, with its cosine similarity to the group's representative."""

    uri: str
    etag: str | None
    width: int | None
    height: int | None
    bytes: int | None
    similarity: float


class DuplicateGroup(BaseModel):
    """One line of `groups.jsonl`: the representative's uri and every member, representative first."""

    representative: str
    size: int
    members: list[DuplicateMember]


@dataclass(frozen=True)
class ImageFacts:
    """What grouping keeps of a record besides its vector."""

    uri: str
    etag: str | None
    width: int | None
    height: int | None
    bytes: int | None

    def rank(self) -> tuple[int, int, str]:
        """Sort key: the largest image first (pixels, then bytes), then the first uri."""
        pixels = (self.width or 0) * (self.height or 0)
        return (-pixels, -(self.bytes or 0), self.uri)


@dataclass
class Embeddings:
    """The records' embeddings, L2-normalised, one row per image, and what was passed over."""

    vectors: Vectors
    images: list[ImageFacts]
    model: str | None
    without_embedding: int = 0
    without_embedding_shown: list[str] = field(default_factory=list)
    failed: int = 0


def collect(batches: Iterable[list[Record]], one_per_image: bool = False) -> Embeddings:
    """Every record's embedding in one matrix. Error records and records without an embedding are
    counted, not guessed; embeddings of two models (or sizes) cannot be compared: a UserError.

    With `one_per_image` (for a history, where one image version has a record per signature), only
    the first record of each (uri, etag) is kept: the others would be its own duplicates."""
    seen: set[tuple[str, str | None]] | None = set() if one_per_image else None
    rows: list[Vectors] = []
    images: list[ImageFacts] = []
    model: tuple[str, int] | None = None
    missing, failed = 0, 0
    shown: list[str] = []
    for batch in batches:
        chunk: list[Vectors] = []
        for record in batch:
            if record.error is not None:
                failed += 1
                continue
            if record.embedding is None:
                missing += 1
                if len(shown) < SHOWN:
                    shown.append(record.uri)
                continue
            if seen is not None:
                if (record.uri, record.etag) in seen:
                    continue
                seen.add((record.uri, record.etag))
            this = (record.embedding.model, record.embedding.dim)
            if model is None:
                model = this
            elif this != model:
                raise UserError(
                    f"{record.uri} has an embedding of {this[0]} (dim {this[1]}), others of {model[0]} "
                    f"(dim {model[1]}): embeddings of different models cannot be compared"
                )
            chunk.append(record.embedding.array())
            info = record.image
            images.append(
                ImageFacts(
                    record.uri, record.etag, info.width if info else None, info.height if info else None, record.bytes
                )
            )
        if chunk:
            rows.append(np.stack(chunk))
    dim = model[1] if model else 0
    vectors = np.concatenate(rows) if rows else np.zeros((0, dim), dtype=np.float32)
    del rows
    normalise(vectors)
    return Embeddings(vectors, images, model[0] if model else None, missing, shown, failed)


def normalise(vectors: Vectors) -> None:
    """Scale rows to unit length in place (the stored ones already are; a zero row stays zero)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    np.divide(vectors, norms, out=vectors, where=norms > 0)


def similar_pairs(
    vectors: Vectors, threshold: float, block: int = DEFAULT_BLOCK, compared: Callable[[int], None] | None = None
) -> Iterator[tuple[Indices, Indices]]:
    """Index pairs (i < j) whose rows' dot product is ≥ threshold, tile by tile: row indices and
    column indices as two arrays per tile. Compared in float32, as computed: 0.95 means float32(0.95).
    `compared` is told after each tile how many pairs it held (n·(n+1)/2 in all): for a progress bar."""
    if block < 1:
        raise ValueError(f"block must be at least 1, not {block}")
    limit = np.float32(threshold)
    n = len(vectors)
    for i in range(0, n, block):
        rows = vectors[i : i + block]
        for j in range(i, n, block):
            hits = rows @ vectors[j : j + block].T >= limit
            if j == i:
                hits = np.triu(hits, k=1)  # each pair once, never an image with itself
            if compared is not None:
                compared(len(rows) * (len(rows) + 1) // 2 if j == i else hits.size)
            # most rows of a tile have no hit: find the few that do before listing their columns
            some = np.flatnonzero(hits.any(axis=1))
            if len(some):
                r, c = np.nonzero(hits[some])
                yield some[r] + i, c + j


def components(n: int, pairs: Iterable[tuple[Indices, Indices]]) -> Indices:
    """Connected components of the graph of `pairs` over n nodes: each node's component label.

    Pairs are folded into a spanning forest whenever many are pending, so memory stays bounded by
    the nodes, not by the pairs (a group of k alike images has k²/2 of them)."""
    from scipy.sparse import coo_array  # the dedup extra; loaded only for a dedup
    from scipy.sparse.csgraph import connected_components

    def fold(rows: list[Indices], cols: list[Indices]) -> tuple[list[Indices], list[Indices], Indices]:
        r = np.concatenate(rows) if rows else np.zeros(0, dtype=np.intp)
        c = np.concatenate(cols) if cols else np.zeros(0, dtype=np.intp)
        graph = coo_array((np.ones(len(r), dtype=np.bool_), (r, c)), shape=(n, n))
        _, labels = connected_components(graph, directed=False)
        # one edge from each node to its component's first node keeps the components and no more
        _, first = np.unique(labels, return_index=True)
        roots = first[labels]
        linked = np.flatnonzero(roots != np.arange(n))
        return [linked], [roots[linked]], labels

    rows: list[Indices] = []
    cols: list[Indices] = []
    pending = 0
    for r, c in pairs:
        rows.append(r)
        cols.append(c)
        pending += len(r)
        if pending > max(_PENDING_PAIRS, 2 * n):
            rows, cols, _ = fold(rows, cols)
            pending = len(rows[0])
    return fold(rows, cols)[2]


def group(
    embeddings: Embeddings,
    threshold: float,
    block: int = DEFAULT_BLOCK,
    compared: Callable[[int], None] | None = None,
) -> list[DuplicateGroup]:
    """The groups of two or more images, largest group first; in each, the representative (the
    largest image) first, then the others by similarity to it."""
    if not 0 < threshold <= 1:
        raise UserError(f"--threshold must be above 0 and at most 1, not {threshold}")
    vectors, images = embeddings.vectors, embeddings.images
    labels = components(len(images), similar_pairs(vectors, threshold, block, compared))
    order = np.argsort(labels, kind="stable")
    starts = np.flatnonzero(np.diff(labels[order], prepend=-1))
    groups = []
    for members in np.split(order, starts[1:]):
        if len(members) < 2:
            continue
        best = min(members, key=lambda m: images[m].rank())
        similarity = vectors[members] @ vectors[best]
        ranked = sorted(
            zip(members, similarity, strict=True), key=lambda ms: (ms[0] != best, -ms[1], images[ms[0]].uri)
        )
        groups.append(
            DuplicateGroup(
                representative=images[best].uri,
                size=len(members),
                members=[_member(images[m], float(s)) for m, s in ranked],
            )
        )
    groups.sort(key=lambda g: (-g.size, g.representative))
    return groups


def _member(image: ImageFacts, similarity: float) -> DuplicateMember:
    return DuplicateMember(
        uri=image.uri,
        etag=image.etag,
        width=image.width,
        height=image.height,
        bytes=image.bytes,
        similarity=round(similarity, 6),
    )
