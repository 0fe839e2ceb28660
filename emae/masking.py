"""Parallel masking: K masked views per image whose visible sets are disjoint.

Per image, one random permutation of the L patches is cut into chunks of
`n_keep = int(L * (1 - mask_ratio))` (MAE's rule); part k sees chunk k and masks the rest. So every
part masks the same ratio, the visible sets are disjoint, and when `K * n_keep == L` the K parts
together see every patch. K = 1 is exactly MAE's `random_masking` (noise -> argsort -> keep first).
"""

from __future__ import annotations

import torch

from emae.patches import allowed_num_parts, masked_in_both, num_visible

__all__ = ["allowed_num_parts", "masked_in_both", "num_visible", "parallel_masks", "visible_indices"]


def parallel_masks(
    batch_size: int,
    num_patches: int,
    num_parts: int,
    mask_ratio: float,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Masks of the K parts, `[K, B, L]` bool, True = masked (removed from the encoder input).

    `noise` ([B, L], uniform) may be injected instead of drawing it from `generator`: the same noise
    gives MAE's exact mask for K = 1.
    """
    n_keep = num_visible(num_patches, mask_ratio)
    allowed = allowed_num_parts(num_patches, mask_ratio)
    if n_keep < 1:
        raise ValueError(f"mask_ratio={mask_ratio} leaves no visible patch out of {num_patches}")
    if not allowed.start <= num_parts < allowed.stop:  # (`in range` breaks torch.compile)
        raise ValueError(
            f"num_parts={num_parts} is not possible with mask_ratio={mask_ratio} and "
            f"{num_patches} patches ({n_keep} visible per part): allowed K are "
            f"{allowed.start}..{allowed.stop - 1}"
        )
    if noise is None:
        noise = torch.rand(batch_size, num_patches, generator=generator,
                           device=generator.device if generator is not None else device)
    noise = noise.to(device) if device is not None else noise
    ids_shuffle = torch.argsort(noise, dim=1)  # [B, L], ascending: small noise is kept, as in MAE
    # part k keeps ids_shuffle[:, k*n_keep:(k+1)*n_keep]
    visible = ids_shuffle[:, : num_parts * n_keep].reshape(batch_size, num_parts, n_keep)
    visible = visible.permute(1, 0, 2)  # [K, B, n_keep]
    mask = torch.ones(num_parts, batch_size, num_patches, dtype=torch.bool, device=noise.device)
    mask.scatter_(2, visible, False)
    return mask


def visible_indices(mask: torch.Tensor, n_keep: int | None = None) -> torch.Tensor:
    """Indices of the visible patches of each part, ascending: `[K, B, L]` -> `[K, B, n_keep]`.

    Every part of a `parallel_masks` output has the same number of visible patches, so the
    indices form a dense tensor that the encoder uses to gather its input tokens. Pass `n_keep`
    when it is known (`num_visible(L, mask_ratio)`): counting it reads a value back from the
    device, a host sync per step and a graph break under torch.compile.
    """
    if n_keep is None:
        n_keep = int((~mask[0, 0]).sum())
    # a stable sort of the mask puts the False (visible) positions first, in ascending order
    return torch.argsort(mask.to(torch.uint8), dim=-1, stable=True)[..., :n_keep]
