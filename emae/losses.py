"""EMAE's loss terms as pure functions of predictions, targets and masks.

Shapes: K parts, B images, L patches, P = patch_size**2 * channels values per patch.
"""

from __future__ import annotations

from typing import Literal

import torch


def patch_targets(patches: torch.Tensor, norm_pix_loss: bool, eps: float = 1e-6) -> torch.Tensor:
    """Reconstruction target per patch: raw pixels, or normalised by the patch's mean and variance
    (MAE's norm_pix_loss). patches: [B, L, P] -> [B, L, P]."""
    if not norm_pix_loss:
        return patches
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps) ** 0.5


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MSE over the masked patches of all parts.

    pred: [K, B, L, P], target: [B, L, P] (shared by the parts), mask: [K, B, L] (True = masked).
    """
    per_patch = (pred - target.unsqueeze(0)).pow(2).mean(dim=-1)  # [K, B, L]
    mask = mask.to(per_patch.dtype)
    return (per_patch * mask).sum() / mask.sum()


def consistency_loss(
    pred: torch.Tensor,
    mask: torch.Tensor,
    distance: Literal["l1", "mse"] = "l1",
) -> torch.Tensor:
    """Self-consistency between the parts' predictions of the same patch.

    For every pair of parts i < j and every patch masked in both:
        0.5 * (d(p_i, sg(p_j)) + d(sg(p_i), p_j)),   sg = stop-gradient,
    with d the per-patch mean absolute (l1) or squared (mse) difference, averaged over all
    (pair, patch) overlaps. pred: [K, B, L, P], mask: [K, B, L]. Zero when K = 1.
    """
    num_parts = pred.shape[0]
    if num_parts < 2:
        return pred.sum() * 0.0
    i, j = torch.triu_indices(num_parts, num_parts, offset=1, device=pred.device)  # [pairs]
    both = (mask[i] & mask[j]).to(pred.dtype)  # [pairs, B, L]
    p_i, p_j = pred[i], pred[j]  # [pairs, B, L, P]
    d_i = _distance(p_i, p_j.detach(), distance)  # gradient flows into p_i only
    d_j = _distance(p_i.detach(), p_j, distance)  # gradient flows into p_j only
    per_patch = 0.5 * (d_i + d_j)  # [pairs, B, L]
    return (per_patch * both).sum() / both.sum().clamp_min(1.0)


def _distance(a: torch.Tensor, b: torch.Tensor, kind: str) -> torch.Tensor:
    diff = a - b
    if kind == "l1":
        return diff.abs().mean(dim=-1)
    if kind == "mse":
        return diff.pow(2).mean(dim=-1)
    raise ValueError(f"unknown consistency distance {kind!r}: use 'l1' or 'mse'")
