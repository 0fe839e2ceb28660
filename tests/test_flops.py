"""The analytic FLOP count (emae.flops) equals what torch counts for the model it describes."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from emae.config import ModelConfig
from emae.flops import forward_flops, train_flops_per_image
from emae.models import EMAE

TINY = dict(patch_size=4, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=24, decoder_depth=1,
            decoder_num_heads=2, mlp_ratio=4.0, norm_pix_loss=True, mask_ratio=0.75,
            consistency_weight=1.0, consistency_distance="mse", grad_checkpointing=False)


@pytest.mark.parametrize("num_parts", [1, 2, 4])
def test_forward_count_matches_torch_flop_counter(num_parts: int) -> None:
    cfg = ModelConfig(**TINY, num_parts=num_parts)
    model = EMAE(img_size=16, in_chans=3, **cfg.model_dump(exclude={"grad_checkpointing"})).eval()
    images = torch.randn(3, 3, 16, 16)
    # the math backend: its matmuls are counted (the fused CPU attention kernels are not)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(images, generator=torch.Generator().manual_seed(0))
    assert counter.get_total_flops() == pytest.approx(3 * forward_flops(cfg, 16, 3), rel=1e-9)
    assert train_flops_per_image(cfg, 16, 3) == 3 * forward_flops(cfg, 16, 3)


def test_k_views_cost_k_times_the_per_view_work() -> None:
    one, four = (forward_flops(ModelConfig(**TINY, num_parts=k), 32, 3) for k in (1, 4))
    patch_embed = 2 * 64 * 48 * 32
    assert four - patch_embed == pytest.approx(4 * (one - patch_embed))
