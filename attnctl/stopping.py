"""Ctrl-C at a safe point: the first SIGINT asks a long loop to stop at its next boundary (after the image, the
training step), so what it saves is whole; a second one stops at once."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import Any


class StopAtBoundary:
    """A context manager: ``stop`` turns true at the first Ctrl-C, which ``note`` reports (``"stopping after
    {what} (Ctrl-C again to stop at once)"``); the second raises ``KeyboardInterrupt`` where the loop is. Outside
    the main thread (where signals cannot be caught) it does nothing."""

    def __init__(self, note: Callable[[str], None] | None, what: str = "the current image") -> None:
        self.stop = False
        self._note, self._what = note, what
        self._previous: Any = None

    def __enter__(self) -> StopAtBoundary:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.stop:
            raise KeyboardInterrupt
        self.stop = True
        if self._note is not None:
            self._note(f"stopping after {self._what} (Ctrl-C again to stop at once)")

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
