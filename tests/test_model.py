import pytest
import timm
import torch

from emae.masking import parallel_masks
from emae.models import EMAE, load_encoder, save_encoder

TINY = dict(img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=2, num_heads=2,
            decoder_embed_dim=24, decoder_depth=1, decoder_num_heads=2)


def _model(**kw) -> EMAE:
    torch.manual_seed(0)
    return EMAE(**{**TINY, **kw}).eval()


def _imgs(b: int = 3) -> torch.Tensor:
    return torch.randn(b, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def test_forward_backward_shapes() -> None:
    model = _model(num_parts=4).train()
    out = model(_imgs(), generator=torch.Generator().manual_seed(0))
    assert out.pred.shape == (4, 3, 16, 48) and out.mask.shape == (4, 3, 16)
    assert out.loss.ndim == 0 and out.consistency_loss > 0
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert model.encoder.pos_embed.grad is None and model.decoder_pos_embed.grad is None  # fixed sin-cos


def test_parts_in_one_batch_equal_a_loop_over_parts() -> None:
    model = _model(num_parts=4)
    imgs = _imgs()
    mask = parallel_masks(3, 16, 4, 0.75, generator=torch.Generator().manual_seed(2))
    together = model(imgs, mask=mask).pred
    for k in range(4):
        alone = model(imgs, mask=mask[k : k + 1]).pred[0]
        assert torch.allclose(together[k], alone, atol=1e-5)


def test_mae_mode_equals_a_straightforward_mae_loss() -> None:
    """K=1, lambda=0 against MAE's forward_loss written out on the same mask."""
    model = _model(num_parts=1, consistency_weight=0.0)
    imgs = _imgs()
    noise = torch.rand(3, 16, generator=torch.Generator().manual_seed(5))
    mask = parallel_masks(3, 16, 1, 0.75, noise=noise)
    out = model(imgs, mask=mask)
    # MAE: target = patchify(imgs) normalised per patch; loss = mean over removed patches
    p = 4
    target = imgs.reshape(3, 3, 4, p, 4, p).permute(0, 2, 4, 3, 5, 1).reshape(3, 16, p * p * 3)
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
    target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = ((out.pred[0] - target) ** 2).mean(-1)
    mae_loss = (loss * mask[0]).sum() / mask[0].sum()
    assert torch.allclose(out.loss, mae_loss, atol=1e-6)
    assert out.consistency_loss.item() == 0.0


def test_lambda_zero_leaves_pure_reconstruction() -> None:
    imgs, g = _imgs(), torch.Generator().manual_seed(0)
    mask = parallel_masks(3, 16, 4, 0.75, generator=g)
    with_lambda = _model(num_parts=4, consistency_weight=2.0)(imgs, mask=mask)
    without = _model(num_parts=4, consistency_weight=0.0)(imgs, mask=mask)
    assert torch.allclose(without.loss, without.recon_loss)
    assert torch.allclose(with_lambda.recon_loss, without.recon_loss)
    assert torch.allclose(with_lambda.loss, with_lambda.recon_loss + 2.0 * with_lambda.consistency_loss)


def test_patchify_roundtrip() -> None:
    model, imgs = _model(), _imgs()
    assert torch.equal(model.unpatchify(model.patchify(imgs)), imgs)


def test_encoder_export_loads_into_timm_with_the_same_features(tmp_path) -> None:
    model = _model()
    with torch.no_grad():
        model.encoder.blocks[0].mlp.fc1.weight.add_(0.1)  # weights that differ from a fresh init
    path = tmp_path / "encoder.safetensors"
    save_encoder(model, path)
    loaded = load_encoder(path)
    created = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0,
                                **model.encoder_kwargs)
    created.load_state_dict(loaded.state_dict(), strict=True)
    imgs = _imgs()
    with torch.no_grad():
        ours = model.encoder.forward_features(imgs)
        assert torch.allclose(created.eval().forward_features(imgs), ours, atol=1e-6)
        assert torch.allclose(loaded.eval().forward_features(imgs), ours, atol=1e-6)


def test_the_same_weights_export_to_the_same_bytes(tmp_path) -> None:
    """The export's digest names the encoder in every evaluation's inputs: it must not change
    between two writes of the same weights (safetensors orders a metadata map at random)."""
    model = _model()
    exports = []
    for i in range(8):
        save_encoder(model, tmp_path / f"{i}.safetensors")
        exports.append((tmp_path / f"{i}.safetensors").read_bytes())
    assert all(export == exports[0] for export in exports)


def test_export_of_another_architecture_lists_mismatched_keys(tmp_path) -> None:
    path = tmp_path / "encoder.safetensors"
    save_encoder(_model(), path)
    with pytest.raises(Exception, match="shape mismatch: .*blocks.0"):
        load_encoder(path, embed_dim=64, num_heads=2)
