"""One trial: pre-train a point of the space with the sweep's budget, then score its encoder.

- budget: `sweep.budget.epochs` (the lr schedule spans them) and optionally `budget.seconds`,
  checked after every epoch that has a kNN value: the first such epoch past the cap ends
  pre-training and its kNN value (or a linear probe of that checkpoint) is the score.
- score: `knn` is the kNN monitor of pre-training (`emae.eval.knn.knn_monitor`, params `knn:`) at
  the last epoch; `linprobe` is `emae.eval.linprobe.evaluate_linprobe` on the trial's encoder.
- pruning (single objective): kNN top-1 every `prune_every_epochs` epochs goes to
  `trial.report`; a pruned trial stops after that epoch (its checkpoint is kept).

Each trial pre-trains into `<out>/trials/<number>/`. A retry of a trial whose worker died first
renames the dead trial's folder to its own, so pre-training resumes from that checkpoint (emae's
resume is exact: the same weights as an uninterrupted run).
"""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path
from typing import Any

import optuna

from emae.config import Config, config_from_tree
from emae.sweep.config import SweepConfig
from emae.sweep.space import SearchSpace

log = logging.getLogger("emae.sweep")

TRIALS = "trials"


class _BudgetReached(Exception):
    """Raised in the epoch callback when the wall-clock budget is spent."""


def trial_config(base: dict[str, Any], sweep: SweepConfig, space: SearchSpace,
                 params: dict[str, Any]) -> Config:
    """The params of one trial: the base tree, the point, and the sweep's budget and monitor."""
    tree = copy.deepcopy(base)
    space.apply(tree, params)
    tree["pretrain"]["epochs"] = sweep.budget.epochs
    if sweep.budget.warmup_epochs is not None:
        tree["pretrain"]["warmup_epochs"] = sweep.budget.warmup_epochs
    needs_knn = sweep.objective == "knn" or sweep.prune_every_epochs > 0
    every = sweep.prune_every_epochs or sweep.budget.epochs
    tree["pretrain"]["knn_every_epochs"] = min(every, sweep.budget.epochs) if needs_knn else 0
    return config_from_tree(tree, {})


def run_dir_name(number: int) -> str:
    """A trial's folder relative to the sweep's (its `run_dir` user attribute)."""
    return f"{TRIALS}/{number}"


def run_dir(out: Path, number: int) -> Path:
    return out / run_dir_name(number)


def adopt_folder(out: Path, trial: optuna.Trial) -> Path:
    """The trial's folder; a retry takes over (renames) the folder of the attempt it retries."""
    target = run_dir(out, trial.number)
    previous = trial.user_attrs.get("resume_dir")
    if previous and not target.exists() and (out / previous).is_dir():
        (out / previous).rename(target)
        log.info("trial %d resumes %s (renamed to %s)", trial.number, previous, target)
    return target


def run_trial(trial: optuna.Trial, out: Path, base: dict[str, Any], sweep: SweepConfig,
              space: SearchSpace) -> float | tuple[float, float]:
    """Pre-train and score the trial's point; raises `optuna.TrialPruned` when pruned."""
    from emae.train.pretrain import pretrain

    params = space.suggest(trial)
    config = trial_config(base, sweep, space, params)
    folder = adopt_folder(out, trial)
    trial.set_user_attr("run_dir", str(folder.relative_to(out)))
    trial.set_user_attr("pretrain_seed", config.pretrain.seed)
    history: list[dict[str, Any]] = []
    prune = not sweep.multi_objective and sweep.pruner != "none" and sweep.prune_every_epochs > 0

    def on_epoch(stats: dict[str, Any]) -> None:
        history.append(stats)
        has_knn = "knn_top1" in stats
        if prune and has_knn:
            trial.report(stats["knn_top1"], stats["epoch"])
            if trial.should_prune():
                trial.set_user_attr("pruned_at_epoch", stats["epoch"])
                trial.set_user_attr("pruned_score", stats["knn_top1"])  # shown in the heatmap's cell
                raise optuna.TrialPruned(f"kNN top-1 {stats['knn_top1']:.2f} at epoch {stats['epoch']}")
        spent = sweep.budget.seconds is not None and stats["pretrain_seconds"] >= sweep.budget.seconds
        if spent and (has_knn or sweep.objective != "knn"):  # a kNN score needs a kNN epoch
            raise _BudgetReached

    stopped_early = _replay_logged_epochs(folder, on_epoch)  # a retry: epochs run before the kill
    try:
        if not stopped_early:
            metrics = pretrain(config, folder, epoch_callback=on_epoch)
    except _BudgetReached:
        stopped_early = True
    if stopped_early:
        metrics = {"knn_top1": history[-1].get("knn_top1"), "knn_top5": history[-1].get("knn_top5"),
                   "pretrain_seconds": history[-1]["pretrain_seconds"], "epochs": history[-1]["epoch"],
                   "final_loss": history[-1]["loss"]}
    if metrics.get("knn_top1") is None and any("knn_top1" in h for h in history):
        # killed after the last checkpoint but before metrics.json: resuming only exports, so the
        # last epoch's kNN comes from its log line (replayed into `history`)
        last = [h for h in history if "knn_top1" in h][-1]
        metrics |= {"knn_top1": last["knn_top1"], "knn_top5": last.get("knn_top5")}
    if sweep.objective == "knn" and metrics.get("knn_top1") is None:
        raise RuntimeError(f"trial {trial.number}: pre-training gave no kNN value ({folder})")
    for key in ("knn_top1", "knn_top5", "pretrain_seconds", "final_loss", "epochs"):
        if metrics.get(key) is not None:
            trial.set_user_attr(key, metrics[key])
    trial.set_user_attr("budget_stopped", stopped_early)
    score = metrics["knn_top1"] if sweep.objective == "knn" else _linprobe(config, folder, stopped_early)
    if sweep.objective == "linprobe":
        trial.set_user_attr("linprobe_top1", score)
    if not math.isfinite(score):
        raise RuntimeError(f"trial {trial.number}: non-finite score {score}")
    return (score, float(metrics["pretrain_seconds"])) if sweep.multi_objective else score


def _replay_logged_epochs(folder: Path, on_epoch: Any) -> bool:
    """Report the epochs a killed attempt already ran (its log.jsonl survives) before resuming, so
    the pruner sees the whole curve. True when the time budget was already spent."""
    import json

    log_path = folder / "log.jsonl"
    if not log_path.exists() or not (folder / "checkpoints" / "last.pt").exists():
        return False
    # a line past the checkpoint (killed between log and save) is rerun identically: same values
    for line in log_path.read_text().splitlines():
        if line.strip():
            try:
                on_epoch(json.loads(line))
            except _BudgetReached:
                return True
    return False


def _linprobe(config: Config, folder: Path, stopped_early: bool) -> float:
    from emae.eval.linprobe import evaluate_linprobe
    from emae.models.export import ENCODER_FILE, load_pretrained, save_encoder

    encoder = folder / ENCODER_FILE
    if stopped_early or not encoder.exists():
        model, _ = load_pretrained(folder / "checkpoints" / "last.pt")
        save_encoder(model, encoder)
    return float(evaluate_linprobe(config, encoder, folder / "linprobe")["top1"])
