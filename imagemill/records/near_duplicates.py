"""Near-duplicate groups from stored embeddings: images whose cosine similarity reaches a threshold,
joined into connected components, each with a representative (the largest image).

How pairs are found is a `Plan`: exact, every pair compared in tiles of `block` x `block` rows of
one matrix product (numpy's BLAS, or torch on a GPU), so memory is the embeddings (n x dim
float32) plus one tile; or approximate, an inverted-file index (faiss IVF, on a GPU when faiss
has one) searched for each image's nearest neighbours, every candidate checked exactly. New
images are checked against a corpus (`against`) by searching the corpus alone: it is not regrouped.
"""

import importlib.util
import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel

from imagemill.core.errors import UserError
from imagemill.core.schemas import Record
from imagemill.core.sinks import read_records
from imagemill.core.sinks.files import parquet_batches, record_file_kind
from imagemill.records.choices import DEFAULT_BLOCK

# pairs kept before they are folded into components: bounds memory when many images are alike
_PENDING_PAIRS = 4_000_000
# `--method auto`: exact on the CPU up to this many embeddings (a few minutes here), faiss IVF above
EXACT_UP_TO = 50_000
# the IVF search: neighbours looked up per image, lists probed, lists per √n, k-means passes; the
# index holds the vectors reduced to REDUCED dimensions (PCA, then unit length: 8x less to compare),
# so a candidate needs only come within MARGIN of the threshold there, and is then checked exactly
NEIGHBOURS = 16
NPROBE = 48
LISTS_PER_ROOT = 2
KMEANS_ITERATIONS = 8
KMEANS_POINTS_PER_LIST = 32
REDUCED = 64
MARGIN = 0.15
QUERY_BATCH = 16_384
DEDUP_EXTRA = "pip install 'imagemill[dedup]'"
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


class Match(BaseModel):
    """A corpus image a new one duplicates, with their cosine similarity."""

    uri: str
    etag: str | None
    similarity: float


class NewDuplicate(BaseModel):
    """One line of `--against`'s output: a new image and the corpus images it duplicates, most alike first."""

    uri: str
    etag: str | None
    matches: list[Match]


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


def read_embeddings(source: str, *, history: bool, advance: Callable[[int], None] = lambda n: None) -> Embeddings:
    """The embeddings of a RECORDS argument (`collect` over its records; one per image version for a
    history); `advance` hears of each batch read. A Parquet file is read as columns (no record
    object built): a million embeddings in seconds."""
    if "://" not in source and record_file_kind(Path(source)) == "parquet":
        return parquet_embeddings(source, advance)

    def counted() -> Iterator[list[Record]]:
        for batch in read_records(source, history=history):
            advance(len(batch))
            yield batch

    return collect(counted(), one_per_image=history)


def parquet_embeddings(source: str, advance: Callable[[int], None] = lambda n: None) -> Embeddings:
    """`collect` for a records Parquet file, column by column: what grouping keeps of each record."""
    import pyarrow.compute as pc  # with pyarrow.parquet, through the file reader: only a Parquet source needs it

    rows: list[Vectors] = []
    images: list[ImageFacts] = []
    model: tuple[str, int] | None = None
    missing, failed = 0, 0
    shown: list[str] = []
    for batch in parquet_batches(source, 65_536):
        advance(batch.num_rows)
        names = batch.schema.names
        failed_rows = pc.is_valid(batch.column("error")) if "error" in names else pc.is_null(batch.column("uri"))
        has = pc.and_(pc.invert(failed_rows), _embedded(batch))
        failed += pc.sum(failed_rows).as_py() or 0
        lacking = batch.filter(pc.and_(pc.invert(failed_rows), pc.invert(has)))
        missing += lacking.num_rows
        shown.extend(lacking.column("uri").slice(0, SHOWN - len(shown)).to_pylist())
        kept = batch.filter(has)
        if not kept.num_rows:
            continue
        embedding = kept.column("embedding")
        for name, dim, uri in _distinct_models(embedding, kept.column("uri")):
            if model is None:
                model = (name, dim)
            elif (name, dim) != model:
                raise UserError(
                    f"{uri} has an embedding of {name} (dim {dim}), others of {model[0]} "
                    f"(dim {model[1]}): embeddings of different models cannot be compared"
                )
        vectors = pc.struct_field(embedding, "vector")
        rows.append(vectors.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(vectors), -1))
        image = kept.column("image")
        width = pc.struct_field(image, "width").to_pylist()
        height = pc.struct_field(image, "height").to_pylist()
        images.extend(
            map(
                ImageFacts,
                kept.column("uri").to_pylist(),
                kept.column("etag").to_pylist(),
                width,
                height,
                kept.column("bytes").to_pylist(),
            )
        )
    dim = model[1] if model else 0
    vectors = np.concatenate(rows) if rows else np.zeros((0, dim), dtype=np.float32)
    del rows
    normalise(vectors)
    return Embeddings(vectors, images, model[0] if model else None, missing, shown, failed)


def _embedded(batch: Any) -> Any:
    import pyarrow as pa  # through the file reader already
    import pyarrow.compute as pc

    if "embedding" not in batch.schema.names:
        return pa.repeat(False, batch.num_rows)
    column = batch.column("embedding")
    return pc.and_(pc.is_valid(column), pc.is_valid(pc.struct_field(column, "vector")))


def _distinct_models(embedding: Any, uris: Any) -> list[tuple[str, int, str]]:
    import pyarrow as pa  # through the file reader already
    import pyarrow.compute as pc

    table = pa.table(
        {"model": pc.struct_field(embedding, "model"), "dim": pc.struct_field(embedding, "dim"), "uri": uris}
    )
    first = table.group_by(["model", "dim"], use_threads=False).aggregate([("uri", "min")])
    return [(row["model"], int(row["dim"]), row["uri_min"]) for row in first.to_pylist()]


def write_groups(groups: list[DuplicateGroup], out: Path) -> None:
    """JSON Lines, one group a line, written beside the target and then moved into place: an
    interrupted run leaves the earlier file. UserError when it cannot be written."""
    partial = out.with_name(f".{out.name}.partial")
    try:
        with partial.open("w", encoding="utf-8") as handle:
            handle.writelines(g.model_dump_json() + "\n" for g in groups)
        os.replace(partial, out)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise UserError(f"cannot write {out}: {exc.strerror or exc}") from None


@dataclass(frozen=True)
class Plan:
    """How pairs are found: `exact` (every pair) or `ivf` (faiss's inverted file, nearest neighbours
    checked exactly), on `cpu` or `cuda`, with `library` numpy, torch or faiss."""

    method: Literal["exact", "ivf"]
    device: Literal["cpu", "cuda"]
    library: Literal["numpy", "torch", "faiss"]

    def describe(self) -> str:
        if self.method == "exact":
            return f"exact ({self.library}, {self.device})"
        return f"approximate (faiss IVF, {NEIGHBOURS} neighbours, {NPROBE} lists probed, {self.device})"


def choose_plan(method: str, n: int, *, faiss: bool, faiss_gpus: int, cuda: bool) -> Plan:
    """The plan for `n` embeddings under `--method` (auto, exact, approximate), given what is
    installed: faiss (and how many GPUs it sees) and whether torch has CUDA. Auto takes the GPU
    when there is one (exact through torch: a million is minutes there), else exact up to
    `EXACT_UP_TO` and faiss IVF above. UserError when the method needs faiss and it is not there."""
    if method not in ("auto", "exact", "approximate"):
        raise UserError(f"--method {method}: expected auto, exact or approximate")
    if method == "approximate" or (method == "auto" and not cuda and n > EXACT_UP_TO):
        if not faiss:
            why = "--method approximate"
            if method == "auto":
                why = f"{n:,} embeddings (auto, above {EXACT_UP_TO:,})"
            raise UserError(
                f"{why} needs faiss (not installed): {DEDUP_EXTRA}, or --method exact (quadratic: hours for a million)"
            )
        return Plan("ivf", "cuda" if faiss_gpus > 0 else "cpu", "faiss")
    if cuda:
        return Plan("exact", "cuda", "torch")
    return Plan("exact", "cpu", "numpy")


def plan_for(method: str, n: int) -> Plan:
    """`choose_plan` with what this machine has."""
    faiss_found = importlib.util.find_spec("faiss") is not None
    gpus = 0
    if faiss_found:
        import faiss  # the dedup extra: found above

        gpus = int(faiss.get_num_gpus())
    return choose_plan(method, n, faiss=faiss_found, faiss_gpus=gpus, cuda=_torch_cuda())


def _torch_cuda() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch  # the worker extra, when installed: only asked whether it sees a GPU

    return bool(torch.cuda.is_available())


def pairs_of(
    plan: Plan, vectors: Vectors, threshold: float, block: int, compared: Callable[[int], None] | None = None
) -> Iterator[tuple[Indices, Indices]]:
    """The pairs at or above `threshold` as `plan` finds them (`similar_pairs`' form)."""
    if plan.method == "ivf":
        return ivf_pairs(vectors, threshold, gpu=plan.device == "cuda", compared=compared)
    if plan.device == "cuda":
        return cuda_pairs(vectors, threshold, block, compared)
    return similar_pairs(vectors, threshold, block, compared)


def cuda_pairs(
    vectors: Vectors, threshold: float, block: int, compared: Callable[[int], None] | None = None
) -> Iterator[tuple[Indices, Indices]]:
    """`similar_pairs` on the GPU through torch: the same tiles, float32 products, same pairs."""
    import torch  # the worker extra: a plan on CUDA is chosen only when torch sees a GPU

    limit = float(np.float32(threshold))
    n = len(vectors)
    block = max(block, 8192)  # the GPU's tiles: larger, its memory is ample and launches cost
    on_device = torch.from_numpy(vectors).to("cuda")
    for i in range(0, n, block):
        rows = on_device[i : i + block]
        for j in range(i, n, block):
            hits = rows @ on_device[j : j + block].T >= limit
            if j == i:
                hits = torch.triu(hits, diagonal=1)
            if compared is not None:
                compared(len(rows) * (len(rows) + 1) // 2 if j == i else hits.numel())
            r, c = hits.nonzero(as_tuple=True)
            if len(r):
                yield r.cpu().numpy().astype(np.intp) + i, c.cpu().numpy().astype(np.intp) + j


def ivf_index(vectors: Vectors, *, gpu: bool = False) -> Any:
    """A faiss IVF index (inner product, HNSW over the list centroids) holding `vectors` reduced to
    64 dimensions (PCA, unit length): about 2·√n lists, trained on up to 32 vectors a list in 8
    k-means passes."""
    import faiss  # the dedup extra: a plan names faiss only when it is installed

    n, dim = vectors.shape
    lists = max(1, min(int(LISTS_PER_ROOT * math.sqrt(n)), n // 8))
    # on the CPU an HNSW graph over the centroids finds each vector's lists cheaply; a GPU compares
    # against every centroid at once
    quantizer = "" if gpu else "_HNSW32"
    reduce = f"PCA{REDUCED},L2norm," if dim > REDUCED else ""
    index = faiss.index_factory(dim, f"{reduce}IVF{lists}{quantizer},Flat", faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.extract_index_ivf(index)
    ivf.cp.niter = KMEANS_ITERATIONS
    ivf.cp.max_points_per_centroid = KMEANS_POINTS_PER_LIST
    ivf.cp.min_points_per_centroid = 1  # few vectors per list is expected here, not a fault to warn of
    space = faiss.ParameterSpace()
    if gpu:  # faiss-gpu: the lists trained, filled and searched on the first GPU
        _GPU_RESOURCES.append(faiss.StandardGpuResources())  # must outlive the index
        index = faiss.index_cpu_to_gpu(_GPU_RESOURCES[-1], 0, index)
        space = faiss.GpuParameterSpace()
    sample = vectors
    if n > lists * KMEANS_POINTS_PER_LIST:
        chosen = np.random.default_rng(0).choice(n, lists * KMEANS_POINTS_PER_LIST, replace=False)
        sample = vectors[np.sort(chosen)]
    index.train(sample)
    index.add(vectors)
    space.set_index_parameter(index, "nprobe", min(NPROBE, lists))
    return index


_GPU_RESOURCES: list[Any] = []


def ivf_pairs(
    vectors: Vectors,
    threshold: float,
    *,
    gpu: bool = False,
    compared: Callable[[int], None] | None = None,
    index: Any = None,
    indexed: Vectors | None = None,
    neighbours: int = NEIGHBOURS,
) -> Iterator[tuple[Indices, Indices]]:
    """Pairs at or above `threshold` among `vectors` (or between them and the vectors of `index`,
    given with `indexed`): each vector's `neighbours` nearest through the IVF index, kept when their
    similarity, computed exactly in float32 from the full vectors, reaches the threshold.
    Approximate: a pair whose vectors fall in lists not probed is missed (the benchmark measures
    how often)."""
    own = index is None
    if own:
        index = ivf_index(vectors, gpu=gpu)
        indexed = vectors
    assert indexed is not None
    limit = np.float32(threshold)
    near = np.float32(threshold - MARGIN)
    k = min(neighbours + (1 if own else 0), max(1, int(index.ntotal)))
    for start in range(0, len(vectors), QUERY_BATCH):
        queries = vectors[start : start + QUERY_BATCH]
        scores, found = index.search(queries, k)
        rows = np.repeat(np.arange(start, start + len(queries)), k).reshape(len(queries), k)
        keep = (found >= 0) & (scores >= near)
        if own:
            keep &= found != rows
        if compared is not None:
            compared(len(queries))
        r, c = rows[keep].astype(np.intp), found[keep].astype(np.intp)
        alike = np.einsum("ij,ij->i", vectors[r], indexed[c]) >= limit
        if alike.any():
            yield r[alike], c[alike]


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
    plan: Plan | None = None,
) -> list[DuplicateGroup]:
    """The groups of two or more images, largest group first; in each, the representative (the
    largest image) first, then the others by similarity to it. Pairs found by `plan` (default:
    exact on the CPU)."""
    if not 0 < threshold <= 1:
        raise UserError(f"--threshold must be above 0 and at most 1, not {threshold}")
    vectors, images = embeddings.vectors, embeddings.images
    plan = plan or Plan("exact", "cpu", "numpy")
    labels = components(len(images), pairs_of(plan, vectors, threshold, block, compared))
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


def against(
    corpus: Embeddings,
    new: Embeddings,
    threshold: float,
    plan: Plan,
    block: int = DEFAULT_BLOCK,
    compared: Callable[[int], None] | None = None,
) -> list[NewDuplicate]:
    """Which `new` images duplicate `corpus` images (similarity ≥ threshold), the corpus searched
    as it is: never grouped, each new image compared with it once (exact: tiles of new x corpus;
    ivf: the corpus's index searched for each new image's nearest). In `new`'s order."""
    if not 0 < threshold <= 1:
        raise UserError(f"--threshold must be above 0 and at most 1, not {threshold}")
    if corpus.model is not None and new.model is not None and corpus.model != new.model:
        raise UserError(f"the corpus's embeddings are of {corpus.model}, the new ones of {new.model}: not comparable")
    if not len(corpus.images) or not len(new.images):
        return []
    if plan.method == "ivf":
        index = ivf_index(corpus.vectors, gpu=plan.device == "cuda")
        pairs = ivf_pairs(new.vectors, threshold, index=index, indexed=corpus.vectors, compared=compared)
    else:
        pairs = _cross_pairs(new.vectors, corpus.vectors, threshold, block, compared)
    found: dict[int, list[tuple[float, int]]] = {}
    for rows, cols in pairs:
        similarity = np.einsum("ij,ij->i", new.vectors[rows], corpus.vectors[cols])
        for r, c, sim in zip(rows.tolist(), cols.tolist(), similarity.tolist(), strict=True):
            found.setdefault(r, []).append((sim, c))
    result = []
    for row in sorted(found):
        image = new.images[row]
        matches = sorted(found[row], key=lambda sc: (-sc[0], corpus.images[sc[1]].uri))
        result.append(
            NewDuplicate(
                uri=image.uri,
                etag=image.etag,
                matches=[
                    Match(uri=corpus.images[c].uri, etag=corpus.images[c].etag, similarity=round(sim, 6))
                    for sim, c in matches
                ],
            )
        )
    return result


def _cross_pairs(
    rows_of: Vectors, cols_of: Vectors, threshold: float, block: int, compared: Callable[[int], None] | None
) -> Iterator[tuple[Indices, Indices]]:
    """Every (new, corpus) pair at or above the threshold, in tiles."""
    limit = np.float32(threshold)
    for i in range(0, len(rows_of), block):
        rows = rows_of[i : i + block]
        for j in range(0, len(cols_of), block):
            hits = rows @ cols_of[j : j + block].T >= limit
            if compared is not None:
                compared(len(rows))
            r, c = np.nonzero(hits)
            if len(r):
                yield r.astype(np.intp) + i, c.astype(np.intp) + j


def write_lines(lines: Iterable[BaseModel], out: Path) -> None:
    """JSON Lines, written beside the target and moved into place (as `write_groups`)."""
    partial = out.with_name(f".{out.name}.partial")
    try:
        with partial.open("w", encoding="utf-8") as handle:
            handle.writelines(line.model_dump_json() + "\n" for line in lines)
        os.replace(partial, out)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise UserError(f"cannot write {out}: {exc.strerror or exc}") from None
