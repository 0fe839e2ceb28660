"""`emae linprobe`: linear probe of a frozen encoder, MAE's protocol (main_linprobe.py).

The encoder is frozen (eval mode, no gradients); the head is BatchNorm1d(affine=False, eps=1e-6)
followed by a Linear layer (weights N(0, 0.01)) on the class-token feature, trained with LARS
(timm.optim.Lars; trust ratio on the weight matrix only, as MAE's LARS), lr = blr * batch_size *
accum_iter * world_size / 256, warmup then half-cycle cosine per iteration, no weight decay.

With `linprobe.augment: false` the features of both splits are computed once and the head trains
on the cached tensors (seconds); with `true`, training images get MAE's RandomResizedCrop + flip
and pass the encoder every step. Checkpoints (`checkpoints/last.pt`, atomic) hold the head only;
rerunning resumes exactly (batch order and augmentation are functions of seed and position).

Output folder: metrics.json {top1, top5 (percent, val, last epoch), best_top1, epochs, steps,
lr, feature_dim, num_train, num_val, augment, random_init, checkpoint, seconds}, log.jsonl (per
epoch: epoch, step, loss, lr, top1, top5), checkpoints/last.pt.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn
from timm.optim import Lars
from torch.utils.data import DataLoader
from tqdm import tqdm

from emae.config import Config, effective_batch
from emae.data import (ResumableBatchSampler, SeededDataset, build_dataset, dataset_digest, eval_transform,
                       pretrain_transform)
from emae.eval.config import LinprobeConfig
from emae.eval.features import (accuracy, add_encoder_evaluation_arguments, build_encoder, extract_features,
                                pooled, run_encoder_evaluation)
from emae.io import append_jsonl, read_jsonl, truncate_jsonl
from emae.provenance import encoder_digest, write_metrics
from emae.seeding import derive_seed, seed_everything
from emae.train import distributed
from emae.train.checkpoint import RunCheckpoint
from emae.train.common import (LossMeter, autocast, autocast_dtype, default_device, micro_batches, precision_name,
                               training_sampler, warmup_cosine)

log = logging.getLogger("emae.linprobe")


class ProbeHead(nn.Sequential):
    """MAE's probe: BatchNorm1d without affine parameters, then a linear classifier."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
        nn.init.trunc_normal_(self[1].weight, std=0.01)
        nn.init.zeros_(self[1].bias)


def build_lars(head: nn.Module, lr: float, cfg: LinprobeConfig) -> Lars:
    """LARS adapting only matrices (MAE's LARS skips biases and norms)."""
    matrices = [p for p in head.parameters() if p.ndim > 1]
    vectors = [p for p in head.parameters() if p.ndim <= 1]
    return Lars([{"params": matrices, "always_adapt": True, "weight_decay": cfg.weight_decay},
                 {"params": vectors, "always_adapt": False, "weight_decay": 0.0}],
                lr=lr, momentum=cfg.momentum)


# ----------------------------------------------------------------------------------- command


add_arguments = add_encoder_evaluation_arguments


def run(args: argparse.Namespace) -> None:
    run_encoder_evaluation(evaluate_linprobe, args)


def evaluate_linprobe(config: Config, checkpoint: Path, out: Path, random_init: bool = False
                      ) -> dict[str, Any]:
    cfg: LinprobeConfig = config.section("linprobe")
    train_tf = pretrain_transform(config.data, cfg.crop_scale_min) if cfg.augment else eval_transform(config.data)
    train_set = build_dataset(config.data, "train", train_tf)
    val_set = build_dataset(config.data, "val", eval_transform(config.data))
    encoder = build_encoder(checkpoint, config.data, random_init=random_init, seed=cfg.seed)
    inputs = {"encoder": encoder_digest(checkpoint, random_init), "data": dataset_digest(config.data)}
    metrics = linear_probe(encoder, config, out, train_set, val_set, inputs)
    if metrics:
        metrics |= {"random_init": random_init, "checkpoint": str(checkpoint)}
        metrics = write_metrics(out / "metrics.json", metrics, inputs, metrics["world_size"],
                                metrics.pop("precision"))  # kept once, in the provenance
    return metrics


def linear_probe(encoder: nn.Module, config: Config, out: Path, train_set: Any, val_set: Any,
                 inputs: dict[str, str]) -> dict[str, Any]:
    """Train a probe on the frozen `encoder` (left unchanged; `inputs`: its and the data's
    digests, which a checkpoint must match to be resumed); metrics on rank 0, {} elsewhere."""
    cfg: LinprobeConfig = config.section("linprobe")
    dist_info = distributed.init_distributed()
    device = default_device()
    amp = autocast_dtype(cfg.amp, device)
    start = time.perf_counter()
    encoder.requires_grad_(False)
    encoder.eval().to(device)

    # features: val always cached; train cached unless augmented
    common = dict(batch_size=cfg.batch_size, num_workers=config.data.num_workers, device=device,
                  dist_info=dist_info, amp_dtype=amp, pool=cfg.pool)
    val_feats, val_labels = extract_features(encoder, val_set, desc="val features", **common)
    cached = None if cfg.augment else extract_features(encoder, train_set, desc="train features", **common)

    cfg.accum_iter, eff_batch = effective_batch(cfg, "linprobe", dist_info.world_size)
    sampler, steps_per_epoch = training_sampler(len(train_set), cfg, "linprobe", dist_info)
    total_steps = steps_per_epoch * cfg.epochs
    lr = cfg.blr * eff_batch / 256

    seed_everything(derive_seed(cfg.seed, "probe head"))  # same head on every rank and every rerun
    head = ProbeHead(val_feats.shape[1], config.data.num_classes).to(device)
    optimizer = build_lars(head, lr, cfg)
    scheduler = warmup_cosine(optimizer, cfg, steps_per_epoch, total_steps)
    ckpt = RunCheckpoint(out / "checkpoints" / "last.pt", inputs, dist_info.world_size,
                         params={"linprobe": cfg, "data": config.data}, precision=precision_name(amp))
    ckpt_path = ckpt.path
    step = ckpt.resume({"head": head, "optimizer": optimizer}, "step", total_steps, dist_info.is_main).get("step", 0)
    if dist_info.is_main:
        truncate_jsonl(out / "log.jsonl", "epoch", step // steps_per_epoch)

    train_head = distributed.wrap_ddp(head, device, dist_info)
    loader = DataLoader(SeededDataset(train_set), batch_sampler=sampler,
                        num_workers=config.data.num_workers) if cached is None else None
    criterion = nn.CrossEntropyLoss()

    def save(meter: LossMeter) -> None:
        meter.raise_if_non_finite(ckpt_path)  # every rank: all raise together, no bad head saved
        ckpt.save({"head": head.state_dict(), "optimizer": optimizer.state_dict(), "step": step}, dist_info)

    record: dict[str, Any] = {}
    best = 0.0
    # on cached features every op is tiny: CPU threads would only wait for each other
    threads = torch.get_num_threads()
    if cached is not None and device.type == "cpu":
        torch.set_num_threads(1)
    for epoch in range(step // steps_per_epoch, cfg.epochs):
        sampler.set_position(epoch, (step - epoch * steps_per_epoch) * cfg.accum_iter)
        head.train()
        meter, steps_run = LossMeter(["loss"], device, dist_info), 0
        batches = _batches(sampler, cached) if cached is not None else loader
        progress = tqdm(batches, total=(steps_per_epoch - (step - epoch * steps_per_epoch)) * cfg.accum_iter,
                        desc=f"probe epoch {epoch + 1}/{cfg.epochs}", unit="batch", leave=False,
                        disable=not dist_info.is_main, dynamic_ncols=True)
        for _, last_micro, (x, y) in micro_batches(progress, cfg.accum_iter, train_head, dist_info):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if cached is None:
                with torch.no_grad(), autocast(device, amp):
                    x = pooled(encoder, x, cfg.pool)  # [B, D], frozen
            scheduler.step_update(step)
            loss = criterion(train_head(x.float()), y)
            meter.add(step, [loss], 1 / cfg.accum_iter)
            (loss / cfg.accum_iter).backward()  # gradients of the step's accum_iter batches add up
            if not last_micro:
                continue
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step, steps_run = step + 1, steps_run + 1
            if step % cfg.checkpoint_every_steps == 0:
                save(meter)
        meter.raise_if_non_finite(ckpt_path)
        result = _evaluate(head, val_feats, val_labels, device)
        best = max(best, result["top1"])
        record = {"epoch": epoch + 1, "step": step, "lr": optimizer.param_groups[0]["lr"],
                  "loss": meter.means(steps_run)["loss"],
                  **result}
        if dist_info.is_main:
            append_jsonl(out / "log.jsonl", record)
        save(meter)

    torch.set_num_threads(threads)
    if not record:  # complete already: evaluate the saved head
        record = _evaluate(head, val_feats, val_labels, device)
    best = max([best, *(r["top1"] for r in read_jsonl(out / "log.jsonl"))])
    metrics = {"top1": record["top1"], "top5": record["top5"], "best_top1": best,
               "epochs": cfg.epochs, "steps": step, "lr": lr, "feature_dim": int(val_feats.shape[1]),
               "num_train": len(train_set), "num_val": len(val_set), "augment": cfg.augment, "pool": cfg.pool,
               "effective_batch_size": eff_batch, "accum_iter": cfg.accum_iter,
               "world_size": dist_info.world_size, "precision": precision_name(amp),
               "seconds": time.perf_counter() - start}
    distributed.barrier(dist_info)
    distributed.cleanup(dist_info)
    return metrics if dist_info.is_main else {}


def _batches(sampler: ResumableBatchSampler, cached: tuple[torch.Tensor, torch.Tensor]
             ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of cached features in the sampler's order (no augmentation, so seeds are unused)."""
    feats, labels = cached
    for batch in sampler:
        index = torch.tensor([i for i, _ in batch])
        yield feats[index], labels[index]


@torch.no_grad()
def _evaluate(head: nn.Module, feats: torch.Tensor, labels: torch.Tensor, device: torch.device
              ) -> dict[str, float]:
    head.eval()
    scores = torch.cat([head(feats[i : i + 4096].to(device)).float().cpu()
                        for i in range(0, len(feats), 4096)])
    return accuracy(scores, labels)
