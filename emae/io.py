"""File writes that lose nothing: a crash, a full disk, a quota or a read-only file system leaves
either the old file or the new one, never half of one and no temporary file.

Storage failures (ENOSPC, EDQUOT, EROFS) are raised as `emae.errors.StorageError`, which the CLI
prints as one `emae: error: no space left on device writing PATH (...)` line.
"""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

from emae.errors import EmaeError, StorageError


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp_path)` on a temporary file beside `path`, then rename it over `path`."""
    path = Path(path)
    with _storage_errors(path):  # creating the folder or the temporary file
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        tmp = Path(name)
        try:
            # told apart while the temporary file still fills the disk (see _storage_errno)
            with _storage_errors(path):
                tmp.chmod(_mode_for(path))  # mkstemp's 0o600 would hide results from the group
                write(tmp)
                with open(tmp, "rb") as handle:
                    os.fsync(handle.fileno())
                os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json(path: str | Path, data: Any) -> None:
    """The one writer of metrics / result JSON files (atomic, sorted keys, trailing newline)."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file in order; none when it does not exist."""
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """The one writer of log lines: append `record` as one JSON line (sorted keys). A write that
    fails (a full disk) cuts the file back to its old length: no half line is left in it."""
    path = Path(path)
    line = (json.dumps(record, sort_keys=True) + "\n").encode()
    with _storage_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        # unbuffered: what reached the file is known, so a short write can be undone
        with open(path, "ab", buffering=0) as handle:
            start = os.fstat(handle.fileno()).st_size
            try:
                view = memoryview(line)
                while view:
                    view = view[handle.write(view):]
            except BaseException:
                os.ftruncate(handle.fileno(), start)
                raise


def truncate_jsonl(path: str | Path, key: str, limit: int) -> None:
    """Drop the lines whose `key` is past `limit`: written after the checkpoint a run resumes from,
    they will be written again."""
    path = Path(path)
    if path.exists():
        kept = [record for record in read_jsonl(path) if record[key] <= limit]
        atomic_write_text(path, "".join(json.dumps(record, sort_keys=True) + "\n" for record in kept))


def _mode_for(path: Path) -> int:
    """The mode of the file being replaced, else what open() would give (0o666 less the umask)."""
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0o022)  # the only way to read it; set back at once
        os.umask(umask)
        return 0o666 & ~umask


# ------------------------------------------------------------------------- storage failures


@contextmanager
def _storage_errors(path: Path) -> Iterator[None]:
    """Raise a failure of the storage while writing `path` as a StorageError (others unchanged)."""
    try:
        yield
    except EmaeError:
        raise
    except Exception as err:  # noqa: BLE001 - writers (torch, safetensors) wrap the OSError
        code = _storage_errno(err, path.parent)
        if code is None:
            raise
        raise StorageError(path, code) from err


def _storage_errno(err: BaseException, folder: Path) -> int | None:
    """ENOSPC / EDQUOT / EROFS when `err` comes from one of them, else None.

    Writers in other languages hide the errno: torch's C++ zip writer raises "unexpected pos"
    (the OSError of a Python file object it wrote to is on the exception chain), safetensors'
    Rust one "... (os error 28)". So: an OSError on the chain, else the Rust errno, else a file
    system with no space left (asked before the temporary file is removed).
    """
    chain, cause = [], err
    while cause is not None and cause not in chain:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    for cause in chain:
        if isinstance(cause, OSError) and cause.errno in StorageError.KINDS:
            return cause.errno
    if isinstance(err, OSError):  # its own errno says what it is
        return None
    rust = re.search(r"\(os error (\d+)\)", str(err))
    if rust:
        return int(rust.group(1)) if int(rust.group(1)) in StorageError.KINDS else None
    try:
        stats = os.statvfs(folder)
    except OSError:
        return None
    free_blocks = stats.f_bfree if os.geteuid() == 0 else stats.f_bavail  # root may use the reserve
    return errno.ENOSPC if free_blocks == 0 else None
