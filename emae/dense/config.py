"""Params sections of the dense-transfer stages: `dense_data` (the generated set), `detect`,
`segment`. Every number lives in `params/dense.yaml`; these models only say what is allowed."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from emae.config import RESUMABLE, Betas, Section


class DenseDataConfig(Section):
    """`emae prepare-dense`: digits (scikit-learn's embedded set) pasted on canvases, written as
    COCO instances (`coco/`) and an ADE20K-style semantic set (`ade/`)."""

    root: str = Field(description="output folder; coco/ and ade/ are written below it")
    canvas_size: int = Field(gt=0)
    num_train: int = Field(gt=0)
    num_val: int = Field(gt=0)
    min_objects: int = Field(ge=1)
    max_objects: int = Field(ge=1)
    min_digit_size: int = Field(gt=0, description="side of a pasted digit in pixels")
    max_digit_size: int = Field(gt=0)
    ink_threshold: float = Field(gt=0, lt=1, description="ink (mask) = intensity > threshold * max")
    noise_std: float = Field(ge=0, description="Gaussian background noise, in 0..1 intensity units")
    max_overlap_tries: int = Field(gt=0, description="placements tried per object (no overlaps)")
    seed: int

    @field_validator("max_objects", "max_digit_size")
    @classmethod
    def _at_least_min(cls, value: int, info: ValidationInfo) -> int:
        low = info.field_name.replace("max_", "min_")
        if low in info.data and info.data[low] > value:
            raise ValueError(f"must be >= {low} ({info.data[low]})")
        if info.field_name == "max_digit_size" and value > info.data.get("canvas_size", value):
            raise ValueError(f"must be <= canvas_size ({info.data['canvas_size']})")
        return value


class BackboneConfig(Section):
    """ViTDet-style adapter of the pre-trained ViT (see emae/dense/backbone.py)."""

    window_size: int = Field(ge=0, description="tokens per window side; 0 = every block global")
    global_blocks: list[int] = Field(description="indices of blocks with global attention")
    drop_path: float = Field(ge=0, lt=1)
    scale_factors: list[float] = Field(min_length=1, description="pyramid levels relative to the "
                                       "ViT map, powers of 2 (ViTDet, patch 16: [4, 2, 1, 0.5])")
    out_channels: int = Field(gt=0)
    layer_decay: float = Field(gt=0, le=1, description="lr scale decay per block from the top")

    @field_validator("scale_factors")
    @classmethod
    def _powers_of_two(cls, value: list[float]) -> list[float]:
        bad = [s for s in value if s <= 0 or not math.log2(s).is_integer()]
        if bad:
            raise ValueError(f"{bad} are not powers of 2 (e.g. 4, 2, 1, 0.5)")
        if sorted(value, reverse=True) != value:
            raise ValueError("must go from fine to coarse (decreasing)")
        return value


class DenseTrainConfig(Section):
    """What detection and segmentation training share: schedule, optimizer, loop."""

    root: str = Field(description="data set root (COCO / ADE20K layout)", json_schema_extra=RESUMABLE)
    train_split: str
    val_split: str
    backbone: BackboneConfig
    iterations: int = Field(gt=0)
    batch_size: int = Field(gt=0, description="images per device per batch")
    accum_iter: int | None = Field(gt=0, description="batches per optimizer step (gradient "
                                   "accumulation); null: derived from effective_batch_size")
    effective_batch_size: int | None = Field(gt=0, description="images per optimizer step over all "
                                             "processes (the recipe's batch); null: what results")
    lr: float = Field(gt=0, description="absolute peak learning rate (top layer), for the step's "
                                        "effective batch (batch_size x accum_iter x devices)")
    min_lr: float = Field(ge=0)
    weight_decay: float = Field(ge=0)
    betas: Betas
    warmup_iters: int = Field(ge=0)
    schedule: Literal["cosine", "multistep"]
    milestones: list[float] = Field(description="multistep: fractions of iterations where lr *= decay_rate")
    decay_rate: float = Field(gt=0, le=1)
    clip_grad: float | None = Field(gt=0, description="max grad norm, or null for none")
    hflip: bool
    amp: Literal["auto", "bf16", "fp16", "off"]
    num_workers: int = Field(ge=0, json_schema_extra=RESUMABLE)
    eval_batch_size: int = Field(gt=0, json_schema_extra=RESUMABLE)
    checkpoint_every: int = Field(gt=0, description="iterations between checkpoints",
                                  json_schema_extra=RESUMABLE)
    log_every: int = Field(gt=0, json_schema_extra=RESUMABLE)
    seed: int

    @field_validator("milestones")
    @classmethod
    def _fractions(cls, value: list[float]) -> list[float]:
        if any(not 0 < m < 1 for m in value):
            raise ValueError("must be fractions of the iterations, in (0, 1)")
        return value

    @field_validator("warmup_iters")
    @classmethod
    def _short_warmup(cls, value: int, info: ValidationInfo) -> int:
        if value >= info.data.get("iterations", value + 1):
            raise ValueError(f"must be < iterations ({info.data['iterations']})")
        return value


class DetectConfig(DenseTrainConfig):
    """Mask R-CNN (torchvision) on the adapter; COCO layout: ROOT/<split>/ images and
    ROOT/annotations/instances_<split>.json."""

    min_size: list[int] = Field(min_length=1, description="train short sides (one drawn per batch)")
    test_min_size: int = Field(gt=0)
    max_size: int = Field(gt=0)
    anchor_sizes: list[int] = Field(description="one anchor size per pyramid level + 1 (the pool level)")
    aspect_ratios: list[float] = Field(min_length=1)
    rpn_batch_size_per_image: int = Field(gt=0)
    rpn_pre_nms_top_n_train: int = Field(gt=0)
    rpn_post_nms_top_n_train: int = Field(gt=0)
    rpn_pre_nms_top_n_test: int = Field(gt=0)
    rpn_post_nms_top_n_test: int = Field(gt=0)
    box_batch_size_per_image: int = Field(gt=0)
    box_head_dim: int = Field(gt=0)
    mask_head_layers: int = Field(gt=0)
    mask_head_channels: int = Field(gt=0)
    box_score_thresh: float = Field(ge=0, lt=1)
    box_detections_per_img: int = Field(gt=0)

    @field_validator("anchor_sizes")
    @classmethod
    def _one_per_level(cls, value: list[int], info: ValidationInfo) -> list[int]:
        if "backbone" in info.data and len(value) != len(info.data["backbone"].scale_factors) + 1:
            raise ValueError(f"has {len(value)} entries; the pyramid has "
                             f"{len(info.data['backbone'].scale_factors) + 1} levels "
                             "(one per backbone.scale_factors + the pool level)")
        return value


class SegmentConfig(DenseTrainConfig):
    """UperNet-style head on the adapter; ADE20K layout: ROOT/images/<split>/*, ROOT/annotations/
    <split>/<same stem>.png (label PNGs)."""

    num_classes: int = Field(gt=0, description="classes after reduce_zero_label")
    reduce_zero_label: bool = Field(description="ADE20K: label 0 ('other') is ignored, 1..C -> 0..C-1")
    ignore_index: int = Field(ge=0, le=255)
    crop_size: int = Field(gt=0, description="train crops and test short side")
    scale_range: tuple[float, float] = Field(description="random resize of the short side, x crop_size")
    head_channels: int = Field(gt=0)
    pool_scales: list[int] = Field(min_length=1, description="pyramid pooling module bins")

    @field_validator("batch_size")
    @classmethod
    def _batch_for_batchnorm(cls, value: int) -> int:
        if value < 2:
            raise ValueError("must be >= 2 (the head's BatchNorm needs two images)")
        return value
