"""User-facing errors: raised anywhere, printed by the CLI as one clear message (no traceback)."""

from __future__ import annotations

import sys
from typing import Any, Callable


class EmaeError(Exception):
    """An error caused by the user's input (params, paths, data, checkpoints)."""


class ConfigError(EmaeError, ValueError):
    """Invalid params: the message names the file, the key, the value and what is allowed."""


class NonFiniteLossError(EmaeError):
    """Training diverged; the last checkpoint written before it is intact."""


def run_reporting_errors(func: Callable[[Any], int | None], args: Any) -> int:
    try:
        code = func(args)
    except EmaeError as err:
        print(f"emae: error: {err}", file=sys.stderr)
        return 2
    return 0 if code is None else int(code)
