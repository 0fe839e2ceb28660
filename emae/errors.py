"""User-facing errors: raised anywhere, printed by the CLI as one clear message (no traceback)."""

from __future__ import annotations

import errno
import os
import sys
from typing import Any, Callable


class EmaeError(Exception):
    """An error caused by the user's input (params, paths, data, checkpoints)."""


class ConfigError(EmaeError, ValueError):
    """Invalid params: the message names the file, the key, the value and what is allowed."""


class NonFiniteLossError(EmaeError):
    """Training diverged; the last checkpoint written before it is intact."""


class StorageError(EmaeError):
    """A file could not be written because of the storage (a full disk, a quota, a read-only file
    system). The writers of `emae.io` raise it having left the previous file as it was and no
    partial or temporary file."""

    _NO_SPACE = ("no space left on device", "free some space and run the command again")
    KINDS: dict[int, tuple[str, str]] = {  # errno -> (what happened, what to do)
        errno.ENOSPC: _NO_SPACE,
        errno.EDQUOT: _NO_SPACE,  # to the user, a quota is a full disk
        errno.EROFS: ("read-only file system", "write to another folder (-o) and run the command again"),
    }

    def __init__(self, path: str | os.PathLike[str], code: int) -> None:
        what, fix = self.KINDS[code]
        super().__init__(f"{what} writing {path} ([Errno {code}] {os.strerror(code)}): nothing was "
                         f"changed, the file is as it was before; {fix}")
        self.path, self.errno = str(path), code


def run_reporting_errors(func: Callable[[Any], int | None], args: Any) -> int:
    try:
        code = func(args)
    except EmaeError as err:
        print(f"emae: error: {err}", file=sys.stderr)
        return 2
    return 0 if code is None else int(code)
