"""PNG files that carry how they were made, so an image can be regenerated from itself.

Two text chunks go into every PNG attnctl writes:

- ``attnctl``: one JSON document (ASCII, a ``tEXt`` chunk) with everything a regeneration needs — prompt,
  negative prompt, seed, model, steps, guidance, size, dtype, the full JSON of every control (schedules
  included) — plus ``"format": "attnctl.image/1"`` and the versions that made it;
- ``parameters``: the same in a short human-readable form (an ``iTXt`` chunk, UTF-8), as other diffusion
  tools write it, for people and image viewers.

Files are written atomically (a temporary file in the same folder, then a rename): a crash never leaves a
half-written PNG under the final name.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from .errors import AttnCtlError
from .io import atomic_write_bytes

METADATA_KEY = "attnctl"
PARAMETERS_KEY = "parameters"
FORMAT = "attnctl.image/1"
"""Value of the ``format`` field; a reader refuses any other."""


def _to_pil(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = np.clip(np.round(arr.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def format_parameters(meta: dict[str, Any]) -> str:
    """A short human-readable summary of ``meta`` (the ``parameters`` chunk)."""
    lines = [str(meta.get("prompt", ""))]
    if meta.get("negative_prompt"):
        lines.append(f"Negative prompt: {meta['negative_prompt']}")
    fields = [
        ("Steps", meta.get("steps")),
        ("Seed", meta.get("seed")),
        ("Size", f"{meta['width']}x{meta['height']}" if "width" in meta and "height" in meta else None),
        ("Guidance", meta.get("guidance")),
        ("True CFG", meta.get("true_cfg")),
        ("Model", meta.get("model")),
        ("Dtype", meta.get("dtype")),
        ("Sampler", meta.get("scheduler")),
        ("Version", f"attnctl {meta['attnctl_version']}" if meta.get("attnctl_version") else None),
    ]
    lines.append(", ".join(f"{k}: {v}" for k, v in fields if v is not None))
    controls = meta.get("controls") or []
    if controls:
        lines.append("Controls: " + json.dumps(controls, separators=(",", ":")))
    return "\n".join(lines)


def encode_png(image: Any, meta: dict[str, Any]) -> bytes:
    """PNG bytes of ``image`` (PIL image or H×W×3 array) with ``meta`` in its text chunks."""
    meta = {"format": FORMAT, **meta}
    info = PngImagePlugin.PngInfo()
    info.add_text(METADATA_KEY, json.dumps(meta, ensure_ascii=True, sort_keys=False))
    info.add_itxt(PARAMETERS_KEY, format_parameters(meta))
    buf = io.BytesIO()
    _to_pil(image).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def save_png(path: str | Path, image: Any, meta: dict[str, Any]) -> Path:
    """Write ``image`` with ``meta`` to ``path`` atomically (temp file + rename in the same folder)."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise AttnCtlError(f"output file {str(path)!r} does not end in .png", "name a .png file, e.g. out/image.png")
    if path.is_dir():
        raise AttnCtlError(f"output path {str(path)!r} is a folder", "name a .png file inside it")
    data = encode_png(image, meta)
    try:
        atomic_write_bytes(path, data)
    except OSError as e:
        raise AttnCtlError(f"cannot write {path}: {e.strerror or e}", "choose a writable output path") from None
    return path


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The ``attnctl`` metadata of a PNG written by :func:`save_png`, with clear errors otherwise."""
    path = Path(path)
    if not path.is_file():
        raise AttnCtlError(f"image {str(path)!r} does not exist", "pass a PNG written by `attnctl generate`")
    try:
        with Image.open(path) as img:
            kind = img.format
            text = dict(getattr(img, "text", {}) or {})
    except (UnidentifiedImageError, OSError) as e:
        raise AttnCtlError(f"{path} is not a readable image ({e})", "pass a PNG written by `attnctl generate`") \
            from None
    if kind != "PNG":
        raise AttnCtlError(f"{path} is a {kind} image, not a PNG", "pass a PNG written by `attnctl generate`")
    raw = text.get(METADATA_KEY)
    if raw is None:
        raise AttnCtlError(
            f"{path} has no attnctl metadata (no {METADATA_KEY!r} text chunk)",
            "pass a PNG written by `attnctl generate`; other tools' metadata is not read",
        )
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise AttnCtlError(f"the attnctl metadata of {path} is not valid JSON ({e})",
                           "the file was modified; regenerate it with `attnctl generate`") from None
    if not isinstance(meta, dict):
        raise AttnCtlError(f"the attnctl metadata of {path} is not a JSON object",
                           "the file was modified; regenerate it with `attnctl generate`")
    fmt = str(meta.get("format", ""))
    if fmt != FORMAT:
        raise AttnCtlError(f"{path} holds attnctl metadata in format {fmt!r}; this attnctl reads {FORMAT!r}",
                           "use the attnctl version that wrote the image")
    return meta


def rgb_image(img: Image.Image, *, upright: bool = False) -> Image.Image:
    """``img`` as 8-bit RGB. 16-bit greyscale (PIL modes ``I;16*``, and ``I`` holding values past 255) is scaled
    to 8 bits — PIL's own conversion clips it, which turns nearly every pixel white. With ``upright=True`` the
    EXIF orientation is applied first, as image viewers (and diffusers' ``load_image``) show a photo."""
    if upright:
        img = ImageOps.exif_transpose(img)
    if img.mode.startswith("I;16") or img.mode == "I":
        values = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or values.max(initial=0) > 255:
            values = values / 257.0  # 65535 → 255
        return Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8), "L").convert("RGB")
    return img.convert("RGB")


def read_image(path: str | Path | BinaryIO) -> np.ndarray:
    """The pixels of an image file (a path, or an open binary file) as an H×W×3 uint8 array, upright and in 8 bits
    (:func:`rgb_image`); a file that is no image PIL can read (or a truncated one, or a decompression bomb) is an
    :class:`AttnCtlError`."""
    try:
        with Image.open(path) as img:
            return np.asarray(rgb_image(img, upright=True))
    except Image.DecompressionBombError as e:
        name = str(path) if isinstance(path, (str, Path)) else "the image"
        raise AttnCtlError(f"{name!r} is refused as a possible decompression bomb ({' '.join(str(e).split())})",
                           "downscale the image first; no model here works at that size") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:  # PIL reports a bad file in these ways
        if isinstance(e, OSError) and not isinstance(e, UnidentifiedImageError) and e.filename is not None:
            raise  # the file itself cannot be opened: the caller's (or the CLI's) error for a path
        name = str(path) if isinstance(path, (str, Path)) else "the image"
        raise AttnCtlError(f"{name!r} is not an image file PIL can read ({' '.join(str(e).split())})",
                           "pass a PNG, JPEG or another image file that opens in an image viewer") from None
