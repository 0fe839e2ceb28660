"""`emae segment`: semantic segmentation with a UperNet-style head (pyramid pooling on the
coarsest level + FPN fusion, Xiao et al. 2018, as in BEiT/MAE's ADE20K transfer) on the
ViTDet-style adapter, trained on an ADE20K-layout set and scored by mIoU and pixel accuracy.

Output folder:
  config.yaml          the resolved params
  checkpoints/last.pt  model, optimizer, iteration, settings (atomic; a rerun continues)
  log.jsonl            loss and lr every segment.log_every iterations
  metrics.json         seg_miou, seg_pixel_acc (percent), seg_iou_per_class, ...

mIoU is the mean over classes with any ground truth or prediction in the val set (as mmseg's
nanmean); evaluation runs on the whole image with its short side resized to crop_size and the
logits resized back to the label's size (no sliding window, no auxiliary FCN head).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from torchvision.ops.misc import Conv2dNormActivation
from tqdm import tqdm

from emae.config import Config, save_config
from emae.dense.backbone import ViTDetBackbone, build_backbone, no_weight_decay, vit_group_matcher
from emae.dense.data import SemanticSegmentation, list_collate, pad_batch
from emae.dense.engine import fit
from emae.eval.features import add_encoder_evaluation_arguments, run_encoder_evaluation
from emae.provenance import encoder_digest, tree_digest, write_metrics
from emae.seeding import derive_seed, seed_everything
from emae.train import distributed
from emae.train.common import default_device

log = logging.getLogger("emae.segment")


add_arguments = add_encoder_evaluation_arguments


def run(args: argparse.Namespace) -> None:
    run_encoder_evaluation(segment, args, hidden=("seg_iou_per_class",))


def _conv(cin: int, cout: int, kernel: int) -> Conv2dNormActivation:
    return Conv2dNormActivation(cin, cout, kernel, norm_layer=nn.BatchNorm2d, activation_layer=nn.ReLU)


class UperNetHead(nn.Module):
    """levels: [B, C, h_i, w_i], fine to coarse -> logits [B, classes, h_0, w_0]."""

    def __init__(self, in_channels: int, num_levels: int, channels: int, pool_scales: list[int],
                 num_classes: int) -> None:
        super().__init__()
        self.ppm = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), _conv(in_channels, channels, 1))
                                 for s in pool_scales)
        self.ppm_out = _conv(in_channels + len(pool_scales) * channels, channels, 3)
        self.lateral = nn.ModuleList(_conv(in_channels, channels, 1) for _ in range(num_levels - 1))
        self.fpn_out = nn.ModuleList(_conv(channels, channels, 3) for _ in range(num_levels - 1))
        self.fuse = _conv(num_levels * channels, channels, 3)
        self.classifier = nn.Sequential(nn.Dropout2d(0.1), nn.Conv2d(channels, num_classes, 1))

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        top = levels[-1]
        pooled = [F.interpolate(branch(top), size=top.shape[-2:], mode="bilinear", align_corners=False)
                  for branch in self.ppm]
        maps = [lateral(x) for lateral, x in zip(self.lateral, levels[:-1])]
        maps.append(self.ppm_out(torch.cat([top, *pooled], dim=1)))
        for i in range(len(maps) - 1, 0, -1):  # top-down pathway
            maps[i - 1] = maps[i - 1] + F.interpolate(maps[i], size=maps[i - 1].shape[-2:],
                                                      mode="bilinear", align_corners=False)
        outs = [conv(m) for conv, m in zip(self.fpn_out, maps[:-1])] + [maps[-1]]
        size = outs[0].shape[-2:]
        fused = torch.cat([outs[0]] + [F.interpolate(o, size=size, mode="bilinear", align_corners=False)
                                       for o in outs[1:]], dim=1)
        return self.classifier(self.fuse(fused))


class Segmenter(nn.Module):
    def __init__(self, backbone: ViTDetBackbone, cfg: Any) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = UperNetHead(backbone.out_channels, len(backbone.level_names), cfg.head_channels,
                                cfg.pool_scales, cfg.num_classes)

    def group_matcher(self, coarse: bool = False) -> dict[str, str]:
        return vit_group_matcher()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: [B, 3, H, W] (sides divisible by backbone.size_divisible) -> logits [B, classes, H, W]."""
        levels = list(self.backbone(images).values())
        logits = self.head(levels[: len(self.backbone.level_names)])
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


def segment(config: Config, encoder: Path, out: Path, random_init: bool = False) -> dict[str, Any]:
    """Fine-tune the segmenter on cfg.root's train split, evaluate on its val split."""
    cfg = config.section("segment")
    mean, std = config.data.mean, config.data.std
    train_set = SemanticSegmentation(cfg.root, cfg.train_split, cfg, mean, std, train=True)
    val_set = SemanticSegmentation(cfg.root, cfg.val_split, cfg, mean, std, train=False)
    dist_info = distributed.init_distributed()
    device = default_device()
    seed_everything(derive_seed(cfg.seed, "init"))  # the new layers start the same in every run
    backbone = build_backbone(encoder, cfg.backbone, "segment", with_pool_level=False,
                              random_init=random_init)
    model = Segmenter(backbone, cfg)
    if dist_info.enabled and device.type == "cuda":  # mmseg's SyncBN (gloo on CPUs has none)
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    if dist_info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(config, out / "config.yaml")
    divisor = backbone.size_divisible

    def step(model: torch.nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        images, labels = batch
        x = pad_batch(images, divisor).to(device)
        y = pad_batch([l.unsqueeze(0) for l in labels], divisor, cfg.ignore_index)[:, 0].to(device)
        return {"loss_ce": F.cross_entropy(model(x), y, ignore_index=cfg.ignore_index)}

    inputs = {"encoder": encoder_digest(encoder, random_init), "data": tree_digest(cfg.root)}
    train = fit(model, train_set, list_collate, step, cfg, "segment", out,
                inputs, no_weight_decay(), device, dist_info)
    start = time.perf_counter()
    scores = evaluate(model, val_set, cfg.num_classes, cfg.ignore_index, cfg.eval_batch_size, divisor,
                      device, dist_info)
    metrics = {**scores, "iterations": cfg.iterations, "train_seconds": train["train_seconds"],
               "final_loss": train["final_loss"], "eval_seconds": time.perf_counter() - start,
               "num_val_images": len(val_set), "world_size": dist_info.world_size,
               "random_init": random_init, "encoder": str(encoder)}
    if dist_info.is_main:
        metrics = write_metrics(out / "metrics.json", metrics, inputs, dist_info.world_size)
    distributed.barrier(dist_info)
    distributed.cleanup(dist_info)
    return metrics


@torch.no_grad()
def evaluate(model: Segmenter, dataset: SemanticSegmentation, num_classes: int, ignore_index: int,
             batch_size: int, divisor: int, device: torch.device,
             dist_info: distributed.DistInfo = distributed.DistInfo()) -> dict[str, Any]:
    """Scores on the whole `dataset`; with several ranks each scores its strided share and the
    confusion matrices are summed."""
    model.eval()
    share = Subset(dataset, range(dist_info.rank, len(dataset), dist_info.world_size))
    loader = DataLoader(share, batch_size=batch_size, collate_fn=list_collate)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)  # [truth, prediction]
    for images, labels in tqdm(loader, desc="segment eval", unit="batch", leave=False,
                               disable=not dist_info.is_main):
        logits = model(pad_batch(images, divisor).to(device)).float().cpu()
        for k, (image, label) in enumerate(zip(images, labels)):
            pred = logits[k : k + 1, :, : image.shape[-2], : image.shape[-1]]
            pred = F.interpolate(pred, size=label.shape, mode="bilinear", align_corners=False)
            confusion += confusion_matrix(pred[0].argmax(0), label, num_classes, ignore_index)
    if dist_info.enabled:
        confusion = confusion.to(device)
        torch.distributed.all_reduce(confusion)
    return scores_from_confusion(confusion.cpu())


def confusion_matrix(pred: torch.Tensor, label: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    valid = label != ignore_index
    index = label[valid] * num_classes + pred[valid]
    return torch.bincount(index, minlength=num_classes**2).reshape(num_classes, num_classes)


def scores_from_confusion(confusion: torch.Tensor) -> dict[str, Any]:
    """mIoU over classes seen in truth or prediction, pixel accuracy; percent."""
    confusion = confusion.double()
    tp = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    return {"seg_miou": float(iou.nanmean()) * 100,
            "seg_pixel_acc": float(tp.sum() / confusion.sum().clamp(min=1)) * 100,
            "seg_iou_per_class": [None if v != v else float(v) * 100 for v in iou.tolist()]}
