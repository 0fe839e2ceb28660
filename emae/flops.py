"""Analytic training FLOPs of one pre-training image: the one count that budgets, the benchmarks and
`emae plan` use. Pure arithmetic, no torch.

Counted: matmuls and attention (2 FLOPs per multiply-add), not elementwise work. Per image, the
patch embedding runs once on all L patches (the K views share it); per view, the encoder runs on its
visible tokens + cls, then the decoder embedding, the decoder on all L + 1 tokens and the prediction
head. A training step is forward + backward = 3 x forward. `tests/test_benchmarks.py` checks the
forward count against torch's FlopCounterMode; docs/method.md gives the formula.
"""

from __future__ import annotations

from typing import Protocol

from emae.patches import num_visible


class ModelDims(Protocol):
    """What the count reads from a model config (`emae.config.ModelConfig` has these)."""

    patch_size: int
    embed_dim: int
    depth: int
    decoder_embed_dim: int
    decoder_depth: int
    mlp_ratio: float
    mask_ratio: float
    num_parts: int


def block_flops(tokens: int, dim: int, mlp_ratio: float) -> float:
    """One transformer block's forward: qkv + proj + MLP, and the two attention matmuls (q k^T, attn v)."""
    linear = 2 * tokens * dim * (3 * dim + dim + 2 * mlp_ratio * dim)
    attention = 2 * 2 * tokens * tokens * dim
    return linear + attention


def forward_flops(model: ModelDims, img_size: int, in_chans: int) -> float:
    """Forward FLOPs of one image with K views, as EMAE computes them."""
    length = (img_size // model.patch_size) ** 2
    pixels = model.patch_size**2 * in_chans
    visible = num_visible(length, model.mask_ratio) + 1  # + cls
    per_view = (
        model.depth * block_flops(visible, model.embed_dim, model.mlp_ratio)
        + 2 * visible * model.embed_dim * model.decoder_embed_dim
        + model.decoder_depth * block_flops(length + 1, model.decoder_embed_dim, model.mlp_ratio)
        + 2 * (length + 1) * model.decoder_embed_dim * pixels
    )
    return 2 * length * pixels * model.embed_dim + model.num_parts * per_view


def train_flops_per_image(model: ModelDims, img_size: int, in_chans: int) -> float:
    """FLOPs of one image in a training step: forward + backward (backward = 2 x forward)."""
    return 3 * forward_flops(model, img_size, in_chans)


def encoder_forward_flops(model: ModelDims, img_size: int, in_chans: int) -> float:
    """Forward FLOPs of the encoder alone on a whole image (every patch + cls, no mask): what the
    evaluation stages (kNN, linear probe, fine-tuning, dense backbones) run per image."""
    length = (img_size // model.patch_size) ** 2
    pixels = model.patch_size**2 * in_chans
    return 2 * length * pixels * model.embed_dim + model.depth * block_flops(length + 1, model.embed_dim,
                                                                              model.mlp_ratio)


def fit_epochs(epochs: int, warmup_epochs: float, images_per_epoch: int, flops_per_image: float,
               budget_flops: float | None = None, budget_images: int | None = None) -> tuple[int, float]:
    """(epochs, warmup_epochs) of a pre-training budget: the whole number of epochs nearest to it
    (at least one), the warm-up keeping its share of the schedule. No budget: `epochs` as given."""
    if budget_flops is not None:
        fitted = budget_flops / (images_per_epoch * flops_per_image)
    elif budget_images is not None:
        fitted = budget_images / images_per_epoch
    else:
        return epochs, warmup_epochs
    fitted_epochs = max(1, round(fitted))
    return fitted_epochs, warmup_epochs * fitted_epochs / epochs
