"""The `sweep` params section (params/sweep.yaml, where every key is explained). A dimension of the
search space is a list of `values` or a range `low`/`high` (optional `step`, or `log: true`), keyed
by its params section (`space.model.num_parts`); `null` is not swept."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, model_validator

from emae.config import Section


class Dimension(Section):
    values: list[int | float | bool | str] | None = Field(None, min_length=1)
    low: float | None = None
    high: float | None = None
    step: float | None = Field(None, gt=0)
    log: bool = False

    @model_validator(mode="after")
    def _one_kind(self) -> "Dimension":
        if self.values is not None:
            if self.low is not None or self.high is not None or self.step is not None or self.log:
                raise ValueError("give either `values` or `low`/`high` (with `step` or `log`), not both")
            if len(set(map(repr, self.values))) != len(self.values):
                raise ValueError(f"values {self.values} has duplicates")
        elif self.low is None or self.high is None:
            raise ValueError("a range needs both `low` and `high` (or give `values`)")
        elif not self.low <= self.high:
            raise ValueError(f"low={self.low} is above high={self.high}")
        elif self.log and (self.step is not None or self.low <= 0):
            raise ValueError(f"a log range needs low > 0 (got {self.low}) and no `step` (Optuna)")
        elif self.step is not None and not math.isclose(r := (self.high - self.low) / self.step, round(r),
                                                         abs_tol=1e-9):
            raise ValueError(f"high - low = {self.high - self.low:g} is not a multiple of step={self.step:g}")
        return self


class Budget(Section):
    epochs: int = Field(gt=0)
    compute: Literal["epochs", "flops"] = Field(
        description="epochs: every trial trains `epochs` epochs; flops: every trial gets the pre-training "
                    "FLOPs of `epochs` epochs of MAE (the base model with K=1), its own epochs fitted to them")
    seconds: float | None = Field(gt=0)
    warmup_epochs: float | None = Field(ge=0)

    def describe(self) -> str:
        if self.compute == "epochs":
            return f"{self.epochs} pre-training epochs per trial"
        return f"equal FLOPs per trial: those of {self.epochs} MAE epochs (epochs fitted to each K)"


class MedianPrunerConfig(Section):
    n_startup_trials: int = Field(ge=0)
    n_warmup_steps: int = Field(ge=0)


class TPEConfig(Section):
    n_startup_trials: int = Field(ge=0)


class SweepConfig(Section):
    study_name: str | None
    storage: str = Field(min_length=1)  # 'journal' (<out>/study.journal) or an Optuna RDB URL
    sampler: Literal["grid", "tpe", "random"]
    seed: int
    n_trials: int | None = Field(gt=0)
    objective: Literal["knn", "linprobe"]
    multi_objective: bool
    budget: Budget
    pruner: Literal["median", "none"]
    prune_every_epochs: int = Field(ge=0)
    median_pruner: MedianPrunerConfig
    tpe: TPEConfig
    workers: int = Field(gt=0)
    backend: Literal["local", "slurm", "submitit-local"]
    threads_per_worker: int | None = Field(gt=0)
    max_retries: int = Field(ge=0)
    heartbeat_seconds: float = Field(gt=0)  # an RDB's Optuna heartbeat: rounded up to whole seconds
    stale_after_seconds: float = Field(gt=0)  # an RDB's grace period (also rounded up)
    poll_seconds: float = Field(gt=0)
    space: dict[str, dict[str, Dimension | None] | None]

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
                **self.model_dump(include={"sampler", "seed", "objective", "multi_objective", "budget", "pruner",
                                           "prune_every_epochs", "median_pruner", "tpe"})}
