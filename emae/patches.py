"""Patch counts of parallel masking: pure integers, no torch.

A core module of its own so that validating a config (`emae.config`, the sweep space) does not
import torch; `emae.masking` re-exports these next to the tensor code that uses them.
"""

from __future__ import annotations


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """Patches each part keeps visible (MAE: `int(L * (1 - mask_ratio))`)."""
    return int(num_patches * (1 - mask_ratio))


def allowed_num_parts(num_patches: int, mask_ratio: float) -> range:
    """The K for which K disjoint visible sets fit: 1 <= K <= L // n_keep."""
    n_keep = num_visible(num_patches, mask_ratio)
    if n_keep < 1:
        return range(1, 1)
    return range(1, num_patches // n_keep + 1)


def masked_in_both(num_patches: int, mask_ratio: float) -> int:
    """Patches that two parts of one image both mask (where the consistency loss looks): L - 2 n_keep.

    Zero when two visible sets cover the image (K = 2, r = 0.5): the consistency term is then empty.
    """
    return max(num_patches - 2 * num_visible(num_patches, mask_ratio), 0)
