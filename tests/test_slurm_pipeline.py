"""`snakemake --profile slurm` as a user runs it, against a real SLURM cluster (tools/local-slurm.sh):
the profile installed by `emae install-profile`, every job an sbatch job, the GPU stages asking for
`gres/gpu` (checked in sacct), and the outputs equal to those of the same DAG run locally."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from safetensors.torch import load_file

from conftest import PARAMS, REPO, cli_env
from conftest_slurm import slurm_has_accounting, slurm_is_up, wait_until
from test_pipeline_e2e import TINY, _run

UP, WHY = slurm_is_up()
pytestmark = [
    pytest.mark.slurm,
    pytest.mark.slow,
    pytest.mark.timeout(900),
    pytest.mark.skipif(not UP, reason=WHY),
    pytest.mark.skipif(shutil.which("snakemake") is None, reason="snakemake not installed"),
]

# The tiny DAG: prepare -> pretrain (mae, emae) -> kNN -> report.
OVERRIDES = [*TINY, "pipeline.stages.linprobe=false", "pipeline.stages.finetune=false",
             "pipeline.stages.consistency=false", "pipeline.stages.visualize=false"]
GPU_STAGES = {"emae-pretrain", "emae-knn"}
CPU_STAGES = {"emae-prepare", "emae-report"}


def install_profile(xdg: Path) -> None:
    """`emae install-profile --partition debug` (which caps the template's 8-10 CPUs and 32-64 GB
    per job to the node: tests/test_slurm_unschedulable.py), then smaller still, so that the jobs
    share the 2-CPU node and the test stays quick."""
    env = cli_env() | {"XDG_CONFIG_HOME": str(xdg)}
    subprocess.run([sys.executable, "-m", "emae.cli", "install-profile", "--partition", "debug"],
                   env=env, check=True, capture_output=True)
    settings_path = xdg / "snakemake" / "slurm" / "emae-slurm.yaml"
    settings = yaml.safe_load(settings_path.read_text())
    launcher = settings["launcher"]
    assert launcher["resources"]["partition"] == "debug"
    launcher["resources"].update(cpus_per_task=1, mem_gb=2, time_min=30)
    for stage in launcher["stages"].values():
        stage.update(cpus_per_task=1, mem_gb=2, time_min=30)
    launcher.update(poll_interval_s=0.5, state_interval_s=1.0, result_grace_s=5.0)
    settings_path.write_text(yaml.safe_dump(settings, sort_keys=False))


def without_timings(record: dict) -> dict:
    """What two runs of the same job must share: not timings (seconds, pretrain_seconds), not the
    provenance (command, hosts, times), not the data digest (file mtimes: each run prepared its own
    copy); the encoder digest stays."""
    kept = {k: v for k, v in record.items() if "seconds" not in k and k != "provenance"}
    if "inputs" in kept:
        kept["inputs"] = {k: v for k, v in kept["inputs"].items() if k != "data"}
    return kept


def sacct_jobs(since: str) -> list[tuple[str, str]]:
    proc = subprocess.run(["sacct", "-n", "-P", "-X", "-S", since, "-o", "JobName,ReqTRES"],
                          capture_output=True, text=True, check=True)
    return [tuple(line.split("|", 1)) for line in proc.stdout.splitlines() if line.startswith("emae-")]


def test_snakemake_profile_slurm_runs_the_dag_like_the_local_run(tmp_path: Path) -> None:
    config = ["--config", f"params={tmp_path / 'params'}", "threads=1", "overrides=" + " ".join(OVERRIDES)]
    shutil.copytree(PARAMS, tmp_path / "params")
    snakefile = ["-s", str(REPO / "Snakefile")]

    local = tmp_path / "local"
    local.mkdir()
    _run([sys.executable, "-m", "snakemake", *snakefile, "--cores", "2", *config], local, cli_env())

    xdg = tmp_path / "xdg"
    install_profile(xdg)
    cluster = tmp_path / "slurm"
    cluster.mkdir()
    since = time.strftime("%Y-%m-%dT%H:%M:%S")
    result = _run([sys.executable, "-m", "snakemake", *snakefile, "--profile", "slurm", *config],
                  cluster, cli_env() | {"XDG_CONFIG_HOME": str(xdg)})
    assert "--launcher kind=slurm" in result.stdout + result.stderr  # printshellcmds: the profile's launcher

    # every job went through sbatch: its rule log says so, submitit's folder has the script
    rule_logs = sorted((cluster / "logs").glob("**/*.log"))
    assert len(rule_logs) == 10  # prepare, 3 x pretrain, 3 + 2 (the baselines) x knn, report
    for log in rule_logs:
        assert "submitted SLURM job" in log.read_text(), log
    for stage in ("prepare", "pretrain", "knn", "report"):
        assert list((cluster / "logs" / "submitit" / stage).glob("*/*_submission.sh")), stage
    if slurm_has_accounting():
        jobs = sacct_jobs(since)
        assert {name for name, _ in jobs} == GPU_STAGES | CPU_STAGES, jobs
        assert [name for name, _ in jobs].count("emae-pretrain") == 3  # mae, emae, emae_eqflops
        for name, tres in jobs:
            assert ("gres/gpu=1" in tres) == (name in GPU_STAGES), (name, tres)

    # the same results as the local run: weights bit for bit, metrics and report up to timings
    for variant in ("mae", "emae"):
        run = Path("runs") / variant / "seed0"
        a, b = load_file(local / run / "encoder.safetensors"), load_file(cluster / run / "encoder.safetensors")
        assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a), variant
        knn = Path("results") / variant / "seed0" / "knn" / "metrics.json"
        assert without_timings(json.loads((local / knn).read_text())) == \
            without_timings(json.loads((cluster / knn).read_text())), variant
    summaries = [pd.read_csv(d / "results" / "report" / "summary.csv") for d in (local, cluster)]
    columns = [c for c in summaries[0].columns if "seconds" not in c]
    assert "knn_top1" in columns
    pd.testing.assert_frame_equal(summaries[0][columns], summaries[1][columns])


def emae_jobs_in_squeue() -> list[str]:
    proc = subprocess.run(["squeue", "-h", "-o", "%j %T"], capture_output=True, text=True, check=True)
    return [line for line in proc.stdout.splitlines() if line.startswith("emae-")]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_snakemake_leaves_no_slurm_job(tmp_path: Path, sig: signal.Signals) -> None:
    """Ctrl-C in the terminal (SIGINT to snakemake's process group), or SIGTERM to the group (a
    closed tmux pane, `scancel` of a job that runs snakemake) while pre-training runs as SLURM jobs:
    snakemake exits and squeue has none of its jobs. (SIGTERM to the snakemake process alone is
    Snakemake's "finish the running jobs, then exit": the jobs then run to their end.)"""
    assert not emae_jobs_in_squeue(), "another test left emae jobs in the queue"
    shutil.copytree(PARAMS, tmp_path / "params")
    xdg = tmp_path / "xdg"
    install_profile(xdg)
    long_pretrain = [*OVERRIDES, "pretrain.epochs=500"]
    argv = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--profile", "slurm",
            "--config", f"params={tmp_path / 'params'}", "threads=1", "overrides=" + " ".join(long_pretrain)]
    with (tmp_path / "snakemake.log").open("w") as log:
        proc = subprocess.Popen(argv, cwd=tmp_path, env=cli_env() | {"XDG_CONFIG_HOME": str(xdg)},
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_until(lambda: any("emae-pretrain RUNNING" in j for j in emae_jobs_in_squeue()), 180,
                       "a pre-training job running in SLURM")
            os.killpg(proc.pid, sig)
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    wait_until(lambda: not emae_jobs_in_squeue(), 30, "the emae jobs to leave squeue")
    rule_logs = "".join(p.read_text() for p in (tmp_path / "logs" / "pretrain").glob("*/*.log"))
    assert "cancelled SLURM job" in rule_logs, rule_logs[-3000:]
