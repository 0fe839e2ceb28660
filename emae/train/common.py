"""What the training loops share: devices, determinism, autocast, optimizer steps, loss sums."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

import torch
from timm.scheduler import CosineLRScheduler

from emae.data import ResumableBatchSampler
from emae.errors import EmaeError, NonFiniteLossError
from emae.attention import AttentionKernels
from emae.provenance import cpu_bf16, cpu_model
from emae.train import distributed

T = TypeVar("T")

log = logging.getLogger("emae.precision")


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


CUBLAS_WORKSPACE = ":4096:8"  # what deterministic cuBLAS needs (PyTorch's reproducibility notes)


def set_deterministic(deterministic: bool) -> None:
    """Deterministic algorithms (warning where one has none) for the loops that honour
    `deterministic`. Call it before any CUDA work: cuBLAS reads CUBLAS_WORKSPACE_CONFIG when it
    starts, and without it every matmul on CUDA >= 10.2 is non-deterministic and warns. A value
    the user set is kept."""
    if not deterministic:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The precision of every stage (None: fp32). 'auto': bf16 on CUDA; on a CPU, bf16 where its
    matmuls are native (AMX or AVX512-BF16, `emae.provenance.cpu_bf16`), fp32 where bf16 is
    emulated (slower than fp32 there). With the measured attention kernels, bf16 steps are faster
    on such a CPU for every model size measured (docs/performance.md). The choice is logged once."""
    if amp == "off":
        return None
    if amp == "fp16":
        return torch.float16
    if amp == "bf16" or device.type == "cuda":
        return torch.bfloat16
    native = cpu_bf16()
    _log_auto_choice(device.type, native)
    return torch.bfloat16 if native else None


def precision_name(amp_dtype: torch.dtype | None) -> str:
    """What a checkpoint records of autocast_dtype's answer: "bfloat16", "float16" or "float32"."""
    return str(amp_dtype or torch.float32).removeprefix("torch.")


@lru_cache(maxsize=None)
def _log_auto_choice(device_type: str, native: str | None) -> None:
    if native:
        log.info("amp auto: bf16 autocast on %s (%s has native bf16: %s)", device_type, cpu_model(), native)
    else:
        log.info("amp auto: fp32 on %s (%s has no native bf16, neither AMX nor AVX512-BF16)",
                 device_type, cpu_model())


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """The precision context of every stage's forward: autocast to `dtype` (None: fp32) and the
    measured attention kernels for every model in it (`emae.attention.AttentionKernels`)."""
    with (torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None
          else contextlib.nullcontext()), AttentionKernels():
        yield


def training_sampler(num_items: int, cfg: Any, section: str,
                     dist_info: distributed.DistInfo) -> tuple[ResumableBatchSampler, int]:
    """A training loop's resumable sampler (`cfg`: batch_size, seed, accum_iter) and its optimizer
    steps per epoch; a training set too small for one step is an error naming the keys."""
    sampler = ResumableBatchSampler(num_items, cfg.batch_size, cfg.seed, dist_info.rank, dist_info.world_size,
                                    accum_iter=cfg.accum_iter)
    steps_per_epoch = len(sampler) // cfg.accum_iter
    if steps_per_epoch == 0:
        raise EmaeError(f"{section}: the training set has {num_items} items, too few for {section}.batch_size="
                        f"{cfg.batch_size} x accum_iter={cfg.accum_iter} x {dist_info.world_size} ranks")
    return sampler, steps_per_epoch


def warmup_cosine(optimizer: torch.optim.Optimizer, cfg: Any, steps_per_epoch: int,
                  total_steps: int, min_lr: float | None = None) -> CosineLRScheduler:
    """MAE's per-step schedule: linear warm-up over `cfg.warmup_epochs`, then half a cosine to
    `min_lr` (default `cfg.min_lr`; the peak lr gives a constant lr after the warm-up), at least
    one step of cosine."""
    warmup = min(int(cfg.warmup_epochs * steps_per_epoch), total_steps - 1)
    lr_min = cfg.min_lr if min_lr is None else min_lr
    return CosineLRScheduler(optimizer, t_initial=total_steps - warmup, lr_min=lr_min, warmup_t=warmup,
                             warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False)


def micro_batches(loader: Iterable[T], accum_iter: int, model: torch.nn.Module,
                  dist_info: distributed.DistInfo) -> Iterator[tuple[int, bool, T]]:
    """(micro, last, batch) for each batch of `loader`: `micro` counts the micro-batches of an
    optimizer step of `accum_iter` of them and `last` marks the one after which the optimizer
    steps. Under DDP the caller's loop body runs inside `model.no_sync()` on every other
    micro-batch, so the gradients are all-reduced once a step."""
    for index, batch in enumerate(loader):
        micro = index % accum_iter
        last = micro == accum_iter - 1
        with model.no_sync() if dist_info.enabled and not last else contextlib.nullcontext():
            yield micro, last, batch


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   scaler: torch.amp.GradScaler, clip_grad: float | None) -> None:
    """The end of a (possibly accumulated) step: unscale and clip if asked, step, update the
    loss scaler, clear the gradients."""
    if clip_grad is not None:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


class LossMeter:
    """Running sums of loss terms kept on the device, and the first step whose terms were not
    finite: a training step never waits for the accelerator to read a loss back; the sums and the
    non-finite check are read (one host sync) only at log points, checkpoints and epoch ends.

    With several ranks the check is a collective: every rank calls `raise_if_non_finite` at the
    same points, and all of them raise the same error (one rank raising while the others wait in
    the next collective would hang the job until the NCCL timeout)."""

    def __init__(self, names: list[str], device: torch.device,
                 dist_info: distributed.DistInfo = distributed.DistInfo()) -> None:
        self.names, self.dist_info = names, dist_info
        self.sums = torch.zeros(len(names), device=device)
        self.last = torch.zeros(len(names), device=device)
        self.bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self.bad_values = torch.zeros(len(names), device=device)

    def add(self, step_index: int, values: list[torch.Tensor], weight: float = 1.0) -> None:
        """`step_index`: the 0-based index of the optimizer step these terms belong to (the loops'
        counter before its increment); errors name it as the logs do, by steps done (index + 1)."""
        v = torch.stack([x.detach().float() for x in values])  # [len(names)]
        first_bad = ~torch.isfinite(v).all() & (self.bad_step < 0)
        self.bad_step = torch.where(first_bad, step_index, self.bad_step)
        self.bad_values = torch.where(first_bad, v, self.bad_values)
        self.sums += v * weight
        self.last = v

    def raise_if_non_finite(self, ckpt_path: Path, prefix: str = "") -> None:
        """Called before every save, so no checkpoint holds weights a non-finite loss updated:
        NonFiniteLossError naming the first such step over all ranks, the rank and its terms."""
        found = self._first_bad(ckpt_path)
        if found is None:
            return
        rank, index, bad_values, saved = found
        where = f" on rank {rank}" if self.dist_info.enabled else ""
        values = ", ".join(f"{n}={v:.4g}" for n, v in zip(self.names, bad_values))
        kept = (f"the last good checkpoint is kept at {ckpt_path}" if saved
                else f"no checkpoint was written yet ({ckpt_path})")
        raise NonFiniteLossError(f"{prefix}non-finite loss at step {index + 1}{where} ({values}); {kept} "
                                 "(a lower learning rate?)")

    def _first_bad(self, ckpt_path: Path) -> tuple[int, int, list[float], bool] | None:
        """(rank, step index, terms, whether rank 0 sees `ckpt_path`) of the earliest non-finite
        step over the ranks (the lowest rank on a tie), or None: every rank's step and terms in one
        collective (rank 0, which writes the checkpoints, tells whether one exists: every rank
        says the same)."""
        saved = torch.ones(1) if self.dist_info.is_main and ckpt_path.exists() else torch.zeros(1)
        row = torch.cat([self.bad_step.reshape(1).double(), saved.to(self.bad_step.device).double(),
                         self.bad_values.double()])
        table = distributed.gather_rows(row, self.dist_info).cpu()  # [world_size, 2 + len(names)]
        bad = [(int(r[0]), rank) for rank, r in enumerate(table) if r[0] >= 0]
        if not bad:
            return None
        index, rank = min(bad)
        return rank, index, table[rank, 2:].tolist(), bool(table[0, 1])

    def means(self, steps: int) -> dict[str, float]:
        """Each term's sum over this process's `steps` (at least 1) divided by them, averaged over
        the ranks (one collective for all terms: every rank calls it at the same points)."""
        return dict(zip(self.names, distributed.all_reduce_mean(self.sums / max(steps, 1), self.dist_info).tolist()))

    def latest(self) -> dict[str, float]:
        return dict(zip(self.names, self.last.tolist()))
