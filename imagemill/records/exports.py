"""Exports for training: records beside their images' original bytes, as a Hugging Face `datasets`
dataset (`save_to_disk`) or WebDataset tar shards.

Streamed: records come in batches, images are read a few dozen at a time through the project's
`ObjectReader` (its byte limits included) and written as they come, so memory stays flat however
many records there are. An image gone or replaced since it was annotated is counted and skipped.
The export is built beside `--out` and moved into place when complete. Keys come from the uri
(stable whatever the filter), and `--split` deals records into splits by a hash of the uri (stable
across exports).
"""

import hashlib
import io
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from boto3.exceptions import S3UploadFailedError
from botocore.exceptions import BotoCoreError, ClientError

from imagemill.core import layout
from imagemill.core.batching import batched
from imagemill.core.errors import ErrorKind, ImageError, UserError
from imagemill.core.images import Blob, ObjectReader, S3Location, make_s3_client, parse_s3
from imagemill.core.schemas import ImageRef, Record
from imagemill.core.settings import Settings
from imagemill.core.sinks import read_records
from imagemill.records.choices import ExportFormat
from imagemill.records.filters import Where

if TYPE_CHECKING:
    from datasets import Features
    from mypy_boto3_s3 import S3Client

EXPORT_EXTRA = "pip install 'imagemill[export]'"
READ_AHEAD = 64  # images in flight at once: bounds memory at READ_AHEAD x the largest image
SHOWN = 5  # uris named per kind of skipped image
SHARD_PATTERN = "shard-%06d.tar"
# the decoded format's usual extension; a format not named here keeps the extension of its uri
EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif"}

Batches = Callable[[], Iterable[list[Record]]]


class ImageReader(Protocol):
    """Reads one image's bytes (`core.images.ObjectReader`); an `ImageError` when it cannot."""

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
    repeated: Skipped = field(default_factory=Skipped)  # records of an image exported already (--history)
    splits: dict[str, int] = field(default_factory=dict)  # records exported per split
    unmarked: int = 0  # records read whose dedup role --where names but dedup never wrote back


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
    split: tuple[tuple[str, float], ...] = ()  # (name, share) in order; () for one whole export
    encoding: "Encoding | None" = None  # re-encode the images (None: their original bytes)
    layout: str = layout.LAYOUT  # the HF columns: `core.layout`'s, or LEGACY's (deprecated) for one release


# what `--image-format` names, as Pillow calls it and the file extension
IMAGE_FORMATS = {"jpeg": ("JPEG", "jpg"), "webp": ("WEBP", "webp"), "png": ("PNG", "png")}


@dataclass(frozen=True)
class Encoding:
    """Images re-encoded for training: at most `max_side` pixels on the longer side (None: as they
    are), in `image_format` (None: JPEG, PNG and WebP keep theirs, others become PNG) at `quality`."""

    max_side: int | None = None
    image_format: str | None = None
    quality: int = 90

    def apply(self, data: bytes) -> tuple[bytes, str]:
        """The image's new bytes and extension: EXIF orientation applied (the picture as displayed),
        colours converted to sRGB when it carries an ICC profile (the profile is then dropped),
        shrunk to `max_side`, encoded. ImageError (not_an_image) when Pillow cannot read it."""
        from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError  # Pillow: only an export that re-encodes

        try:
            opened = Image.open(io.BytesIO(data))
            if self.max_side and opened.format in ("JPEG", "MPO"):
                opened.draft("RGB", (self.max_side, self.max_side))  # decode at reduced size where JPEG can
            opened.load()
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            raise ImageError(ErrorKind.NOT_AN_IMAGE, f"cannot re-encode it: {exc}") from None
        source_format = opened.format
        image: Image.Image = ImageOps.exif_transpose(opened)
        profile = image.info.get("icc_profile")
        if profile:
            try:
                source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
                rgb = image.convert("RGBA" if image.mode in ("RGBA", "LA", "PA") else "RGB")
                converted = ImageCms.profileToProfile(rgb, source, ImageCms.createProfile("sRGB"), outputMode=rgb.mode)
                image = converted if converted is not None else rgb
            except (ImageCms.PyCMSError, OSError, ValueError):
                pass  # a profile Little CMS cannot use: the values are kept as they are
        if self.max_side and max(image.size) > self.max_side:
            image.thumbnail((self.max_side, self.max_side), Image.Resampling.LANCZOS)
        name = self.image_format or {"JPEG": "jpeg", "MPO": "jpeg", "PNG": "png", "WEBP": "webp"}.get(
            source_format or "", "png"
        )
        pillow, extension = IMAGE_FORMATS[name]
        has_alpha = image.mode in ("RGBA", "LA", "PA", "P") and (image.mode != "P" or "transparency" in image.info)
        if pillow == "JPEG" or not has_alpha:
            if has_alpha:  # JPEG holds no transparency: composited on white, as the models saw it
                rgba = image.convert("RGBA")
                canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                image = Image.alpha_composite(canvas, rgba)
            image = image.convert("RGB")
        else:
            image = image.convert("RGBA")
        out = io.BytesIO()
        options: dict[str, Any] = {"quality": self.quality} if pillow in ("JPEG", "WEBP") else {"optimize": True}
        image.save(out, format=pillow, **options)
        return out.getvalue(), extension


def parse_split(text: str) -> tuple[tuple[str, float], ...]:
    """`train=0.98,val=0.02` -> (("train", 0.98), ("val", 0.02)); UserError (one line) unless each
    part is name=share, the names distinct and plain, the shares positive and adding up to 1."""
    parts = []
    for part in text.split(","):
        name, _, share = part.partition("=")
        name = name.strip()
        try:
            value = float(share)
        except ValueError:
            raise UserError(f"--split {text}: expected name=share,… such as train=0.98,val=0.02") from None
        if not name.replace("-", "").replace("_", "").isalnum() or value <= 0:
            raise UserError(f"--split {text}: {part.strip()!r} needs a plain name and a share above 0")
        parts.append((name, value))
    if len({name for name, _ in parts}) != len(parts):
        raise UserError(f"--split {text}: a split is named twice")
    if abs(sum(value for _, value in parts) - 1) > 1e-6:
        raise UserError(f"--split {text}: the shares add up to {sum(v for _, v in parts):g}, not 1")
    return tuple(parts)


def uri_fraction(uri: str) -> float:
    """Where a uri falls in [0, 1): the first 64 bits of its SHA-256. The same uri, the same place,
    whatever else is exported with it: splits stay put across exports."""
    return int.from_bytes(hashlib.sha256(uri.encode()).digest()[:8], "big") / 2**64


def split_of(uri: str, split: tuple[tuple[str, float], ...]) -> str:
    """The split a uri belongs to: the one whose share of [0, 1) holds its `uri_fraction`."""
    place, edge = uri_fraction(uri), 0.0
    for name, share in split:
        edge += share
        if place < edge:
            return name
    return split[-1][0]


def uri_key(uri: str) -> str:
    """A sample's key, from its uri: 20 hex digits of its SHA-256 (no dot, which WebDataset reads as
    the start of an extension); the same image has the same key in every export."""
    return hashlib.sha256(uri.encode()).hexdigest()[:20]


def export_records(
    records: str,
    fmt: ExportFormat,
    out: Path | str,
    settings: Settings,
    options: Options,
    *,
    history: bool = False,
    advance: Callable[[int], None] = lambda n: None,
    total: Callable[[int], None] = lambda n: None,
) -> ExportReport:
    """`export` of a RECORDS argument (its current records unless `history`), images read through
    the settings' `ObjectReader`; to a local directory, or to an `s3://bucket/prefix/` (built in a
    temporary directory, then uploaded: `upload_to`)."""

    def batches() -> Iterable[list[Record]]:
        return read_records(records, history=history)

    reader = ObjectReader(settings)
    if not str(out).startswith("s3://"):
        return export(batches, fmt, Path(out), reader, options, advance, total)
    client = make_s3_client(settings)
    location = _empty_prefix(client, str(out))
    with tempfile.TemporaryDirectory(prefix="imagemill-export-") as scratch:
        built = Path(scratch) / "export"
        report = export(batches, fmt, built, reader, options, advance, total)
        upload_to(client, built, location)
    return report


def _empty_prefix(client: "S3Client", out: str) -> S3Location:
    """The bucket and prefix of `--out s3://…`, checked before any record is read: an existing
    bucket where nothing is under the prefix yet. UserError (one line) otherwise."""
    try:
        location = parse_s3(out if out.endswith("/") else out + "/")
    except ValueError as exc:
        raise UserError(f"--out {out}: {exc}") from None
    try:
        found = client.list_objects_v2(Bucket=location.bucket, Prefix=location.key, MaxKeys=1)
    except (BotoCoreError, ClientError) as exc:
        raise UserError(f"--out {out}: cannot list it ({exc})") from None
    if found.get("KeyCount", 0):
        raise UserError(f"--out {out} already holds objects: name a new prefix")
    return location


def upload_to(client: "S3Client", folder: Path, location: S3Location) -> None:
    """Every file under `folder` to the same relative keys under the prefix (multipart for large
    ones, boto3's transfer manager); the export's own index files last, so a reader that finds
    them finds the data they name."""
    files = sorted(path for path in folder.rglob("*") if path.is_file())
    last = {"dataset_dict.json", "dataset_info.json", "state.json"}
    for path in sorted(files, key=lambda p: p.name in last):
        key = location.key + path.relative_to(folder).as_posix()
        try:
            client.upload_file(str(path), location.bucket, key)
        except (BotoCoreError, ClientError, S3UploadFailedError) as exc:
            raise UserError(f"uploading {key} to s3://{location.bucket}/ failed: {exc}") from None


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
        if not options.split:
            _write_one(fmt, batches, built, work / "cache", reader, options, report, advance, total)
        else:
            built.mkdir()
            read = unmarked = 0
            for name, _ in options.split:
                # each split is one pass over the records, keeping those whose uri falls in it
                part = replace(options, split=(), where=_in_split(options.where, name, options.split))
                before = report.exported
                _write_one(fmt, batches, built / name, work / f"cache-{name}", reader, part, report, advance, total)
                report.splits[name] = report.exported - before
                if name == options.split[0][0]:
                    read, unmarked = report.read, report.unmarked
            # every pass read every record: they count once, and what no split kept was filtered out
            report.read, report.unmarked = read, unmarked
            skipped = report.missing.count + report.changed.count + report.unreadable.count
            report.filtered = read - report.exported - skipped
            if fmt is ExportFormat.HF:  # what `DatasetDict.save_to_disk` writes beside its splits
                splits = [name for name, _ in options.split]
                (built / "dataset_dict.json").write_text(json.dumps({"splits": splits}))
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(built, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report


def _write_one(
    fmt: ExportFormat,
    batches: Batches,
    built: Path,
    cache: Path,
    reader: ImageReader,
    options: Options,
    report: ExportReport,
    advance: Callable[[int], None],
    total: Callable[[int], None],
) -> None:
    if fmt is ExportFormat.HF:
        _write_hf(batches, built, cache, reader, options, report, advance, total)
    else:
        built.mkdir()
        _write_webdataset(_samples(batches(), reader, options, report, advance), built, options, report)


def _in_split(where: Where, name: str, split: tuple[tuple[str, float], ...]) -> Where:
    """`where` and the record's uri falling in split `name`."""
    in_split: Callable[[Record], bool] = lambda record: split_of(record.uri, split) == name  # noqa: E731
    return replace(where, tests=(*where.tests, in_split))


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
            blob = reader.read(ImageRef(uri=record.uri, etag=record.etag))
            if options.encoding is not None:  # on the read threads: decoding and encoding are the cost
                data, ext = options.encoding.apply(blob.data)
                encoded[id(record)] = ext
                blob = Blob(data=data, etag=blob.etag)
            return blob
        except ImageError as exc:
            return exc

    encoded: dict[int, str] = {}  # each re-encoded record's extension, by id while its batch is out

    seen: set[bytes] = set()  # 8 bytes of each exported uri's hash: --history repeats images
    with ThreadPoolExecutor(options.threads, thread_name_prefix="export-read") as pool:
        for batch in batches:
            report.read += len(batch)
            report.unmarked += sum(options.where.unmarked(r) for r in batch)
            kept = [r for r in batch if options.where(r) and not (options.only_ok and r.error is not None)]
            report.filtered += len(batch) - len(kept)
            advance(len(batch) - len(kept))
            for part in batched(kept, READ_AHEAD):
                for record, got in zip(part, pool.map(fetch, part), strict=True):
                    sample = _sample(record, got, report, seen, encoded.pop(id(record), None))
                    if sample is not None:
                        yield sample
                    advance(1)


def _sample(
    record: Record, got: Blob | ImageError | None, report: ExportReport, seen: set[bytes], ext: str | None = None
) -> Sample | None:
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
    key = uri_key(record.uri)
    digest = hashlib.sha256(record.uri.encode()).digest()[:8]
    if digest in seen:  # another record of an image already exported (--history): a key of its own
        report.repeated.add(record.uri)
        key = f"{key}-{hashlib.sha256(f'{record.signature}/{record.processed_at}'.encode()).hexdigest()[:8]}"
    seen.add(digest)
    if got is None:
        return Sample(key, record, None, None)
    return Sample(key, record, got.data, ext or extension(record))


def extension(record: Record) -> str:
    """The image's real extension: from its decoded format, else its uri's, else `bin`."""
    fmt = record.image.format if record.image else None
    if fmt and fmt.upper() in EXTENSIONS:
        return EXTENSIONS[fmt.upper()]
    suffix = Path(record.uri.rsplit("/", 1)[-1]).suffix.lstrip(".").lower()
    return suffix if suffix.isalnum() else "bin"


def _write_webdataset(samples: Iterator[Sample], out: Path, options: Options, report: ExportReport) -> None:
    try:
        import webdataset  # the export extra: optional, and only this format needs it
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
        # the export extra: optional, heavy, and only this format needs it
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

    before = report.exported  # of earlier splits
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
        if report.exported > before:
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
    """The dataset's columns, learnt in a first pass over the records: the embedding's size varies
    with the model that made the records, and the statistics' and probes' columns are there when
    some record holds them (the deprecated v1 layout's `scores` struct also takes the labels seen)."""

    records: int = 0
    dim: int | None = None
    labels: set[str] = field(default_factory=set)  # the moderation labels (layout v1's `scores` struct)
    quality: bool = False  # some record holds image statistics
    probes: bool = False  # some record holds probes' scores
    layout: str = layout.LAYOUT

    @classmethod
    def learn(cls, batches: Iterable[list[Record]], options: Options, advance: Callable[[int], None]) -> "_Columns":
        found = cls(layout=options.layout)
        for batch in batches:
            advance(len(batch))
            for record in batch:
                if not options.where(record) or (options.only_ok and record.error is not None):
                    continue
                found.records += 1
                if record.moderation is not None:
                    found.labels.update(record.moderation.scores)
                found.quality = found.quality or record.quality is not None
                found.probes = found.probes or record.scores is not None
                if record.embedding is not None:
                    if found.dim is not None and record.embedding.dim != found.dim:
                        raise UserError(
                            f"{record.uri} has an embedding of dim {record.embedding.dim}, others of dim "
                            f"{found.dim}: export one model's records at a time (--where job=…)"
                        )
                    found.dim = record.embedding.dim
        return found

    def columns(self) -> dict[str, Any]:
        """The layout's columns this export holds (layout v2; `core.layout`)."""
        return layout.export_columns(quality=self.quality, probes=self.probes)

    def features(self) -> "Features":
        from datasets import Features, Image, List, Value  # the export extra, imported by `_write_hf` already

        if self.layout == layout.LAYOUT:
            return Features({"image": Image(), **layout.features(self.columns(), self.dim)})

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
        data = None if sample.data is None else {"bytes": sample.data, "path": None}
        if self.layout == layout.LAYOUT:
            return {"image": data, **layout.row(record, self.columns())}
        image = record.image
        row: dict[str, Any] = {
            "image": data,
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
