"""The pre-trained ViT as a dense backbone, ViTDet style (Li et al., 2022, arXiv 2203.16527).

- The plain ViT runs on the whole image without its class token; its absolute position
  embeddings are resampled to the input's patch grid (timm's `resample_abs_pos_embed`).
- Blocks listed in `global_blocks` attend globally; the others attend inside non-overlapping
  `window_size` x `window_size` windows: the token map is cut into windows before the (unchanged
  timm) block and stitched back after it, so every pre-trained weight is used as is. Maps that
  do not divide into windows are zero-padded, as in ViTDet.
- A simple feature pyramid builds multi-scale maps from the last map alone (deconvolutions up,
  max-pooling down), plus torchvision's `LastLevelMaxPool` level for the RPN.
- `group_matcher` gives timm's layer-wise lr decay its layers: stem, block i, then everything
  else (final norm, pyramid, heads) at the top.

Not in this adapter (ViTDet has them): relative position biases and the cls-token-free
pre-training; the cls token and its position are loaded (every export key loads) but unused
(the cls token is frozen).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from timm.layers import LayerNorm2d, resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer_sam import window_partition, window_unpartition
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from emae.errors import ConfigError
from emae.models.export import encoder_kwargs, load_encoder, reinitialise

VIT_PREFIX = "backbone.vit."


def vit_group_matcher(prefix: str = VIT_PREFIX) -> dict[str, str]:
    """timm group matcher for a model that holds the adapter at `backbone`."""
    p = prefix.replace(".", r"\.")
    return {"stem": rf"^{p}(?:cls_token|pos_embed|patch_embed)", "blocks": rf"^{p}blocks\.(\d+)"}


def no_weight_decay(prefix: str = VIT_PREFIX) -> list[str]:
    return [f"{prefix}pos_embed", f"{prefix}cls_token"]  # 1-D params are excluded by timm anyway


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's pyramid: one map -> one level per scale factor (powers of 2), each followed by a
    1x1 and a 3x3 convolution with channel LayerNorm."""

    def __init__(self, dim: int, scale_factors: list[float], out_channels: int) -> None:
        super().__init__()
        self.stages = nn.ModuleList()
        for scale in scale_factors:
            steps = int(round(math.log2(scale)))
            layers: list[nn.Module] = []
            channels = dim
            for i in range(steps):  # up: deconvolutions halving the channels
                if i:
                    layers += [LayerNorm2d(channels), nn.GELU()]
                layers.append(nn.ConvTranspose2d(channels, channels // 2, kernel_size=2, stride=2))
                channels //= 2
            layers += [nn.MaxPool2d(kernel_size=2, stride=2) for _ in range(-steps)]  # down
            layers += [
                nn.Conv2d(channels, out_channels, kernel_size=1, bias=False), LayerNorm2d(out_channels),
                nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
                LayerNorm2d(out_channels),
            ]
            self.stages.append(nn.Sequential(*layers))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [stage(x) for stage in self.stages]  # x: [B, D, h, w] -> [B, C, h * s, w * s] each


class ViTDetBackbone(nn.Module):
    """Pre-trained timm ViT + simple feature pyramid; the `out_channels` attribute and the
    OrderedDict output ("0", "1", ..., "pool") are what torchvision's detectors expect."""

    def __init__(self, vit: VisionTransformer, window_size: int, global_blocks: list[int],
                 scale_factors: list[float], out_channels: int, with_pool_level: bool = True,
                 section: str = "") -> None:
        super().__init__()
        depth = len(vit.blocks)
        bad = [i for i in global_blocks if not 0 <= i < depth]
        if window_size and bad:
            raise ConfigError(f"{section}.backbone.global_blocks={global_blocks}: {bad} are not blocks "
                              f"of the encoder (it has blocks 0..{depth - 1})")
        self.vit = vit
        if vit.cls_token is not None:  # loaded (every export key loads) but unused: not trained,
            vit.cls_token.requires_grad_(False)  # and DDP needs every trained parameter in the loss
        self.patch_size = int(vit.patch_embed.patch_size[0])
        self.pretrain_grid = tuple(int(g) for g in vit.patch_embed.grid_size)
        self.window_size = window_size
        self.global_blocks = set(global_blocks)
        self.pyramid = SimpleFeaturePyramid(vit.embed_dim, scale_factors, out_channels)
        self.top_block = LastLevelMaxPool() if with_pool_level else None
        self.out_channels = out_channels
        self.level_names = [str(i) for i in range(len(scale_factors))]
        self.strides = [self.patch_size / s for s in scale_factors]
        # input sides must give whole patches and whole max-pool steps down to the coarsest level
        self.size_divisible = int(self.patch_size * max(1.0, 1 / min(scale_factors)))

    def forward_vit(self, images: torch.Tensor) -> torch.Tensor:
        """images: [B, C, H, W] (sides divisible by the patch) -> last map [B, D, H/p, W/p]."""
        vit = self.vit
        x = vit.patch_embed.proj(images).permute(0, 2, 3, 1)  # [B, h, w, D]
        x = vit.patch_embed.norm(x)
        b, h, w, d = x.shape
        pos = resample_abs_pos_embed(vit.pos_embed[:, vit.num_prefix_tokens:], new_size=[h, w],
                                     old_size=list(self.pretrain_grid), num_prefix_tokens=0)
        x = vit.norm_pre(vit.pos_drop(x + pos.reshape(1, h, w, d)))
        for i, block in enumerate(vit.blocks):
            if self.window_size and i not in self.global_blocks:
                windows, padded = window_partition(x, self.window_size)  # [B * nW, ws, ws, D]
                windows = block(windows.flatten(1, 2)).view_as(windows)
                x = window_unpartition(windows, self.window_size, (h, w), padded)
            else:
                x = block(x.reshape(b, h * w, d)).reshape(b, h, w, d)
        return vit.norm(x).permute(0, 3, 1, 2)  # [B, D, h, w]

    def forward(self, images: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        levels = self.pyramid(self.forward_vit(images))
        names = list(self.level_names)
        if self.top_block is not None:
            levels, names = self.top_block(levels, [], names)
        return OrderedDict(zip(names, levels))


def build_backbone(checkpoint: str | Path, cfg: Any, section: str,
                   with_pool_level: bool = True, random_init: bool = False) -> ViTDetBackbone:
    """The adapter around an `emae pretrain` encoder export; `cfg` is `<section>.backbone`.
    `random_init`: the export's architecture with the weights pre-training starts from."""
    vit = load_encoder(checkpoint, drop_path_rate=cfg.drop_path)
    if random_init:
        reinitialise(vit, encoder_kwargs(checkpoint))
    return ViTDetBackbone(vit, cfg.window_size, cfg.global_blocks, cfg.scale_factors,
                          cfg.out_channels, with_pool_level, section)
