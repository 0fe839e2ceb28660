"""`emae report -o results/report`: join every run of the pipeline into tables and plots.

Reads the runs of params/pipeline.yaml (variants x seeds) from `runs/` and `results/` and writes:

  summary.csv, summary.md   one row per variant and per baseline (raw pixels, random init): K, mask
                            ratio, lambda, epochs, seeds, and the mean (`*_std`: standard deviation,
                            `*_ci95`: 95% CI half-width over seeds) of pre-training seconds and FLOPs
                            (also as a % of pipeline.reference's), final loss, kNN / linear-probe /
                            fine-tuning top-1 and consistency; summary.md adds the time-to-target
                            table, one verdict sentence per claim, and the provenance
  time_to_target.csv        FLOPs and seconds each variant needed to reach the reference's accuracy
  runs.csv                  one row per run
  loss_curves.png, accuracy_vs_time.png, accuracy_vs_flops.png, accuracy_vs_epochs.png
  curves/<run>.csv, curves/<run>-knn.csv   the curves as CSV (dvc plots)
  reconstructions/<run>-*.png              the visualize grids
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

from emae.workflow.stages import (CURVES_DIR, PLOTS, RECONSTRUCTIONS_DIR, RUNS_CSV, SUMMARY_CSV,
                                  SUMMARY_MD, TIME_TO_TARGET_CSV)

logger = logging.getLogger("emae.report")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from emae.config import add_config_arguments

    add_config_arguments(parser, out_required=True)


def run(args: argparse.Namespace) -> None:
    from emae.workflow.stages import Pipeline

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    pipeline = Pipeline(_one_params(args.params), args.preset, args.overrides)
    paths = write_report(pipeline, Path(args.out))
    print(paths[SUMMARY_MD].read_text(), end="")


def _one_params(params: list[str] | None) -> str:
    from emae.errors import ConfigError

    if not params:
        return "params"
    if len(params) > 1:
        raise ConfigError("emae report takes one --params directory (the pipeline's), "
                          f"got {len(params)}: {', '.join(params)}")
    return params[0]


def write_report(pipeline, out: Path, root: Path = Path(".")) -> dict[str, Path]:
    """Write every report file under `out`; returns them by name."""
    from emae.io import atomic_write, atomic_write_text
    from emae.report import plots
    from emae.report.compute import time_to_target, time_to_target_markdown, verdicts, verdicts_markdown
    from emae.report.summary import (provenance_markdown, provenance_table, read_log, runs_table,
                                     summary_table, to_markdown)

    cfg = pipeline.settings.report
    reference = pipeline.settings.reference
    runs = runs_table(pipeline, root)  # reads (and checks) every metrics file first
    provenance, warnings = provenance_table(pipeline, root)
    for warning in warnings:
        logger.warning("%s", warning)
    logs = {run: read_log(root / run.run_dir / "log.jsonl") for run in pipeline.runs}
    summary = summary_table(runs, reference)
    targets = time_to_target(pipeline, runs, logs)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in (SUMMARY_CSV, SUMMARY_MD, RUNS_CSV, TIME_TO_TARGET_CSV,
                                           *PLOTS.values())}
    atomic_write(paths[SUMMARY_CSV], lambda tmp: summary.to_csv(tmp, index=False))
    atomic_write(paths[RUNS_CSV], lambda tmp: runs.to_csv(tmp, index=False))
    atomic_write(paths[TIME_TO_TARGET_CSV], lambda tmp: targets.to_csv(tmp, index=False))
    atomic_write_text(paths[SUMMARY_MD], "\n".join([
        to_markdown(summary, cfg.decimals, reference), time_to_target_markdown(targets, reference),
        verdicts_markdown(verdicts(pipeline, runs, targets)), provenance_markdown(provenance, warnings)]))

    epochs = {run: (int(row["epochs"]), float(row["pretrain_flops"]))
              for run, (_, row) in zip(pipeline.runs, runs.iterrows())}
    baselines = {name: float(value) for name, value in summary.set_index("variant")["knn_top1"].items()
                 if name in ("pixels", "random_init") and value == value}
    plots.loss_curves(logs, paths[PLOTS["loss_curves"]], cfg)
    for name, x in (("accuracy_vs_time", "pretrain_seconds"), ("accuracy_vs_flops", "flops"),
                    ("accuracy_vs_epochs", "epoch")):
        plots.accuracy_curves(logs, epochs, baselines, paths[PLOTS[name]], x, cfg)

    curves = out / CURVES_DIR
    curves.mkdir(exist_ok=True)
    for run, log in logs.items():
        columns = [c for c in ("epoch", "step", "pretrain_seconds", "loss", "recon_loss",
                               "consistency_loss") if c in log]
        atomic_write(curves / f"{run.id}.csv", lambda tmp: log[columns].to_csv(tmp, index=False))
        knn = log.dropna(subset=["knn_top1"]) if "knn_top1" in log else log.iloc[0:0]
        knn_columns = ["epoch", "pretrain_seconds", *[c for c in ("knn_top1", "knn_top5") if c in log]]
        atomic_write(curves / f"{run.id}-knn.csv", lambda tmp: knn[knn_columns].to_csv(tmp, index=False))
    paths[CURVES_DIR] = curves

    if pipeline.stage_enabled("visualize"):
        paths[RECONSTRUCTIONS_DIR] = _copy_reconstructions(pipeline, out / RECONSTRUCTIONS_DIR, root)
    return paths


def _copy_reconstructions(pipeline, dest: Path, root: Path) -> Path:
    from emae.errors import EmaeError

    if dest.exists():
        shutil.rmtree(dest)  # only this run's images: a removed variant leaves none behind
    dest.mkdir(parents=True)
    for run in pipeline.runs:
        source = root / run.result_dir("visualize")
        images = sorted(source.rglob("*.png"))
        if not images:
            raise EmaeError(f"{source}: no reconstruction images (*.png) found")
        for image in images:
            name = "-".join(image.relative_to(source).parts)
            shutil.copyfile(image, dest / f"{run.id}-{name}")
    return dest
