"""A JPEG's header read on the CPU, to decide whether a device may decode it: size, mode, orientation.

Pillow's lazy open reads the header only, so the pixel limit is checked before any pixel is
decoded. Kept apart from `imagemill.pipeline.prepare.device_decode` because the prefetch threads use it
and importing imagemill must not import torch.
"""

import io
from dataclasses import dataclass

from PIL import Image

from imagemill.pipeline.prepare.decode import ORIENTATION_TAG, ImageFacts, check_pixels

# modes nvjpeg turns into RGB itself; CMYK/YCCK (Adobe) JPEGs are not among them
DEVICE_MODES = ("RGB", "L")
EOI = b"\xff\xd9"
EOI_SEARCH = 4096  # bytes from the end where the end-of-image marker must be (trailers are allowed)


@dataclass(frozen=True)
class JpegHeader:
    """What the CPU read from a JPEG's header: the stored size and the EXIF orientation."""

    width: int  # as stored, before orientation
    height: int
    orientation: int

    def decoded(self) -> ImageFacts:
        """The record's facts, the same as the Pillow path's: sizes after orientation, format JPEG."""
        swapped = self.orientation in (5, 6, 7, 8)
        width, height = (self.height, self.width) if swapped else (self.width, self.height)
        return ImageFacts(width=width, height=height, format="JPEG")


@dataclass(frozen=True)
class PendingJpeg:
    """A JPEG whose pixels the device decoder will make; `data` is still encoded."""

    data: bytes
    header: JpegHeader


def read_header(data: bytes, max_pixels: int) -> JpegHeader | None:
    """The header of a JPEG the device may decode, or None (the Pillow path takes it).

    Raises ImageError (too large) over the pixel limit, before any pixel is decoded. None for
    anything not a plain RGB or grey JPEG, and for a file cut short (no end-of-image marker), so
    that the Pillow path names its error exactly as without a device decoder."""
    if not data.startswith(b"\xff\xd8") or EOI not in data[-EOI_SEARCH:]:
        return None
    try:
        image = Image.open(io.BytesIO(data))
        if image.format != "JPEG" or image.mode not in DEVICE_MODES:
            return None
        width, height = image.size
        orientation = int(image.getexif().get(ORIENTATION_TAG, 1))
    except Exception:  # noqa: BLE001 - an unreadable header: the Pillow path names the error
        return None
    check_pixels(width, height, max_pixels)
    return JpegHeader(width=width, height=height, orientation=orientation if 1 <= orientation <= 8 else 1)
