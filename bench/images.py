"""The benchmark's input: photo-like JPEGs from the test fixtures, generated once and cached."""

import json
import time
from dataclasses import dataclass
from pathlib import Path

from tests.fixtures.images import write_photos

MARKER = "generated.json"


@dataclass(frozen=True)
class ImageSet:
    folder: Path
    paths: tuple[Path, ...]
    width: int
    height: int
    generate_s: float  # 0 when the cache already held them

    @property
    def count(self) -> int:
        return len(self.paths)

    @property
    def total_bytes(self) -> int:
        return sum(path.stat().st_size for path in self.paths)


def parse_size(text: str) -> tuple[int, int]:
    """`1280x960` -> (1280, 960)."""
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"size must look like 1280x960, not {text!r}") from None
    if width < 16 or height < 16:
        raise ValueError(f"size {text} is too small (16x16 at least)")
    return width, height


def photo_set(cache: Path, count: int, width: int, height: int) -> ImageSet:
    """`count` photo JPEGs of `width`x`height` in a folder of their own (reused when present)."""
    folder = cache / "images" / f"{width}x{height}-{count}"
    marker = folder / MARKER
    if marker.is_file():
        paths = tuple(sorted(folder.glob("*.jpg")))
        if len(paths) == count:
            return ImageSet(folder, paths, width, height, 0.0)
    started = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.jpg"):
        stale.unlink()
    paths = tuple(write_photos(folder, count, width, height))
    elapsed = time.perf_counter() - started
    marker.write_text(json.dumps({"count": count, "width": width, "height": height}))
    return ImageSet(folder, paths, width, height, elapsed)


def cycling_manifest(path: Path, images: ImageSet, total: int) -> Path:
    """A `.txt` manifest of `total` lines naming the set's files over and over (absolute paths)."""
    names = [str(p) for p in images.paths]
    with path.open("w", encoding="utf-8") as handle:
        for i in range(total):
            handle.write(names[i % len(names)] + "\n")
    return path


def synthetic_manifest(path: Path, total: int) -> Path:
    """A `.txt` manifest of `total` s3:// URIs that need not exist (for listing at scale)."""
    with path.open("w", encoding="utf-8") as handle:
        for i in range(total):
            handle.write(f"s3://bench-bucket/photos/{i // 1000:05d}/img_{i:08d}.jpg\n")
    return path
