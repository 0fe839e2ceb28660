"""`emae pretrain`: pre-train EMAE (or MAE: K=1, lambda=0) and export the encoder.

The loop reads top to bottom: set up -> resume if `OUT/checkpoints/last.pt` exists -> for each
step: masks, forward, backward, optimizer step, log, checkpoint -> export. Rerunning the same
command continues where a killed run stopped and ends with the same weights as an uninterrupted
run (data order, augmentation and masks are functions of the seed and the position, see
`emae.seeding`).

Learning rate: lr = blr * effective batch / 256 (batch_size x accum_iter x processes; with
`pretrain.effective_batch_size` set and accum_iter null, accum_iter is derived), i.e. the effective batch
counts *images*, not the K*images views (as in MAE, whose recipe EMAE inherits).

Output folder:
  config.yaml          the resolved config
  checkpoints/last.pt  model (with decoder), optimizer, scaler, position, config (no RNG
                       states: every draw is seeded from the seed and the position)
  log.jsonl            one line per epoch (loss parts, lr, images/s, seconds, kNN when monitored)
  steps.jsonl          per-step scalars every `log_every_steps` (also in tb/ for TensorBoard)
  encoder.safetensors  the encoder alone, timm VisionTransformer key names
  metrics.json         final figures (pretrain_seconds, final losses, ...)
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch
from timm.optim import param_groups_weight_decay
from torch.utils.data import DataLoader
from tqdm import tqdm

from emae.config import Config, add_config_arguments, config_from_args, effective_batch, save_config
from emae.data import SeededDataset, build_dataset, dataset_digest, pretrain_transform
from emae.errors import EmaeError
from emae.eval.knn import knn_monitor, monitor_datasets
from emae.flops import fit_epochs, train_flops_per_image
from emae.io import append_jsonl, read_jsonl, truncate_jsonl
from emae.masking import masked_in_both
from emae.models import EMAE, save_encoder
from emae.models.export import ENCODER_FILE
from emae.provenance import write_metrics
from emae.seeding import derive_seed, seed_everything
from emae.train import distributed
from emae.train.checkpoint import RunCheckpoint
from emae.train.common import (LossMeter, autocast, autocast_dtype, default_device, micro_batches,
                               optimizer_step, precision_name, set_deterministic, training_sampler, warmup_cosine)

log = logging.getLogger("emae.pretrain")


LOSS_TERMS = ("loss", "recon_loss", "consistency_loss")  # EMAEOutput's scalars, logged per step and epoch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, out_required=True)


def run(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    metrics = pretrain(config_from_args(args), Path(args.out))
    if metrics:
        print(json.dumps(metrics, indent=2, sort_keys=True))


def build_optimizer(model: torch.nn.Module, config: Config, lr: float) -> torch.optim.Optimizer:
    """AdamW without weight decay on norms, biases, tokens and position embeddings."""
    cfg = config.pretrain
    groups = param_groups_weight_decay(model, cfg.weight_decay, no_weight_decay_list=model.no_weight_decay())
    return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, fused=True)  # fused: CPU and CUDA


def pretrain(config: Config, out: Path,
             epoch_callback: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Pre-train into `out` (resuming from its checkpoint) and return the final metrics.

    `epoch_callback(stats)` runs on rank 0 after each epoch's checkpoint (e.g. Optuna reporting
    the kNN monitor); an exception it raises (e.g. `optuna.TrialPruned`) ends the run there.
    """
    cfg = config.pretrain
    if cfg.knn_every_epochs:
        config.section("knn")  # the monitor's params: errors now, not after the first epochs
    set_deterministic(cfg.deterministic)  # before any CUDA work
    dist_info = distributed.init_distributed()
    device = default_device()
    cfg.accum_iter, eff_batch = effective_batch(cfg, "pretrain", dist_info.world_size)
    seed_everything(derive_seed(cfg.seed, "init"))  # same initial weights on every rank

    # data: batches of (index, augmentation seed), resumable mid-epoch
    dataset = SeededDataset(build_dataset(config.data, "train", pretrain_transform(config.data)))
    sampler, steps_per_epoch = training_sampler(len(dataset), cfg, "pretrain", dist_info)
    # a budget in FLOPs or images is met in whole epochs; the schedule is stretched to them
    flops_per_image = train_flops_per_image(config.model, config.data.image_size, config.data.in_chans)
    epochs, warmup_epochs = fit_epochs(cfg.epochs, cfg.warmup_epochs, steps_per_epoch * eff_batch,
                                       flops_per_image, cfg.budget_flops, cfg.budget_images)
    cfg = cfg.model_copy(update={"epochs": epochs, "warmup_epochs": warmup_epochs})
    config = config.model_copy(update={"pretrain": cfg})
    total_steps = steps_per_epoch * cfg.epochs
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=config.data.num_workers,
                        pin_memory=device.type == "cuda", persistent_workers=False)

    # model, optimizer, schedule
    model = EMAE.from_config(config.model, config.data).to(device)
    lr = cfg.blr * eff_batch / 256
    optimizer = build_optimizer(model, config, lr)
    scheduler = warmup_cosine(optimizer, cfg, steps_per_epoch, total_steps,
                              min_lr=lr if cfg.schedule == "constant" else None)
    amp_dtype = autocast_dtype(cfg.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    # resume
    ckpt = RunCheckpoint(out / "checkpoints" / "last.pt", {"data": dataset_digest(config.data)},
                         dist_info.world_size, params={"model": config.model, "pretrain": cfg, "data": config.data},
                         precision=precision_name(amp_dtype))
    ckpt_path = ckpt.path
    state = ckpt.resume({"model": model, "optimizer": optimizer, "scaler": scaler}, "step", total_steps,
                        dist_info.is_main, check=lambda state: _check_epochs(
                            state["params"]["pretrain"]["epochs"], cfg.epochs, state["step"], steps_per_epoch,
                            ckpt_path))
    step, elapsed = state.get("step", 0), state.get("elapsed_seconds", 0.0)
    if step >= total_steps and (out / "metrics.json").exists():
        log.info("%s is complete (%d steps); nothing to do", out, total_steps)
        return json.loads((out / "metrics.json").read_text()) if dist_info.is_main else {}

    train_model: torch.nn.Module = model
    if cfg.compile:
        train_model = torch.compile(model)
    train_model = distributed.wrap_ddp(train_model, device, dist_info)

    if dist_info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(config, out / "config.yaml")
        truncate_jsonl(out / "steps.jsonl", "step", step)
        truncate_jsonl(out / "log.jsonl", "epoch", step // steps_per_epoch)
        if ckpt.restarted:  # the stale run's TensorBoard scalars would mix with this one's
            shutil.rmtree(out / "tb", ignore_errors=True)
        if (config.model.num_parts > 1 and config.model.consistency_weight > 0
                and masked_in_both(config.num_patches, config.model.mask_ratio) == 0):
            log.warning("K=%d at mask_ratio=%g: no patch is masked in two parts, so the consistency term "
                        "is empty and model.consistency_weight has no effect", config.model.num_parts,
                        config.model.mask_ratio)
        log.info("pre-training %s: K=%d mask_ratio=%.2f lambda=%g, %d steps of %d images (lr %.3g), "
                 "%d epochs = %.3g FLOPs, %s lr after %g warm-up epochs", out, config.model.num_parts,
                 config.model.mask_ratio, config.model.consistency_weight, total_steps, eff_batch, lr,
                 cfg.epochs, total_steps * eff_batch * flops_per_image, cfg.schedule, cfg.warmup_epochs)
    writer = _tensorboard(out) if dist_info.is_main else None

    # the loop
    mask_generator = torch.Generator(device=device)
    start_epoch = step // steps_per_epoch
    epoch_stats: dict[str, float] = {}
    monitor_sets = None  # the kNN monitor's data, built at its first pass
    for epoch in range(start_epoch, cfg.epochs):
        first_step = epoch * steps_per_epoch
        sampler.set_position(epoch, (step - first_step) * cfg.accum_iter)
        epoch_start, epoch_images, epoch_start_step = time.perf_counter(), 0, step
        meter = LossMeter(list(LOSS_TERMS), device, dist_info)
        progress = tqdm(total=steps_per_epoch, initial=step - first_step, disable=not dist_info.is_main,
                        desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step", dynamic_ncols=True)
        for micro, last_micro, batch in micro_batches(loader, cfg.accum_iter, train_model, dist_info):
            imgs = batch[0].to(device, non_blocking=True)
            scheduler.step_update(step)
            mask_generator.manual_seed(derive_seed(cfg.seed, "mask", step, micro, dist_info.rank))
            with autocast(device, amp_dtype):
                output = train_model(imgs, generator=mask_generator)
            meter.add(step, [getattr(output, k) for k in LOSS_TERMS], 1 / cfg.accum_iter)
            scaler.scale(output.loss / cfg.accum_iter).backward()
            epoch_images += imgs.shape[0] * dist_info.world_size
            if not last_micro:
                continue
            optimizer_step(model, optimizer, scaler, cfg.clip_grad)
            step += 1
            progress.update(1)
            log_now, save_now = step % cfg.log_every_steps == 0, step % cfg.checkpoint_every_steps == 0
            if log_now or save_now:  # every rank: a collective, so all ranks raise together
                meter.raise_if_non_finite(ckpt_path)
            if log_now and dist_info.is_main:
                scalars = meter.latest() | {"lr": optimizer.param_groups[0]["lr"]}
                _log_step(out, writer, step, scalars)
                progress.set_postfix(loss=f"{scalars['loss']:.4f}", lr=f"{scalars['lr']:.2e}")
            if save_now:
                elapsed_now = elapsed + time.perf_counter() - epoch_start
                _save(ckpt, model, optimizer, scaler, config, step, elapsed_now, dist_info)
        progress.close()
        epoch_seconds = time.perf_counter() - epoch_start
        elapsed += epoch_seconds
        steps_run = max(step - epoch_start_step, 1)  # steps this process ran in this epoch
        meter.raise_if_non_finite(ckpt_path)
        epoch_stats = meter.means(steps_run)
        epoch_stats |= {"epoch": epoch + 1, "step": step, "lr": optimizer.param_groups[0]["lr"],
                        "images_per_s": epoch_images / epoch_seconds, "epoch_seconds": epoch_seconds,
                        "pretrain_seconds": elapsed, "flops": step * eff_batch * flops_per_image}
        if cfg.knn_every_epochs and ((epoch + 1) % cfg.knn_every_epochs == 0 or epoch + 1 == cfg.epochs):
            monitor_sets = monitor_sets or monitor_datasets(config)
            epoch_stats |= knn_monitor(model.encoder, config, device, dist_info, monitor_sets)
        if dist_info.is_main:
            append_jsonl(out / "log.jsonl", epoch_stats)
            if writer is not None:
                for k, v in epoch_stats.items():
                    writer.add_scalar(f"epoch/{k}", v, epoch + 1)
        # end of epoch: save again (the timing and log line are now complete)
        _save(ckpt, model, optimizer, scaler, config, step, elapsed, dist_info)
        if epoch_callback is not None and dist_info.is_main:
            epoch_callback(epoch_stats)

    metrics: dict[str, Any] = {}
    if not epoch_stats:  # killed after the last checkpoint: the last epoch's line has the figures
        epoch_stats = (read_jsonl(out / "log.jsonl") or [{}])[-1]
    if dist_info.is_main:
        save_encoder(model, out / ENCODER_FILE)
        metrics = {"epochs": cfg.epochs, "steps": step, "pretrain_seconds": elapsed,
                   "final_loss": epoch_stats.get("loss"), "final_recon_loss": epoch_stats.get("recon_loss"),
                   "final_consistency_loss": epoch_stats.get("consistency_loss"),
                   "num_parts": config.model.num_parts, "mask_ratio": config.model.mask_ratio,
                   "consistency_weight": config.model.consistency_weight,
                   "effective_batch_size": eff_batch, "lr": lr, "world_size": dist_info.world_size,
                   "flops_per_image": flops_per_image, "images_seen": step * eff_batch,
                   "pretrain_flops": step * eff_batch * flops_per_image,
                   "budget_flops": cfg.budget_flops, "budget_images": cfg.budget_images}
        for key in ("knn_top1", "knn_top5"):
            if key in epoch_stats:
                metrics[key] = epoch_stats[key]
        metrics = write_metrics(out / "metrics.json", metrics, ckpt.inputs, dist_info.world_size,
                                precision_name(amp_dtype))
        if writer is not None:
            writer.close()
    distributed.barrier(dist_info)
    distributed.cleanup(dist_info)
    return metrics


# ---------------------------------------------------------------------------------- helpers


def _save(ckpt: RunCheckpoint, model: EMAE, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
          config: Config, step: int, elapsed: float, dist_info: distributed.DistInfo) -> None:
    # no RNG states: every random draw is seeded from (seed, step, ...) by derive_seed
    ckpt.save({
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(), "step": step, "elapsed_seconds": elapsed,
        "config": config.to_dict(),
    }, dist_info)


def _check_epochs(before: int, epochs: int, step: int, steps_per_epoch: int, path: Path) -> None:
    """More `pretrain.epochs` extend a run (the cosine schedule is laid over the new total from here
    on, a warm restart: logged); fewer than the checkpoint has trained are refused."""
    if epochs < before and step > steps_per_epoch * epochs:
        raise EmaeError(f"{path} was written with other params; use another --out or move it away. "
                        f"Changed: pretrain.epochs: {before} -> {epochs} (the checkpoint has trained "
                        f"{step / steps_per_epoch:g} epochs)")
    if epochs != before:
        log.warning("pretrain.epochs %s -> %s: the lr schedule is laid over %s epochs from step %d on "
                    "(a finished run restarts from a higher lr)", before, epochs, epochs, step)


def _tensorboard(out: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dependency, but a minimal GPU image may lack it
        log.warning("tensorboard is not installed: per-step scalars go to steps.jsonl only")
        return None
    return SummaryWriter(str(out / "tb"))


def _log_step(out: Path, writer: Any, step: int, scalars: dict[str, float]) -> None:
    append_jsonl(out / "steps.jsonl", {"step": step, **scalars})
    if writer is not None:
        for k, v in scalars.items():
            writer.add_scalar(f"train/{k}", v, step)
