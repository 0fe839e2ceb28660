"""Matched compute: how much pre-training each variant needed to reach the reference's accuracy
(time-to-target), and the plain sentences the report ends with (the paper's claims, tested).

Targets are the reference variant's (MAE's) final mean kNN and linear-probe top-1. kNN is read off
each run's monitor curve (log.jsonl: the first monitored epoch at or above the target; the monitor
runs the kNN stage's protocol); the linear probe exists only at the end of pre-training, so a run
reaches its target there or not at all. FLOPs and seconds are a % of the reference's mean totals.
"""

from __future__ import annotations

import math

import pandas as pd
from scipy import stats

from emae.report.summary import ci95
from emae.workflow.stages import Pipeline, Run

TARGETS = {"knn_top1": "kNN", "linprobe_top1": "linear probe"}


def _first_reaching(log: pd.DataFrame, run: pd.Series, target: float) -> tuple[float, float] | None:
    """(FLOPs, seconds) at the first monitored epoch with kNN >= target, or None. Every epoch
    costs the same FLOPs: epoch / epochs of the run's total."""
    if "knn_top1" not in log:
        return None
    hits = log[log["knn_top1"] >= target]
    if hits.empty:
        return None
    first = hits.iloc[0]
    return float(first["epoch"] / run["epochs"] * run["pretrain_flops"]), float(first["pretrain_seconds"])


def time_to_target(pipeline: Pipeline, runs: pd.DataFrame, logs: dict[Run, pd.DataFrame]) -> pd.DataFrame:
    """One row per (variant, measure): the target, how many seeds reached it, and the FLOPs and
    seconds they needed as a % of the reference's (mean and 95% CI over the seeds that reached)."""
    reference = pipeline.settings.reference
    ref = runs[runs["variant"] == reference]
    ref_flops, ref_seconds = ref["pretrain_flops"].mean(), ref["pretrain_seconds"].mean()
    rows = []
    for measure, label in TARGETS.items():
        target = ref[measure].mean()
        if math.isnan(target):
            continue  # the stage did not run
        for variant in pipeline.settings.variants:
            if variant == reference:  # its own seeds straddle their mean: no target to reach
                continue
            points = []
            for _, run in runs[runs["variant"] == variant].iterrows():
                if measure == "knn_top1":
                    point = _first_reaching(logs[Run(variant, int(run["seed"]))], run, target)
                else:
                    point = (run["pretrain_flops"], run["pretrain_seconds"]) if run[measure] >= target else None
                points.append(point)
            reached = pd.DataFrame([p for p in points if p is not None], columns=["flops", "seconds"])
            flops_pct, seconds_pct = 100 * reached["flops"] / ref_flops, 100 * reached["seconds"] / ref_seconds
            rows.append({"variant": variant, "measure": label, "target": target,
                         "seeds": len(points), "reached": len(reached),
                         "flops_pct": flops_pct.mean(), "flops_pct_ci95": ci95(flops_pct),
                         "seconds_pct": seconds_pct.mean(), "seconds_pct_ci95": ci95(seconds_pct),
                         "budget_flops_pct": 100 * runs.loc[runs["variant"] == variant, "pretrain_flops"].mean()
                         / ref_flops})
    return pd.DataFrame(rows)


def _pct(mean: float, ci: float) -> str:
    return f"{mean:.0f}%" + ("" if math.isnan(ci) else f" ± {ci:.0f}")


def time_to_target_markdown(table: pd.DataFrame, reference: str) -> str:
    lines = [f"## Time to target: {reference}'s final accuracy", "",
             f"FLOPs and wall-clock each variant needed to reach {reference}'s final mean top-1, as a % of "
             f"{reference}'s pre-training (mean ± 95% CI over the seeds that reached it). kNN: the first "
             "monitored epoch at or above the target; linear probe: only probed at the end of pre-training.",
             "", "| variant | measure | target | reached | FLOPs (% of " + reference + ") | wall-clock (% of "
             + reference + ") |", "|---|---|---:|---:|---:|---:|"]
    for _, row in table.iterrows():
        if row["reached"] == row["seeds"]:
            flops, seconds = _pct(row["flops_pct"], row["flops_pct_ci95"]), _pct(row["seconds_pct"], row["seconds_pct_ci95"])
        else:
            flops, seconds = f"not reached within budget ({row['budget_flops_pct']:.0f}% of the FLOPs)", "-"
        lines.append(f"| {row['variant']} | {row['measure']} | {row['target']:.2f} | "
                     f"{int(row['reached'])}/{int(row['seeds'])} | {flops} | {seconds} |")
    return "\n".join(lines) + "\n"


def _difference(a: pd.Series, b: pd.Series) -> tuple[float, float, float]:
    """mean(a) - mean(b) and its Welch 95% CI (NaN bounds below two seeds each)."""
    a, b = a.dropna(), b.dropna()
    diff = a.mean() - b.mean()
    if len(a) < 2 or len(b) < 2:
        return diff, math.nan, math.nan
    result = stats.ttest_ind(a, b, equal_var=False)
    low, high = result.confidence_interval(0.95)
    return diff, float(low), float(high)


def _compare(name: str, other: str, measure: str, label: str, runs: pd.DataFrame,
             lower_is_better: bool = False) -> str:
    a, b = (runs.loc[runs["variant"] == v, measure] for v in (name, other))
    diff, low, high = _difference(a, b)
    if math.isnan(low):
        verdict = "one seed each: no interval, so no verdict"
    elif low > 0 or high < 0:
        better = (diff < 0) if lower_is_better else (diff > 0)
        verdict = f"{name} is {'better' if better else 'worse'} (the 95% CI of the difference excludes 0)"
    else:
        verdict = "no clear difference (the 95% CI of the difference includes 0)"
    interval = "" if math.isnan(low) else f", 95% CI [{low:+.4g}, {high:+.4g}]"
    return (f"{label}: {name} {a.mean():.4g} vs {other} {b.mean():.4g} (difference {diff:+.4g}{interval}): "
            f"{verdict}.")


def verdicts(pipeline: Pipeline, runs: pd.DataFrame, targets: pd.DataFrame) -> list[str]:
    """One plain sentence per claim: pre-training vs the baselines, efficiency, consistency."""
    settings = pipeline.settings
    reference = settings.reference
    variants = list(settings.variants)
    lines = []
    for baseline in ("pixels", "random_init"):
        if (runs["variant"] == baseline).any():
            for measure, label in TARGETS.items():
                if runs.loc[runs["variant"] == baseline, measure].notna().any():
                    lines += [_compare(v, baseline, measure, f"Pre-training vs {baseline}, {label}", runs)
                              for v in variants]
    equal_flops = [v for v, source in settings.compute_of.items() if source == reference]
    for variant in equal_flops:
        for measure, label in TARGETS.items():
            if runs[measure].notna().any():
                lines.append(_compare(variant, reference, measure, f"Efficiency at {reference}'s FLOPs, {label}", runs))
    for _, row in targets.iterrows():
        if row["reached"] == row["seeds"]:
            lines.append(f"Efficiency, {row['measure']}: {row['variant']} reached {reference}'s final "
                         f"{row['target']:.2f} in {_pct(row['flops_pct'], row['flops_pct_ci95'])} of "
                         f"{reference}'s FLOPs and {_pct(row['seconds_pct'], row['seconds_pct_ci95'])} of its "
                         "wall-clock" + (": less compute than " + reference if row["flops_pct"] < 100 else
                                         ": not less compute than " + reference) + ".")
        else:
            lines.append(f"Efficiency, {row['measure']}: {row['variant']} did not reach {reference}'s final "
                         f"{row['target']:.2f} in {int(row['seeds'] - row['reached'])} of {int(row['seeds'])} "
                         f"seeds within its budget ({row['budget_flops_pct']:.0f}% of {reference}'s FLOPs).")
    if runs["consistency"].notna().any():
        for variant in variants:
            if variant != reference:
                lines.append(_compare(variant, reference, "consistency",
                                      "Consistency (spread of a patch's predictions over masks, lower is "
                                      "more consistent)", runs, lower_is_better=True))
    return lines + _claims(reference, runs, targets)


def _claims(reference: str, runs: pd.DataFrame, targets: pd.DataFrame) -> list[str]:
    """The paper's two claims, one sentence each, from the rows above."""
    lines = []
    if not targets.empty:
        full = targets[targets["reached"] == targets["seeds"]]
        cheaper = full[full["flops_pct"] + full["flops_pct_ci95"].fillna(0) < 100]
        if len(cheaper):
            row = cheaper.sort_values("flops_pct").iloc[0]
            verdict = (f"supported on this benchmark for {row['measure']}: {row['variant']} reached {reference}'s "
                       f"final accuracy in {row['flops_pct']:.0f}% of its FLOPs (the whole 95% CI below 100%)")
        elif (full["flops_pct"] < 100).any():
            verdict = "not settled: a variant reached it in less compute on average, but the 95% CI reaches 100%"
        else:
            verdict = f"not supported on this benchmark: no variant reached {reference}'s final accuracy in less compute"
        lines.append(f"Claim 1 (efficiency: {reference}'s accuracy in a fraction of its compute): {verdict}.")
    others = [v for v in runs["variant"].unique() if v != reference and runs.loc[runs["variant"] == v, "K"].gt(1).all()]
    if others and runs["consistency"].notna().any():
        results = {v: _difference(*(runs.loc[runs["variant"] == x, "consistency"] for x in (v, reference)))
                   for v in others}
        better = [v for v, (_, low, high) in results.items() if high < 0]
        verdict = ("supported: " + ", ".join(better) + f" more consistent than {reference} (95% CI below 0)"
                   if len(better) == len(others) else
                   f"supported for {', '.join(better)} only" if better else
                   "not shown: no difference with a 95% CI below 0")
        lines.append(f"Claim 2 (self-consistency: predictions of a patch depend less on the mask): {verdict}.")
    return lines


def verdicts_markdown(lines: list[str]) -> str:
    return "## Verdicts\n\n" + "\n".join(f"- {line}" for line in lines) + "\n"
