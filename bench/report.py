"""The JSON end of every benchmark: print the result and, when asked, write it atomically; and the argument types
the benchmarks share, so a bad value is refused by argparse (exit 2, one line) before any model is built."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def emit(result: Any, path: str | Path | None = None, indent: int = 1) -> None:
    """Print ``result`` as JSON; also write it to ``path`` (atomically) when one is given."""
    text = json.dumps(result, indent=indent)
    print(text)
    if path:
        from attnctl.io import atomic_write_text

        atomic_write_text(Path(path), text + "\n")


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1 (repeats, threads, seeds, items...)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not at least 1")
    return value


def resolution(text: str) -> int:
    """argparse type: an image side in pixels, a positive multiple of 16 (one token per 16×16 pixels)."""
    value = positive_int(text)
    if value % 16:
        raise argparse.ArgumentTypeError(f"{value} is not a multiple of 16 (one token per 16 pixels)")
    return value


def json_object(text: str) -> dict:
    """argparse type: a JSON object of settings, e.g. '{"iterations": 2}'."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not JSON ({e.msg})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object of settings")
    return value
