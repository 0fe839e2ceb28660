"""Optuna sweeps over K (`model.num_parts`) and the mask ratio: `emae sweep` (docs/sweeps.md).

config: the `sweep` params section; space: the constrained space; study: storage, trial cap,
dead trials; objective: one trial; worker, backends, cli: workers and the coordinator; liveness:
the journal's owner checks; results: trials.csv, best.yaml, plots. Importing it imports no torch.
"""
