"""Real DDP: two gloo processes on the CPU; what happens when one rank fails."""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from emae.masking import parallel_masks
from emae.models import EMAE
from tests.conftest import CORE_PARAMS, REPO, cli_env

TINY = dict(img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=2, num_heads=2,
            decoder_embed_dim=24, decoder_depth=1, decoder_num_heads=2, num_parts=4)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_step(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = DistributedDataParallel(EMAE(**TINY))
    imgs = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    mask = parallel_masks(4, 16, 4, 0.75, generator=torch.Generator().manual_seed(2))
    half = slice(2 * rank, 2 * rank + 2)  # each rank takes half of the batch
    model(imgs[half], mask=mask[:, half]).loss.backward()
    if rank == 0:
        torch.save({n: p.grad for n, p in model.module.named_parameters() if p.grad is not None}, out)
    dist.destroy_process_group()


def test_ddp_gradients_equal_the_single_process_gradient(tmp_path: Path) -> None:
    out = str(tmp_path / "grads.pt")
    mp.spawn(_ddp_step, args=(2, _free_port(), out), nprocs=2, join=True)
    torch.manual_seed(0)
    model = EMAE(**TINY)
    imgs = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    mask = parallel_masks(4, 16, 4, 0.75, generator=torch.Generator().manual_seed(2))
    model(imgs, mask=mask).loss.backward()
    ddp_grads = torch.load(out)
    for name, param in model.named_parameters():
        if param.grad is not None:
            assert torch.allclose(ddp_grads[name], param.grad, atol=1e-6), name


def test_pretrain_under_torchrun_with_two_processes(tmp_path: Path, tiny_overrides: list[str]) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
           str(_free_port()), "-m", "emae.cli", "pretrain", *[a for f in CORE_PARAMS for a in ("-p", str(f))], "-o", str(out),
           *tiny_overrides, "pretrain.epochs=1", "pretrain.batch_size=32"]
    result = subprocess.run(cmd, cwd=REPO, env=cli_env() | {"OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["effective_batch_size"] == 64
    assert metrics["steps"] == -(-1437 // 2) // 32


# ------------------------------------------------------------------------- one rank fails

# The real `emae` CLI, with EMAE.forward patched on one rank: the loss of its Nth forward (its Nth
# step: no accumulation) is NaN. Each rank writes when it ends (and the fault when it happens).
NAN_ON_ONE_RANK = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    from emae.models import EMAE

    rank, marks = int(os.environ["RANK"]), Path(os.environ["MARKS"])
    bad_rank, bad_call = int(os.environ["BAD_RANK"]), int(os.environ["BAD_CALL"])
    real_forward, calls = EMAE.forward, [0]

    def forward(self, *args, **kwargs):
        out = real_forward(self, *args, **kwargs)
        calls[0] += 1
        if rank == bad_rank and calls[0] == bad_call:
            (marks / "nan").write_text(repr(time.time()))
            out.loss = out.loss * float("nan")
        return out

    EMAE.forward = forward
    from emae.cli import main
    code = 1
    try:
        code = main(sys.argv[1:])
    finally:
        (marks / f"exit{rank}").write_text(json.dumps({"time": time.time(), "code": code}))
    sys.exit(code)
""")


def test_nan_on_one_rank_stops_every_rank_together(tmp_path: Path, tiny_overrides: list[str]) -> None:
    """Rank 1 alone sees a NaN at step 5: both ranks raise the same error (naming step 5 as
    steps.jsonl numbers it, and rank 1) and exit within seconds; the checkpoint of step 4 stays."""
    out, marks = tmp_path / "run", tmp_path / "marks"
    marks.mkdir()
    (tmp_path / "nan_on_one_rank.py").write_text(NAN_ON_ONE_RANK)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
           str(_free_port()), f"--log-dir={tmp_path / 'logs'}", "--redirects=3",  # a log per rank
           str(tmp_path / "nan_on_one_rank.py"), "pretrain", *[a for f in CORE_PARAMS for a in ("-p", str(f))],
           "-o", str(out), *tiny_overrides, "pretrain.epochs=1", "pretrain.batch_size=32",
           "pretrain.log_every_steps=1", "pretrain.checkpoint_every_steps=4"]
    env = cli_env() | {"OMP_NUM_THREADS": "1", "MARKS": str(marks), "BAD_RANK": "1", "BAD_CALL": "5"}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode != 0, result.stderr[-3000:]
    nan_at = float((marks / "nan").read_text())
    ends = [json.loads((marks / f"exit{rank}").read_text()) for rank in (0, 1)]
    assert [e["code"] for e in ends] == [2, 2], result.stderr[-3000:]  # EmaeError: `emae: error:`
    seconds = max(e["time"] for e in ends) - nan_at
    print(f"NaN on rank 1 -> both ranks ended {seconds:.2f} s later")
    assert seconds < 60
    message = "emae: error: non-finite loss at step 5 on rank 1 (loss=nan, recon_loss="
    for rank in (0, 1):
        (stderr,) = (tmp_path / "logs").glob(f"*/attempt_0/{rank}/stderr.log")
        assert message in stderr.read_text(), stderr.read_text()[-3000:]
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=False)
    assert state["step"] == 4 and all(torch.isfinite(v).all() for v in state["model"].values())
    logged = [json.loads(line)["step"] for line in (out / "steps.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4]  # step 5 is the one the error names: it never completed


def _silent_peer(rank: int, port: int, marks: str) -> None:
    """Rank 0 all-reduces; rank 1 is alive but never joins: rank 0's collective must time out."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), EMAE_DIST_TIMEOUT_S="4")
    from emae.train import distributed

    info = distributed.init_distributed()
    done = Path(marks) / "rank0"
    if rank == 1:
        deadline = time.monotonic() + 120
        while not done.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        return
    start = time.monotonic()
    try:
        dist.all_reduce(torch.ones(1))
        outcome = "returned"
    except RuntimeError as err:  # gloo: "Timed out waiting 4000ms for recv operation to complete"
        outcome = f"raised after {time.monotonic() - start:.1f} s: {err}"
    done.write_text(outcome)
    distributed.cleanup(info)


def test_a_collective_waits_no_longer_than_the_timeout(tmp_path: Path) -> None:
    # fork: torch is imported already (seconds saved); this process has no process group
    mp.start_processes(_silent_peer, args=(_free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    outcome = (tmp_path / "rank0").read_text()
    assert outcome.startswith("raised after ") and "Timed out" in outcome, outcome
    assert 3 <= float(outcome.split()[2]) < 30, outcome


def test_collective_timeout_is_finite_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    from emae.errors import EmaeError
    from emae.train.distributed import collective_timeout

    monkeypatch.delenv("EMAE_DIST_TIMEOUT_S", raising=False)
    assert collective_timeout().total_seconds() == 600
    monkeypatch.setenv("EMAE_DIST_TIMEOUT_S", "90")
    assert collective_timeout().total_seconds() == 90
    for bad in ("ten", "0", "-5", "inf", "nan"):
        monkeypatch.setenv("EMAE_DIST_TIMEOUT_S", bad)
        with pytest.raises(EmaeError, match=rf"EMAE_DIST_TIMEOUT_S='{bad}': expected a positive number"):
            collective_timeout()


def test_slurm_jobs_end_when_one_task_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sbatch script runs the tasks with `srun --kill-on-bad-exit=1` (submitit's srun args)."""
    from emae.launch.config import load_launcher_config
    from emae.launch.runner import make_executor

    bin_dir = tmp_path / "bin"  # submitit looks for srun on PATH; nothing is submitted
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    config = load_launcher_config(None, ["kind=slurm", f"folder={tmp_path}/logs/%j",
                                         "resources.tasks_per_node=2"])
    executor = make_executor(config, "pretrain")
    script = executor._executor._make_submission_file_text("python -m emae.cli pretrain", "uid")
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    assert "--kill-on-bad-exit=1" in srun.split()
