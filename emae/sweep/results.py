"""What a sweep leaves in its folder, rewritten from the study after every run (atomically):
trials.csv (`study.trials_dataframe()` + worker, host, retry columns, Pareto flag), best.yaml (a
params overlay: `emae pretrain -p params -p <out>/best.yaml`), metrics.json (counts, the best
trial), plots/heatmap.png (best score over K x mask ratio), Optuna's history and Pareto plots.
A multi-objective study's best is its most accurate Pareto-optimal trial."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import yaml
from optuna.trial import FrozenTrial, TrialState

from emae.io import atomic_write, atomic_write_text, write_json
from emae.patches import allowed_num_parts
from emae.sweep.space import PARTS, RATIO
from emae.sweep.study import Sweep, metric_names, progress, retried_as


def trials_table(study: optuna.Study) -> pd.DataFrame:
    """`study.trials_dataframe()` with the owner flattened, retry links and a `pareto` flag."""
    df = study.trials_dataframe(attrs=("number", "value", "datetime_start", "datetime_complete",
                                       "duration", "params", "user_attrs", "state"))
    if df.empty:
        return df
    owners = df.pop("user_attrs_owner") if "user_attrs_owner" in df else pd.Series([None] * len(df))
    for key in ("worker", "host"):
        df[key] = [o.get(key) if isinstance(o, dict) else None for o in owners]
    links = retried_as(study.get_trials(deepcopy=False))
    df["retry_of"] = df["number"].map({retry: failed for failed, retry in links.items()}).astype("Int64")
    df["retried_as"] = df["number"].map(links).astype("Int64")
    if len(study.directions) > 1:
        df["pareto"] = df["number"].isin({t.number for t in study.best_trials})
    return df


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return None
    if len(study.directions) == 1:
        return study.best_trial
    return max(study.best_trials, key=lambda t: t.values[0])  # the most accurate Pareto point


def _cells(sweep: Sweep, trials: pd.DataFrame) -> list[tuple[int, float]]:
    """Each trial's (K, mask ratio): its swept params, or the base params for an axis not swept."""
    model = sweep.base["model"]
    k = trials.get("params_num_parts", pd.Series(model["num_parts"], index=trials.index))
    r = trials.get("params_mask_ratio", pd.Series(model["mask_ratio"], index=trials.index))
    return list(zip(k.astype(int), r.astype(float)))


def heatmap_frame(sweep: Sweep, df: pd.DataFrame) -> pd.DataFrame:
    """Best score per (K, mask ratio) of the complete trials: rows K, columns ratio (NaN: not run)."""
    done = df[df["state"] == "COMPLETE"]
    score = next(c for c in df.columns if c.startswith("value"))
    frame = pd.DataFrame(_cells(sweep, done), columns=["K", "mask_ratio"], index=done.index).assign(score=done[score])
    table = frame.pivot_table(index="K", columns="mask_ratio", values="score", aggfunc="max")
    ks, rs = (set(sweep.space.axis_values(key)) for key in (PARTS, RATIO))
    return table.reindex(index=sorted(ks | set(table.index)), columns=sorted(rs | set(table.columns)))


def pruned_labels(sweep: Sweep, df: pd.DataFrame) -> dict[tuple[int, float], str]:
    """(K, mask ratio) -> 'pruned' with the best last reported score of that cell's pruned trials."""
    pruned = df[df["state"] == "PRUNED"]
    labels: dict[tuple[int, float], str] = {}
    best: dict[tuple[int, float], float] = {}
    nan = pd.Series(float("nan"), index=pruned.index)
    for cell, value, at in zip(_cells(sweep, pruned), pruned.get("user_attrs_pruned_score", nan),
                               pruned.get("user_attrs_pruned_at_epoch", nan)):
        if pd.isna(value):
            labels.setdefault(cell, "pruned")
        elif value > best.get(cell, float("-inf")):
            best[cell], labels[cell] = value, f"pruned\n{value:.1f} @ ep {int(at)}"
    return labels


def plot_heatmap(sweep: Sweep, df: pd.DataFrame, path: Path) -> None:
    import matplotlib.pyplot as plt

    table, L, pruned = heatmap_frame(sweep, df), sweep.space.num_patches, pruned_labels(sweep, df)
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(table.columns), 1.0 + 0.6 * len(table.index)))
    image = ax.imshow(table.to_numpy(dtype=float), cmap="viridis", aspect="auto", origin="lower")
    for i, k in enumerate(table.index):
        for j, r in enumerate(table.columns):
            value = table.iat[i, j]
            if k not in allowed_num_parts(L, r):
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///", edgecolor="0.6", lw=0))
            elif not pd.isna(value):
                ax.text(j, i, f"{value:.1f}", ha="center", va="center", color="w", fontsize=9)
            elif (k, r) in pruned:
                ax.text(j, i, pruned[k, r], ha="center", va="center", color="0.4", fontsize=8)
    ax.set_xticks(range(len(table.columns)), [f"{r:g}" for r in table.columns])
    ax.set_yticks(range(len(table.index)), [str(k) for k in table.index])
    ax.set(xlabel="mask ratio r", ylabel="K (parts)")
    name = metric_names(sweep.settings.objective, sweep.settings.multi_objective)[0]
    ax.set_title(f"{sweep.name}: best {name} (%)  [hatched: K*int(L(1-r)) > L={L}]\n"
                 f"{sweep.settings.budget.describe()}", fontsize=9)
    fig.colorbar(image, ax=ax, label=name)
    _save(fig, path)


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.set_size_inches(max(fig.get_size_inches()[0], 4), max(fig.get_size_inches()[1], 3))
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png", bbox_inches="tight"))
    plt.close(fig)


def write_results(sweep: Sweep, study: optuna.Study) -> dict[str, Any]:
    """trials.csv, best.yaml, plots, metrics.json from the study as it is now."""
    import matplotlib

    matplotlib.use("Agg")
    from optuna.visualization import matplotlib as ovm

    s, out, trials = sweep.settings, sweep.out, study.get_trials(deepcopy=False)
    names = metric_names(s.objective, s.multi_objective)
    df = trials_table(study)
    if not df.empty:
        atomic_write(out / "trials.csv", lambda tmp: df.to_csv(tmp, index=False))
    p = progress(trials)
    summary: dict[str, Any] = {"study": study.study_name, "sampler": s.sampler, "objective": names,
                               "trials": len(trials), "complete": p.complete, "pruned": p.pruned, "failed": p.failed,
                               "retried": p.retried, "running": p.running, "waiting": p.waiting, "target": sweep.target}
    best = best_trial(study)
    if best is not None:
        point = sweep.space.from_optuna(best.params)
        scores = ", ".join(f"{n} = {v:.4g}" for n, v in zip(names, best.values))
        atomic_write_text(out / "best.yaml", (
            f"# emae sweep {study.study_name!r}: {'most accurate Pareto-optimal' if s.multi_objective else 'best'} of "
            f"{p.complete} complete trials: trial {best.number} ({scores}; {s.budget.describe()})\n"
            f"# use: emae pretrain -p params -p {out / 'best.yaml'} -o runs/<name>\n")
            + yaml.safe_dump(sweep.space.overlay(point), sort_keys=False))
        summary |= {"best_trial": best.number, "best_values": list(best.values), "best_params": point}
        plot_heatmap(sweep, df, out / "plots" / "heatmap.png")
        _save(ovm.plot_optimization_history(study, target=(lambda t: t.values[0]) if s.multi_objective else None,
                                            target_name=names[0]).figure, out / "plots" / "history.png")
        if s.multi_objective:
            _save(ovm.plot_pareto_front(study, target_names=names).figure, out / "plots" / "pareto.png")
    write_json(out / "metrics.json", summary)
    return summary
