"""Jobs the local SLURM cluster (tools/local-slurm.sh) can never start fail fast, with what was
asked and what the partition offers; jobs that wait for a normal reason say why in the log.

    tools/local-slurm.sh up && pytest -m slurm tests/test_slurm_unschedulable.py

Skipped (with the reason) when no SLURM node is up. Each test takes a few seconds.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import cli_env
from conftest_slurm import Launch, slurm_is_up
from emae.launch import job_state, load_launcher_config, precheck
from emae.launch.slurm import Request, gres_gpus, query_partition

UP, WHY = slurm_is_up()
pytestmark = [pytest.mark.slurm, pytest.mark.timeout(120), pytest.mark.skipif(not UP, reason=WHY)]

FAST = ["poll_interval_s=0.3", "state_interval_s=0.5", "result_grace_s=3", "unknown_state_timeout_s=60"]


def largest_node() -> tuple[int, int, int]:
    """(CPUs, memory MB, GPUs) of the biggest node of partition debug, read with sinfo here."""
    out = subprocess.run(["sinfo", "-h", "-N", "-p", "debug", "-o", "%c %m %G"], capture_output=True,
                         text=True, check=True).stdout.split("\n")
    nodes = [(int(c), int(m), gres_gpus(g)) for c, m, g in (line.split() for line in out if line.strip())]
    return max(n[0] for n in nodes), max(n[1] for n in nodes), max(n[2] for n in nodes)


def slurm(tmp_path: Path, *extra: str) -> list[str]:
    return ["kind=slurm", f"folder={tmp_path}/logs/%j", "resources.time_min=10", *FAST, *extra]


def test_installed_profile_fits_the_local_node(tmp_path: Path) -> None:
    """The shipped profile asks for 8-10 CPUs and 32-64 GB; installed for partition debug it gets
    what the node has, says what it changed and what it wrote, and every stage passes the pre-check."""
    cpus, mem_mb, gpus = largest_node()
    xdg = tmp_path / "xdg"
    proc = subprocess.run([sys.executable, "-m", "emae.cli", "install-profile", "--partition", "debug"],
                          env=cli_env() | {"XDG_CONFIG_HOME": str(xdg)}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "capped the shipped resources to fit partition 'debug'" in proc.stdout
    if cpus < 10:
        assert f"stages.pretrain.cpus_per_task: 10 -> {cpus}" in proc.stdout
    assert "what each stage asks for" in proc.stdout and "pretrain" in proc.stdout.split("what each stage")[1]
    settings = yaml.safe_load((xdg / "snakemake" / "slurm" / "emae-slurm.yaml").read_text())
    config = load_launcher_config(settings["launcher"])
    part = query_partition("debug")
    for stage in config.stages:
        req = Request.of(config.for_stage(stage))
        assert req.cpus <= cpus and (req.mem_mb or 0) <= mem_mb and req.gpus <= gpus, (stage, req)
        assert any(req.fits(part, node) for node in part.nodes), stage
        precheck(config, stage)  # raises if it would not fit
    assert config.for_stage("pretrain").gpus_per_node == min(1, gpus)


def test_more_cpus_than_the_node_fails_before_submission(tmp_path: Path) -> None:
    """From params/launcher.yaml (the file `emae launch` reads by default): the error names the
    request, the node, the key and the file; nothing is submitted."""
    cpus = largest_node()[0]
    (tmp_path / "params").mkdir()
    (tmp_path / "params" / "launcher.yaml").write_text(
        f"launcher:\n  kind: slurm\n  stages:\n    pretrain: {{cpus_per_task: {cpus + 8}}}\n")
    run = Launch(tmp_path, ["echo", "never"], [f"folder={tmp_path}/logs/%j", *FAST], stage="pretrain")
    assert run.wait(30) == 2, run.describe()
    assert run.stderr == (f"emae: error: stage pretrain asks for {cpus + 8} CPUs per node but the largest node of "
                          f"partition 'debug' has {cpus} (launcher.stages.pretrain.cpus_per_task / "
                          "params/launcher.yaml)\n")
    assert "submitted" not in run.stdout and not (tmp_path / "logs").exists()


def test_pending_job_shows_its_reason_every_state_check(tmp_path: Path) -> None:
    """A job that may not start yet (`--begin` 4 s ahead) pends with reason BeginTime: the log
    says so at every state check, then the job runs."""
    run = Launch(tmp_path, ["echo", "began"], slurm(tmp_path, "resources.additional_parameters.begin=now+4"))
    job_id = run.job_id()
    assert run.wait(60) == 0, run.describe()
    pending = [line for line in run.stderr.splitlines() if line.startswith(f"emae launch: job {job_id} ")
               and "PENDING (BeginTime)" in line]
    assert len(pending) >= 3, run.describe()
    assert pending[0] == f"emae launch: job {job_id} (stage 't'): PENDING (BeginTime)"
    assert pending[-1].endswith("in the queue")
    assert "began" in run.stdout


@pytest.mark.parametrize("request_, reasons", [
    ("cpus", ["PartitionConfig"]),
    ("nodes", ["PartitionConfig", "PartitionNodeLimit"]),  # SLURM 22.05 says the first, then the second
], ids=["more-cpus-than-the-node", "more-nodes-than-the-partition"])
def test_impossible_request_past_the_precheck_is_cancelled(tmp_path: Path, request_: str, reasons: list[str]) -> None:
    """Submitted with --no-precheck, SLURM takes the job and keeps it pending for a reason that
    cannot resolve: the launcher cancels it at its first state check and says why."""
    ask = f"resources.cpus_per_task={largest_node()[0] + 1}" if request_ == "cpus" else "resources.nodes=9"
    run = Launch(tmp_path, ["echo", "never"], ["--no-precheck", *slurm(tmp_path, ask)])
    job_id = run.job_id()
    assert run.wait(30) == 1, run.describe()
    assert run.elapsed < 15, run.describe()
    reason = next((r for r in reasons if f"PENDING ({r})" in run.stderr), reasons[0])
    assert f"job {job_id} (stage 't'): PENDING ({reason}): it can never start; cancelling it" in run.stderr
    assert f"cancelled SLURM job {job_id}" in run.stderr
    assert (f"emae launch: error: stage 't': job {job_id} (stage 't') can never start: SLURM keeps it pending "
            f"with reason {reason} (") in run.stderr
    assert "It asked for: partition debug" in run.stderr
    assert job_state(job_id).state == "CANCELLED"
