"""The JSON end of every benchmark: print the result and, when asked, write it atomically."""

from __future__ import annotations

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
