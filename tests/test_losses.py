import pytest
import torch

from emae.losses import consistency_loss, patch_targets, reconstruction_loss
from emae.masking import parallel_masks


def _data(num_parts: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(num_parts, 3, 16, 12, generator=g, requires_grad=True)
    target = torch.randn(3, 16, 12, generator=g)
    mask = parallel_masks(3, 16, num_parts, 0.75, generator=g)
    return pred, target, mask


def test_reconstruction_is_mse_over_masked_patches_only() -> None:
    pred, target, mask = _data()
    expected = torch.stack([((pred[k] - target) ** 2).mean(-1)[mask[k]] for k in range(4)]).mean()
    assert torch.allclose(reconstruction_loss(pred, target, mask), expected)
    # visible patches do not matter
    changed = pred.detach().clone()
    changed[~mask] = 1e3
    assert torch.allclose(reconstruction_loss(changed, target, mask), expected)


@pytest.mark.parametrize("distance", ["l1", "mse"])
def test_consistency_zero_when_parts_agree_and_for_k1(distance: str) -> None:
    _, _, mask = _data()
    same = torch.randn(1, 3, 16, 12).expand(4, -1, -1, -1)
    # mse's closed form (squared deviations from the parts' mean) leaves float rounding
    assert consistency_loss(same, mask, distance).item() == pytest.approx(0.0, abs=1e-6)
    pred, _, mask1 = _data(num_parts=1)
    assert consistency_loss(pred, mask1, distance).item() == 0.0


@pytest.mark.parametrize("distance", ["l1", "mse"])
def test_consistency_matches_pairwise_definition(distance: str) -> None:
    pred, _, mask = _data()
    total, count = 0.0, 0
    for i in range(4):
        for j in range(i + 1, 4):
            both = mask[i] & mask[j]
            diff = (pred[i] - pred[j])[both]
            d = diff.abs().mean(-1) if distance == "l1" else diff.pow(2).mean(-1)
            total, count = total + d.sum(), count + both.sum()
    assert torch.allclose(consistency_loss(pred, mask, distance), total / count)


def test_stop_gradient_halves_the_gradient_of_the_symmetric_distance() -> None:
    # 0.5*(d(p_i, sg p_j) + d(sg p_i, p_j)): each side only pulls itself towards the other
    pred, _, mask = _data(num_parts=2)
    consistency_loss(pred, mask, "mse").backward()
    grad_sg = pred.grad.clone()
    plain = pred.detach().clone().requires_grad_(True)
    both = (mask[0] & mask[1]).float()
    d = (plain[0] - plain[1]).pow(2).mean(-1)
    ((d * both).sum() / both.sum()).backward()
    assert torch.allclose(grad_sg, 0.5 * plain.grad, atol=1e-7)
    # and no gradient reaches patches that are not masked in both views
    assert (grad_sg[0][~(mask[0] & mask[1])] == 0).all()


@pytest.mark.parametrize("distance", ["l1", "mse"])
@pytest.mark.parametrize("num_parts", [2, 4])
def test_gradient_matches_the_pairwise_stop_gradient_definition(distance: str, num_parts: int) -> None:
    pred, _, mask = _data(num_parts=num_parts)
    consistency_loss(pred, mask, distance).backward()
    naive = pred.detach().clone().requires_grad_(True)

    def d(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a - b).abs().mean(-1) if distance == "l1" else (a - b).pow(2).mean(-1)

    total, count = naive.new_zeros(()), 0
    for i in range(num_parts):
        for j in range(i + 1, num_parts):
            both = (mask[i] & mask[j]).float()
            total = total + (0.5 * (d(naive[i], naive[j].detach()) + d(naive[i].detach(), naive[j])) * both).sum()
            count += both.sum()
    (total / count).backward()
    assert torch.allclose(pred.grad, naive.grad, atol=1e-7)


def test_norm_pix_targets_are_per_patch_standardised() -> None:
    patches = torch.rand(2, 5, 48) * 7 + 3
    t = patch_targets(patches, norm_pix_loss=True)
    assert torch.allclose(t.mean(-1), torch.zeros(2, 5), atol=1e-5)
    assert torch.allclose(t.var(-1), torch.ones(2, 5), atol=1e-3)
    assert torch.equal(patch_targets(patches, norm_pix_loss=False), patches)
