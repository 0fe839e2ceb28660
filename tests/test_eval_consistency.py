"""Prediction consistency and reconstruction grids, on tiny EMAE / MAE checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from emae.config import Config, load_config
from emae.errors import EmaeError
from emae.eval.consistency import PatchSpread, evaluate_consistency, prediction_consistency
from emae.eval.visualize import reconstruct
from emae.losses import patch_targets
from emae.models import EMAE
from emae.models.emae import EMAEOutput
from emae.train.checkpoint import save_checkpoint
from tests.conftest import PARAMS, TINY_OVERRIDES, run_cli

MAE = ["model.num_parts=1", "model.consistency_weight=0"]


def _config(digits_root: Path, *extra: str) -> Config:
    return load_config([PARAMS], TINY_OVERRIDES + [f"data.root={digits_root}", *extra])


def _checkpoint(config: Config, path: Path, model: EMAE | None = None) -> Path:
    """A pre-training checkpoint in `emae pretrain`'s format (model + resolved config)."""
    torch.manual_seed(0)
    model = model or EMAE.from_config(config.model, config.data)
    save_checkpoint(path, {"model": model.state_dict(), "config": config.to_dict()})
    return path


def test_patch_spread_is_the_variance_over_rounds_that_mask_the_patch() -> None:
    g = torch.Generator().manual_seed(0)
    preds = torch.randn(6, 3, 5, 4, generator=g)  # [R, B, L, P]
    masks = torch.rand(6, 3, 5, generator=g) < 0.6  # [R, B, L]
    spread = PatchSpread()
    spread.add_batch(preds, masks)
    expected = [preds[masks[:, b, l], b, l].double().var(dim=0, unbiased=True).mean()
                for b in range(3) for l in range(5) if masks[:, b, l].sum() >= 2]
    result = spread.result()
    assert result["patches_counted"] == len(expected)
    assert result["consistency"] == pytest.approx(float(torch.stack(expected).mean()), rel=1e-9)


def test_zero_for_a_mask_independent_model_positive_otherwise(digits_root: Path) -> None:
    from emae.data import build_dataset, eval_transform

    config = _config(digits_root)
    val = build_dataset(config.data, "val", eval_transform(config.data))
    torch.manual_seed(0)
    model = EMAE.from_config(config.model, config.data)
    args = dict(num_images=32, rounds=4, batch_size=16, seed=0, device=torch.device("cpu"))
    varying = prediction_consistency(model, val, **args)
    assert varying["consistency"] > 1e-4
    assert prediction_consistency(model, val, **args) == varying  # deterministic under a seed
    assert prediction_consistency(model, val, **(args | {"seed": 1}))["consistency"] != varying["consistency"]
    # a decoder that ignores its input: the same prediction whatever the mask
    with torch.no_grad():
        model.decoder_pred.weight.zero_()
        model.decoder_pred.bias.normal_()
    constant = prediction_consistency(model, val, **args)
    assert constant["consistency"] < 1e-12 and constant["patches_counted"] == varying["patches_counted"]


def test_consistency_command_writes_metrics(digits_root: Path, tmp_path: Path) -> None:
    config = _config(digits_root, *MAE)
    ckpt = _checkpoint(config, tmp_path / "last.pt")
    run_cli("consistency", "--checkpoint", str(ckpt), "-o", str(tmp_path / "out"), *TINY_OVERRIDES,
            f"data.root={digits_root}", "consistency.num_images=16", "consistency.rounds=3")
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["consistency"] > 0 and metrics["num_images"] == 16 and metrics["rounds"] == 3
    assert metrics["num_parts_trained"] == 1 and metrics["patches_counted"] > 0


def test_checkpoint_errors(digits_root: Path, tmp_path: Path) -> None:
    config = _config(digits_root)
    with pytest.raises(EmaeError, match="pre-training checkpoint not found"):
        evaluate_consistency(config, tmp_path / "missing.pt", tmp_path / "o")
    # weights of another architecture under this config: the mismatched keys are listed
    other = EMAE.from_config(_config(digits_root, "model.depth=3").model, config.data)
    bad = tmp_path / "bad.pt"
    save_checkpoint(bad, {"model": other.state_dict(), "config": config.to_dict()})
    with pytest.raises(EmaeError, match=r"unexpected: encoder\.blocks\.2\."):
        evaluate_consistency(config, bad, tmp_path / "o")
    # a model trained at 16 px evaluated on 32 px data
    ckpt = _checkpoint(config, tmp_path / "last.pt")
    with pytest.raises(EmaeError, match="16px images.*data.image_size=32"):
        evaluate_consistency(_config(digits_root, "data.image_size=32", "model.patch_size=4"), ckpt, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_perfect_predictions_reconstruct_the_image(digits_root: Path) -> None:
    """Undoing norm-pix with each patch's own statistics gives back the original pixels."""
    config = _config(digits_root)
    model = EMAE.from_config(config.model, config.data)
    imgs = torch.randn(3, 3, 16, 16)

    def oracle(x: torch.Tensor, generator: torch.Generator | None = None) -> EMAEOutput:
        from emae.masking import parallel_masks

        mask = parallel_masks(x.shape[0], model.num_patches, model.num_parts, model.mask_ratio,
                              generator=generator)
        pred = patch_targets(model.patchify(x), model.norm_pix_loss).expand(model.num_parts, -1, -1, -1)
        zero = torch.zeros(())
        return EMAEOutput(zero, zero, zero, pred, mask)

    model.forward = oracle  # type: ignore[method-assign]
    panels = reconstruct(model, imgs, torch.Generator().manual_seed(0))
    assert panels["recon"].shape == (4, 3, 3, 16, 16)
    assert torch.allclose(panels["recon"], imgs.expand(4, -1, -1, -1, -1), atol=1e-3)
    assert panels["recon_loss"].abs().max() < 1e-10
    # the K parts' visible sets are disjoint and cover the image
    assert torch.equal(panels["visible"].sum(0), torch.ones_like(imgs))


@pytest.mark.parametrize("variant", [MAE, []], ids=["mae", "emae"])
def test_visualize_writes_a_readable_grid(digits_root: Path, tmp_path: Path, variant: list[str]) -> None:
    config = _config(digits_root, *variant)
    ckpt = _checkpoint(config, tmp_path / "last.pt")
    run_cli("visualize", "--checkpoint", str(ckpt), "-o", str(tmp_path / "out"), *TINY_OVERRIDES,
            f"data.root={digits_root}", *variant, "visualize.num_images=3", "visualize.cell_pixels=64")
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    k = config.model.num_parts
    assert metrics["num_parts"] == k and len(metrics["recon_loss"]) == k
    with Image.open(tmp_path / "out" / metrics["images"][0]) as image:
        width, height = image.size
    columns = 1 + 3 * k
    assert width == columns * 64 and height >= 3 * 64  # each 16 px image drawn 64 px wide
