"""Decoding: every mode to RGB, limits enforced, broken files named by the right error kind."""

import io
import struct
import zlib

import pytest
from PIL import Image, ImageFile, JpegImagePlugin

import imagemill.pipeline.prepare.decode as decoding
from imagemill.core.errors import ErrorKind, ImageError
from imagemill.pipeline.prepare.decode import decode, from_image, to_rgb
from tests.fixtures.images import mixed_cases, photo_jpeg

LIMIT = 64_000_000


@pytest.mark.parametrize("case", mixed_cases(), ids=lambda c: c.name)
def test_each_mixed_case_decodes_or_fails_with_its_kind(case) -> None:
    if case.expected_error:
        with pytest.raises(ImageError) as raised:
            decode(case.data, max_pixels=LIMIT, min_side=64)
        assert raised.value.kind == ErrorKind(case.expected_error)
        assert raised.value.message
    else:
        decoded = decode(case.data, max_pixels=LIMIT, min_side=64)
        assert decoded.image.mode == "RGB"
        assert (decoded.width, decoded.height) == case.expected_size


def multi_picture(width: int, height: int) -> bytes:
    """An MPO file as phones write it: the photo, then a second picture (a depth map, say)."""
    first = Image.open(io.BytesIO(photo_jpeg(width, height)))
    out = io.BytesIO()
    first.save(out, "MPO", save_all=True, append_images=[Image.new("L", (width // 4, height // 4), 128)])
    return out.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "MPO"])
def test_jpeg_is_drafted_to_reduced_size_but_reports_full_size(monkeypatch, fmt: str) -> None:
    drafts: list[tuple[int, int]] = []
    real_draft = JpegImagePlugin.JpegImageFile.draft
    monkeypatch.setattr(
        JpegImagePlugin.JpegImageFile,
        "draft",
        lambda self, mode, size: drafts.append(size) or real_draft(self, mode, size),
    )
    data = photo_jpeg(1280, 960) if fmt == "JPEG" else multi_picture(1280, 960)
    decoded = decode(data, max_pixels=LIMIT, min_side=224)
    assert drafts == [(299, 224)]  # the DCT scaling chooses its size from this: shorter side kept >= 224
    assert (decoded.width, decoded.height, decoded.format) == (1280, 960, fmt)
    assert min(decoded.image.size) >= 224
    assert decoded.image.size[0] < 1280


def test_formats_without_scaled_decoding_are_never_asked_for_a_draft(monkeypatch) -> None:
    asked: list[str | None] = []
    monkeypatch.setattr(Image.Image, "draft", lambda self, mode, size: asked.append(self.format))
    for fmt in ("PNG", "WEBP", "TIFF", "PPM"):
        out = io.BytesIO()
        Image.open(io.BytesIO(photo_jpeg(640, 480))).save(out, fmt)
        assert decode(out.getvalue(), max_pixels=LIMIT, min_side=224).format == fmt
    assert asked == []


def test_vector_markers_are_looked_for_in_the_first_512_bytes() -> None:
    # as file(1) sniffs: an SVG tag that ends on byte 512 is a vector image, one a byte later is not
    within, beyond = b" " * 508 + b"<svg>", b" " * 509 + b"<svg>"
    with pytest.raises(ImageError) as raised:
        decode(within, max_pixels=LIMIT)
    assert raised.value.kind == ErrorKind.UNSUPPORTED
    with pytest.raises(ImageError) as raised:
        decode(beyond, max_pixels=LIMIT)
    assert raised.value.kind == ErrorKind.NOT_AN_IMAGE


def test_without_min_side_the_picture_keeps_full_resolution() -> None:
    decoded = decode(photo_jpeg(640, 480), max_pixels=LIMIT)
    assert decoded.image.size == (640, 480)


def test_pixel_limit_is_configurable_and_checked_before_decoding() -> None:
    with pytest.raises(ImageError) as raised:
        decode(photo_jpeg(640, 480), max_pixels=640 * 480 - 1)
    assert raised.value.kind == ErrorKind.TOO_LARGE
    assert "IMAGEMILL_MAX_IMAGE_PIXELS" in raised.value.message


def test_transparent_pixels_are_composited_on_white() -> None:
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    la = Image.new("LA", (4, 4), (0, 255))
    assert to_rgb(la).getpixel((0, 0)) == (0, 0, 0)


def test_sixteen_bit_grey_is_scaled_not_clipped() -> None:
    grey = Image.frombytes("I;16", (2, 1), (32768).to_bytes(2, "little") * 2)
    value = to_rgb(grey).getpixel((0, 0))
    assert 120 <= value[0] <= 135 and value[0] == value[1] == value[2]


def test_cmyk_becomes_rgb() -> None:
    buffer = io.BytesIO()
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(buffer, "JPEG")
    decoded = decode(buffer.getvalue(), max_pixels=LIMIT)
    red, green, blue = decoded.image.getpixel((4, 4))
    assert decoded.image.mode == "RGB" and red > 200 and green < 60 and blue < 60


def test_animation_uses_its_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    red, _, blue = decode(buffer.getvalue(), max_pixels=LIMIT).image.getpixel((4, 4))
    assert red > 200 and blue < 60


def header_only_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but whose pixel data is one empty row: a full decode
    of it fails (cut short), so only a check made from the header alone can call it too large."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * (3 * width + 1)))
        + chunk(b"IEND", b"")
    )


def opened(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))  # lazily: Pillow reads the header only


@pytest.mark.parametrize("entry", ["bytes", "picture"])
def test_pixel_limit_is_checked_from_the_header_before_any_pixel_is_decoded(entry: str, monkeypatch) -> None:
    data = header_only_png(6000, 5000)  # 30 MP claimed, a few bytes of pixels
    loads: list[str] = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append("load") or real_load(self))
    limit = 6000 * 5000 - 1
    with pytest.raises(ImageError) as raised:
        decode(data, max_pixels=limit, min_side=64) if entry == "bytes" else from_image(opened(data), max_pixels=limit)
    assert raised.value.kind == ErrorKind.TOO_LARGE, raised.value.message
    assert "6000x5000" in raised.value.message
    assert loads == []  # refused before Pillow decoded anything


def test_a_picture_at_the_pixel_limit_is_decoded_and_the_refusal_says_how_many_pixels() -> None:
    assert decode(photo_jpeg(64, 48), max_pixels=64 * 48).image.size == (64, 48)  # the limit itself is allowed
    with pytest.raises(ImageError, match=r"64x48 is 3,072 pixels, over the limit of 3,071"):
        decode(photo_jpeg(64, 48), max_pixels=64 * 48 - 1)


def test_an_exif_rotated_picture_in_memory_is_turned_like_its_file() -> None:
    stored = Image.new("RGB", (60, 40), (255, 0, 0))
    stored.paste((0, 0, 255), (0, 0, 30, 40))  # left half blue in storage
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    buffer = io.BytesIO()
    stored.save(buffer, "PNG", exif=exif)
    picture = Image.open(io.BytesIO(buffer.getvalue()))
    decoded = from_image(picture, max_pixels=LIMIT)
    assert (decoded.width, decoded.height) == decoded.image.size == (40, 60)
    assert decoded.image.getpixel((20, 5))[2] > 200  # blue now on top
    assert from_image(stored, max_pixels=LIMIT).image.size == (60, 40)  # no EXIF: as it is


def test_a_decoder_failing_with_value_error_is_a_truncated_record(monkeypatch) -> None:
    def broken(self: ImageFile.ImageFile) -> None:
        raise ValueError("broken data")

    monkeypatch.setattr(ImageFile.ImageFile, "load", broken)
    with pytest.raises(ImageError) as raised:
        decode(photo_jpeg(64, 48), max_pixels=LIMIT)
    assert raised.value.kind == ErrorKind.TRUNCATED


def test_a_header_pillow_cannot_read_is_not_an_image(monkeypatch) -> None:
    def unreadable(*_: object, **__: object) -> Image.Image:
        raise OSError("cannot identify the header")

    monkeypatch.setattr(Image, "open", unreadable)
    with pytest.raises(ImageError) as raised:
        decode(b"\x89PNG not really", max_pixels=LIMIT)
    assert raised.value.kind == ErrorKind.NOT_AN_IMAGE and "header" in raised.value.message


def test_a_picture_in_memory_mirrored_by_exif_is_mirrored_back() -> None:
    stored = Image.new("RGB", (60, 40), (255, 0, 0))
    stored.paste((0, 0, 255), (0, 0, 30, 40))  # left half blue in storage
    exif = Image.Exif()
    exif[0x0112] = 2  # "mirror horizontally to display"
    buffer = io.BytesIO()
    stored.save(buffer, "PNG", exif=exif)
    decoded = from_image(Image.open(io.BytesIO(buffer.getvalue())), max_pixels=LIMIT)
    assert decoded.image.size == (60, 40)
    assert decoded.image.getpixel((55, 20))[2] > 200  # blue now on the right


@pytest.mark.parametrize(
    ("head", "kind"),
    [
        (b"\x00\x00\x00\x18ftypheic", ErrorKind.UNSUPPORTED),  # HEIC, and no decoder for it
        (b"\x00\x00\x00\x18ftypabcd", ErrorKind.NOT_AN_IMAGE),  # an ISO box, not a HEIF brand
        (b"\x00\x00\x00\x18abcdheic", ErrorKind.NOT_AN_IMAGE),  # the brand's bytes without the ftyp box
        (b"\x00\x00\x00\x18zzzzheic", ErrorKind.NOT_AN_IMAGE),
    ],
)
def test_heif_without_its_decoder_is_unsupported_and_only_heif(head: bytes, kind: ErrorKind, monkeypatch) -> None:
    monkeypatch.setattr(decoding, "HEIF_DECODABLE", False)
    with pytest.raises(ImageError) as raised:
        decode(head + b"\x00" * 64, max_pixels=LIMIT)
    assert raised.value.kind == kind, raised.value.message
    if kind == ErrorKind.NOT_AN_IMAGE:
        assert f"(starts with {head[:8]!r})" in raised.value.message  # the first 8 bytes, to tell formats apart
