"""torch.distributed set-up that works under torchrun, under SLURM (srun / submitit) and alone.

A rank that fails must not leave the others waiting in a collective for ever: the process group
has a finite timeout (`EMAE_DIST_TIMEOUT_S`, default 10 minutes: a collective that waits longer
raises), a failing task ends the others (torchrun's agent; srun `--kill-on-bad-exit=1`, set by
`emae.launch`), and errors the loops detect themselves (a non-finite loss) are agreed on by every
rank in one collective, so that all raise together (`emae.train.common.LossMeter`).
"""

from __future__ import annotations

import datetime
import os
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from emae.errors import EmaeError

TIMEOUT_ENV = "EMAE_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 600.0  # NCCL's own default; gloo's (30 min) is longer than a hang should last


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _from_slurm() -> None:
    """Fill torchrun's variables from SLURM's when a multi-task job was started with srun."""
    if "RANK" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    if "MASTER_ADDR" not in os.environ:
        hosts = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
                               capture_output=True, text=True, check=True).stdout.split()
        os.environ["MASTER_ADDR"] = hosts[0]
    os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ["SLURM_JOB_ID"]) % 20000))


def init_distributed() -> DistInfo:
    """Initialise the process group when WORLD_SIZE > 1 (nccl on GPUs, gloo on CPUs)."""
    _from_slurm()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, init_method="env://", timeout=collective_timeout())
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank)


def collective_timeout() -> datetime.timedelta:
    """How long a collective may wait for the other ranks before it raises (`EMAE_DIST_TIMEOUT_S`)."""
    text = os.environ.get(TIMEOUT_ENV, "")
    try:
        seconds = float(text) if text.strip() else DEFAULT_TIMEOUT_S
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < float("inf"):
        raise EmaeError(f"environment variable {TIMEOUT_ENV}={text!r}: expected a positive number of "
                        f"seconds (default {DEFAULT_TIMEOUT_S:g})")
    return datetime.timedelta(seconds=seconds)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if not info.enabled:
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / info.world_size


def gather_rows(row: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Every rank's `row` stacked in rank order, [world_size, *row.shape], on every rank: one
    SUM all-reduce of a zero table that holds this rank's row (a NaN or inf in a row stays as it
    is: only its own rank adds anything but zeros to it; any backend)."""
    if not info.enabled:
        return row.unsqueeze(0)
    table = torch.zeros((info.world_size, *row.shape), dtype=row.dtype, device=row.device)
    table[info.rank] = row
    dist.all_reduce(table)
    return table


def wrap_ddp(module: torch.nn.Module, device: torch.device, info: DistInfo) -> torch.nn.Module:
    """`module` in DistributedDataParallel when there are several ranks, else itself."""
    if not info.enabled:
        return module
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
