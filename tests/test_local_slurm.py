"""`emae launch` against a real SLURM cluster (tools/local-slurm.sh): sbatch through submitit, log
streaming, fake-GPU accounting, cancellation on interrupt, a killed job reported failed (with and
without accounting), requeue through submitit's checkpoint.

Run by CI twice, with the cluster in each mode:

    tools/local-slurm.sh up                 && pytest -m slurm tests/test_local_slurm.py
    tools/local-slurm.sh up --no-accounting && pytest -m slurm tests/test_local_slurm.py
    tools/local-slurm.sh down

Skipped (with the reason) when no SLURM node is up. Tests that need `sacct` skip without accounting.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from conftest_slurm import Launch, slurm_has_accounting, slurm_is_up, wait_until
from emae.launch import job_state

UP, WHY = slurm_is_up()
pytestmark = [
    pytest.mark.slurm,
    pytest.mark.timeout(180),
    pytest.mark.skipif(not UP, reason=WHY),
]
ACCOUNTING = UP and slurm_has_accounting()

FAST = ["poll_interval_s=0.3", "state_interval_s=0.5", "result_grace_s=3", "unknown_state_timeout_s=60"]


def slurm(tmp_path: Path, *extra: str) -> list[str]:
    return ["kind=slurm", f"folder={tmp_path}/logs/%j", "resources.time_min=10", *FAST, *extra]


def squeue_active(job_id: str) -> list[str]:
    """The job's lines in plain `squeue` (pending, running, completing)."""
    proc = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True)
    return proc.stdout.split()


def job_field(job_id: str, field: str) -> str:
    proc = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True)
    for word in proc.stdout.split():
        if word.startswith(f"{field}="):
            return word.split("=", 1)[1]
    return ""


def start_now_if_delayed(job_id: str) -> bool:
    """SLURM holds a requeued batch job back ~2 minutes (BeginTime); let it start in 2 s. Not at
    once: slurmd refuses a job whose credential is from the same second as the requeue's
    revocation ("Killing non-startable batch job: Job credential revoked") and the job FAILs."""
    if job_field(job_id, "JobState") == "PENDING" and job_field(job_id, "Reason") == "BeginTime":
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now+2"], check=False)
        return True
    return False


def test_sbatch_job_succeeds_and_streams(tmp_path: Path) -> None:
    run = Launch(tmp_path, ["echo", "hello", "from", "slurm"], slurm(tmp_path))
    job_id = run.job_id()
    assert run.wait(90) == 0, run.describe()
    assert "hello\nfrom\nslurm\n" in run.stdout
    assert "stderr: hello from slurm" in run.stderr
    assert f"job {job_id} completed" in run.stdout
    assert (tmp_path / "logs" / job_id / f"{job_id}_submission.sh").exists()


def test_failed_command_exit_code_and_stderr_tail(tmp_path: Path) -> None:
    run = Launch(tmp_path, ["fail", "7"], slurm(tmp_path))
    assert run.wait(90) == 7, run.describe()
    assert "exited with code 7" in run.stderr and "failing with exit code 7" in run.stderr


def test_gpu_job_is_accounted(tmp_path: Path) -> None:
    run = Launch(tmp_path, ["env"], slurm(tmp_path, "stages.t.gpus_per_node=1"))
    job_id = run.job_id()
    assert run.wait(90) == 0, run.describe()
    assert "CUDA_VISIBLE_DEVICES=0" in run.stdout
    if not ACCOUNTING:
        pytest.skip("without accounting there is no sacct to check gres/gpu in")

    def alloc_tres() -> str:
        proc = subprocess.run(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "AllocTRES,ReqTRES"],
                              capture_output=True, text=True)
        return proc.stdout if "gres/gpu" in proc.stdout else ""

    tres = wait_until(alloc_tres, 30, f"gres/gpu in sacct for job {job_id}")
    assert "gres/gpu=1" in tres


def test_a_task_runs_as_many_threads_as_it_has_cpus(tmp_path: Path) -> None:
    run = Launch(tmp_path, ["env"], slurm(tmp_path, "stages.t.cpus_per_task=2"), unset=("OMP_NUM_THREADS",))
    assert run.wait(90) == 0, run.describe()
    assert "SLURM_CPUS_PER_TASK=2" in run.stdout and "OMP_NUM_THREADS=2" in run.stdout
    run = Launch(tmp_path, ["env"], slurm(tmp_path, "stages.t.cpus_per_task=2"))  # the submitter's own wins
    assert run.wait(90) == 0, run.describe()
    assert f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')}" in run.stdout


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_cancels_the_slurm_job(tmp_path: Path, sig: signal.Signals) -> None:
    run = Launch(tmp_path, ["sleep", "300"], slurm(tmp_path))
    job_id = run.job_id()
    run.wait_for_output("tick 1", 60)
    assert squeue_active(job_id) == ["RUNNING"]
    run.proc.send_signal(sig)
    assert run.wait(60) == 128 + sig, run.describe()
    assert f"cancelled SLURM job {job_id}" in run.stderr
    wait_until(lambda: not squeue_active(job_id), 30, f"job {job_id} to leave squeue")


def test_killed_job_is_reported_failed_in_bounded_time(tmp_path: Path) -> None:
    """The launched process is SIGKILLed (as by the OOM killer): no result file. With accounting the
    state comes from squeue/sacct; without, sacct fails and squeue alone must end the wait."""
    run = Launch(tmp_path, ["die"], slurm(tmp_path))
    job_id = run.job_id()
    assert run.wait(90) == 1, run.describe()
    assert f"job {job_id}" in run.stderr and "without writing its result" in run.stderr
    assert "dying" in run.stderr  # tail of the job's stderr
    assert run.elapsed < 60
    assert job_state(job_id).state == "FAILED"  # from squeue (kept MinJobAge), else sacct
    sacct = subprocess.run(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "State"], capture_output=True, text=True)
    if ACCOUNTING:
        wait_until(lambda: subprocess.run(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "State"],
                                          capture_output=True, text=True).stdout.strip() == "FAILED",
                   30, "sacct to record FAILED")
    else:
        assert sacct.returncode != 0  # no accounting: what submitit relies on is not there


def test_timeout_requeues_through_checkpoint_and_completes(tmp_path: Path) -> None:
    """`job._interrupt(timeout=True)` (SIGUSR2, as before a time limit): submitit calls
    EmaeCommand.checkpoint(), requeues the job, which runs the command again and finishes."""
    from submitit.slurm.slurm import SlurmJob

    attempts = tmp_path / "attempts.txt"
    run = Launch(tmp_path, ["attempts", "--file", str(attempts), "--until", "2", "--sleep", "300"],
                 slurm(tmp_path))
    job_id = run.job_id()
    run.wait_for_output("attempt 1: running", 60)
    SlurmJob(folder=tmp_path / "logs" / job_id, job_id=job_id)._interrupt(timeout=True)
    run.wait_for_output("checkpoint: requeueing", 30)
    wait_until(lambda: start_now_if_delayed(job_id) or run.proc.poll() is not None, 60, "the requeued job")
    assert run.wait(90) == 0, run.describe()
    assert "attempt 2: done (resumed after requeue)" in run.stdout
    assert attempts.read_text().split() == [job_id, job_id]
    assert job_field(job_id, "Restarts") == "1"


def test_scontrol_requeue_reruns_the_command(tmp_path: Path) -> None:
    """An admin/preemption requeue (`scontrol requeue`) kills the job; it runs again and completes."""
    attempts = tmp_path / "attempts.txt"
    run = Launch(tmp_path, ["attempts", "--file", str(attempts), "--until", "2", "--sleep", "300"],
                 slurm(tmp_path))
    job_id = run.job_id()
    run.wait_for_output("attempt 1: running", 60)
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    wait_until(lambda: start_now_if_delayed(job_id) or run.proc.poll() is not None, 60, "the requeued job")
    assert run.wait(90) == 0, run.describe()
    assert "attempt 2: done" in run.stdout


def test_two_task_job_exports_torch_distributed_env(tmp_path: Path) -> None:
    run = Launch(tmp_path, ["ddp"], slurm(tmp_path, "stages.t.tasks_per_node=2"))
    assert run.wait(120) == 0, run.describe()
    assert "[task 0] ddp rank 0/2: all_reduce sum = 3" in run.stdout
    assert "[task 1] ddp rank 1/2: all_reduce sum = 3" in run.stdout
