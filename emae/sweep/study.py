"""A sweep as both the coordinator (`emae sweep`) and its workers see it: validated params, the
search space, the storage, and the rules that decide which trial runs next.

The global trial cap: under `study_lock`, a worker first fails dead owners' trials (queueing
their retries), then asks for a trial only if one is queued (a grid cell or a retry) or, for
TPE/random, if fewer than `n_trials` slots are taken. A slot is a trial that is complete, pruned,
running, queued, or failed for good; a failed trial that was retried gives its slot to the retry.
Counting and `ask` happen under the same lock, so concurrent workers never exceed the cap.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from emae.config import Config, load_config
from emae.errors import ConfigError, EmaeError
from emae.seeding import derive_seed
from emae.sweep import liveness, storage as storage_mod
from emae.sweep.config import SweepConfig
from emae.sweep.objective import trial_config
from emae.sweep.space import SearchSpace

log = logging.getLogger("emae.sweep")

PARAMS_SNAPSHOT = "params.yaml"  # the resolved params of the sweep; workers read it
# keys that do not change a trial's result and may differ between reruns of a study
_FREE_KEYS = {("data", "root"), ("data", "num_workers"), ("pretrain", "checkpoint_every_steps"),
              ("pretrain", "log_every_steps"), ("pretrain", "epochs"), ("pretrain", "knn_every_epochs")}
_SCORING_SECTIONS = {"knn": ("knn",), "linprobe": ("knn", "linprobe")}


@dataclass
class Progress:
    complete: int
    pruned: int
    running: int
    waiting: int
    failed: int  # every FAIL trial (the FAIL rows of trials.csv)
    retried: int  # of those, the ones handed to a retry
    slots: int

    @property
    def failed_for_good(self) -> int:
        return self.failed - self.retried

    @property
    def finished(self) -> int:
        return self.complete + self.pruned + self.failed_for_good


def progress(trials: list[FrozenTrial]) -> Progress:
    states = Counter(t.state for t in trials)
    retried = sum(1 for t in trials if t.state == TrialState.FAIL and t.user_attrs.get("retried"))
    failed = states[TrialState.FAIL]
    slots = (states[TrialState.COMPLETE] + states[TrialState.PRUNED] + states[TrialState.RUNNING]
             + states[TrialState.WAITING] + failed - retried)
    return Progress(states[TrialState.COMPLETE], states[TrialState.PRUNED], states[TrialState.RUNNING],
                    states[TrialState.WAITING], failed, retried, slots)


class Sweep:
    """Validated settings of one study in `out` (nothing is written until `open_study`)."""

    def __init__(self, config: Config, out: Path) -> None:
        self.config, self.out = config, out
        self.settings: SweepConfig = config.section("sweep")
        self.space = SearchSpace(self.settings, config)
        self.base = config.to_dict()
        self.name = self.settings.study_name or out.resolve().name
        self._validate()

    @classmethod
    def from_snapshot(cls, out: Path) -> "Sweep":
        """What a worker uses: the params the coordinator resolved and wrote into `out`."""
        path = out / PARAMS_SNAPSHOT
        if not path.is_file():
            raise EmaeError(f"{path}: not found; workers are started by `emae sweep -o {out}`")
        return cls(load_config([path]), out)

    # ------------------------------------------------------------------------- validation

    def _validate(self) -> None:
        """Everything that can be checked before a trial runs: each point's params, the scoring
        sections, the data set (a missing folder fails here, not in every trial)."""
        s = self.settings
        for section in _SCORING_SECTIONS[s.objective]:
            self.config.section(section)
        if s.objective == "linprobe":
            try:
                import emae.eval.linprobe  # noqa: F401
            except ImportError as err:
                raise ConfigError(f"sweep.objective = 'linprobe' needs emae.eval.linprobe ({err})") from None
        points = self.space.grid() if s.sampler == "grid" else self._corners()
        for point in points:
            try:
                trial_config(self.base, s, self.space, point)
            except ConfigError as err:
                raise ConfigError(f"sweep.space point {point} gives invalid params:\n{err}") from None
        if s.sampler == "grid" and not points:
            raise ConfigError("sweep.space: the grid has no valid (K, mask ratio) combination")
        if self.config.data.kind == "imagefolder":
            for split in ("train", "val"):
                if not (Path(self.config.data.root) / split).is_dir():
                    raise EmaeError(f"{Path(self.config.data.root) / split}: data split not found "
                                    f"(data.root={self.config.data.root!r}; for the embedded set run "
                                    "`emae prepare`)")

    def _corners(self) -> list[dict[str, Any]]:
        """A few valid points that reach every dimension's ends (TPE/random validation)."""
        points = []
        for key, axis in self.space.axes.items():
            ends = (axis.choices[0], axis.choices[-1]) if axis.choices else (axis.dim.low, axis.dim.high)
            for value in ends:
                point = {key: value}
                if not self.space.valid(point):  # e.g. K = 8 alone: pair it with the largest ratio
                    ratio = self.space.axes.get("model.mask_ratio")
                    point["model.mask_ratio"] = ratio.choices[-1] if ratio else None
                    point = {k: v for k, v in point.items() if v is not None}
                if self.space.valid(point):
                    points.append(point)
        return points

    def signature(self) -> dict[str, Any]:
        """What defines the study's results: the sweep's signature and the base params."""
        base = {section: {k: v for k, v in self.base[section].items() if (section, k) not in _FREE_KEYS}
                for section in ("data", "model", "pretrain", *_SCORING_SECTIONS[self.settings.objective])
                if section in self.base}
        return {**self.settings.signature(), "base": base}

    @property
    def target(self) -> int:
        """Trials the study should end with (grid: its enqueued cells)."""
        cells = len(self.space.grid()) if self.settings.sampler == "grid" else None
        if cells is not None:
            return min(cells, self.settings.n_trials or cells)
        return self.settings.n_trials

    # --------------------------------------------------------------------------- storage

    def open_storage(self) -> BaseStorage:
        return storage_mod.open_storage(self.settings.storage, self.out, self.settings.workers)

    def sampler(self, worker: str) -> optuna.samplers.BaseSampler:
        """TPE/random seeded per worker (same seed everywhere would make workers draw alike)."""
        seed = derive_seed(self.settings.seed, "sampler", worker) % (2**32)
        if self.settings.sampler == "tpe":
            return optuna.samplers.TPESampler(seed=seed, n_startup_trials=self.settings.tpe.n_startup_trials)
        # grid cells are enqueued; random draws the rest (it never runs for a grid study)
        return optuna.samplers.RandomSampler(seed=seed)

    def pruner(self) -> optuna.pruners.BasePruner:
        s = self.settings
        if s.pruner == "none" or s.multi_objective or s.prune_every_epochs == 0:
            return optuna.pruners.NopPruner()
        return optuna.pruners.MedianPruner(n_startup_trials=s.median_pruner.n_startup_trials,
                                           n_warmup_steps=s.median_pruner.n_warmup_steps)

    def create_study(self, storage: BaseStorage) -> tuple[optuna.Study, bool]:
        """Create the study (grid: enqueue its cells) or reopen it (signature checked)."""
        s = self.settings
        with storage_mod.study_lock(self.out):
            study, new = storage_mod.create_or_load(storage, self.name, self.signature(), s.multi_objective,
                                                    s.objective, self.sampler("coordinator"), self.pruner())
            if new:
                study.set_user_attr("seed", s.seed)
                if s.sampler == "grid":
                    for cell in self.space.grid()[: self.target]:
                        study.enqueue_trial(self.space.to_optuna(cell))
                    study.set_user_attr("grid_cells", self.target)
        return study, new

    def load_study(self, storage: BaseStorage, worker: str) -> optuna.Study:
        study = storage_mod.load(storage, self.name, self.sampler(worker), self.pruner())
        storage_mod.check_signature(study, self.signature())
        return study

    # ------------------------------------------------------------------------------ trials

    def remaining(self, study: optuna.Study) -> int:
        """Trials that still have to be started (queued ones and free slots)."""
        p = progress(study.get_trials(deepcopy=False))
        free = 0 if self.settings.sampler == "grid" else max(self.target - p.slots, 0)
        return p.waiting + free

    def recover(self, study: optuna.Study) -> list[tuple[int, str]]:
        """Fail (and retry) trials whose owner died. Call under `study_lock`."""
        s = self.settings
        found = liveness.recover_stale(study, self.out, s.stale_after_seconds, s.max_retries)
        for number, reason in found:
            log.warning("trial %d: %s", number, reason)
        return found

    def next_trial(self, study: optuna.Study, worker: str) -> optuna.Trial | None:
        """The next trial for `worker` (owner recorded), or None when the study needs no more."""
        with storage_mod.study_lock(self.out):
            self.recover(study)
            if self.remaining(study) == 0:
                return None
            trial = study.ask()
            trial.set_user_attr("owner", liveness.owner_record(worker))
        return trial
