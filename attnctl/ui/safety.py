"""Checks of what users hand the UI: uploaded PNGs and control JSON.

An upload is refused with a message (:class:`UploadError`), never a traceback, when it is

- too large a file (:data:`MAX_UPLOAD_BYTES`);
- not a PNG (the 8-byte signature and the ``IHDR`` chunk are read by hand, before PIL sees the data);
- larger than :data:`MAX_PIXELS` pixels, by the size its header *claims* (a 20000×20000 PNG is refused
  after reading 24 bytes, whatever its compressed size), and PIL's own decompression-bomb guard
  (``Image.MAX_IMAGE_PIXELS``) is tightened to the same limit for whatever slips past the header check;
- unreadable or truncated, or without attnctl metadata (text chunks are read with PIL's limits on
  chunk sizes, so a zTXt bomb stops there too).

Nothing the user types or uploads becomes a path on disk: uploads stay in memory, and control JSON that
names a file (SoftPAG's ``heads="preset.json"``) is refused (:func:`check_control_json`).
"""

from __future__ import annotations

import io
import json
import struct
import warnings
import zlib
from dataclasses import dataclass
from typing import Any

from PIL import Image, UnidentifiedImageError

from ..imageio import FORMAT, METADATA_KEY, rgb_image

MAX_UPLOAD_BYTES = 16 * 1024 * 1024
"""Largest upload read at all (bytes)."""

MAX_PIXELS = 4096 * 4096
"""Largest image (width × height) the UI decodes."""

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

if Image.MAX_IMAGE_PIXELS is None or Image.MAX_IMAGE_PIXELS > MAX_PIXELS:
    # PIL warns above MAX_IMAGE_PIXELS and raises DecompressionBombError above twice that: tighten only.
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS


class UploadError(ValueError):
    """An upload the UI refuses; the message is shown to the user as it is."""


@dataclass(frozen=True)
class CheckedPNG:
    """An upload that passed every check: its pixels (RGB) and its attnctl metadata."""

    name: str
    image: Image.Image
    metadata: dict[str, Any]


def png_header_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the ``IHDR`` chunk of PNG bytes, checked by hand; :class:`UploadError` if the
    bytes are not a PNG."""
    if len(data) < 33 or not data.startswith(PNG_SIGNATURE):
        raise UploadError("this file is not a PNG image (its first bytes are not the PNG signature)")
    length, kind = struct.unpack(">I4s", data[8:16])
    if kind != b"IHDR" or length != 13:
        raise UploadError("this PNG is damaged: it does not start with an IHDR header chunk")
    width, height = struct.unpack(">II", data[16:24])
    crc = struct.unpack(">I", data[29:33])[0]
    if zlib.crc32(data[12:29]) & 0xFFFFFFFF != crc:
        raise UploadError("this PNG is damaged: its header checksum does not match")
    if width == 0 or height == 0:
        raise UploadError(f"this PNG claims an empty size ({width}×{height})")
    return width, height


def check_pixels(width: int, height: int, limit: int = MAX_PIXELS) -> None:
    if width * height > limit:
        raise UploadError(
            f"this image is {width}×{height} = {width * height:,} pixels; the UI opens images up to "
            f"{limit:,} pixels ({int(limit ** 0.5)}×{int(limit ** 0.5)}) — a PNG written by attnctl is far smaller"
        )


def check_png_upload(name: str, data: bytes, *, max_bytes: int = MAX_UPLOAD_BYTES,
                     max_pixels: int = MAX_PIXELS, settings: bool = True) -> CheckedPNG:
    """Every check of an uploaded PNG; its pixels and attnctl metadata, or :class:`UploadError`. With
    ``settings=False`` (a real image to edit) a PNG without attnctl metadata is fine: its metadata is then empty."""
    if len(data) > max_bytes:
        raise UploadError(f"{name!r} is {len(data) / 2**20:.1f} MB; the UI opens PNGs up to "
                          f"{max_bytes / 2**20:.0f} MB")
    width, height = png_header_size(data)
    check_pixels(width, height, max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=["PNG"]) as img:
                if img.size != (width, height):
                    raise UploadError("this PNG is damaged: PIL reads a different size than its header")
                check_pixels(*img.size, max_pixels)
                img.load()
                text = dict(getattr(img, "text", {}) or {})
                pixels = rgb_image(img, upright=True)
    except UploadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise UploadError(f"refused as a decompression bomb: {e}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, zlib.error) as e:
        raise UploadError(f"this PNG cannot be read: {e}") from None
    if not settings and METADATA_KEY not in text:
        return CheckedPNG(name=name, image=pixels, metadata={})
    return CheckedPNG(name=name, image=pixels, metadata=parse_metadata(text))


def parse_metadata(text: dict[str, Any]) -> dict[str, Any]:
    """The attnctl metadata of a PNG's text chunks (as :func:`attnctl.imageio.read_metadata` reads it)."""
    raw = text.get(METADATA_KEY)
    if raw is None:
        raise UploadError("this PNG has no attnctl settings in it: open a PNG made by attnctl "
                          "(`attnctl generate` or this UI's download)")
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, TypeError) as e:
        raise UploadError(f"the attnctl settings in this PNG are not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise UploadError("the attnctl settings in this PNG are not a JSON object")
    fmt = str(meta.get("format", ""))
    if fmt != FORMAT:
        raise UploadError(f"this PNG holds attnctl settings in format {fmt!r}; this attnctl reads {FORMAT!r}")
    return meta


def check_control_json(data: Any, where: str = "control") -> dict[str, Any]:
    """A control's JSON object, refused if it is not an object with a ``kind`` or if any string in it
    names a file (``*.json``): the UI never opens a path that came from the user."""
    if not isinstance(data, dict):
        raise UploadError(f"{where} is {type(data).__name__}, not a JSON object with a 'kind'")
    if not isinstance(data.get("kind"), str):
        raise UploadError(f"{where} has no 'kind'")

    def walk(x: Any) -> None:
        if isinstance(x, str):
            if x.strip().lower().endswith(".json"):
                raise UploadError(f"{where} names the file {x!r}; the UI does not open files named in settings "
                                  "(pick heads with the head picker instead)")
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list | tuple):
            for v in x:
                walk(v)

    walk(data)
    return data
