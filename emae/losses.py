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
    distance: Literal["l1", "mse"] = "mse",
) -> torch.Tensor:
    """Self-consistency between the parts' predictions of the same patch.

    For every pair of parts i < j and every patch masked in both:
        0.5 * (d(p_i, sg(p_j)) + d(sg(p_i), p_j)),   sg = stop-gradient,
    with d the per-patch mean absolute (l1) or squared (mse) difference, averaged over all
    (pair, patch) overlaps. pred: [K, B, L, P], mask: [K, B, L]. Zero when K = 1.

    Computed without the pairs' copies: the stop-gradient pair has the value of d(p_i, p_j) and
    half its gradient, i.e. 0.5 * d + 0.5 * sg(d); l1 sums the K(K-1)/2 pair differences one pair
    at a time (views, no gathered copies), mse uses the closed form over the parts that mask a
    patch, sum_{i<j} |p_i - p_j|^2 = M * sum_i |p_i - mean|^2, which is O(K) instead of O(K^2).
    """
    if distance not in ("l1", "mse"):
        raise ValueError(f"unknown consistency distance {distance!r}: use 'l1' or 'mse'")
    num_parts = pred.shape[0]
    if num_parts < 2:
        return pred.sum() * 0.0
    maskf = mask.to(pred.dtype)  # [K, B, L]
    if distance == "l1":
        parts = pred.unbind(0)  # K x [B, L, P]; one backward stack instead of one per pair
        total = pred.new_zeros(())
        for i in range(num_parts):
            for j in range(i + 1, num_parts):
                per_patch = (parts[i] - parts[j]).abs().mean(dim=-1)  # [B, L]
                total = total + (per_patch * maskf[i] * maskf[j]).sum()
    else:
        total = _pairwise_sq_sum(pred, maskf)
    masked = maskf.sum(dim=0)  # [B, L]: parts that mask each patch
    pairs = (masked * (masked - 1) / 2).sum()  # (pair, patch) overlaps
    value = total / pairs.clamp_min(1.0)
    return 0.5 * value + 0.5 * value.detach()


def _pairwise_sq_sum(pred: torch.Tensor, maskf: torch.Tensor) -> torch.Tensor:
    """sum over pairs i < j and patches masked in both of mean_P (p_i - p_j)^2, in O(K):
    per patch, over the M parts that mask it, sum_{i<j} |p_i - p_j|^2 = M * sum_i |p_i - mean|^2
    (centred first: no cancellation when the parts nearly agree). pred: [K, B, L, P]."""
    m = maskf.unsqueeze(-1)  # [K, B, L, 1]
    count = m.sum(dim=0)  # [B, L, 1]
    mean = (pred * m).sum(dim=0) / count.clamp_min(1.0)  # [B, L, P]
    spread = ((pred - mean) * m).pow(2).sum(dim=0).mean(dim=-1)  # [B, L]
    return (count.squeeze(-1) * spread).sum()
