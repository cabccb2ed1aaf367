"""Exports for training: records beside their images' original bytes, as a Hugging Face `datasets`
dataset (`save_to_disk`) or WebDataset tar shards.

Streamed: records come in batches, images are read a few dozen at a time through the project's
`ObjectReader` (its byte limits included) and written as they come, so memory stays flat however
many records there are. An image gone or replaced since it was annotated is counted and skipped.
The export is built beside `--out` and moved into place when complete.
"""

import math
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from imagemill.core.errors import ErrorKind, ImageError, UserError
from imagemill.core.schemas import ImageRef, Record
from imagemill.core.storage import Blob
from imagemill.pipeline.record_filter import Where

if TYPE_CHECKING:
    from datasets import Features

EXPORT_EXTRA = "pip install 'imagemill[export]'"
READ_AHEAD = 64  # images in flight at once: bounds memory at READ_AHEAD x the largest image
SHOWN = 5  # uris named per kind of skipped image
SHARD_PATTERN = "shard-%06d.tar"
# the decoded format's usual extension; a format not named here keeps the extension of its uri
EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif"}

Batches = Callable[[], Iterable[list[Record]]]


class ExportFormat(StrEnum):
    HF = "hf"
    WEBDATASET = "webdataset"


class ImageReader(Protocol):
    """Reads one image's bytes (`core.storage.ObjectReader`); an `ImageError` when it cannot."""

    def read(self, ref: ImageRef) -> Blob: ...


@dataclass
class Skipped:
    """How many images were skipped for one reason, and the first few of them."""

    count: int = 0
    shown: list[str] = field(default_factory=list)

    def add(self, uri: str) -> None:
        self.count += 1
        if len(self.shown) < SHOWN:
            self.shown.append(uri)


@dataclass
class ExportReport:
    """What an export did: records read, exported, filtered out, and images skipped and why."""

    read: int = 0
    exported: int = 0
    filtered: int = 0
    missing: Skipped = field(default_factory=Skipped)  # gone since annotation
    changed: Skipped = field(default_factory=Skipped)  # replaced since annotation (another etag)
    unreadable: Skipped = field(default_factory=Skipped)  # any other read failure, its kind beside the uri
    shards: int = 0


@dataclass(frozen=True)
class Sample:
    """One exported record: a key unique in the export, the image's bytes and extension (none for
    an error record: its image was never annotated)."""

    key: str
    record: Record
    data: bytes | None
    extension: str | None


@dataclass(frozen=True)
class Options:
    """What to export: the records kept by `where`, error records unless `only_ok`, split into
    shards of `shard_size` samples (None: the format's default)."""

    where: Where = field(default_factory=Where)
    only_ok: bool = False
    shard_size: int | None = None
    threads: int = 8


def export(
    batches: Batches,
    fmt: ExportFormat,
    out: Path,
    reader: ImageReader,
    options: Options,
    advance: Callable[[int], None] = lambda n: None,
    total: Callable[[int], None] = lambda n: None,
) -> ExportReport:
    """Write the records of `batches` (called once, or twice for `hf`: a first pass learns the
    columns) and their images to `out`, which must not exist or be empty. `advance` is told of each
    record handled (and of each read by a first pass), `total` of the number to handle once a
    first pass knows it: the count starts again from there."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} already exists and is not empty: name a new directory")
    work = out.with_name(f".{out.name}.partial")
    shutil.rmtree(work, ignore_errors=True)
    try:
        work.mkdir(parents=True)
    except OSError as exc:
        raise UserError(f"cannot create {work}: {exc.strerror or exc}") from None
    report = ExportReport()
    try:
        built = work / "export"
        if fmt is ExportFormat.HF:
            _write_hf(batches, built, work / "cache", reader, options, report, advance, total)
        else:
            built.mkdir()
            _write_webdataset(_samples(batches(), reader, options, report, advance), built, options, report)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(built, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report


def _samples(
    batches: Iterable[list[Record]],
    reader: ImageReader,
    options: Options,
    report: ExportReport,
    advance: Callable[[int], None],
) -> Iterator[Sample]:
    """The records to export with their images' bytes, in order; the rest counted in `report`."""

    def fetch(record: Record) -> Blob | ImageError | None:
        if record.error is not None:
            return None  # never annotated: nothing worth reading
        try:
            return reader.read(ImageRef(uri=record.uri, etag=record.etag))
        except ImageError as exc:
            return exc

    with ThreadPoolExecutor(options.threads, thread_name_prefix="export-read") as pool:
        for batch in batches:
            report.read += len(batch)
            kept = [r for r in batch if options.where(r) and not (options.only_ok and r.error is not None)]
            report.filtered += len(batch) - len(kept)
            advance(len(batch) - len(kept))
            for start in range(0, len(kept), READ_AHEAD):
                part = kept[start : start + READ_AHEAD]
                for record, got in zip(part, pool.map(fetch, part), strict=True):
                    sample = _sample(record, got, report)
                    if sample is not None:
                        yield sample
                    advance(1)


def _sample(record: Record, got: Blob | ImageError | None, report: ExportReport) -> Sample | None:
    if isinstance(got, ImageError):
        if got.kind is ErrorKind.NOT_FOUND:
            report.missing.add(record.uri)
        else:
            report.unreadable.add(f"{record.uri} ({got.kind.value})")
        return None
    if got is not None and got.etag and record.etag and got.etag != record.etag:
        report.changed.add(record.uri)  # its record describes the image it replaced
        return None
    report.exported += 1
    key = f"{report.exported - 1:09d}"
    if got is None:
        return Sample(key, record, None, None)
    return Sample(key, record, got.data, extension(record))


def extension(record: Record) -> str:
    """The image's real extension: from its decoded format, else its uri's, else `bin`."""
    fmt = record.image.format if record.image else None
    if fmt and fmt.upper() in EXTENSIONS:
        return EXTENSIONS[fmt.upper()]
    suffix = Path(record.uri.rsplit("/", 1)[-1]).suffix.lstrip(".").lower()
    return suffix if suffix.isalnum() else "bin"


def _write_webdataset(samples: Iterator[Sample], out: Path, options: Options, report: ExportReport) -> None:
    try:
        import webdataset
    except ModuleNotFoundError:
        raise UserError(f"--format webdataset needs the export extra: {EXPORT_EXTRA}") from None
    pattern = os.path.join(str(out).replace("%", "%%"), SHARD_PATTERN)  # a % in the folder is not a format
    # samples per shard only: a size limit would cut shards unevenly
    with webdataset.ShardWriter(
        pattern, maxcount=options.shard_size or 10_000, maxsize=float("inf"), verbose=0
    ) as sink:
        for sample in samples:
            entry: dict[str, Any] = {"__key__": sample.key, "json": sample.record.model_dump_json().encode()}
            if sample.data is not None and sample.extension is not None:
                entry[sample.extension] = sample.data
            sink.write(entry)
    report.shards = len(list(out.glob("shard-*.tar")))


def _write_hf(
    batches: Batches,
    out: Path,
    cache: Path,
    reader: ImageReader,
    options: Options,
    report: ExportReport,
    advance: Callable[[int], None],
    total: Callable[[int], None],
) -> None:
    try:
        import datasets
        from datasets.exceptions import DatasetGenerationError
    except ModuleNotFoundError:
        raise UserError(f"--format hf needs the export extra: {EXPORT_EXTRA}") from None
    columns = _Columns.learn(batches(), options, advance)
    total(columns.records)
    features = columns.features()

    def examples() -> Iterator[dict[str, Any]]:
        for sample in _samples(batches(), reader, options, report, advance):
            yield columns.example(sample)

    datasets.disable_progress_bars()  # ours is shown instead
    datasets.logging.set_verbosity_error()
    try:
        # a fingerprint given: the generator (a closure over the reader) is never hashed
        dataset = datasets.Dataset.from_generator(
            examples, features=features, cache_dir=str(cache), fingerprint=f"imagemill-export-{os.getpid()}"
        )
    except DatasetGenerationError as exc:
        if isinstance(exc.__cause__, UserError):
            raise exc.__cause__ from None
        raise
    except ValueError:
        if report.exported:
            raise
        # datasets cannot make a split of no rows from a generator: an empty export is still a dataset
        dataset = datasets.Dataset.from_dict({name: [] for name in features}, features=features)
    shards = None  # datasets' own: files of at most 500 MB
    if not len(dataset):
        shards = 1  # datasets would write none, and a folder of no shards does not load
    elif options.shard_size:
        shards = math.ceil(len(dataset) / options.shard_size)
    dataset.save_to_disk(str(out), num_shards=shards)
    report.shards = len(list(out.glob("data-*.arrow")))


@dataclass
class _Columns:
    """The dataset's columns, learnt in a first pass over the records: the embedding's size and
    the moderation labels vary with the models that made the records."""

    records: int = 0
    dim: int | None = None
    labels: set[str] = field(default_factory=set)

    @classmethod
    def learn(cls, batches: Iterable[list[Record]], options: Options, advance: Callable[[int], None]) -> "_Columns":
        found = cls()
        for batch in batches:
            advance(len(batch))
            for record in batch:
                if not options.where(record) or (options.only_ok and record.error is not None):
                    continue
                found.records += 1
                if record.moderation is not None:
                    found.labels.update(record.moderation.scores)
                if record.embedding is not None:
                    if found.dim is not None and record.embedding.dim != found.dim:
                        raise UserError(
                            f"{record.uri} has an embedding of dim {record.embedding.dim}, others of dim "
                            f"{found.dim}: export one model's records at a time (--where job=…)"
                        )
                    found.dim = record.embedding.dim
        return found

    def features(self) -> "Features":
        from datasets import Features, Image, List, Value

        columns: dict[str, Any] = {
            "image": Image(),
            "uri": Value("string"),
            "etag": Value("string"),
            "bytes": Value("int64"),
            "width": Value("int32"),
            "height": Value("int32"),
            "format": Value("string"),
            "caption": Value("string"),
            "tags": List({"tag": Value("string"), "score": Value("float64")}),
            "flagged": Value("bool"),
        }
        if self.labels:
            columns["scores"] = {label: Value("float64") for label in sorted(self.labels)}
        if self.dim is not None:
            columns["embedding"] = List(Value("float32"), length=self.dim)
        columns |= {
            "error": Value("string"),
            "signature": Value("string"),
            "job_id": Value("string"),
            "processed_at": Value("timestamp[us, tz=UTC]"),
        }
        return Features(columns)

    def example(self, sample: Sample) -> dict[str, Any]:
        record = sample.record
        image = record.image
        row: dict[str, Any] = {
            "image": None if sample.data is None else {"bytes": sample.data, "path": None},
            "uri": record.uri,
            "etag": record.etag,
            "bytes": record.bytes,
            "width": image.width if image else None,
            "height": image.height if image else None,
            "format": image.format if image else None,
            "caption": record.caption.text if record.caption else None,
            "tags": [{"tag": t.tag, "score": t.score} for t in record.tags.labels] if record.tags else None,
            "flagged": record.moderation.flagged if record.moderation else None,
            "error": record.error.kind.value if record.error else None,
            "signature": record.signature,
            "job_id": record.job_id,
            "processed_at": record.processed_at,
        }
        if self.labels:
            scores = record.moderation.scores if record.moderation else None
            row["scores"] = None if scores is None else {label: scores.get(label) for label in self.labels}
        if self.dim is not None:
            row["embedding"] = record.embedding.array() if record.embedding else None
        return row
