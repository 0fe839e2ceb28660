"""The training loop both dense stages share: AdamW with timm's layer-wise lr decay, an
iteration schedule (timm: warmup + cosine or multi-step), atomic checkpoints and exact resume.

Resume is exact because nothing random depends on how far a process got: the data order and
each sample's augmentation come from (seed, epoch, index) (`ResumableBatchSampler`,
`SeededDataset`), and the global RNG (proposal sampling, multi-scale choice, dropout, drop path)
is reseeded from (seed, iteration, batch, rank) before every batch. Several ranks: DDP, each rank
its share of every step's images; gradient accumulation over `accum_iter` batches.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
from timm.optim import param_groups_layer_decay
from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from emae.config import effective_batch
from emae.data import SeededDataset
from emae.io import append_jsonl, truncate_jsonl
from emae.seeding import derive_seed
from emae.train.checkpoint import RunCheckpoint
from emae.train import distributed
from emae.train.common import (LossMeter, autocast, autocast_dtype, micro_batches, optimizer_step, precision_name,
                               training_sampler)

log = logging.getLogger("emae.dense")

StepFn = Callable[[torch.nn.Module, Any], dict[str, torch.Tensor]]


def build_optimizer(model: torch.nn.Module, cfg: Any, no_weight_decay: list[str]
                    ) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW over timm's layer-decay groups (`model.group_matcher`) and the lr schedule."""
    groups = param_groups_layer_decay(model, cfg.weight_decay, no_weight_decay_list=no_weight_decay,
                                      layer_decay=cfg.backbone.layer_decay)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)
    common = dict(warmup_t=cfg.warmup_iters, warmup_lr_init=cfg.lr * 1e-3, warmup_prefix=True,
                  t_in_epochs=False)
    if cfg.schedule == "cosine":
        scheduler = CosineLRScheduler(optimizer, t_initial=cfg.iterations - cfg.warmup_iters,
                                      lr_min=cfg.min_lr, **common)
    else:  # milestones count from the start, as in ViTDet / detectron2
        decay_t = [max(int(m * cfg.iterations) - cfg.warmup_iters, 1) for m in cfg.milestones]
        scheduler = MultiStepLRScheduler(optimizer, decay_t=decay_t, decay_rate=cfg.decay_rate, **common)
    return optimizer, scheduler


def fit(model: torch.nn.Module, train_set: Dataset, collate: Callable, step_fn: StepFn, cfg: Any,
        section: str, out: Path, inputs: dict[str, str], no_weight_decay: list[str],
        device: torch.device, dist_info: distributed.DistInfo) -> dict[str, Any]:
    """Train `model` for cfg.iterations optimizer steps into `out` (resuming from
    out/checkpoints/last.pt when it was made from the same `inputs`: digests of the backbone's
    start and of the data). Each
    step takes cfg.accum_iter batches of cfg.batch_size images on every rank (DDP when there are
    several). Returns {"train_seconds", "final_loss"}; the model holds the final weights on every
    rank."""
    cfg.accum_iter, _ = effective_batch(cfg, section, dist_info.world_size)
    optimizer, scheduler = build_optimizer(model, cfg, no_weight_decay)
    amp_dtype = autocast_dtype(cfg.amp, device)
    ckpt = RunCheckpoint(out / "checkpoints" / "last.pt", inputs, dist_info.world_size,
                         params={section: cfg}, precision=precision_name(amp_dtype))
    ckpt_path = ckpt.path
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    state = ckpt.resume({"model": model, "optimizer": optimizer, "scaler": scaler}, "iteration", cfg.iterations,
                        dist_info.is_main, finished=lambda state: state["iteration"] >= cfg.iterations)
    iteration, elapsed = state.get("iteration", 0), state.get("elapsed_seconds", 0.0)
    last_loss = state.get("loss", math.nan)
    if iteration >= cfg.iterations:
        return {"train_seconds": elapsed, "final_loss": last_loss}

    sampler, per_epoch = training_sampler(len(train_set), cfg, section, dist_info)
    loader = DataLoader(SeededDataset(train_set), batch_sampler=sampler, collate_fn=collate,
                        num_workers=cfg.num_workers)
    if dist_info.is_main:
        truncate_jsonl(out / "log.jsonl", "iteration", iteration)
    train_model = distributed.wrap_ddp(model, device, dist_info)
    model.train()
    progress = tqdm(total=cfg.iterations, initial=iteration, desc=section, unit="it", dynamic_ncols=True,
                    disable=not dist_info.is_main)
    start = time.perf_counter()
    meter, metered_steps = None, 0  # meter: loss sums since the last log line, on the device
    while iteration < cfg.iterations:
        sampler.set_position(iteration // per_epoch, (iteration % per_epoch) * cfg.accum_iter)
        for micro, last_micro, batch in micro_batches(loader, cfg.accum_iter, train_model, dist_info):
            # proposal sampling, multi-scale choice, dropout, drop path: from (seed, step, batch, rank)
            torch.manual_seed(derive_seed(cfg.seed, "step", iteration, micro, dist_info.rank))
            scheduler.step_update(iteration)
            with autocast(device, amp_dtype):
                losses = step_fn(train_model, batch)
            loss = sum(losses.values())
            meter = meter or LossMeter(["loss", *losses], device, dist_info)
            meter.add(iteration, [loss, *losses.values()], 1 / cfg.accum_iter)
            scaler.scale(loss / cfg.accum_iter).backward()
            if not last_micro:
                continue
            optimizer_step(model, optimizer, scaler, cfg.clip_grad)
            iteration, metered_steps = iteration + 1, metered_steps + 1
            progress.update(1)
            log_now = iteration % cfg.log_every == 0 or iteration == cfg.iterations
            if log_now or iteration % cfg.checkpoint_every == 0:  # before every save
                meter.raise_if_non_finite(ckpt_path, f"{section}: ")
            if log_now:  # the mean over the steps since the last line
                step_losses = meter.means(metered_steps)
                meter, metered_steps = None, 0
                last_loss = step_losses["loss"]
                if dist_info.is_main:
                    append_jsonl(out / "log.jsonl", {"iteration": iteration, "lr": _top_lr(optimizer),
                                                      **step_losses})
                progress.set_postfix(loss=f"{last_loss:.3f}")
            if iteration % cfg.checkpoint_every == 0 or iteration == cfg.iterations:
                now = elapsed + time.perf_counter() - start
                ckpt.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                           "scaler": scaler.state_dict(), "iteration": iteration,
                           "elapsed_seconds": now, "loss": last_loss}, dist_info)
            if iteration >= cfg.iterations:
                break
    progress.close()
    if dist_info.enabled:  # DDP leaves each rank with its own BatchNorm statistics: use rank 0's,
        for buffer in model.buffers():  # which the checkpoint has, so every rank evaluates one model
            torch.distributed.broadcast(buffer, src=0)
    return {"train_seconds": elapsed + time.perf_counter() - start, "final_loss": last_loss}


def _top_lr(optimizer: torch.optim.Optimizer) -> float:
    return max(group["lr"] for group in optimizer.param_groups)
