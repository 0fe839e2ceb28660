"""Small pieces the resumable evaluation loops (linear probe, fine-tuning) share."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from emae.errors import EmaeError
from emae.io import atomic_write_text
from emae.seeding import rng_states
from emae.train import distributed


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        handle.write(json.dumps(record, sort_keys=True) + "\n")


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


def gather_rng(dist_info: distributed.DistInfo) -> list[dict[str, Any]]:
    """RNG states of every rank (rank r resumes from entry r)."""
    states = rng_states()
    if not dist_info.enabled:
        return [states]
    gathered: list[Any] = [None] * dist_info.world_size
    torch.distributed.all_gather_object(gathered, states)
    return gathered


def mean_across(value: float, dist_info: distributed.DistInfo, device: torch.device) -> float:
    return float(distributed.all_reduce_mean(torch.tensor(value, device=device), dist_info))
