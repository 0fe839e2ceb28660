"""Report plots (matplotlib, Agg): pre-training loss curves, and kNN-monitor accuracy against
pre-training wall-clock and against epochs, one line per run (a colour per variant)."""

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


def accuracy_curves(logs: dict[Run, pd.DataFrame], path: Path, x: str, cfg: ReportConfig) -> None:
    """kNN top-1 of the monitor entries of each log against `x` (pretrain_seconds or epoch)."""
    runs = list(logs)
    colours = _colours(runs)
    fig, ax = plt.subplots(figsize=cfg.figure_size)
    plotted = False
    for run, log in logs.items():
        points = log.dropna(subset=["knn_top1"]) if "knn_top1" in log else log.iloc[0:0]
        if len(points):
            ax.plot(points[x], points["knn_top1"], marker="o", color=colours[run.variant],
                    label=_label(run, runs))
            plotted = True
    xlabel = "pre-training wall-clock (s)" if x == "pretrain_seconds" else "epoch"
    ax.set(xlabel=xlabel, ylabel="kNN top-1 (%)",
           title=f"kNN top-1 during pre-training vs {'time' if x == 'pretrain_seconds' else 'epochs'}")
    if plotted:
        ax.legend()
    else:  # still write the file: its absence would break the pipeline's outputs
        ax.text(0.5, 0.5, "no kNN monitor entries\n(pretrain.knn_every_epochs = 0)",
                ha="center", va="center", transform=ax.transAxes)
    ax.grid(alpha=0.3)
    _save(fig, path, cfg.dpi)
