"""Optuna sweeps over K (`model.num_parts`) and the mask ratio: `emae sweep`.

- `space`: the constrained search space (K * int(L * (1 - r)) <= L, never violated), grid or TPE;
- `study`: validated settings, storage, the global trial cap;
- `objective`: one trial = pre-training with a fixed budget, then kNN / linear-probe accuracy;
- `liveness`: trial owners, heartbeats, failing and retrying trials of dead workers;
- `worker` / `cli`: workers (local processes or a submitit job array) and the coordinator;
- `results`: trials.csv, best.yaml (a params overlay), plots.

Importing this package does not import torch (the objective imports it when a trial runs).
"""

from emae.sweep.config import Dimension, SweepConfig

__all__ = ["Dimension", "SweepConfig"]
