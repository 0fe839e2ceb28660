"""Training through real SLURM (tools/local-slurm.sh), compared with the same run done locally:
a pre-training job requeued by submitit's checkpointing ends with the weights of an uninterrupted
run, and a 2-task DDP job (gloo on CPU) gives the weights of the local 2-process run."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import CORE_PARAMS
from conftest_slurm import Launch, slurm_is_up, wait_until
from test_local_slurm import FAST, job_field, start_now_if_delayed

UP, WHY = slurm_is_up()
pytestmark = [pytest.mark.slurm, pytest.mark.timeout(300), pytest.mark.skipif(not UP, reason=WHY)]

ENTRY = "emae"  # the default entry: the emae program, `python -m emae`, run in-process in the job


def pretrain_argv(out: Path, overrides: list[str]) -> list[str]:
    return ["pretrain", *[a for f in CORE_PARAMS for a in ("-p", str(f))], "-o", str(out), *overrides]


def launch_pretrain(workdir: Path, out: Path, overrides: list[str], launcher: list[str]) -> Launch:
    return Launch(workdir, pretrain_argv(out, overrides), launcher, stage="pretrain", entry=ENTRY)


def slurm(tmp_path: Path, *extra: str) -> list[str]:
    return ["kind=slurm", f"folder={tmp_path}/logs/%j", "resources.time_min=10", *FAST, *extra]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "encoder.safetensors"), load_file(b / "encoder.safetensors")
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not wa[k].equal(wb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def requeue_at_the_time_limit(run: Launch, out: Path, tmp_path: Path, wait_s: float) -> str:
    """Send the job of `run` (pre-training into `out`) SLURM's time-limit signal after its first
    checkpoint; it must requeue, run again, resume past step 0 and succeed. Returns the job id."""
    from submitit.slurm.slurm import SlurmJob

    job_id = run.job_id()
    wait_until(lambda: (out / "checkpoints" / "last.pt").exists(), 120, "the first checkpoint")
    assert not (out / "encoder.safetensors").exists(), "pre-training ended before it could be interrupted"
    SlurmJob(folder=tmp_path / "logs" / job_id, job_id=job_id)._interrupt(timeout=True)
    run.wait_for_output("checkpoint: requeueing", 30)
    wait_until(lambda: start_now_if_delayed(job_id) or run.proc.poll() is not None, 60, "the requeued job")
    assert run.wait(wait_s) == 0, run.describe()
    assert job_field(job_id, "Restarts") == "1"
    resumed = re.search(r"resuming from \S+last.pt at step (\d+)/", run.output)
    assert resumed and int(resumed.group(1)) > 0, run.describe()
    return job_id


def test_pretrain_requeued_at_time_limit_ends_with_the_uninterrupted_weights(
        tmp_path: Path, tiny_overrides: list[str]) -> None:
    """SIGUSR2 as SLURM sends it before the time limit: submitit calls the checkpoint hook, the job
    is requeued, runs again and resumes from checkpoints/last.pt; the result is bit-identical."""
    overrides = [*tiny_overrides, "pretrain.epochs=6", "pretrain.checkpoint_every_steps=5"]
    reference = tmp_path / "uninterrupted"
    local = launch_pretrain(tmp_path / "local", reference, overrides, ["kind=local"])
    assert local.wait(240) == 0, local.describe()

    out = tmp_path / "requeued"
    run = launch_pretrain(tmp_path / "slurm", out, overrides, slurm(tmp_path))
    requeue_at_the_time_limit(run, out, tmp_path, 240)
    assert_same_weights(reference, out)


def test_two_task_ddp_job_matches_the_local_two_process_run(tmp_path: Path, tiny_overrides: list[str]) -> None:
    """`tasks_per_node=2`: SLURM starts two tasks that join one gloo process group (the launcher maps
    SLURM's variables to torch.distributed's); locally the launcher runs torchrun with 2 processes."""
    overrides = [*tiny_overrides, "pretrain.epochs=1", "pretrain.batch_size=32"]
    two_tasks = "stages.pretrain.tasks_per_node=2"
    local = launch_pretrain(tmp_path / "local", tmp_path / "local_ddp", overrides, ["kind=local", two_tasks])
    assert local.wait(240) == 0, local.describe()

    run = launch_pretrain(tmp_path / "slurm", tmp_path / "slurm_ddp", overrides, slurm(tmp_path, two_tasks))
    job_id = run.job_id()
    assert run.wait(240) == 0, run.describe()
    assert "[task 1]" in run.stdout + run.stderr  # both tasks ran and their output was streamed
    steps = subprocess.run(["sacct", "-n", "-P", "-j", job_id, "-o", "NTasks"], capture_output=True, text=True)
    if steps.returncode == 0:
        assert "2" in steps.stdout.split(), steps.stdout
    for out in (tmp_path / "local_ddp", tmp_path / "slurm_ddp"):
        metrics = (out / "metrics.json").read_text()
        assert '"world_size": 2' in metrics, metrics
    assert_same_weights(tmp_path / "local_ddp", tmp_path / "slurm_ddp")
