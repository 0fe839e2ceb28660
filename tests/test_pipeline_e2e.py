"""The whole pipeline, run for real on a tiny config: `snakemake` (both variants, every stage, the
report, `--report report.html`, then a no-op rerun) and `dvc repro` in a fresh git repository (a
no-op second repro, then `dvc exp run -S` resuming pre-training from the persistent checkpoint)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import PARAMS, REPO, cli_env

pytestmark = [pytest.mark.slow]

# A tiny ViT on 16x16 digits, short stages: the DAG's structure, not its accuracy.
TINY = [
    "data.image_size=16", "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
    "model.decoder_embed_dim=32", "model.decoder_depth=1", "model.decoder_num_heads=2",
    "pretrain.batch_size=128", "pretrain.epochs=2", "pretrain.warmup_epochs=1",
    "pretrain.log_every_steps=2", "pretrain.knn_every_epochs=1", "knn.batch_size=512",
    "linprobe.epochs=2", "linprobe.warmup_epochs=1", "finetune.epochs=1", "finetune.warmup_epochs=0",
    "finetune.batch_size=128", "consistency.num_images=32", "consistency.rounds=2",
    "visualize.num_images=2",
]


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 1200) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        logs = "".join(f"\n--- {p}\n{p.read_text()[-2000:]}" for p in sorted(cwd.glob("logs/**/*.log")))
        raise AssertionError(f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}{logs}")
    return result


@pytest.mark.skipif(shutil.which("snakemake") is None, reason="snakemake not installed")
def test_snakemake_runs_the_whole_dag_and_reruns_nothing(tmp_path: Path) -> None:
    shutil.copytree(PARAMS, tmp_path / "params")  # a snapshot: the rerun must see the same params
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump({"overrides": TINY, "threads": 1}))
    snakemake = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--cores", "2",
                 "--configfile", "tiny.yaml"]
    _run(snakemake, tmp_path, cli_env())

    report = tmp_path / "results" / "report"
    summary = pd.read_csv(report / "summary.csv")
    assert list(summary["variant"]) == ["mae", "emae"]
    assert list(summary["K"]) == [1, 4] and list(summary["consistency_weight"]) == [0.0, 1.0]
    assert (summary["epochs"] == 2).all() and (summary["pretrain_seconds"] > 0).all()
    for column in ("knn_top1", "linprobe_top1", "finetune_top1"):
        assert summary[column].between(0, 100).all(), column
    assert (summary["consistency"] >= 0).all()
    # the report's numbers are the stages' own
    knn = json.loads((tmp_path / "results/emae/seed0/knn/metrics.json").read_text())
    assert summary.loc[1, "knn_top1"] == pytest.approx(knn["top1"])
    assert "| emae | 4 | 0.75 | 1 | 2 | 1 |" in (report / "summary.md").read_text()
    # the kNN monitor ran every epoch of pre-training: accuracy-vs-time curves have points
    curve = pd.read_csv(report / "curves" / "mae-seed0-knn.csv")
    assert list(curve["epoch"]) == [1, 2] and curve["knn_top1"].between(0, 100).all()
    assert len(list((report / "reconstructions").glob("*.png"))) >= 2
    for name in ("loss_curves.png", "accuracy_vs_time.png", "accuracy_vs_epochs.png"):
        assert (report / name).stat().st_size > 1000

    again = _run([*snakemake, "-n"], tmp_path, cli_env())
    assert "Nothing to be done" in again.stdout + again.stderr
    # switching more stages on plans only their jobs and the report, not the finished ones
    (tmp_path / "more.yaml").write_text(yaml.safe_dump(
        {"overrides": [*TINY, "pipeline.stages.prepare_dense=true", "pipeline.stages.segment=true"], "threads": 1}))
    plan = _run([*snakemake[:-1], "more.yaml", "-n"], tmp_path, cli_env())
    planned = {line.split()[1].rstrip(":") for line in (plan.stdout + plan.stderr).splitlines()
               if line.startswith(("rule ", "localrule "))}
    assert planned == {"prepare_dense", "segment", "report", "all"}, planned
    html = tmp_path / "report.html"
    _run([*snakemake, "--report", str(html)], tmp_path, cli_env())
    text = html.read_text()
    assert all(name in text for name in ("summary.csv", "loss_curves.png", "accuracy_vs_time.png",
                                          "Pre-training loss per epoch"))


def _set_params(params: Path, overrides: list[str]) -> None:
    """Write `section.key=value` into the params file that holds the section (DVC reads files)."""
    files = {p: yaml.safe_load(p.read_text()) for p in sorted(params.glob("*.yaml"))}
    for item in overrides:
        key, value = item.split("=", 1)
        section, *rest = key.split(".")
        path = next(p for p, tree in files.items() if section in tree)
        node = files[path][section]
        for part in rest[:-1]:
            node = node[part]
        node[rest[-1]] = yaml.safe_load(value)
    for path, tree in files.items():
        path.write_text(yaml.safe_dump(tree, sort_keys=False))


@pytest.mark.skipif(shutil.which("dvc") is None or shutil.which("git") is None, reason="needs dvc and git")
def test_dvc_repro_in_a_fresh_repo_then_noop_then_experiment(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("emae", "params", ".dvc", ".dvcignore", ".gitignore", "pyproject.toml"):
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, repo / name, ignore=shutil.ignore_patterns(
                "__pycache__", "tmp", "cache", "config.local"))
        else:
            shutil.copy(source, repo / name)
    # one variant, knn + consistency only: enough for the DAG's properties, fast on a CPU
    _set_params(repo / "params", [*TINY, "pipeline.stages.linprobe=false", "pipeline.stages.finetune=false",
                                  "pipeline.stages.visualize=false"])
    pipeline_yaml = repo / "params" / "pipeline.yaml"
    tree = yaml.safe_load(pipeline_yaml.read_text())
    del tree["pipeline"]["variants"]["mae"]
    pipeline_yaml.write_text(yaml.safe_dump(tree, sort_keys=False))

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the copy's emae
    env |= {"DVC_NO_ANALYTICS": "1", "OMP_NUM_THREADS": "2", "GIT_AUTHOR_NAME": "t",
            "GIT_AUTHOR_EMAIL": "t@e", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@e"}
    _run([sys.executable, "-m", "emae.cli", "dvc-yaml"], repo, env)
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    assert list(stages) == ["prepare", "pretrain-emae-seed0", "knn-emae-seed0", "consistency-emae-seed0",
                            "report"]
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        _run(cmd, repo, env)

    _run(["dvc", "repro"], repo, env)
    summary = pd.read_csv(repo / "results/report/summary.csv")
    assert list(summary["variant"]) == ["emae"] and summary["knn_top1"].between(0, 100).all()
    assert summary["finetune_top1"].isna().all()
    metrics = _run(["dvc", "metrics", "show", "--json"], repo, env).stdout
    assert "results/emae/seed0/knn/metrics.json" in metrics and "top1" in metrics

    again = _run(["dvc", "repro"], repo, env)
    assert "Data and pipelines are up to date" in again.stdout, again.stdout
    assert "Running stage" not in again.stdout

    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "results"], repo, env)
    log = repo / "runs/emae/seed0/log.jsonl"
    before = log.read_text().splitlines()
    ran = _run(["dvc", "exp", "run", "-S", "params/pretrain.yaml:pretrain.epochs=3"], repo, env).stdout
    assert "Running stage 'pretrain-emae-seed0'" in ran and "Running stage 'prepare'" not in ran
    after = log.read_text().splitlines()
    # the persistent checkpoint and log survived: epochs 1-2 were not trained again
    assert after[:2] == before and [json.loads(line)["epoch"] for line in after] == [1, 2, 3]
    name = re.search(r"Ran experiment\(s\): (\S+)", ran).group(1)
    shown = json.loads(_run(["dvc", "exp", "show", "--json"], repo, env).stdout)
    experiment = next(rev for row in shown for exp in row.get("experiments") or []
                      for rev in exp["revs"] if rev["name"] == name)
    params = experiment["data"]["params"]["params/pretrain.yaml"]["data"]["pretrain"]
    assert params["epochs"] == 3
    assert experiment["data"]["metrics"]["runs/emae/seed0/metrics.json"]["data"]["epochs"] == 3
