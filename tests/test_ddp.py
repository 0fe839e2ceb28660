"""Real DDP: two gloo processes on the CPU."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

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
