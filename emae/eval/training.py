"""Small pieces the resumable evaluation loops (linear probe, fine-tuning) share."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


from emae.errors import EmaeError
from emae.io import append_jsonl, atomic_write_text  # append_jsonl: linprobe, finetune


def truncate_log(path: Path, key: str, limit: int) -> None:
    """Drop lines written after the checkpoint we resume from (they will be written again)."""
    if path.exists():
        kept = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line)[key] <= limit]
        atomic_write_text(path, "".join(line + "\n" for line in kept))


def check_same_run(saved: dict[str, Any], now: dict[str, Any], path: Path, ignore: set[str]) -> None:
    """Resuming with other settings would silently mix two runs: refuse, naming what changed."""
    changed = [f"{section}.{key}: {saved.get(section, {}).get(key)!r} -> {value!r}"
               for section, values in now.items() for key, value in values.items()
               if key not in ignore and _plain(saved.get(section, {}).get(key)) != _plain(value)]
    if changed:
        raise EmaeError(f"{path} was written with other params; use another --out or move it away. "
                        "Changed: " + "; ".join(changed))


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
