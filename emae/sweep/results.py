"""What a sweep leaves in its folder, rewritten from the study after every run (atomically):

    trials.csv             every trial (`study.trials_dataframe()`): params_*, values, state, attrs
    best.yaml              a params overlay of the best point:
                           `emae pretrain -p params -p <out>/best.yaml -o runs/best`
    metrics.json           counts, the best trial and its score (DVC metrics)
    plots/heatmap.png      best score over K x mask ratio (invalid cells hatched)
    plots/history.png      optimisation history (Optuna's matplotlib plot)
    plots/pareto.png       accuracy vs pre-training seconds (multi-objective studies)

Multi-objective studies have no single best: best.yaml holds the Pareto-optimal trial with the
highest accuracy, and every Pareto-optimal trial is flagged `pareto` in trials.csv.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import yaml
from optuna.trial import FrozenTrial, TrialState

from emae.io import atomic_write, atomic_write_text, write_json
from emae.masking import allowed_num_parts
from emae.sweep.space import PARTS, RATIO
from emae.sweep.storage import metric_names
from emae.sweep.study import Sweep, progress

log = logging.getLogger("emae.sweep")


def trials_table(study: optuna.Study) -> pd.DataFrame:
    """`study.trials_dataframe()` with the owner dicts flattened and a `pareto` flag."""
    df = study.trials_dataframe(attrs=("number", "value", "datetime_start", "datetime_complete",
                                       "duration", "params", "user_attrs", "state"))
    if df.empty:
        return df
    if "user_attrs_owner" in df:
        owners = df.pop("user_attrs_owner")
        df["worker"] = [o.get("worker") if isinstance(o, dict) else None for o in owners]
        df["host"] = [o.get("host") if isinstance(o, dict) else None for o in owners]
    if len(study.directions) > 1:
        front = {t.number for t in study.best_trials}
        df["pareto"] = df["number"].isin(front)
    return df


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return None
    if len(study.directions) == 1:
        return study.best_trial
    return max(study.best_trials, key=lambda t: t.values[0])  # the most accurate Pareto point


def best_overlay(sweep: Sweep, trial: FrozenTrial) -> dict[str, Any]:
    return sweep.space.overlay(sweep.space.from_optuna(trial.params))


def write_best(sweep: Sweep, study: optuna.Study, trial: FrozenTrial, path: Path) -> None:
    names = metric_names(sweep.settings.objective, sweep.settings.multi_objective)
    scores = ", ".join(f"{n} = {v:.4g}" for n, v in zip(names, trial.values))
    n_complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    kind = "most accurate Pareto-optimal" if sweep.settings.multi_objective else "best"
    header = (f"# emae sweep {study.study_name!r}: {kind} of {n_complete} complete trials: trial "
              f"{trial.number} ({scores}, {sweep.settings.budget.epochs} pre-training epochs)\n"
              f"# use: emae pretrain -p params -p {path} -o runs/<name>\n")
    atomic_write_text(path, header + yaml.safe_dump(best_overlay(sweep, trial), sort_keys=False))


def heatmap_frame(sweep: Sweep, df: pd.DataFrame) -> pd.DataFrame:
    """Best score per (K, mask ratio) of the complete trials: rows K, columns ratio (NaN: not run)."""
    score = _score_column(df)
    done = df[df["state"] == "COMPLETE"]
    k, r = _cells(sweep, done)
    frame = pd.DataFrame({"K": k, "mask_ratio": r, "score": done[score]})
    model = sweep.base["model"]
    ratios = list(sweep.space.axes[RATIO].choices) if RATIO in sweep.space.axes else [model["mask_ratio"]]
    parts = list(sweep.space.axes[PARTS].choices) if PARTS in sweep.space.axes else [model["num_parts"]]
    table = frame.pivot_table(index="K", columns="mask_ratio", values="score", aggfunc="max")
    return table.reindex(index=sorted(set(parts) | set(table.index)),
                         columns=sorted(set(ratios) | set(table.columns)))


def _cells(sweep: Sweep, trials: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """Each trial's (K, mask ratio): its swept params, or the base params for an axis not swept."""
    model = sweep.base["model"]
    k = trials.get("params_num_parts", pd.Series(model["num_parts"], index=trials.index))
    r = trials.get("params_mask_ratio", pd.Series(model["mask_ratio"], index=trials.index))
    return k.astype(int), r.astype(float)


def _score_column(df: pd.DataFrame) -> str:
    candidates = [c for c in df.columns if c.startswith("value")]
    return candidates[0]


def pruned_labels(sweep: Sweep, df: pd.DataFrame) -> dict[tuple[int, float], str]:
    """(K, mask ratio) -> 'pruned' with the best last reported score of that cell's pruned trials."""
    pruned = df[df["state"] == "PRUNED"]
    k, r = _cells(sweep, pruned)
    score = pruned.get("user_attrs_pruned_score", pd.Series(float("nan"), index=pruned.index))
    epoch = pruned.get("user_attrs_pruned_at_epoch", pd.Series(float("nan"), index=pruned.index))
    labels: dict[tuple[int, float], str] = {}
    best: dict[tuple[int, float], float] = {}
    for cell, value, at in zip(zip(k, r), score, epoch):
        if pd.isna(value):  # pruned before this attribute existed
            labels.setdefault(cell, "pruned")
        elif value > best.get(cell, float("-inf")):
            best[cell] = value
            labels[cell] = f"pruned\n{value:.1f} @ ep {int(at)}"
    return labels


def plot_heatmap(sweep: Sweep, df: pd.DataFrame, path: Path) -> None:
    import matplotlib.pyplot as plt
    import numpy as np

    table = heatmap_frame(sweep, df)
    L = sweep.space.num_patches
    pruned = pruned_labels(sweep, df)
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(table.columns), 1.0 + 0.6 * len(table.index)))
    image = ax.imshow(table.to_numpy(dtype=float), cmap="viridis", aspect="auto", origin="lower")
    for i, k in enumerate(table.index):
        for j, r in enumerate(table.columns):
            value = table.iat[i, j]
            if k not in allowed_num_parts(L, r):
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///",
                                           edgecolor="0.6", linewidth=0))
            elif not np.isnan(value):
                ax.text(j, i, f"{value:.1f}", ha="center", va="center", color="w", fontsize=9)
            elif (k, r) in pruned:
                ax.text(j, i, pruned[k, r], ha="center", va="center", color="0.4", fontsize=8)
    ax.set_xticks(range(len(table.columns)), [f"{r:g}" for r in table.columns])
    ax.set_yticks(range(len(table.index)), [str(k) for k in table.index])
    ax.set_xlabel("mask ratio r")
    ax.set_ylabel("K (parts)")
    name = metric_names(sweep.settings.objective, sweep.settings.multi_objective)[0]
    ax.set_title(f"{sweep.name}: best {name} (%)  [hatched: K*int(L(1-r)) > L={L}]", fontsize=9)
    fig.colorbar(image, ax=ax, label=name)
    fig.tight_layout()
    _save(fig, path)


def plot_optuna(sweep: Sweep, study: optuna.Study, plots: Path) -> list[Path]:
    """Optuna's own matplotlib plots: optimisation history, and the Pareto front when multi-objective."""
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    names = metric_names(sweep.settings.objective, sweep.settings.multi_objective)
    written = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if sweep.settings.multi_objective:
            ax = ovm.plot_optimization_history(study, target=lambda t: t.values[0], target_name=names[0])
        else:
            ax = ovm.plot_optimization_history(study, target_name=names[0])
        _save(ax.figure, plots / "history.png")
        written.append(plots / "history.png")
        if sweep.settings.multi_objective:
            ax = ovm.plot_pareto_front(study, target_names=names)
            _save(ax.figure, plots / "pareto.png")
            written.append(plots / "pareto.png")
    plt.close("all")
    return written


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.set_size_inches(max(fig.get_size_inches()[0], 4), max(fig.get_size_inches()[1], 3))
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png", bbox_inches="tight"))
    plt.close(fig)


def write_results(sweep: Sweep, study: optuna.Study) -> dict[str, Any]:
    """trials.csv, best.yaml, plots, metrics.json from the study as it is now."""
    import matplotlib

    matplotlib.use("Agg")
    out = sweep.out
    trials = study.get_trials(deepcopy=False)
    df = trials_table(study)
    if not df.empty:
        atomic_write(out / "trials.csv", lambda tmp: df.to_csv(tmp, index=False))
    p = progress(trials)
    summary: dict[str, Any] = {"study": study.study_name, "sampler": sweep.settings.sampler,
                               "objective": metric_names(sweep.settings.objective,
                                                         sweep.settings.multi_objective),
                               "trials": len(trials), "complete": p.complete, "pruned": p.pruned,
                               "failed": p.failed, "retried": p.retried, "running": p.running,
                               "waiting": p.waiting, "target": sweep.target}
    best = best_trial(study)
    if best is not None:
        write_best(sweep, study, best, out / "best.yaml")
        summary |= {"best_trial": best.number, "best_values": list(best.values),
                    "best_params": sweep.space.from_optuna(best.params)}
        plot_heatmap(sweep, df, out / "plots" / "heatmap.png")
        plot_optuna(sweep, study, out / "plots")
    write_json(out / "metrics.json", summary)
    return summary
