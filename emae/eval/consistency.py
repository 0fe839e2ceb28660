"""`emae consistency`: how much a model's prediction of a patch depends on which other patches it
happens to see (the paper's "prediction consistency" problem).

For N val images and R rounds, each round draws an independent single mask per image (K = 1, the
model's mask ratio, i.e. MAE-style masking) and records the predictions. For every patch masked in
c >= 2 rounds, the unbiased variance of its c predictions is taken per value (pixel x channel)
and averaged over the values; `consistency` is the mean of that over all such patches. Lower is
more consistent; a model whose predictions ignore the mask scores 0. Predictions are compared in
the model's own target space (per-patch normalised pixels when `norm_pix_loss`). Masks are drawn
from generators seeded by (seed, round, first image of the batch): the figure is deterministic.

Output folder: metrics.json {consistency, consistency_std (over patches), recon_loss (MSE on
masked patches, averaged over rounds), patches_counted, num_images, rounds, mask_ratio,
num_parts_trained, checkpoint, seconds}.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from emae.config import Config, add_config_arguments, config_from_args
from emae.data import build_dataset, dataset_digest, eval_transform
from emae.errors import EmaeError
from emae.eval.config import ConsistencyConfig
from emae.eval.features import add_checkpoint_argument
from emae.provenance import file_digest, write_metrics
from emae.losses import patch_targets
from emae.masking import parallel_masks
from emae.models import EMAE
from emae.models.export import load_pretrained
from emae.seeding import derive_seed
from emae.train.common import default_device

log = logging.getLogger("emae.consistency")


class PatchSpread:
    """Per-patch spread of predictions over rounds, from counts, sums and sums of squares."""

    def __init__(self) -> None:
        self.values: list[torch.Tensor] = []  # mean variance of each patch masked >= 2 times

    def add_batch(self, preds: torch.Tensor, masks: torch.Tensor) -> None:
        """preds: [R, B, L, P], masks: [R, B, L] (True = masked) -> per-patch spreads kept."""
        m = masks.to(torch.float64).unsqueeze(-1)  # [R, B, L, 1]
        p = preds.to(torch.float64)
        count = m.sum(0)  # [B, L, 1]
        total = (p * m).sum(0)
        squares = (p.pow(2) * m).sum(0)
        eligible = count.squeeze(-1) >= 2  # [B, L]
        c = count[eligible]  # [n, 1]
        var = (squares[eligible] - total[eligible].pow(2) / c) / (c - 1)  # [n, P], unbiased
        self.values.append(var.clamp_min(0).mean(-1))  # [n]

    def result(self) -> dict[str, float]:
        values = torch.cat(self.values) if self.values else torch.zeros(0, dtype=torch.float64)
        if values.numel() == 0:
            raise EmaeError("no patch was masked in two rounds: raise consistency.rounds")
        return {"consistency": float(values.mean()), "consistency_std": float(values.std()) if
                values.numel() > 1 else 0.0, "patches_counted": int(values.numel())}


@torch.no_grad()
def prediction_consistency(model: EMAE, dataset: Any, num_images: int, rounds: int, batch_size: int,
                           seed: int, device: torch.device, mask_ratio: float | None = None
                           ) -> dict[str, float]:
    """Spread of the predictions of patches masked in >= 2 of `rounds` independent single masks."""
    model.eval()
    ratio = model.mask_ratio if mask_ratio is None else mask_ratio
    subset = Subset(dataset, range(min(num_images, len(dataset))))
    spread = PatchSpread()
    recon_sum, recon_n = 0.0, 0
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False)
    for batch_index, (imgs, _) in enumerate(tqdm(loader, desc="consistency", unit="batch", leave=False)):
        imgs = imgs.to(device)  # [B, C, H, W]
        target = patch_targets(model.patchify(imgs).float(), model.norm_pix_loss)  # [B, L, P]
        preds, masks = [], []
        for r in range(rounds):
            generator = torch.Generator(device=device).manual_seed(
                derive_seed(seed, "consistency", r, batch_index * batch_size))
            mask = parallel_masks(imgs.shape[0], model.num_patches, 1, ratio, generator=generator,
                                  device=device)  # [1, B, L]
            pred = model(imgs, mask=mask).pred.float()  # [1, B, L, P]
            err = (pred[0] - target).pow(2).mean(-1)  # [B, L]
            recon_sum += float((err * mask[0]).sum() / mask[0].sum())
            recon_n += 1
            preds.append(pred[0].cpu())
            masks.append(mask[0].cpu())
        spread.add_batch(torch.stack(preds), torch.stack(masks))
    return {**spread.result(), "recon_loss": recon_sum / max(recon_n, 1)}


# ----------------------------------------------------------------------------------- command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command line of `emae consistency` and `emae visualize`: a pre-training checkpoint."""
    add_checkpoint_argument(parser, "pre-training checkpoint (runs/<variant>/checkpoints/last.pt)")
    add_config_arguments(parser, out_required=True)


def run(args: argparse.Namespace, evaluate: Callable[[Config, Path, Path], dict[str, Any]] | None = None) -> None:
    """`evaluate(config, checkpoint, out)` (default: the consistency) from the command line."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    metrics = (evaluate or evaluate_consistency)(config_from_args(args), Path(args.checkpoint), Path(args.out))
    print(json.dumps(metrics, indent=2, sort_keys=True))


def load_model_for_data(checkpoint: Path, config: Config) -> tuple[EMAE, Config]:
    """The pre-trained EMAE (with decoder); its image size and channels must be the data's."""
    model, trained = load_pretrained(checkpoint)
    if (trained.data.image_size, trained.data.in_chans) != (config.data.image_size, config.data.in_chans):
        raise EmaeError(f"{checkpoint}: model was trained on {trained.data.image_size}px images with "
                        f"{trained.data.in_chans} channels but data.image_size={config.data.image_size}, "
                        f"data.in_chans={config.data.in_chans}")
    return model, trained


def evaluate_consistency(config: Config, checkpoint: Path, out: Path) -> dict[str, Any]:
    cfg: ConsistencyConfig = config.section("consistency")
    val_set = build_dataset(config.data, "val", eval_transform(config.data))
    model, trained = load_model_for_data(checkpoint, config)
    device = default_device()
    start = time.perf_counter()
    model.to(device)
    metrics: dict[str, Any] = prediction_consistency(model, val_set, cfg.num_images, cfg.rounds,
                                                     cfg.batch_size, cfg.seed, device)
    metrics |= {"num_images": min(cfg.num_images, len(val_set)), "rounds": cfg.rounds,
                "mask_ratio": model.mask_ratio, "num_parts_trained": trained.model.num_parts,
                "checkpoint": str(checkpoint), "seconds": time.perf_counter() - start}
    inputs = {"checkpoint": file_digest(checkpoint), "data": dataset_digest(config.data)}
    metrics = write_metrics(out / "metrics.json", metrics, inputs, world_size=1)
    log.info("prediction consistency %.4g over %d patches -> %s", metrics["consistency"],
             metrics["patches_counted"], out / "metrics.json")
    return metrics
