"""One trial: pre-train a point with the sweep's budget, then score its encoder (kNN top-1 of the
last epoch, or a linear probe). With pruning, kNN every `prune_every_epochs` goes to `trial.report`;
`budget.seconds` ends pre-training at the first kNN epoch past it. A trial pre-trains into
`<out>/trials/<number>/`; its retries keep that folder (the `run_dir` they inherit) and resume its
checkpoint (exactly), the epochs logged before replayed to the pruner.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import optuna

from emae.config import Config, config_from_tree
from emae.flops import fit_epochs, train_flops_per_image
from emae.sweep.config import SweepConfig


class _BudgetReached(Exception):
    """Raised in the epoch callback when the wall-clock budget is spent."""


def trial_config(base: dict[str, Any], sweep: SweepConfig, point: dict[str, Any]) -> Config:
    """The params of one trial: the base tree, the point (dotted keys), the budget and kNN monitor."""
    tree = copy.deepcopy(base)
    for key, value in point.items():
        section, name = key.split(".")
        tree[section][name] = value
    tree["pretrain"]["epochs"] = sweep.budget.epochs
    if sweep.budget.warmup_epochs is not None:
        tree["pretrain"]["warmup_epochs"] = sweep.budget.warmup_epochs
    if sweep.budget.compute == "flops":
        tree["pretrain"] |= _equal_flops_schedule(base, tree, sweep.budget.epochs, tree["pretrain"]["warmup_epochs"])
    epochs = tree["pretrain"]["epochs"]
    needs_knn = sweep.objective == "knn" or sweep.prune_every_epochs > 0
    tree["pretrain"]["knn_every_epochs"] = min(sweep.prune_every_epochs or epochs, epochs) if needs_knn else 0
    return config_from_tree(tree, {})


def _equal_flops_schedule(base: dict[str, Any], tree: dict[str, Any], epochs: int, warmup: float) -> dict[str, Any]:
    """The trial's epochs and warm-up for the FLOPs of `epochs` epochs of MAE (the base model, K=1)."""
    data = tree["data"]
    mae = SimpleNamespace(**(base["model"] | {"num_parts": 1}))
    trial = SimpleNamespace(**tree["model"])
    budget = epochs * train_flops_per_image(mae, data["image_size"], data["in_chans"])
    fitted, fitted_warmup = fit_epochs(epochs, warmup, 1, train_flops_per_image(trial, data["image_size"], data["in_chans"]),
                                       budget_flops=budget)
    return {"epochs": fitted, "warmup_epochs": fitted_warmup}


def run_trial(trial: optuna.Trial, out: Path, base: dict[str, Any], sweep: SweepConfig,
              space: Any) -> float | tuple[float, float]:
    """Pre-train and score the trial's point; raises `optuna.TrialPruned` when pruned."""
    from emae.train.pretrain import pretrain

    config = trial_config(base, sweep, space.suggest(trial))
    run_dir = trial.user_attrs.get("run_dir") or f"trials/{trial.number}"  # a retry: its first attempt's
    folder = out / run_dir
    trial.set_user_attr("run_dir", run_dir)
    trial.set_user_attr("pretrain_seed", config.pretrain.seed)
    history: list[dict[str, Any]] = []
    prune = not sweep.multi_objective and sweep.pruner != "none" and sweep.prune_every_epochs > 0

    def on_epoch(stats: dict[str, Any]) -> None:
        history.append(stats)
        if prune and "knn_top1" in stats:
            trial.report(stats["knn_top1"], stats["epoch"])
            if trial.should_prune():
                trial.set_user_attr("pruned_at_epoch", stats["epoch"])
                trial.set_user_attr("pruned_score", stats["knn_top1"])  # shown in the heatmap's cell
                raise optuna.TrialPruned(f"kNN top-1 {stats['knn_top1']:.2f} at epoch {stats['epoch']}")
        spent = sweep.budget.seconds is not None and stats["pretrain_seconds"] >= sweep.budget.seconds
        if spent and ("knn_top1" in stats or sweep.objective != "knn"):  # a kNN score needs a kNN epoch
            raise _BudgetReached

    stopped_early = _replay_logged_epochs(folder, on_epoch)
    try:  # pretrain's metrics hold the last epoch's kNN, also when only its export was left to do
        metrics = {} if stopped_early else pretrain(config, folder, epoch_callback=on_epoch)
    except _BudgetReached:
        stopped_early = True
    if stopped_early:
        knn = [h for h in history if "knn_top1" in h]  # the budget's epoch (objective knn) or before
        metrics = {"pretrain_seconds": history[-1]["pretrain_seconds"], "epochs": history[-1]["epoch"],
                   "final_loss": history[-1]["loss"], **{k: knn[-1].get(k) for k in ("knn_top1", "knn_top5") if knn}}
    if sweep.objective == "knn" and metrics.get("knn_top1") is None:
        raise RuntimeError(f"trial {trial.number}: pre-training gave no kNN value ({folder})")
    for key in ("knn_top1", "knn_top5", "pretrain_seconds", "final_loss", "epochs"):
        if metrics.get(key) is not None:
            trial.set_user_attr(key, metrics[key])
    trial.set_user_attr("budget_stopped", stopped_early)
    score = metrics["knn_top1"] if sweep.objective == "knn" else _linprobe(trial, config, folder, stopped_early)
    if not math.isfinite(score):
        raise RuntimeError(f"trial {trial.number}: non-finite score {score}")
    return (score, float(metrics["pretrain_seconds"])) if sweep.multi_objective else score


def _replay_logged_epochs(folder: Path, on_epoch: Callable[[dict[str, Any]], None]) -> bool:
    """Report the epochs a killed attempt already ran (its log.jsonl survives) before resuming, so
    the pruner sees the whole curve. True when the time budget was already spent."""
    log_path = folder / "log.jsonl"
    if not log_path.exists() or not (folder / "checkpoints" / "last.pt").exists():
        return False
    # a line past the checkpoint (killed between log and save) is rerun identically: same values
    for line in filter(str.strip, log_path.read_text().splitlines()):
        try:
            on_epoch(json.loads(line))
        except _BudgetReached:
            return True
    return False


def _linprobe(trial: optuna.Trial, config: Config, folder: Path, stopped_early: bool) -> float:
    from emae.eval.linprobe import evaluate_linprobe
    from emae.models.export import ENCODER_FILE, load_pretrained, save_encoder

    encoder = folder / ENCODER_FILE
    if stopped_early or not encoder.exists():  # the export of the budget's epoch
        save_encoder(load_pretrained(folder / "checkpoints" / "last.pt")[0], encoder)
    score = float(evaluate_linprobe(config, encoder, folder / "linprobe")["top1"])
    trial.set_user_attr("linprobe_top1", score)
    return score
