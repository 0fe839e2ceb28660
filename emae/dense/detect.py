"""`emae detect`: Mask R-CNN (torchvision) on the ViTDet-style adapter of a pre-trained encoder,
trained on COCO-format instances and scored with pycocotools' COCOeval.

Output folder:
  config.yaml          the resolved params
  checkpoints/last.pt  model, optimizer, iteration, settings (atomic; a rerun continues)
  log.jsonl            losses and lr every detect.log_every iterations
  coco_eval.txt        COCOeval's summaries (bbox, segm)
  metrics.json         det_ap_box, det_ap_mask (COCO AP@[.5:.95], percent) and AP50/AP75/S/M/L
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign
from tqdm import tqdm

from emae.config import Config, save_config
from emae.dense.backbone import ViTDetBackbone, build_backbone, no_weight_decay, vit_group_matcher
from emae.dense.data import CocoInstances, list_collate
from emae.dense.engine import fit
from emae.eval.features import add_encoder_evaluation_arguments, run_encoder_evaluation
from emae.errors import EmaeError
from emae.io import atomic_write_text
from emae.provenance import encoder_digest, tree_digest, write_metrics
from emae.seeding import derive_seed, seed_everything
from emae.train import distributed
from emae.train.common import default_device

log = logging.getLogger("emae.detect")
STAT_NAMES = ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large")


class ViTMaskRCNN(MaskRCNN):
    """torchvision's Mask R-CNN whose backbone is the ViT adapter; `group_matcher` tells timm's
    layer-decay grouping where the ViT blocks are."""

    def group_matcher(self, coarse: bool = False) -> dict[str, str]:
        return vit_group_matcher()


add_arguments = add_encoder_evaluation_arguments


def run(args: argparse.Namespace) -> None:
    run_encoder_evaluation(detect, args)


def build_detector(backbone: ViTDetBackbone, num_classes: int, cfg: Any, mean: tuple[float, ...],
                   std: tuple[float, ...]) -> ViTMaskRCNN:
    """Mask R-CNN with one anchor size per pyramid level and RoI pooling on the non-pool levels."""
    levels = backbone.level_names
    anchors = AnchorGenerator(sizes=tuple((s,) for s in cfg.anchor_sizes),
                              aspect_ratios=(tuple(cfg.aspect_ratios),) * len(cfg.anchor_sizes))
    c = backbone.out_channels
    return ViTMaskRCNN(
        backbone, num_classes=None,  # the predictors below have num_classes + 1 (background)
        min_size=tuple(cfg.min_size), max_size=cfg.max_size, image_mean=list(mean), image_std=list(std),
        size_divisible=backbone.size_divisible,
        rpn_anchor_generator=anchors,
        rpn_batch_size_per_image=cfg.rpn_batch_size_per_image,
        rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_top_n_train,
        rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
        box_roi_pool=MultiScaleRoIAlign(levels, output_size=7, sampling_ratio=2),
        box_head=TwoMLPHead(c * 7 * 7, cfg.box_head_dim),
        box_predictor=FastRCNNPredictor(cfg.box_head_dim, num_classes + 1),
        box_batch_size_per_image=cfg.box_batch_size_per_image,
        box_score_thresh=cfg.box_score_thresh,
        box_detections_per_img=cfg.box_detections_per_img,
        mask_roi_pool=MultiScaleRoIAlign(levels, output_size=14, sampling_ratio=2),
        mask_head=MaskRCNNHeads(c, [cfg.mask_head_channels] * cfg.mask_head_layers, dilation=1),
        mask_predictor=MaskRCNNPredictor(cfg.mask_head_channels, cfg.mask_head_channels, num_classes + 1),
    )


def detect(config: Config, encoder: Path, out: Path, random_init: bool = False) -> dict[str, Any]:
    """Fine-tune Mask R-CNN on cfg.root's train split, evaluate on its val split."""
    cfg = config.section("detect")
    # everything that can be wrong with the input fails here, before the model is built
    train_set = CocoInstances(cfg.root, cfg.train_split, train=True, hflip=cfg.hflip)
    val_set = CocoInstances(cfg.root, cfg.val_split, train=False, hflip=False)
    if val_set.cat_ids != train_set.cat_ids:
        raise EmaeError(f"{val_set.annotation_file}: categories {val_set.cat_ids} differ from "
                        f"{train_set.annotation_file}'s {train_set.cat_ids}")
    dist_info = distributed.init_distributed()
    device = default_device()
    seed_everything(derive_seed(cfg.seed, "init"))  # the new layers start the same in every run
    backbone = build_backbone(encoder, cfg.backbone, "detect", random_init=random_init)
    model = build_detector(backbone, train_set.num_classes, cfg, config.data.mean, config.data.std).to(device)
    if dist_info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(config, out / "config.yaml")

    def step(model: torch.nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        images, targets = batch
        images = [i.to(device) for i in images]
        targets = [{k: v.to(device) for k, v in t.items() if k != "image_id"} for t in targets]
        return model(images, targets)

    model.transform.min_size = tuple(cfg.min_size)
    inputs = {"encoder": encoder_digest(encoder, random_init), "data": tree_digest(cfg.root)}
    train = fit(model, train_set, list_collate, step, cfg, "detect", out,
                inputs, no_weight_decay(), device, dist_info)
    model.transform.min_size = (cfg.test_min_size,)
    start = time.perf_counter()
    detections = predict(model, val_set, cfg.eval_batch_size, device, dist_info)
    metrics: dict[str, Any] = {}
    if dist_info.is_main:
        box, mask, summary = coco_evaluate(val_set, detections)
        atomic_write_text(out / "coco_eval.txt", summary)
        metrics = {"det_ap_box": box["ap"], "det_ap_mask": mask["ap"],
                   **{f"det_{k}_box": v for k, v in box.items() if k != "ap"},
                   **{f"det_{k}_mask": v for k, v in mask.items() if k != "ap"},
                   "iterations": cfg.iterations, "train_seconds": train["train_seconds"],
                   "final_loss": train["final_loss"], "eval_seconds": time.perf_counter() - start,
                   "num_val_images": len(val_set), "world_size": dist_info.world_size,
                   "random_init": random_init, "encoder": str(encoder)}
        metrics = write_metrics(out / "metrics.json", metrics, inputs, dist_info.world_size)
    distributed.barrier(dist_info)
    distributed.cleanup(dist_info)
    return metrics


@torch.no_grad()
def predict(model: torch.nn.Module, dataset: CocoInstances, batch_size: int, device: torch.device,
            dist_info: distributed.DistInfo = distributed.DistInfo()) -> list[dict[str, Any]]:
    """COCO-format results (box and RLE mask per detection) of the whole `dataset`; with several
    ranks each predicts its strided share and every rank returns all of them."""
    from pycocotools import mask as mask_utils

    model.eval()
    share = Subset(dataset, range(dist_info.rank, len(dataset), dist_info.world_size))
    loader = DataLoader(share, batch_size=batch_size, collate_fn=list_collate)
    detections: list[dict[str, Any]] = []
    for images, targets in tqdm(loader, desc="detect eval", unit="batch", leave=False,
                                disable=not dist_info.is_main):
        outputs = model([i.to(device) for i in images])
        for target, output in zip(targets, outputs):
            boxes = output["boxes"].cpu()
            boxes[:, 2:] -= boxes[:, :2]  # xyxy -> xywh
            masks = (output["masks"][:, 0] > 0.5).cpu().numpy().astype(np.uint8)  # [N, H, W]
            for k in range(len(boxes)):
                rle = mask_utils.encode(np.asfortranarray(masks[k]))
                rle["counts"] = rle["counts"].decode("ascii")
                detections.append({"image_id": target["image_id"], "score": float(output["scores"][k]),
                                   "category_id": dataset.cat_ids[int(output["labels"][k]) - 1],
                                   "bbox": [float(v) for v in boxes[k]], "segmentation": rle})
    if dist_info.enabled:
        gathered: list[Any] = [None] * dist_info.world_size
        torch.distributed.all_gather_object(gathered, detections)
        detections = [d for part in gathered for d in part]
    return detections


def coco_evaluate(dataset: CocoInstances, detections: list[dict[str, Any]]
                  ) -> tuple[dict[str, float], dict[str, float], str]:
    """COCO AP (percent) of boxes and masks, and COCOeval's printed summary."""
    # separate lists: with a bbox, loadRes would take the box area for segm's size ranges
    boxes = [{k: v for k, v in d.items() if k != "segmentation"} for d in detections]
    masks = [{k: v for k, v in d.items() if k != "bbox"} for d in detections]
    box, summary_box = coco_stats(dataset.coco, boxes, "bbox")
    mask, summary_mask = coco_stats(dataset.coco, masks, "segm")
    return box, mask, f"== bbox ==\n{summary_box}\n== segm ==\n{summary_mask}"


def coco_stats(coco_gt: Any, results: list[dict[str, Any]], iou_type: str) -> tuple[dict[str, float], str]:
    """COCOeval's first six stats (AP, AP50, AP75, AP small/medium/large) in percent; a class
    or size without ground truth gives -1 in COCOeval and is reported as such."""
    from pycocotools.cocoeval import COCOeval

    if not results:  # loadRes cannot take an empty list: nothing detected is AP 0
        return {k: 0.0 for k in STAT_NAMES}, "no detections"
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        coco_dt = coco_gt.loadRes(results)
        evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = {k: float(v) * 100 if v >= 0 else -1.0 for k, v in zip(STAT_NAMES, evaluator.stats[:6])}
    return stats, text.getvalue()
