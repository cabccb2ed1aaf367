"""Bytes, or a picture already in memory, to a model-ready RGB picture: limits, EXIF orientation, RGB.

JPEGs (and MPO, their multi-picture kind) are decoded at reduced size (`Image.draft`) when the models
need fewer pixels.
"""

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from imagemill.core.errors import ErrorKind, ImageError

# we check pixel counts ourselves (against the configured limit) before any pixel is decoded
warnings.simplefilter("ignore", Image.DecompressionBombWarning)
ImageFile.LOAD_TRUNCATED_IMAGES = False

VECTOR_MARKERS = (b"<svg", b"<?xml")
# how far into a file the vector markers are looked for (as file(1) does, the head of the file)
SNIFF_BYTES = 512
# formats whose decoder can scale while decoding (`Image.draft`): JPEG, and MPO, the multi-picture
# JPEG many phones write (a depth map or a second frame after the first picture)
DRAFTABLE = frozenset({"JPEG", "MPO"})
# ISO base media files (`....ftyp<brand>`) whose brand says HEIF: an image format, decodable with the plugin
HEIF_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", b"mif1", b"msf1"})
HEIC_EXTRA = "pip install 'imagemill[heic]'"


def register_heif() -> bool:
    """Teach Pillow HEIC/HEIF when the `heic` extra (pillow-heif) is installed; whether it is."""
    try:
        import pillow_heif  # optional: the `heic` extra
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


HEIF_DECODABLE = register_heif()
WHITE = (255, 255, 255)
ORIENTATION_TAG = 0x0112


@dataclass(frozen=True)
class ImageFacts:
    """The original image's facts for the record (a device decoder knows them from the header)."""

    width: int  # after EXIF orientation, at full resolution
    height: int
    format: str | None


@dataclass(frozen=True, kw_only=True)
class Decoded(ImageFacts):
    """A picture ready for the models, with the original image's facts for the record."""

    image: Image.Image  # RGB, possibly reduced in size


def decode(data: bytes, *, max_pixels: int, min_side: int | None = None) -> Decoded:
    """Decode `data`; keep the shorter side at least `min_side` when reducing. Raises ImageError."""
    if not data:
        raise ImageError(ErrorKind.EMPTY, "the file is empty (0 bytes)")
    image = _open(data)
    width, height = image.size
    _check_pixels(width, height, max_pixels)
    fmt = image.format
    if min_side and fmt in DRAFTABLE:
        image.draft("RGB", _draft_box(width, height, min_side))
    _load(image)
    if _swaps_sides(image):
        width, height = height, width
    image = ImageOps.exif_transpose(image)
    image = to_rgb(image)
    if min_side:
        image = reduce_to(image, min_side)
    return Decoded(image=image, width=width, height=height, format=fmt)


def from_image(image: Image.Image, *, max_pixels: int, min_side: int | None = None) -> Decoded:
    """A picture the caller already holds -> what `decode` gives for its file. Raises ImageError.

    The same limits, EXIF orientation, RGB conversion and reduction; the caller's object is read,
    never changed (a lazily opened file is loaded, as any use of it would)."""
    width, height = image.size
    _check_pixels(width, height, max_pixels)
    fmt = image.format  # set when the picture came from Image.open; None when made in memory
    _load(image)
    if _swaps_sides(image):
        width, height = height, width
    if image.getexif().get(ORIENTATION_TAG, 1) != 1:
        # only then: exif_transpose copies even an upright picture, and a caller's may be large
        image = ImageOps.exif_transpose(image)
    image = to_rgb(image)
    if min_side:
        image = reduce_to(image, min_side)
    return Decoded(image=image, width=width, height=height, format=fmt)


def check_pixels(width: int, height: int, max_pixels: int) -> None:
    """ImageError (too large) when a picture of this size is over the limit: the header's size suffices."""
    _check_pixels(width, height, max_pixels)


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImageError(
            ErrorKind.TOO_LARGE,
            f"{width}x{height} is {width * height:,} pixels, over the limit of {max_pixels:,} "
            "(IMAGEMILL_MAX_IMAGE_PIXELS)",
        )


def _open(data: bytes) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageError(ErrorKind.TOO_LARGE, f"decompression bomb refused: {exc}") from None
    except UnidentifiedImageError:
        head = data[:SNIFF_BYTES].lstrip().lower()
        if any(marker in head for marker in VECTOR_MARKERS):
            raise ImageError(ErrorKind.UNSUPPORTED, "vector images (SVG) are not supported") from None
        if data[4:8] == b"ftyp" and data[8:12] in HEIF_BRANDS and not HEIF_DECODABLE:
            raise ImageError(ErrorKind.UNSUPPORTED, f"a HEIC/HEIF image: decoding it needs {HEIC_EXTRA}") from None
        raise ImageError(
            ErrorKind.NOT_AN_IMAGE, f"not an image format Pillow knows (starts with {data[:8]!r})"
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(ErrorKind.NOT_AN_IMAGE, f"cannot read the image header: {exc}") from None


def _load(image: Image.Image) -> None:
    try:
        image.load()  # the first frame only, for animations
    except OSError as exc:
        if "truncated" in str(exc) or "broken data stream" in str(exc):
            raise ImageError(ErrorKind.TRUNCATED, f"the image data is cut short: {exc}") from None
        raise ImageError(ErrorKind.UNSUPPORTED, f"cannot decode this {image.format} image: {exc}") from None
    except (SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(ErrorKind.TRUNCATED, f"the image data is damaged: {exc}") from None


def _draft_box(width: int, height: int, min_side: int) -> tuple[int, int]:
    # draft keeps the picture at least this big; scale so the shorter side stays >= min_side
    scale = min_side / min(width, height)
    return (max(1, round(width * scale)), max(1, round(height * scale)))


def _swaps_sides(image: Image.Image) -> bool:
    # EXIF orientations 5-8 turn the picture by 90 degrees
    return image.getexif().get(ORIENTATION_TAG, 1) in (5, 6, 7, 8)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any mode Pillow opens -> RGB; transparency is composited on white, 16-bit scaled down."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return _high_depth_to_rgb(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*WHITE, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def _high_depth_to_rgb(image: Image.Image) -> Image.Image:
    pixels = np.asarray(image, dtype=np.float32)
    peak = float(pixels.max(initial=0.0))
    if image.mode.startswith("I;16") or 255.0 < peak <= 65535.0:
        full = 65535.0
    elif peak > 65535.0:
        full = peak
    elif image.mode == "F" and peak <= 1.0:
        full = 1.0
    else:
        full = 255.0
    scaled = np.clip(pixels * (255.0 / full), 0, 255).astype(np.uint8)
    return Image.fromarray(scaled).convert("RGB")


def reduce_to(image: Image.Image, min_side: int) -> Image.Image:
    """Shrink by an integer factor (cheap box filter) while the shorter side stays >= min_side."""
    factor = min(image.size) // min_side
    return image.reduce(factor) if factor >= 2 else image
