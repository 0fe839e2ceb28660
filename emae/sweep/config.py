"""The `sweep` params section (params/sweep.yaml): what is searched, how, and where it is stored.

A dimension of the search space is either a list of `values` or a range `low`/`high` (with an
optional `step`, or `log: true`). Dimensions are keyed by their params section, e.g.
`space.model.num_parts`; a `null` entry is not swept (the base params value is used).
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, model_validator

from emae.config import Section

Number = int | float | bool | str


class Dimension(Section):
    """One swept key: `values: [...]` or `low`/`high` (+ `step` or `log`)."""

    values: list[Number] | None = Field(None, min_length=1, description="the choices (grid: all of them)")
    low: float | None = None
    high: float | None = None
    step: float | None = Field(None, gt=0, description="a discrete range: low, low+step, ..., high")
    log: bool = Field(False, description="sample the range on a log scale (TPE/random)")

    @model_validator(mode="after")
    def _one_kind(self) -> "Dimension":
        is_range = self.low is not None or self.high is not None
        if self.values is not None and (is_range or self.step is not None or self.log):
            raise ValueError("give either `values` or `low`/`high` (with `step` or `log`), not both")
        if self.values is None:
            if self.low is None or self.high is None:
                raise ValueError("a range needs both `low` and `high` (or give `values`)")
            if not self.low <= self.high:
                raise ValueError(f"low={self.low} is above high={self.high}")
            if self.log and self.step is not None:
                raise ValueError("`log` and `step` cannot be combined (Optuna)")
            if self.log and self.low <= 0:
                raise ValueError(f"a log range needs low > 0 (got {self.low})")
            if self.step is not None and not _on_grid(self.high - self.low, self.step):
                raise ValueError(f"high - low = {self.high - self.low:g} is not a multiple of step={self.step:g}")
        elif len(set(map(repr, self.values))) != len(self.values):
            raise ValueError(f"values {self.values} has duplicates")
        return self


def _on_grid(span: float, step: float) -> bool:
    ratio = span / step
    return math.isclose(ratio, round(ratio), abs_tol=1e-9)


class Budget(Section):
    epochs: int = Field(gt=0, description="pre-training epochs per trial (the lr schedule spans them)")
    seconds: float | None = Field(gt=0, description="optional wall-clock cap per trial (pre-training "
                                  "seconds); checked after each epoch with a kNN value; null = none")
    warmup_epochs: float | None = Field(ge=0, description="lr warm-up of a trial (short budgets want "
                                        "less than the full recipe); null = pretrain.warmup_epochs")


class MedianPrunerConfig(Section):
    n_startup_trials: int = Field(ge=0, description="trials finished before any is pruned")
    n_warmup_steps: int = Field(ge=0, description="epochs of a trial before it can be pruned")


class TPEConfig(Section):
    n_startup_trials: int = Field(ge=0, description="random trials before TPE models the results")


class SweepConfig(Section):
    study_name: str | None = Field(description="null: the output folder's name")
    storage: str = Field(min_length=1, description="'journal' (<out>/study.journal) or an Optuna RDB URL")
    sampler: Literal["grid", "tpe", "random"]
    seed: int = Field(description="sampler seed (worker w draws from derive_seed(seed, w, ...))")
    n_trials: int | None = Field(gt=0, description="trials of the study (all workers); grid: null = every cell")
    objective: Literal["knn", "linprobe"]
    multi_objective: bool = Field(description="also minimise pre-training seconds (Pareto front)")
    budget: Budget
    pruner: Literal["median", "none"]
    prune_every_epochs: int = Field(ge=0, description="kNN every N epochs, reported to the pruner")
    median_pruner: MedianPrunerConfig
    tpe: TPEConfig
    workers: int = Field(gt=0, description="concurrent workers (processes, or jobs of the array)")
    backend: Literal["local", "slurm", "submitit-local"]
    threads_per_worker: int | None = Field(gt=0, description="torch threads of a local worker; "
                                           "null = CPU cores / workers")
    max_retries: int = Field(ge=0, description="retries of a trial whose worker died")
    heartbeat_seconds: float = Field(gt=0)
    stale_after_seconds: float = Field(gt=0, description="a RUNNING trial whose heartbeat is older "
                                       "is failed (its owner is on another host, or hung)")
    poll_seconds: float = Field(gt=0, description="progress refresh interval")
    space: dict[str, dict[str, Dimension | None] | None] = Field(
        description="section -> key -> dimension, e.g. model: {num_parts: {low: 1, high: 8}}")

    @model_validator(mode="after")
    def _checks(self) -> "SweepConfig":
        if self.n_trials is None and self.sampler != "grid":
            raise ValueError(f"n_trials is required for sampler {self.sampler!r} (null only for grid)")
        if self.heartbeat_seconds * 2 > self.stale_after_seconds:
            raise ValueError(f"stale_after_seconds={self.stale_after_seconds:g} must be at least twice "
                             f"heartbeat_seconds={self.heartbeat_seconds:g}")
        if self.budget.seconds is not None and self.objective == "knn" and self.prune_every_epochs == 0:
            raise ValueError("budget.seconds needs kNN values during pre-training: set prune_every_epochs > 0")
        return self

    def dimensions(self) -> dict[str, Dimension]:
        """Swept keys, dotted (`model.num_parts`) -> dimension, in the file's order."""
        return {f"{section}.{key}": dim for section, keys in self.space.items()
                for key, dim in (keys or {}).items() if dim is not None}

    def signature(self) -> dict[str, Any]:
        """What defines the study's results (a rerun must match it; n_trials, workers may change)."""
        return {"space": {k: d.model_dump(exclude_defaults=True) for k, d in self.dimensions().items()},
                "sampler": self.sampler, "seed": self.seed, "objective": self.objective,
                "multi_objective": self.multi_objective, "budget": self.budget.model_dump(),
                "pruner": self.pruner, "prune_every_epochs": self.prune_every_epochs,
                "median_pruner": self.median_pruner.model_dump(), "tpe": self.tpe.model_dump()}
