"""The one checkpoint format: a dict saved atomically (temp file + rename) as `last.pt`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from emae.errors import EmaeError
from emae.io import atomic_write


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | Path) -> dict[str, Any] | None:
    """The checkpoint at `path`, or None when there is none yet."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001
        raise EmaeError(f"{path}: cannot read checkpoint ({err}); move it away to start afresh") from None
