"""`emae finetune`: end-to-end fine-tuning of a pre-trained encoder, MAE's / BEiT's recipe via timm.

- model: timm VisionTransformer initialised from the encoder export (every encoder key must
  load; only the new head may be missing), drop path, head weights N(0, 2e-5) as in MAE;
- optimizer: AdamW with layer-wise lr decay (`timm.optim.create_optimizer_v2(layer_decay=...)`,
  which puts an `lr_scale` on each layer's group; timm's scheduler multiplies it in at every
  update), no weight decay on norms, biases, tokens and positions;
- lr = blr * batch_size * accum_iter * world_size / 256, warmup then half-cycle cosine per step;
- data: `timm.data.create_transform` (RandomResizedCrop, RandAugment, random erasing), Mixup /
  CutMix with label smoothing (`timm.data.Mixup` + `SoftTargetCrossEntropy`);
- autocast, gradient accumulation, DDP, top-1/top-5 on the val split.

Exact resume: batch order and per-image augmentation come from ResumableBatchSampler +
SeededDataset; before every micro-batch all RNGs are reseeded from (seed, step, micro-batch,
rank), so Mixup/CutMix and drop path draw what an uninterrupted run draws. Rerunning the command
continues from `checkpoints/last.pt` (atomic) and ends with the same weights.

Output folder: metrics.json {top1, top5 (percent, val, last epoch), best_top1, val_loss, epochs,
steps, lr, effective_batch_size, finetune_seconds, world_size, checkpoint}, log.jsonl (per epoch),
checkpoints/last.pt {model, optimizer, scaler, step, elapsed_seconds} (no RNG states: every
draw is reseeded from the seed and the position).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from timm.data import Mixup, create_transform
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models.vision_transformer import VisionTransformer
from timm.optim import create_optimizer_v2
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from emae.config import Config, effective_batch
from emae.data import SeededDataset, build_dataset, dataset_digest, eval_transform
from emae.eval.config import FinetuneConfig
from emae.eval.features import (add_encoder_evaluation_arguments, build_encoder, run_encoder_evaluation,
                                topk_correct)
from emae.io import append_jsonl, read_jsonl, truncate_jsonl
from emae.provenance import encoder_digest, write_metrics
from emae.seeding import derive_seed, seed_everything
from emae.train import distributed
from emae.train.checkpoint import RunCheckpoint
from emae.train.common import (LossMeter, autocast, autocast_dtype, default_device, micro_batches,
                               optimizer_step, precision_name, training_sampler, warmup_cosine)

log = logging.getLogger("emae.finetune")
POSTFIX_SECONDS = 1.0  # the progress bar's loss is refreshed at most this often (a host sync)


def train_transform(config: Config, cfg: FinetuneConfig) -> Any:
    data = config.data
    return create_transform(
        input_size=data.image_size, is_training=True, scale=(cfg.crop_scale_min, 1.0),
        hflip=0.5 if data.hflip else 0.0, color_jitter=None, auto_augment=cfg.rand_augment,
        interpolation="bicubic", re_prob=cfg.reprob, re_mode="pixel", re_count=1,
        mean=tuple(data.mean), std=tuple(data.std))


def build_model(config: Config, checkpoint: Path, random_init: bool = False) -> VisionTransformer:
    """timm ViT with a `data.num_classes` head, initialised from the export (all encoder keys), or
    with `random_init` as pre-training starts: training from scratch with the same recipe."""
    cfg: FinetuneConfig = config.section("finetune")
    model = build_encoder(checkpoint, config.data, random_init=random_init, seed=cfg.seed,
                          num_classes=config.data.num_classes,
                          global_pool=cfg.global_pool, fc_norm=False, drop_path_rate=cfg.drop_path)
    nn.init.trunc_normal_(model.head.weight, std=2e-5)  # MAE: a near-zero head at the start
    nn.init.zeros_(model.head.bias)
    return model


def build_optimizer(model: nn.Module, cfg: FinetuneConfig, lr: float) -> torch.optim.Optimizer:
    return create_optimizer_v2(model, opt="adamw", lr=lr, weight_decay=cfg.weight_decay,
                               layer_decay=cfg.layer_decay, betas=cfg.betas)


def build_criterion(cfg: FinetuneConfig) -> nn.Module:
    if cfg.mixing:
        return SoftTargetCrossEntropy()  # Mixup already smooths the targets
    if cfg.label_smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=cfg.label_smoothing)
    return nn.CrossEntropyLoss()


# ----------------------------------------------------------------------------------- command


add_arguments = add_encoder_evaluation_arguments


def run(args: argparse.Namespace) -> None:
    run_encoder_evaluation(finetune, args)


def finetune(config: Config, checkpoint: Path, out: Path, random_init: bool = False) -> dict[str, Any]:
    cfg: FinetuneConfig = config.section("finetune")
    # every input error before any heavy work: params, data, checkpoint
    train_set = SeededDataset(build_dataset(config.data, "train", train_transform(config, cfg)))
    val_set = build_dataset(config.data, "val", eval_transform(config.data))
    model = build_model(config, checkpoint, random_init)

    dist_info = distributed.init_distributed()
    device = default_device()
    cfg.accum_iter, eff_batch = effective_batch(cfg, "finetune", dist_info.world_size)
    sampler, steps_per_epoch = training_sampler(len(train_set), cfg, "finetune", dist_info)
    total_steps = steps_per_epoch * cfg.epochs
    loader = DataLoader(train_set, batch_sampler=sampler, num_workers=config.data.num_workers,
                        pin_memory=device.type == "cuda")

    model.to(device)
    lr = cfg.blr * eff_batch / 256
    optimizer = build_optimizer(model, cfg, lr)
    scheduler = warmup_cosine(optimizer, cfg, steps_per_epoch, total_steps)
    amp = autocast_dtype(cfg.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                  switch_prob=cfg.mixup_switch_prob, mode="batch", label_smoothing=cfg.label_smoothing,
                  num_classes=config.data.num_classes) if cfg.mixing else None
    criterion = build_criterion(cfg)

    # resume
    ckpt = RunCheckpoint(out / "checkpoints" / "last.pt",
                         {"encoder": encoder_digest(checkpoint, random_init), "data": dataset_digest(config.data)},
                         dist_info.world_size, params={"finetune": cfg, "data": config.data},
                         precision=precision_name(amp))
    ckpt_path = ckpt.path
    state = ckpt.resume({"model": model, "optimizer": optimizer, "scaler": scaler}, "step", total_steps,
                        dist_info.is_main)
    step, elapsed = state.get("step", 0), state.get("elapsed_seconds", 0.0)
    if step >= total_steps and (out / "metrics.json").exists():
        log.info("%s is complete (%d steps); nothing to do", out, total_steps)
        return json.loads((out / "metrics.json").read_text()) if dist_info.is_main else {}
    if dist_info.is_main:
        truncate_jsonl(out / "log.jsonl", "epoch", step // steps_per_epoch)
        log.info("fine-tuning %s: %d steps of %d images, lr %.3g, layer decay %g", checkpoint,
                 total_steps, eff_batch, lr, cfg.layer_decay)
    train_model = distributed.wrap_ddp(model, device, dist_info)

    def save(elapsed_now: float, meter: LossMeter) -> None:
        meter.raise_if_non_finite(ckpt_path)
        ckpt.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                   "scaler": scaler.state_dict(), "step": step, "elapsed_seconds": elapsed_now}, dist_info)

    result: dict[str, float] = {}
    for epoch in range(step // steps_per_epoch, cfg.epochs):
        first_step = epoch * steps_per_epoch
        sampler.set_position(epoch, (step - first_step) * cfg.accum_iter)
        model.train()
        epoch_start, images, loss_steps = time.perf_counter(), 0, 0
        meter, shown_at = LossMeter(["loss"], device, dist_info), epoch_start
        progress = tqdm(total=steps_per_epoch, initial=step - first_step, unit="step",
                        desc=f"finetune epoch {epoch + 1}/{cfg.epochs}", disable=not dist_info.is_main,
                        dynamic_ncols=True)
        for micro, last_micro, (imgs, targets) in micro_batches(loader, cfg.accum_iter, train_model, dist_info):
            scheduler.step_update(step)
            # Mixup/CutMix (numpy) and drop path (torch) draw from the global RNGs: make them a
            # function of the position so a resumed run draws the same
            seed_everything(derive_seed(cfg.seed, "finetune", step, micro, dist_info.rank))
            imgs, targets = imgs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            if mixup is not None:
                imgs, targets = mixup(imgs, targets)
            with autocast(device, amp):
                loss = criterion(train_model(imgs), targets)
            meter.add(step, [loss], 1 / cfg.accum_iter)
            scaler.scale(loss / cfg.accum_iter).backward()
            images += imgs.shape[0] * dist_info.world_size
            if not last_micro:
                continue
            optimizer_step(model, optimizer, scaler, cfg.clip_grad)
            step += 1
            loss_steps += 1
            progress.update(1)
            if time.perf_counter() - shown_at > POSTFIX_SECONDS:  # reading the loss waits for the device
                shown_at = time.perf_counter()
                progress.set_postfix(loss=f"{meter.latest()['loss']:.4f}",
                                     lr=f"{optimizer.param_groups[-1]['lr']:.2e}")
            if step % cfg.checkpoint_every_steps == 0:
                save(elapsed + time.perf_counter() - epoch_start, meter)
        progress.close()
        epoch_seconds = time.perf_counter() - epoch_start
        elapsed += epoch_seconds
        meter.raise_if_non_finite(ckpt_path)
        record: dict[str, Any] = {
            "epoch": epoch + 1, "step": step, "lr": max(g["lr"] for g in optimizer.param_groups),
            "loss": meter.means(loss_steps)["loss"],
            "epoch_seconds": epoch_seconds, "images_per_s": images / epoch_seconds}
        if (epoch + 1) % cfg.eval_every_epochs == 0 or epoch + 1 == cfg.epochs:
            result = evaluate(model, val_set, cfg.batch_size, config.data.num_workers, device,
                              dist_info, amp)
            record |= result
        if dist_info.is_main:
            append_jsonl(out / "log.jsonl", record)
        save(elapsed, meter)

    if not result:  # resumed after the last step but before metrics.json was written
        result = evaluate(model, val_set, cfg.batch_size, config.data.num_workers, device, dist_info, amp)
    metrics: dict[str, Any] = {}
    if dist_info.is_main:
        logged = read_jsonl(out / "log.jsonl")
        metrics = {**result, "best_top1": max([result["top1"], *(r["top1"] for r in logged if "top1" in r)]),
                   "epochs": cfg.epochs, "steps": step, "lr": lr, "effective_batch_size": eff_batch,
                   "finetune_seconds": elapsed, "world_size": dist_info.world_size,
                   "checkpoint": str(checkpoint), "random_init": random_init}
        metrics = write_metrics(out / "metrics.json", metrics, ckpt.inputs, dist_info.world_size,
                                precision_name(amp))
        log.info("fine-tuned: top-1 %.2f%%, top-5 %.2f%% -> %s", metrics["top1"], metrics["top5"],
                 out / "metrics.json")
    distributed.barrier(dist_info)
    distributed.cleanup(dist_info)
    return metrics


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Any, batch_size: int, num_workers: int, device: torch.device,
             dist_info: distributed.DistInfo, amp: torch.dtype | None) -> dict[str, float]:
    """top1 / top5 (percent) and mean cross-entropy on `dataset`; ranks split it, counts are summed."""
    was_training = model.training
    model.eval()
    local = Subset(dataset, range(dist_info.rank, len(dataset), dist_info.world_size))
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # top1, top5, loss sum, count
    for imgs, labels in tqdm(DataLoader(local, batch_size=batch_size, num_workers=num_workers),
                             desc="val", unit="batch", leave=False, disable=not dist_info.is_main):
        imgs, labels = imgs.to(device), labels.to(device)
        with autocast(device, amp):
            logits = model(imgs).float()
        correct = topk_correct(logits, labels)
        totals += torch.tensor([correct[1], correct[5],
                                float(nn.functional.cross_entropy(logits, labels, reduction="sum")),
                                len(labels)], dtype=torch.float64, device=device)
    if dist_info.enabled:
        torch.distributed.all_reduce(totals)
    model.train(was_training)
    n = max(float(totals[3]), 1.0)
    return {"top1": 100.0 * float(totals[0]) / n, "top5": 100.0 * float(totals[1]) / n,
            "val_loss": float(totals[2]) / n}
