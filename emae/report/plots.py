"""Report plots (matplotlib, Agg): pre-training loss curves (one line per run, a colour per
variant), and kNN-monitor accuracy against pre-training wall-clock, FLOPs and epochs: per variant
the mean over seeds with a band from the lowest to the highest seed, and the baselines' kNN
(raw pixels, random init) as horizontal lines."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from emae.io import atomic_write  # noqa: E402
from emae.workflow.config import ReportConfig  # noqa: E402
from emae.workflow.stages import Run  # noqa: E402


def _save(fig: plt.Figure, path: Path, dpi: int) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight"))
    plt.close(fig)


def _colours(runs: list[Run]) -> dict[str, str]:
    variants = list(dict.fromkeys(r.variant for r in runs))
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {v: cycle[i % len(cycle)] for i, v in enumerate(variants)}


def _label(run: Run, runs: list[Run]) -> str:
    several = sum(r.variant == run.variant for r in runs) > 1
    return f"{run.variant} (seed {run.seed})" if several else run.variant


def loss_curves(logs: dict[Run, pd.DataFrame], path: Path, cfg: ReportConfig) -> None:
    runs = list(logs)
    colours = _colours(runs)
    fig, ax = plt.subplots(figsize=cfg.figure_size)
    for run, log in logs.items():
        ax.plot(log["epoch"], log["loss"], color=colours[run.variant], label=_label(run, runs))
        if "recon_loss" in log and (log["recon_loss"] != log["loss"]).any():
            ax.plot(log["epoch"], log["recon_loss"], color=colours[run.variant], linestyle="--",
                    linewidth=1)
    ax.set(xlabel="epoch", ylabel="pre-training loss (dashed: reconstruction only)",
           title="Pre-training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path, cfg.dpi)


AXES = {"pretrain_seconds": ("pre-training wall-clock (s)", "time"),
        "flops": ("pre-training FLOPs (analytic)", "FLOPs"), "epoch": ("epoch", "epochs")}


def _monitor_points(logs: dict[Run, pd.DataFrame], epochs: dict[Run, tuple[int, float]]) -> pd.DataFrame:
    """Every monitored epoch of every run: variant, seed, epoch, seconds, FLOPs, kNN top-1."""
    frames = []
    for run, log in logs.items():
        if "knn_top1" not in log:
            continue
        points = log.dropna(subset=["knn_top1"])[["epoch", "pretrain_seconds", "knn_top1"]].copy()
        total_epochs, total_flops = epochs[run]
        points["flops"] = points["epoch"] / total_epochs * total_flops  # every epoch costs the same
        frames.append(points.assign(variant=run.variant, seed=run.seed))
    return pd.concat(frames) if frames else pd.DataFrame()


def accuracy_curves(logs: dict[Run, pd.DataFrame], epochs: dict[Run, tuple[int, float]],
                    baselines: dict[str, float], path: Path, x: str, cfg: ReportConfig) -> None:
    """kNN top-1 of the monitor entries against `x` (pretrain_seconds, flops or epoch): per variant
    the mean over seeds at each monitored epoch, the band spanning the seeds; `baselines`: name ->
    kNN top-1, drawn as horizontal lines. `epochs`: run -> (its epochs, its pre-training FLOPs)."""
    colours = _colours(list(logs))
    fig, ax = plt.subplots(figsize=cfg.figure_size)
    points = _monitor_points(logs, epochs)
    plotted = not points.empty
    for variant, group in (points.groupby("variant", sort=False) if plotted else []):
        by_epoch = group.groupby("epoch")
        mean, low, high = (f(numeric_only=True).reset_index() for f in (by_epoch.mean, by_epoch.min, by_epoch.max))
        seeds = group["seed"].nunique()
        ax.plot(mean[x], mean["knn_top1"], marker="o", markersize=3, color=colours[variant],
                label=f"{variant} ({seeds} seed{'s' if seeds > 1 else ''})")
        if seeds > 1:
            ax.fill_between(mean[x], low["knn_top1"], high["knn_top1"], color=colours[variant], alpha=0.2)
    for i, (name, value) in enumerate(baselines.items()):
        ax.axhline(value, color="0.3", linestyle=("--", ":")[i % 2], linewidth=1, label=f"{name} (baseline)")
    xlabel, what = AXES[x]
    ax.set(xlabel=xlabel, ylabel="kNN top-1 (%)", title=f"kNN top-1 during pre-training vs {what}")
    if plotted:
        ax.legend(fontsize="small")
    else:  # still write the file: its absence would break the pipeline's outputs
        ax.text(0.5, 0.5, "no kNN monitor entries\n(pretrain.knn_every_epochs = 0)",
                ha="center", va="center", transform=ax.transAxes)
    ax.grid(alpha=0.3)
    _save(fig, path, cfg.dpi)
