"""`emae report`: tables (mean +- std over seeds) and plots from the stage outputs' contract files
(metrics.json, log.jsonl, visualize PNGs), written here for 2 variants x 2 seeds."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from conftest import PARAMS, run_cli
from emae.provenance import file_digest

RNG = np.random.default_rng(0)


def _write_params(root: Path, seeds: list[int], full: bool = False, **stages: bool) -> Path:
    """The default pipeline params with `seeds`; unless `full`, only the mae and emae variants and
    no baselines (the default also has emae_eqflops, compute_of and the baselines)."""
    params = root / "params"
    shutil.copytree(PARAMS, params)
    tree = yaml.safe_load((params / "pipeline.yaml").read_text())
    tree["pipeline"]["seeds"] = seeds
    tree["pipeline"]["stages"].update(stages)
    if not full:
        del tree["pipeline"]["variants"]["emae_eqflops"]
        tree["pipeline"]["compute_of"] = {}
        tree["pipeline"]["baselines"] = {"pixels": False, "random_init": False}
    (params / "pipeline.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    return params


PROVENANCE = {"commit": "0123456789abcdef", "dirty": False, "diff_sha256": None, "emae": "0.1.0",
              "torch": "2.14.1", "timm": "1.0.31", "cuda": None, "device": "cpu",
              "device_names": ["Test CPU"], "device_count": 1, "world_size": 1, "hosts": ["h1"],
              "precision": "float32", "finished": "2026-12-01T00:00:00+00:00"}


def _write_run(root: Path, variant: str, seed: int, k: int, epochs: int = 4, finetune: bool = True,
               provenance: dict = PROVENANCE, knn_curve: dict[int, float] | None = None,
               **fixed: float) -> dict:
    """Stage outputs of one run, as the commands write them; returns the numbers written (random
    unless given in `fixed`; the kNN monitor every 2 epochs at 10 x epoch unless `knn_curve`)."""
    run_dir = root / "runs" / variant / f"seed{seed}"
    run_dir.mkdir(parents=True)
    numbers = {"pretrain_seconds": float(RNG.uniform(10, 20)), "knn_top1": float(RNG.uniform(40, 90)),
               "linprobe_top1": float(RNG.uniform(40, 90)), "finetune_top1": float(RNG.uniform(40, 90)),
               "consistency": float(RNG.uniform(0, 0.1)), "final_loss": float(RNG.uniform(0.5, 1)),
               "final_recon_loss": float(RNG.uniform(0.4, 0.5)), "pretrain_flops": 1e12 * k * epochs} | fixed
    knn_curve = knn_curve or {e: 10.0 * e for e in range(2, epochs + 1, 2)}
    lines = []
    for epoch in range(1, epochs + 1):
        line = {"epoch": epoch, "step": epoch * 10, "loss": 1.0 / epoch, "recon_loss": 0.9 / epoch,
                "consistency_loss": 0.1 / epoch, "pretrain_seconds": numbers["pretrain_seconds"] * epoch / epochs}
        if epoch in knn_curve:
            line |= {"knn_top1": knn_curve[epoch], "knn_top5": min(100.0, 2 * knn_curve[epoch])}
        lines.append(json.dumps(line))
    (run_dir / "log.jsonl").write_text("\n".join(lines) + "\n")
    (run_dir / "checkpoints").mkdir()
    (run_dir / "encoder.safetensors").write_bytes(f"encoder {variant} {seed}".encode())
    (run_dir / "checkpoints" / "last.pt").write_bytes(f"checkpoint {variant} {seed}".encode())
    encoder = {"encoder": file_digest(run_dir / "encoder.safetensors")}
    checkpoint = {"checkpoint": file_digest(run_dir / "checkpoints" / "last.pt")}
    stamp = {"provenance": provenance, "inputs": {"data": "d"}}
    (run_dir / "metrics.json").write_text(json.dumps({**stamp,
        "epochs": epochs, "steps": epochs * 10, "pretrain_seconds": numbers["pretrain_seconds"],
        "final_loss": numbers["final_loss"], "final_recon_loss": numbers["final_recon_loss"],
        "pretrain_flops": numbers["pretrain_flops"], "num_parts": k, "mask_ratio": 0.75,
        "consistency_weight": 0.0 if k == 1 else 1.0, "knn_top1": 40.0}))
    results = root / "results" / variant / f"seed{seed}"
    for stage in ("knn", "linprobe", *(["finetune"] if finetune else [])):
        (results / stage).mkdir(parents=True)
        top1 = numbers[f"{stage}_top1"]
        (results / stage / "metrics.json").write_text(json.dumps(
            {"top1": top1, "top5": min(100, top1 + 5), "provenance": provenance, "inputs": encoder}))
    (results / "consistency").mkdir(parents=True)
    (results / "consistency" / "metrics.json").write_text(json.dumps(
        {"consistency": numbers["consistency"], "provenance": provenance, "inputs": checkpoint}))
    (results / "visualize").mkdir(parents=True)
    (results / "visualize" / "metrics.json").write_text(json.dumps({"provenance": provenance, "inputs": checkpoint}))
    Image.new("RGB", (8, 8), (k * 40, 0, 0)).save(results / "visualize" / "reconstructions.png")
    return numbers


def test_summary_mean_std_over_seeds_and_plots(tmp_path: Path) -> None:
    params = _write_params(tmp_path, seeds=[0, 1])
    written = {(v, s): _write_run(tmp_path, v, s, k) for v, k in (("mae", 1), ("emae", 4)) for s in (0, 1)}
    result = run_cli("report", "-p", str(params), "-o", "results/report", cwd=tmp_path)
    out = tmp_path / "results" / "report"

    summary = pd.read_csv(out / "summary.csv")
    assert list(summary["variant"]) == ["mae", "emae"]  # pipeline order
    for col in ("variant", "K", "mask_ratio", "consistency_weight", "epochs", "pretrain_seconds",
                "knn_top1", "linprobe_top1", "finetune_top1", "consistency"):
        assert col in summary.columns
    for _, row in summary.iterrows():
        assert row["K"] == (1 if row["variant"] == "mae" else 4) and row["seeds"] == 2
        for key in ("knn_top1", "linprobe_top1", "finetune_top1", "consistency", "pretrain_seconds",
                    "final_loss", "final_recon_loss"):
            values = [written[(row["variant"], s)][key] for s in (0, 1)]
            assert row[key] == pytest.approx(np.mean(values))
            assert row[f"{key}_std"] == pytest.approx(np.std(values, ddof=1))
            # two seeds: t(0.975, 1) = 12.706 x std / sqrt(2)
            assert row[f"{key}_ci95"] == pytest.approx(12.7062 * np.std(values, ddof=1) / np.sqrt(2), rel=1e-4)
    assert list(summary["flops_vs_reference"]) == [100.0, 400.0]  # K=4 at equal epochs
    assert len(pd.read_csv(out / "runs.csv")) == 4

    markdown = (out / "summary.md").read_text()
    assert markdown == result.stdout  # also printed
    mae_knn = [written[("mae", s)]["knn_top1"] for s in (0, 1)]
    half = 12.7062 * np.std(mae_knn, ddof=1) / np.sqrt(2)
    assert f"{np.mean(mae_knn):.2f} ± {half:.2f}" in markdown
    assert "± is the 95% confidence interval of the mean over seeds" in markdown

    for name in ("loss_curves.png", "accuracy_vs_time.png", "accuracy_vs_flops.png", "accuracy_vs_epochs.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.width > 300
    knn_curve = pd.read_csv(out / "curves" / "emae-seed1-knn.csv")
    assert list(knn_curve["epoch"]) == [2, 4] and list(knn_curve["knn_top1"]) == [20.0, 40.0]
    assert len(pd.read_csv(out / "curves" / "mae-seed0.csv")) == 4
    assert sorted(p.name for p in (out / "reconstructions").iterdir()) == [
        f"{v}-seed{s}-reconstructions.png" for v in ("emae", "mae") for s in (0, 1)]


def test_stage_switched_off_is_a_dash_and_needs_no_file(tmp_path: Path) -> None:
    params = _write_params(tmp_path, seeds=[3], finetune=False)
    for v, k in (("mae", 1), ("emae", 4)):
        _write_run(tmp_path, v, 3, k, finetune=False)
    run_cli("report", "-p", str(params), "-o", "out", cwd=tmp_path)
    summary = pd.read_csv(tmp_path / "out" / "summary.csv")
    assert summary["finetune_top1"].isna().all() and summary["knn_top1"].notna().all()
    assert summary["knn_top1_std"].isna().all()  # one seed: no spread
    lines = (tmp_path / "out" / "summary.md").read_text().splitlines()
    header, _, row = (line.strip("| ").split(" | ") for line in lines[:3])
    cell = dict(zip(header, row))
    assert cell["finetune_top1"] == "-" and cell["seg_miou"] == "-"
    assert cell["knn_top1"] != "-" and "±" not in cell["knn_top1"]


def test_missing_metrics_name_the_file(tmp_path: Path) -> None:
    params = _write_params(tmp_path, seeds=[0])
    for v, k in (("mae", 1), ("emae", 4)):
        _write_run(tmp_path, v, 0, k)
    missing = tmp_path / "results" / "emae" / "seed0" / "linprobe" / "metrics.json"
    missing.unlink()
    result = run_cli("report", "-p", str(params), "-o", "out", cwd=tmp_path, check=False)
    assert result.returncode == 2 and "results/emae/seed0/linprobe/metrics.json: missing" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out" / "summary.csv").exists()
    missing.parent.mkdir(exist_ok=True)
    missing.write_text(json.dumps({"top5": 90.0}))
    result = run_cli("report", "-p", str(params), "-o", "out", cwd=tmp_path, check=False)
    assert result.returncode == 2 and "has no 'top1'" in result.stderr and "top5" in result.stderr


def test_provenance_table_and_warnings(tmp_path: Path) -> None:
    """The report says which code, devices and versions produced each stage's runs, and warns
    when a result is stale (made from another encoder than the run's current one) or when the runs
    it compares differ in code, devices or training precision (`amp: auto` picks by device)."""
    params = _write_params(tmp_path, seeds=[0])
    _write_run(tmp_path, "mae", 0, 1)
    _write_run(tmp_path, "emae", 0, 4, provenance={**PROVENANCE, "commit": "fedcba9876543210",
                                                    "device_names": ["Other CPU"], "precision": "bfloat16"})
    result = run_cli("report", "-p", str(params), "-o", "out", cwd=tmp_path)
    markdown = (tmp_path / "out" / "summary.md").read_text()
    provenance = markdown[markdown.index("## Provenance"):]
    assert "| pretrain | 2 | 0123456789 / fedcba9876 | 1 x Other CPU / 1 x Test CPU |" in provenance
    assert "the pretrain runs differ in training precision: bfloat16; float32" in provenance
    assert "the knn runs differ in code (commit + uncommitted diff): 0123456789; fedcba9876" in provenance
    assert "the pretrain runs differ in devices: 1 x Other CPU; 1 x Test CPU" in provenance
    assert "stale" not in provenance and "stale" not in result.stderr

    # pre-train mae again (its export changes), leave its evaluations: the report flags them
    (tmp_path / "runs" / "mae" / "seed0" / "encoder.safetensors").write_bytes(b"another encoder")
    result = run_cli("report", "-p", str(params), "-o", "out", cwd=tmp_path)
    markdown = (tmp_path / "out" / "summary.md").read_text()
    for stage in ("knn", "linprobe", "finetune"):
        warning = (f"results/mae/seed0/{stage}/metrics.json: stale: made from another encoder than the "
                   "current runs/mae/seed0's")
        assert warning in markdown and warning in result.stderr
    assert "results/emae/seed0/knn/metrics.json: stale" not in markdown
    assert "consistency/metrics.json: stale" not in markdown  # its input, last.pt, did not change


def _write_baselines(root: Path, seed: int, pixels: dict[str, float], random_init: dict[str, float]) -> None:
    for name, figures in (("pixels", pixels), ("random_init", random_init)):
        for stage, top1 in figures.items():
            path = root / "results" / name / f"seed{seed}" / stage / "metrics.json"
            path.parent.mkdir(parents=True)
            encoder = ("pixels" if name == "pixels"
                       else "random-init:" + file_digest(root / "runs" / "mae" / f"seed{seed}" / "encoder.safetensors"))
            path.write_text(json.dumps({"top1": top1, "top5": 99.0, "provenance": PROVENANCE,
                                        "inputs": {"encoder": encoder}}))


def test_baselines_time_to_target_and_verdicts(tmp_path: Path) -> None:
    """The default study: mae (the reference), emae at equal epochs (4x the FLOPs), emae_eqflops at
    mae's FLOPs (1 epoch), 3 seeds, and the baselines; figures chosen so every outcome is known."""
    params = _write_params(tmp_path, seeds=[0, 1, 2], full=True)
    for s in (0, 1, 2):
        _write_run(tmp_path, "mae", s, 1, knn_curve={2: 60.0, 4: 80.0 + s}, knn_top1=80.0 + s,
                   linprobe_top1=90.0 + s, pretrain_seconds=100.0, consistency=0.05 + 0.001 * s)
        # reaches mae's final kNN (81) at epoch 2 of 4: half its 16e12 FLOPs = 200% of mae's 4e12
        _write_run(tmp_path, "emae", s, 4, knn_curve={2: 85.0, 4: 90.0}, knn_top1=90.0 + s,
                   linprobe_top1=93.0 + s, pretrain_seconds=200.0, consistency=0.02 + 0.001 * s)
        _write_run(tmp_path, "emae_eqflops", s, 4, epochs=1, knn_curve={1: 70.0}, knn_top1=70.0 + s,
                   linprobe_top1=88.0 + s, pretrain_seconds=50.0, pretrain_flops=4e12, consistency=0.03)
        _write_baselines(tmp_path, s, {"knn": 96.0 + 0.1 * s, "linprobe": 95.0},
                         {"knn": 60.0 + s, "linprobe": 85.0, "finetune": 50.0 + s})
    run_cli("report", "-p", str(params), "-o", "out", cwd=tmp_path)
    out = tmp_path / "out"
    summary = pd.read_csv(out / "summary.csv").set_index("variant")
    assert list(summary.index) == ["mae", "emae", "emae_eqflops", "pixels", "random_init"]
    assert summary.loc["pixels", "knn_top1"] == pytest.approx(96.1)
    assert summary.loc["random_init", "finetune_top1"] == pytest.approx(51.0)
    assert np.isnan(summary.loc["pixels", "finetune_top1"]) and np.isnan(summary.loc["pixels", "K"])
    assert summary.loc["emae_eqflops", "flops_vs_reference"] == pytest.approx(100.0)

    targets = pd.read_csv(out / "time_to_target.csv").set_index(["variant", "measure"])
    assert targets.loc[("emae", "kNN"), "reached"] == 3
    assert targets.loc[("emae", "kNN"), "flops_pct"] == pytest.approx(200.0)
    assert targets.loc[("emae", "kNN"), "seconds_pct"] == pytest.approx(100.0)  # epoch 2 of 200 s
    assert targets.loc[("emae_eqflops", "kNN"), "reached"] == 0
    assert targets.loc[("emae_eqflops", "linear probe"), "reached"] == 0  # 88, 89, 90 < mae's 91
    markdown = (out / "summary.md").read_text()
    assert "| emae | kNN | 81.00 | 3/3 | 200% ± 0 | 100% ± 0 |" in markdown
    assert "| mae | kNN |" not in markdown  # the reference is the target
    assert "| emae_eqflops | kNN | 81.00 | 0/3 | not reached within budget (100% of the FLOPs)" in markdown
    verdicts = markdown[markdown.index("## Verdicts"):markdown.index("## Provenance")]
    assert "Pre-training vs pixels, kNN: mae 81 vs pixels 96.1 (difference -15.1" in verdicts
    assert "mae is worse (the 95% CI of the difference excludes 0)" in verdicts
    assert "Efficiency at mae's FLOPs, kNN: emae_eqflops 71 vs mae 81" in verdicts
    assert ("Efficiency, kNN: emae reached mae's final 81.00 in 200% ± 0 of mae's FLOPs and 100% ± 0 of its "
            "wall-clock: not less compute than mae.") in verdicts
    assert "Efficiency, kNN: emae_eqflops did not reach mae's final 81.00 in 3 of 3 seeds" in verdicts
    assert "lower is more consistent): emae 0.021 vs mae 0.051" in verdicts and "emae is better" in verdicts
    assert ("Claim 1 (efficiency: mae's accuracy in a fraction of its compute): not supported on this benchmark: "
            "no variant reached mae's final accuracy in less compute.") in verdicts
    assert ("Claim 2 (self-consistency: predictions of a patch depend less on the mask): supported: emae, "
            "emae_eqflops more consistent than mae (95% CI below 0).") in verdicts
    assert "stale" not in markdown
    with Image.open(out / "accuracy_vs_flops.png") as image:
        assert image.format == "PNG"
