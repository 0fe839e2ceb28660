"""The whole pipeline, run for real on a tiny config, each in a copy of the repository:

- `snakemake` (both variants, every stage, the report, `--report report.html`), then a no-op rerun,
  and what a change to the package code reruns (the digest of each job's import closure);
- `dvc repro` in a fresh git repository, a no-op second repro, DVC as the artifact store end to end
  (`dvc push` to a local remote, a fresh clone, `dvc pull`: nothing to reproduce, the same summary),
  then `dvc exp run -S`: a kNN param in the clone (the new metric beside the baseline's in
  `dvc exp show`), more epochs in the first repository (pre-training resumes from the persistent
  checkpoint)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from test_pipeline_dag import copy_checkout, copy_env, job_counts

pytestmark = [pytest.mark.slow]

# A tiny ViT on 16x16 digits, short stages: the DAG's structure, not its accuracy.
TINY = [
    "data.image_size=16", "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
    "model.decoder_embed_dim=32", "model.decoder_depth=1", "model.decoder_num_heads=2",
    "pretrain.batch_size=128", "pretrain.epochs=2", "pretrain.warmup_epochs=1",
    "pretrain.log_every_steps=2", "pretrain.knn_every_epochs=1", "knn.batch_size=512",
    "linprobe.epochs=2", "linprobe.warmup_epochs=1", "finetune.epochs=1", "finetune.warmup_epochs=0",
    "finetune.batch_size=128", "consistency.num_images=32", "consistency.rounds=2",
    "visualize.num_images=2", "pipeline.seeds=[0]",
]


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 1200) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        logs = "".join(f"\n--- {p}\n{p.read_text()[-2000:]}" for p in sorted(cwd.glob("logs/**/*.log")))
        raise AssertionError(f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}{logs}")
    return result


def _planned(output: str) -> dict[str, int]:
    """rule -> jobs a dry run plans ({} when there is nothing to be done)."""
    return {} if "Nothing to be done" in output else job_counts(output)


@pytest.mark.skipif(shutil.which("snakemake") is None, reason="snakemake not installed")
def test_snakemake_runs_the_whole_dag_and_reruns_nothing(tmp_path: Path) -> None:
    # a copy (code and params) whose code the test edits; its Snakefile runs its own emae
    copy_checkout(tmp_path, ("Snakefile", "workflow", "emae", "params"))
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump({"overrides": TINY, "threads": 1}))
    snakemake = [sys.executable, "-m", "snakemake", "--cores", "2", "--configfile", "tiny.yaml"]
    _run(snakemake, tmp_path, copy_env())

    report = tmp_path / "results" / "report"
    summary = pd.read_csv(report / "summary.csv")
    assert list(summary["variant"]) == ["mae", "emae", "emae_eqflops", "pixels", "random_init"]
    trained = summary.iloc[:3]
    assert list(trained["K"]) == [1, 4, 4] and list(trained["consistency_weight"]) == [0.0, 1.0, 1.0]
    # emae_eqflops gets mae's FLOPs (pipeline.compute_of): one epoch of K=4 views for mae's two
    assert list(trained["epochs"]) == [2, 2, 1] and (trained["pretrain_seconds"] > 0).all()
    # (whole epochs: 0.56 rounds up to 1; the report shows the FLOPs each really had)
    assert trained["flops_vs_reference"].tolist() == pytest.approx([100, 356.6, 178.3], abs=0.1)
    for column in ("knn_top1", "linprobe_top1"):
        assert summary[column].between(0, 100).all(), column
    assert summary["finetune_top1"].drop(3).between(0, 100).all()  # pixels: no fine-tuning
    assert (trained["consistency"] >= 0).all()
    assert "## Time to target: mae's final accuracy" in (report / "summary.md").read_text()
    # the report's numbers are the stages' own
    knn = json.loads((tmp_path / "results/emae/seed0/knn/metrics.json").read_text())
    assert summary.loc[1, "knn_top1"] == pytest.approx(knn["top1"])
    # settings, then the effective batch and the lr pre-training ran with (6e-3 x 128 / 256), seeds
    assert "| emae | 4 | 0.75 | 1 | 2 | 128 | 0.003 | 1 |" in (report / "summary.md").read_text()
    assert (trained["batch"] == 128).all() and trained["lr"].tolist() == pytest.approx([3e-3] * 3)
    # the kNN monitor ran every epoch of pre-training: accuracy-vs-time curves have points
    curve = pd.read_csv(report / "curves" / "mae-seed0-knn.csv")
    assert list(curve["epoch"]) == [1, 2] and curve["knn_top1"].between(0, 100).all()
    assert len(list((report / "reconstructions").glob("*.png"))) >= 2
    for name in ("loss_curves.png", "accuracy_vs_time.png", "accuracy_vs_flops.png", "accuracy_vs_epochs.png"):
        assert (report / name).stat().st_size > 1000

    again = _run([*snakemake, "-n"], tmp_path, copy_env())
    assert _planned(again.stdout + again.stderr) == {}

    # code is a dependency: a changed line in the loss reruns pre-training and all after it
    # (the jobs' code digests changed), one in the report's code only the report
    def plan_after_edit(edited: str) -> str:
        path = tmp_path / edited
        original = path.read_text()
        path.write_text(original + "# a changed line\n")
        try:
            plan = _run([*snakemake, "-n"], tmp_path, copy_env())
        finally:
            path.write_text(original)
        return plan.stdout + plan.stderr

    plan = plan_after_edit("emae/losses.py")
    # (the baselines too: their evaluations import the model package)
    assert _planned(plan) == {"pretrain": 3, "knn": 5, "linprobe": 5, "finetune": 4, "consistency": 3,
                              "visualize": 3, "report": 1, "all": 1}, plan[-3000:]
    assert "Params have changed since last execution" in plan
    assert _planned(plan_after_edit("emae/report/plots.py")) == {"report": 1, "all": 1}
    # switching more stages on plans only their jobs and the report, not the finished ones
    (tmp_path / "more.yaml").write_text(yaml.safe_dump(
        {"overrides": [*TINY, "pipeline.stages.prepare_dense=true", "pipeline.stages.segment=true"], "threads": 1}))
    plan = _run([*snakemake[:-1], "more.yaml", "-n"], tmp_path, copy_env()).stdout
    # (segment: the three runs and the random_init baseline)
    assert _planned(plan) == {"prepare_dense": 1, "segment": 4, "report": 1, "all": 1}, plan[-3000:]
    html = tmp_path / "report.html"
    _run([*snakemake, "--report", str(html)], tmp_path, copy_env())
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


def _exp_row(shown: list[dict], name: str) -> tuple[dict, dict]:
    """(baseline commit, experiment `name`) rows of `dvc exp show --json`."""
    for row in shown:
        for exp in row.get("experiments") or []:
            for rev in exp["revs"]:
                if rev["name"] == name:
                    return row, rev
    raise AssertionError(f"no experiment {name} in {json.dumps(shown)[:3000]}")


def _stages_run(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.mark.skipif(shutil.which("dvc") is None or shutil.which("git") is None, reason="needs dvc and git")
def test_dvc_repro_push_clone_pull_then_experiments(tmp_path: Path) -> None:
    repo = copy_checkout(tmp_path / "repo")
    # one variant, knn + consistency only: enough for the DAG's properties, fast on a CPU
    _set_params(repo / "params", [*TINY, "pipeline.stages.linprobe=false", "pipeline.stages.finetune=false",
                                  "pipeline.stages.visualize=false"])
    pipeline_yaml = repo / "params" / "pipeline.yaml"
    tree = yaml.safe_load(pipeline_yaml.read_text())
    for variant in ("mae", "emae_eqflops"):
        del tree["pipeline"]["variants"][variant]
    tree["pipeline"] |= {"reference": "emae", "compute_of": {}, "baselines": {"pixels": False, "random_init": False}}
    pipeline_yaml.write_text(yaml.safe_dump(tree, sort_keys=False))

    env = copy_env()  # the copy's emae
    _run([sys.executable, "-m", "emae.cli", "dvc-yaml"], repo, env)
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    assert list(stages) == ["prepare", "pretrain-emae-seed0", "knn-emae-seed0", "consistency-emae-seed0",
                            "report"]
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        _run(cmd, repo, env)

    _run(["dvc", "repro"], repo, env)
    summary_csv = "results/report/summary.csv"
    summary = pd.read_csv(repo / summary_csv)
    assert list(summary["variant"]) == ["emae"] and summary["knn_top1"].between(0, 100).all()
    assert summary["finetune_top1"].isna().all()
    metrics = _run(["dvc", "metrics", "show", "--json"], repo, env).stdout
    assert "results/emae/seed0/knn/metrics.json" in metrics and "top1" in metrics

    again = _run(["dvc", "repro"], repo, env)
    assert "Data and pipelines are up to date" in again.stdout, again.stdout
    assert "Running stage" not in again.stdout

    # DVC as the artifact store: a local-path remote, its config and dvc.lock in git, everything pushed
    _run(["dvc", "remote", "add", "-d", "storage", str(tmp_path / "remote")], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "results"], repo, env)
    pushed = _run(["dvc", "push"], repo, env).stdout
    assert re.search(r"\d+ files? pushed", pushed), pushed
    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(repo), str(clone)], tmp_path, env)
    assert not (clone / "results").exists() and not (clone / "runs").exists()
    _run(["dvc", "pull"], clone, env)
    assert (clone / "runs/emae/seed0/checkpoints/last.pt").is_file()  # persistent outputs travel too
    for cmd in (["dvc", "repro"], ["dvc", "status"]):
        out = _run(cmd, clone, env).stdout
        assert "Data and pipelines are up to date" in out and "Running stage" not in out, (cmd, out)
    assert (clone / summary_csv).read_bytes() == (repo / summary_csv).read_bytes()

    # an experiment on a kNN param in the clone: only kNN and the report rerun; `dvc exp show`
    # has the new metric next to the baseline's
    knn_json = clone / "results/emae/seed0/knn/metrics.json"
    baseline_top1 = json.loads(knn_json.read_text())["top1"]
    ran = _run(["dvc", "exp", "run", "-S", "params/eval.yaml:knn.k=3"], clone, env).stdout
    assert _stages_run(ran) == {"knn-emae-seed0", "report"}, ran
    new_top1 = json.loads(knn_json.read_text())["top1"]
    name = re.search(r"Ran experiment\(s\): (\S+)", ran).group(1)
    baseline, experiment = _exp_row(json.loads(_run(["dvc", "exp", "show", "--json"], clone, env).stdout), name)
    for row, k, top1 in ((baseline, 20, baseline_top1), (experiment, 3, new_top1)):
        assert row["data"]["params"]["params/eval.yaml"]["data"]["knn"]["k"] == k
        assert row["data"]["metrics"]["results/emae/seed0/knn/metrics.json"]["data"]["top1"] == top1

    # more epochs (in the first repository): pre-training resumes from the persistent checkpoint
    log = repo / "runs/emae/seed0/log.jsonl"
    before = log.read_text().splitlines()
    ran = _run(["dvc", "exp", "run", "-S", "params/pretrain.yaml:pretrain.epochs=3"], repo, env).stdout
    assert "Running stage 'pretrain-emae-seed0'" in ran and "Running stage 'prepare'" not in ran
    after = log.read_text().splitlines()
    # the persistent checkpoint and log survived: epochs 1-2 were not trained again
    assert after[:2] == before and [json.loads(line)["epoch"] for line in after] == [1, 2, 3]
    name = re.search(r"Ran experiment\(s\): (\S+)", ran).group(1)
    _, experiment = _exp_row(json.loads(_run(["dvc", "exp", "show", "--json"], repo, env).stdout), name)
    assert experiment["data"]["params"]["params/pretrain.yaml"]["data"]["pretrain"]["epochs"] == 3
    assert experiment["data"]["metrics"]["runs/emae/seed0/metrics.json"]["data"]["epochs"] == 3
