"""Params sections of the evaluation stages: `knn`, `linprobe`, `finetune`, `consistency`,
`visualize`. Every number lives in `params/eval.yaml`; these models only say what is allowed.

Torch-free on purpose: `emae.config.validate_all` imports these to check a whole params tree
before any job starts, and every pipeline job does that (see tests/test_layers.py).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from emae.config import RESUMABLE, Betas, Section

Pool = Annotated[Literal["token", "avg"], Field(description="class token, or mean of the patch tokens")]


class KnnConfig(Section):
    k: int = Field(gt=0, description="neighbours that vote")
    temperature: float = Field(gt=0, description="vote weight exp(cos / temperature)")
    batch_size: int = Field(gt=0, description="images per device for feature extraction")
    pool: Pool
    amp: Literal["auto", "bf16", "fp16", "off"]
    seed: int = Field(description="draws the weights of the random-init baseline (--random-init)")


class LinprobeConfig(Section):
    epochs: int = Field(gt=0, json_schema_extra=RESUMABLE)
    batch_size: int = Field(gt=0, description="per device")
    accum_iter: int | None = Field(gt=0, description="batches per step (MAE's main_linprobe "
                                   "--accum_iter); null: derived from effective_batch_size")
    effective_batch_size: int | None = Field(gt=0, description="images per step over all processes")
    blr: float = Field(gt=0, description="lr = blr * effective batch / 256")
    min_lr: float = Field(ge=0)
    warmup_epochs: float = Field(ge=0)
    weight_decay: float = Field(ge=0)
    momentum: float = Field(ge=0, lt=1)
    pool: Pool
    augment: bool = Field(description="false: cached features; true: RandomResizedCrop + flip")
    crop_scale_min: float = Field(gt=0, le=1)
    checkpoint_every_steps: int = Field(gt=0, json_schema_extra=RESUMABLE)
    amp: Literal["auto", "bf16", "fp16", "off"]
    seed: int


class FinetuneConfig(Section):
    epochs: int = Field(gt=0, json_schema_extra=RESUMABLE)
    batch_size: int = Field(gt=0, description="images per device per micro-batch")
    accum_iter: int | None = Field(gt=0, description="null: derived from effective_batch_size")
    effective_batch_size: int | None = Field(gt=0, description="images per step over all processes")
    blr: float = Field(gt=0, description="lr = blr * effective batch / 256")
    min_lr: float = Field(ge=0)
    warmup_epochs: float = Field(ge=0)
    weight_decay: float = Field(ge=0)
    betas: Betas
    layer_decay: float = Field(gt=0, le=1, description="lr scale per layer towards the input")
    drop_path: float = Field(ge=0, lt=1)
    global_pool: Pool
    clip_grad: float | None = Field(gt=0, description="max grad norm, or null for none")
    mixup: float = Field(ge=0, description="Mixup alpha, 0 = off")
    cutmix: float = Field(ge=0, description="CutMix alpha, 0 = off")
    mixup_prob: float = Field(ge=0, le=1)
    mixup_switch_prob: float = Field(ge=0, le=1)
    label_smoothing: float = Field(ge=0, lt=1)
    rand_augment: str | None = Field(description="timm RandAugment string, e.g. rand-m9-mstd0.5-inc1")
    reprob: float = Field(ge=0, le=1, description="random erasing probability")
    crop_scale_min: float = Field(gt=0, le=1)
    checkpoint_every_steps: int = Field(gt=0, json_schema_extra=RESUMABLE)
    eval_every_epochs: int = Field(gt=0, json_schema_extra=RESUMABLE)
    amp: Literal["auto", "bf16", "fp16", "off"]
    seed: int

    @property
    def mixing(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0

    @model_validator(mode="after")
    def _even_batch(self) -> "FinetuneConfig":
        if self.mixing and self.batch_size % 2:
            raise ValueError(f"finetune.batch_size={self.batch_size} must be even when mixup or cutmix is on "
                             "(timm's Mixup pairs each image with its mirror in the batch)")
        if self.rand_augment is not None and not self.rand_augment.startswith("rand"):
            raise ValueError(f"finetune.rand_augment={self.rand_augment!r}: expected a timm RandAugment "
                             "string such as 'rand-m9-mstd0.5-inc1', or null")
        return self


class ConsistencyConfig(Section):
    num_images: int = Field(gt=0, description="val images (the first ones)")
    rounds: int = Field(ge=2, description="independent masks per image")
    batch_size: int = Field(gt=0)
    seed: int


class VisualizeConfig(Section):
    num_images: int = Field(gt=0, description="val images, one row each")
    cell_pixels: int = Field(ge=16, description="drawn width of each image in pixels")
    seed: int
