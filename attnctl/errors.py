"""Errors raised by attnctl.

Every error says what is wrong and how to get out of it. They derive from ``ValueError`` so code that
already catches bad-argument errors keeps working.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any


class AttnCtlError(ValueError):
    """Base class: ``AttnCtlError(problem, fix=None)``.

    ``problem`` names what is wrong; ``fix`` (optional) names the way out. The message is
    ``"<problem>. Fix: <fix>"``; a single string argument is used as the whole message.
    """

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        message = problem if fix is None else f"{problem.rstrip().rstrip('.')}. Fix: {fix}"
        super().__init__(message)


class ConfigError(AttnCtlError):
    """A configuration value (control, site, schedule, layout) is invalid."""


class ScheduleError(ConfigError):
    """A strength schedule is malformed or produced a value outside its range."""


class SiteError(ConfigError):
    """An attention site, head or selector does not exist or matches nothing."""


class LayoutError(ConfigError):
    """The token layout (text length, image grid, word positions) is unknown or inconsistent."""


class WordCutOffError(LayoutError):
    """A word of the prompt lies past the tokens the text encoders read (the prompt was truncated)."""


class UnsupportedModelError(AttnCtlError):
    """A control or feature does not support this model family."""


def exit_on_error(main: Callable[[], Any]) -> None:
    """Run a script's ``main`` (the examples'): an :class:`AttnCtlError` ends it with one ``error:`` line on stderr
    and exit code 2, as the CLI does, not a traceback."""
    try:
        main()
    except AttnCtlError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
