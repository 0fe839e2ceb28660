"""Join the metrics of every run into tables: one row per run, and one per variant (mean, std and
a 95% confidence interval over seeds), the baselines (raw pixels, random init) as rows of their own.

Inputs (the stage contract): `runs/<v>/seed<s>/metrics.json` and `log.jsonl` from pre-training,
`results/<v>/seed<s>/<stage>/metrics.json` with `top1`/`top5` (kNN, linear probe, fine-tuning) and
`consistency` (prediction consistency); `results/{pixels,random_init}/seed<s>/<stage>/metrics.json`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
from scipy import stats

from emae.errors import EmaeError
from emae.io import read_json, read_jsonl
from emae.provenance import file_digest
from emae.workflow.stages import DENSE_STAGES, EVAL_STAGES, MODEL_STAGES, Pipeline, Run

# dense transfer metrics (percent) in the summary, when their stages run
DENSE_KEYS = {"detect": ("det_ap_box", "det_ap_mask"), "segment": ("seg_miou",)}
# per evaluation stage: summary column -> its key in the stage's metrics.json
STAGE_COLUMNS = {**{stage: {f"{stage}_top1": "top1", f"{stage}_top5": "top5"} for stage in EVAL_STAGES},
                 **{stage: {key: key for key in keys} for stage, keys in DENSE_KEYS.items()}}

# Columns of the per-variant summary that are the same for all seeds of a variant.
SETTINGS = ["K", "mask_ratio", "consistency_weight", "epochs", "batch", "lr"]
# Columns averaged over seeds (mean, and `<name>_std`).
# final_loss is what each variant minimised (reconstruction + lambda x consistency); compare
# variants on final_recon_loss
MEASURES = ["pretrain_seconds", "pretrain_flops", "final_loss", "final_recon_loss", "knn_top1",
            "linprobe_top1", "finetune_top1", "det_ap_box", "det_ap_mask", "seg_miou", "consistency"]
# Shown as a percentage of the reference variant's mean (pipeline.reference).
RELATIVE = {"pretrain_flops": "flops_vs_reference", "pretrain_seconds": "seconds_vs_reference"}


def ci95(values: pd.Series) -> float:
    """Half-width of the 95% confidence interval of the mean (Student t; NaN below two values)."""
    values = values.dropna()
    if len(values) < 2:
        return math.nan
    return float(stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values)))


def _metrics(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise EmaeError(f"{path}: missing (run its stage first, e.g. `snakemake --cores all`)")
    try:
        return read_json(path)
    except json.JSONDecodeError as err:
        raise EmaeError(f"{path}: not valid JSON ({err})") from None


def _number(metrics: dict[str, Any], key: str, path: Path) -> float:
    if key not in metrics:
        raise EmaeError(f"{path}: has no {key!r} (keys: {', '.join(sorted(metrics))})")
    return float(metrics[key])


def read_log(path: Path) -> pd.DataFrame:
    """A run's `log.jsonl` (one line per epoch) as a frame sorted by epoch."""
    if not path.is_file():
        raise EmaeError(f"{path}: missing (pre-training writes it)")
    rows = read_jsonl(path)
    if not rows:
        raise EmaeError(f"{path}: empty")
    return pd.DataFrame(rows).sort_values("epoch").reset_index(drop=True)


def run_row(pipeline: Pipeline, run: Run, root: Path = Path(".")) -> dict[str, Any]:
    """Everything the report shows about one run."""
    path = root / run.run_dir / "metrics.json"
    pre = _metrics(path)
    row: dict[str, Any] = {
        "variant": run.variant, "seed": run.seed,
        "K": int(_number(pre, "num_parts", path)), "mask_ratio": _number(pre, "mask_ratio", path),
        "consistency_weight": _number(pre, "consistency_weight", path),
        "epochs": int(_number(pre, "epochs", path)),
        # pre-training's effective batch (images per step, all processes) and the lr it gave
        "batch": float(pre.get("effective_batch_size", math.nan)), "lr": float(pre.get("lr", math.nan)),
        "pretrain_seconds": _number(pre, "pretrain_seconds", path),
        "pretrain_flops": float(pre.get("pretrain_flops", math.nan)),
        "final_loss": _number(pre, "final_loss", path),
        "final_recon_loss": _number(pre, "final_recon_loss", path),
        "pretrain_knn_top1": float(pre.get("knn_top1", math.nan)),
    }
    row |= _stage_figures(pipeline, run, EVAL_STAGES, root)
    row["consistency"] = math.nan
    if pipeline.stage_enabled("consistency"):
        path = root / run.result_dir("consistency") / "metrics.json"
        row["consistency"] = _number(_metrics(path), "consistency", path)
    return row | _stage_figures(pipeline, run, DENSE_STAGES, root)


def _stage_figures(pipeline: Pipeline, run: Run, shown: tuple[str, ...], root: Path,
                   ran: tuple[str, ...] | None = None) -> dict[str, float]:
    """The STAGE_COLUMNS of the `shown` stages: the figures of those `run` ran (`ran`, by default
    every one), where the pipeline has them on; NaN for the others."""
    row = {}
    for stage in shown:
        columns = STAGE_COLUMNS[stage]
        row |= dict.fromkeys(columns, math.nan)
        if (ran is None or stage in ran) and pipeline.stage_enabled(stage):
            path = root / run.result_dir(stage) / "metrics.json"
            metrics = _metrics(path)
            row |= {column: _number(metrics, key, path) for column, key in columns.items()}
    return row


def baseline_row(pipeline: Pipeline, run: Run, root: Path = Path(".")) -> dict[str, Any]:
    """A baseline (no pre-training): its evaluation figures; settings and the rest are NaN."""
    row: dict[str, Any] = {"variant": run.variant, "seed": run.seed,
                           **{c: math.nan for c in [*SETTINGS, *MEASURES, "pretrain_knn_top1"]}}
    stages = tuple(pipeline.baseline_stages(run))
    return row | _stage_figures(pipeline, run, EVAL_STAGES + DENSE_STAGES, root, ran=stages)


def runs_table(pipeline: Pipeline, root: Path = Path(".")) -> pd.DataFrame:
    rows = [run_row(pipeline, run, root) for run in pipeline.runs]
    rows += [baseline_row(pipeline, run, root) for run in pipeline.baseline_runs]
    return pd.DataFrame(rows)


def summary_table(runs: pd.DataFrame, reference: str) -> pd.DataFrame:
    """One row per variant, then per baseline (in pipeline order): its settings, the number of
    seeds, and the mean, standard deviation and 95% CI half-width (over seeds; NaN with one seed)
    of each measure; pre-training FLOPs and seconds also as a % of the `reference` variant's."""
    rows = []
    for variant, group in runs.groupby("variant", sort=False):
        row: dict[str, Any] = {"variant": variant}
        for column in SETTINGS:
            values = group[column].unique()
            if len(values) != 1:  # e.g. an override of the seed changed K: not one variant
                raise EmaeError(f"variant {variant!r}: its runs differ in {column} ({list(values)})")
            row[column] = values[0]
        row["seeds"] = len(group)
        for column in MEASURES:
            row[column] = group[column].mean()
            row[f"{column}_std"] = group[column].std(ddof=1) if len(group) > 1 else math.nan
            row[f"{column}_ci95"] = ci95(group[column])
        rows.append(row)
    table = pd.DataFrame(rows)
    ref = table[table["variant"] == reference].iloc[0]
    for column, name in RELATIVE.items():
        table[name] = 100 * table[column] / ref[column]
    return table


def _cell(mean: float, ci: float, digits: int) -> str:
    if pd.isna(mean):
        return "-"
    return f"{mean:.{digits}f}" if pd.isna(ci) else f"{mean:.{digits}f} ± {ci:.{digits}f}"


def to_markdown(summary: pd.DataFrame, decimals: int, reference: str) -> str:
    """The summary as a Markdown table: `mean ± 95% CI` with several seeds, `-` where a stage did
    not run (or a baseline has none)."""
    headers = ["variant", *SETTINGS, "seeds", "pretrain_seconds", f"seconds_vs_{reference}_%", "pretrain_flops",
               f"flops_vs_{reference}_%", *MEASURES[2:]]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] * len(headers)) + "|"]
    for _, row in summary.iterrows():
        known = not pd.isna(row["K"])
        cells = [str(row["variant"]), *([str(int(row["K"])), f"{row['mask_ratio']:g}",
                 f"{row['consistency_weight']:g}", str(int(row["epochs"]))] if known else ["-"] * 4),
                 "-" if pd.isna(row["batch"]) else str(int(row["batch"])),
                 "-" if pd.isna(row["lr"]) else f"{row['lr']:.3g}", str(int(row["seeds"])),
                 _cell(row["pretrain_seconds"], row["pretrain_seconds_ci95"], 1),
                 _cell(row["seconds_vs_reference"], math.nan, 0),
                 "-" if pd.isna(row["pretrain_flops"]) else f"{row['pretrain_flops']:.3g}",
                 _cell(row["flops_vs_reference"], math.nan, 0)]
        for column in MEASURES[2:]:
            digits = 4 if column in ("consistency", "final_loss", "final_recon_loss") else decimals
            cells.append(_cell(row[column], row[f"{column}_ci95"], digits))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "± is the 95% confidence interval of the mean over seeds (Student t; the standard "
              "deviations are in summary.csv). FLOPs: the analytic training count (emae.flops). "
              "pixels / random_init: the baselines (no pre-training; fine-tuning random_init is "
              "training from scratch with the same recipe)."]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------- provenance

# what must agree between the runs of one stage for their figures to be compared
COMPARED = {"commit": "code (commit + uncommitted diff)", "device": "devices",
            "versions": "package versions", "world_size": "process counts",
            "precision": "training precision"}


def _describe(provenance: dict[str, Any]) -> dict[str, str]:
    commit = provenance.get("commit")
    code = "unknown" if commit is None else commit[:10] + ("+dirty:" + (provenance.get("diff_sha256") or "")[:8]
                                                          if provenance.get("dirty") else "")
    devices = provenance.get("device_names") or ["unknown"]
    device = f"{provenance.get('device_count', len(devices))} x {devices[0]}"
    versions = ", ".join(f"{k} {provenance.get(k)}" for k in ("emae", "torch", "timm", "cuda")
                         if provenance.get(k) is not None)
    return {"commit": code, "device": device, "versions": versions or "unknown",
            "world_size": str(provenance.get("world_size", "unknown")),
            "precision": provenance.get("precision", "-")}  # recorded by the training stages


def _expected_inputs(stage: str, run: Run, root: Path) -> dict[str, str]:
    """The digests a stage's metrics must name to be a result of the run's current artifacts."""
    artifact = {**{s: "encoder.safetensors" for s in (*EVAL_STAGES, *DENSE_STAGES)},
                **{s: "checkpoints/last.pt" for s in MODEL_STAGES}}.get(stage)
    if artifact is None:
        return {}
    path = root / run.run_dir / artifact
    if not path.is_file():
        raise EmaeError(f"{path}: missing, so the {stage} results of {run.name} cannot be checked "
                        "against it (rerun its pre-training)")
    return {"encoder" if artifact.endswith(".safetensors") else "checkpoint": file_digest(path)}


def provenance_table(pipeline: Pipeline, root: Path = Path(".")) -> tuple[pd.DataFrame, list[str]]:
    """One row per (run, stage) with where its metrics come from, and the warnings a reader must
    see: a result made from other artifacts than the run's current ones (stale), a result without
    provenance, and runs of one stage that differ in code, devices, versions or process counts."""
    rows, warnings = [], []
    stages = ["pretrain", *(s for s in (*EVAL_STAGES, *MODEL_STAGES, *DENSE_STAGES)
                            if pipeline.stage_enabled(s))]
    jobs = [(run, stage, run) for run in pipeline.runs for stage in stages]
    # baselines: random_init is checked against the reference run's export it was drawn for
    jobs += [(run, stage, Run(pipeline.settings.reference, run.seed) if run.variant == "random_init" else None)
             for run in pipeline.baseline_runs for stage in pipeline.baseline_stages(run)]
    for run, stage, made_from in jobs:
        path = root / (run.run_dir if stage == "pretrain" else run.result_dir(stage)) / "metrics.json"
        metrics = _metrics(path)
        if "provenance" not in metrics:
            warnings.append(f"{path}: no provenance recorded (written by an older emae): rerun its stage")
        inputs = metrics.get("inputs", {})
        expected = _expected_inputs(stage, made_from, root) if made_from is not None else {}
        for name, digest in expected.items():
            recorded = str(inputs.get(name, "")).removeprefix("random-init:")
            if recorded != digest:
                warnings.append(f"{path}: stale: made from another {name} than the current "
                                f"{made_from.run_dir}'s ({recorded[:12] or 'unrecorded'} vs {digest[:12]}): "
                                "rerun its stage")
        rows.append({"run": run.name, "stage": stage, **_describe(metrics.get("provenance", {}))})
    table = pd.DataFrame(rows)
    for stage, group in table.groupby("stage", sort=False):
        for column, what in COMPARED.items():
            values = sorted(group[column].unique())
            if len(values) > 1:
                warnings.append(f"the {stage} runs differ in {what}: {'; '.join(values)}")
    return table, warnings


def provenance_markdown(table: pd.DataFrame, warnings: list[str]) -> str:
    """Per stage: the code, devices, versions and process counts its runs used; then warnings."""
    lines = ["## Provenance", "", "| stage | runs | " + " | ".join(COMPARED) + " |",
             "|---|---:|" + "---|" * len(COMPARED)]
    for stage, group in table.groupby("stage", sort=False):
        cells = [" / ".join(sorted(group[c].unique())) for c in COMPARED]
        lines.append(f"| {stage} | {len(group)} | " + " | ".join(cells) + " |")
    lines += ["", *(f"- **Warning:** {w}" for w in warnings)] if warnings else ["", "All compared runs agree."]
    return "\n".join(lines) + "\n"
