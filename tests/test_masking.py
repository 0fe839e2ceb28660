import pytest
import torch

from emae.masking import allowed_num_parts, masked_in_both, num_visible, parallel_masks, visible_indices


def mae_random_masking(noise: torch.Tensor, mask_ratio: float) -> torch.Tensor:
    """facebookresearch/mae's random_masking, reduced to the mask it returns ([B, L], 1 = removed)."""
    b, l = noise.shape
    len_keep = int(l * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones([b, l])
    mask[:, :len_keep] = 0
    return torch.gather(mask, dim=1, index=ids_restore)


@pytest.mark.parametrize("num_parts,mask_ratio,num_patches", [(1, 0.75, 64), (2, 0.75, 64), (4, 0.75, 64),
                                                              (2, 0.6, 49), (3, 0.7, 49), (2, 0.5, 196)])
def test_shape_ratio_and_disjoint_visible_sets(num_parts: int, mask_ratio: float, num_patches: int) -> None:
    g = torch.Generator().manual_seed(0)
    mask = parallel_masks(5, num_patches, num_parts, mask_ratio, generator=g)
    assert mask.shape == (num_parts, 5, num_patches) and mask.dtype == torch.bool
    n_keep = num_visible(num_patches, mask_ratio)
    assert ((~mask).sum(-1) == n_keep).all()  # every part masks the same ratio
    visible_count = (~mask).sum(0)  # [B, L]: in how many parts each patch is visible
    assert visible_count.max() <= 1  # disjoint visible sets
    assert (visible_count.sum(-1) == num_parts * n_keep).all()


def test_full_coverage_when_parts_fill_the_image() -> None:
    mask = parallel_masks(8, 64, 4, 0.75, generator=torch.Generator().manual_seed(1))
    assert ((~mask).sum(0) == 1).all()  # each patch visible in exactly one part


def test_k1_equals_mae_random_masking() -> None:
    noise = torch.rand(6, 49, generator=torch.Generator().manual_seed(3))
    ours = parallel_masks(6, 49, 1, 0.75, noise=noise)[0]
    assert torch.equal(ours, mae_random_masking(noise, 0.75).bool())


def test_generator_makes_masks_deterministic() -> None:
    a = parallel_masks(4, 64, 4, 0.75, generator=torch.Generator().manual_seed(7))
    b = parallel_masks(4, 64, 4, 0.75, generator=torch.Generator().manual_seed(7))
    c = parallel_masks(4, 64, 4, 0.75, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_visible_indices_gather_the_visible_patches() -> None:
    mask = parallel_masks(3, 16, 2, 0.5, generator=torch.Generator().manual_seed(0))
    ids = visible_indices(mask)
    assert ids.shape == (2, 3, 8)
    assert not torch.gather(mask, 2, ids).any()  # all gathered positions are visible
    assert (ids.diff(dim=-1) > 0).all()  # ascending, no repeats


def test_invalid_combinations_say_which_k_are_allowed() -> None:
    assert allowed_num_parts(64, 0.75) == range(1, 5)
    with pytest.raises(ValueError, match=r"allowed K are 1\.\.4"):
        parallel_masks(2, 64, 5, 0.75)
    with pytest.raises(ValueError, match="no visible patch"):
        parallel_masks(2, 4, 1, 0.9)


@pytest.mark.parametrize("num_parts,mask_ratio,expected", [(2, 0.75, 8), (4, 0.75, 8), (2, 0.5, 0)])
def test_masked_in_both_counts_the_patches_two_parts_share(num_parts: int, mask_ratio: float,
                                                           expected: int) -> None:
    # where the consistency loss looks: at K=2, r=0.5 the visible halves are complementary
    masks = parallel_masks(3, 16, num_parts, mask_ratio, generator=torch.Generator().manual_seed(0))
    assert masked_in_both(16, mask_ratio) == expected
    for i in range(num_parts):
        for j in range(i + 1, num_parts):
            assert ((masks[i] & masks[j]).sum(-1) == expected).all()
