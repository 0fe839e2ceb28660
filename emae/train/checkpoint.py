"""The one checkpoint format: a dict saved atomically (temp file + rename) as `last.pt`, holding
the digests of the inputs it was made from and the number of processes that made it."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from emae.config import Section, changed_params
from emae.errors import EmaeError
from emae.io import atomic_write
from emae.train.distributed import DistInfo, barrier

log = logging.getLogger("emae.checkpoint")


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: _torch_save(state, tmp))


def _torch_save(state: dict[str, Any], path: Path) -> None:
    # Through a Python file: given a path, torch's C++ writer reports a full disk only as
    # "unexpected pos"; a Python file's OSError (ENOSPC, EDQUOT) stays on the exception chain.
    with open(path, "wb") as handle:
        torch.save(state, handle)


def load_checkpoint(path: str | Path) -> dict[str, Any] | None:
    """The checkpoint at `path`, or None when there is none yet."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001
        raise EmaeError(f"{path}: cannot read checkpoint ({err}); move it away to start afresh") from None


@dataclass
class RunCheckpoint:
    """A stage's `last.pt`, tied to what it was made from.

    `inputs` name the stage's inputs by digest (the encoder export, the data set): a checkpoint
    made from other inputs is not resumed (it would report the old run's figures for the new
    inputs) but trained again from scratch, with a warning naming both digests. Resuming with other
    `params` (the sections that define the run; their resumable keys may change, see
    emae.config.RESUMABLE) or in another `precision` (`amp: auto` resolves per machine) would mix
    two runs: refused, naming what changed. So is a checkpoint written by another number of
    processes: steps per epoch, the sampler's shards, the lr and the masks all depend on it (a
    finished run may be evaluated by another count).
    """

    path: Path
    inputs: dict[str, str]
    world_size: int
    params: dict[str, Section] = field(default_factory=dict)
    precision: str | None = None  # the resolved compute dtype, e.g. "bfloat16"
    restarted: bool = field(default=False, init=False)  # True when a stale checkpoint was found

    def load(self, finished: Callable[[dict[str, Any]], bool] = lambda state: False
             ) -> dict[str, Any] | None:
        """The state to resume from, or None to start afresh; `finished(state)`: nothing is left
        to train (only then may the process count and the precision differ)."""
        state = load_checkpoint(self.path)
        if state is None:
            return None
        saved = state.get("inputs", {})
        changed = [f"{name} {saved.get(name, 'unrecorded')} -> {digest}"
                   for name, digest in self.inputs.items() if saved.get(name) != digest]
        if changed:
            log.warning("%s was made from other inputs (%s): starting this stage again from scratch",
                        self.path, "; ".join(changed))
            self.restarted = True
            return None
        if self.params and "params" not in state:
            raise EmaeError(f"{self.path} records no params (an older emae wrote it): use another "
                            "--out or move it away")
        changed = changed_params(state.get("params", {}), self.params)
        if changed:
            raise EmaeError(f"{self.path} was written with other params; use another --out or move it "
                            "away. Changed: " + "; ".join(changed))
        if finished(state):
            return state
        saved_world = state.get("world_size")
        if saved_world is not None and saved_world != self.world_size:
            raise EmaeError(f"{self.path} was written by {saved_world} process(es) but this run has "
                            f"{self.world_size}: resume with {saved_world} (the data shards, steps per "
                            "epoch, lr and masks depend on it), or use another --out")
        saved_precision = state.get("precision")
        if saved_precision is not None and self.precision is not None and saved_precision != self.precision:
            raise EmaeError(f"{self.path} was trained in {saved_precision} but this run computes in "
                            f"{self.precision} (amp 'auto' picks per machine: set the stage's amp to "
                            "the checkpoint's precision to resume here), or use another --out")
        return state

    def resume(self, parts: dict[str, Any], counter: str, total: int, log_it: bool = True,
               finished: Callable[[dict[str, Any]], bool] = lambda state: False,
               check: Callable[[dict[str, Any]], None] = lambda state: None) -> dict[str, Any]:
        """`load` and `check(state)` (raises to refuse it), then each of `parts` (model, optimizer,
        scaler, ...) from its saved state dict; the saved state ({} to start afresh), its `counter`
        (step, iteration) logged against `total`."""
        state = self.load(finished)
        if state is None:
            return {}
        check(state)
        for name, part in parts.items():
            part.load_state_dict(state[name])
        if log_it:
            log.info("resuming from %s at %s %d/%d", self.path, counter, state[counter], total)
        return state

    def save(self, state: dict[str, Any], dist_info: DistInfo = DistInfo()) -> None:
        """Rank 0 writes; every rank waits for it, so none runs ahead of the checkpoint on disk."""
        if dist_info.is_main:
            save_checkpoint(self.path, {
                **state, "inputs": self.inputs, "world_size": self.world_size, "precision": self.precision,
                "params": {name: section.model_dump(mode="json") for name, section in self.params.items()},
            })
        barrier(dist_info)
