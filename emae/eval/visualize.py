"""`emae visualize`: reconstruction grids a person can read.

One row per val image (spread evenly over the split, so several classes show): the original, then
for each of the model's K parts (K = 1: MAE) its masked input, its reconstruction, and the
reconstruction with the visible patches pasted back. As in MAE's demo, norm-pix predictions are
turned back into pixels with each patch's own mean and variance from the original, then the data
normalisation is undone. Small images are upscaled (nearest) to `visualize.cell_pixels`.

Output folder: reconstructions.png, metrics.json {images: [file names], num_images, num_parts,
mask_ratio, recon_loss (per part, MSE on masked patches in the model's target space), checkpoint}.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from emae.config import Config  # noqa: E402
from emae.data import build_dataset, dataset_digest, eval_transform  # noqa: E402
# the same command line as `emae consistency`: a pre-training checkpoint
from emae.eval.consistency import add_arguments, load_model_for_data  # noqa: E402,F401
from emae.eval.consistency import run as run_checkpoint_command  # noqa: E402
from emae.eval.config import VisualizeConfig  # noqa: E402
from emae.io import atomic_write  # noqa: E402
from emae.provenance import file_digest, write_metrics  # noqa: E402
from emae.losses import patch_targets  # noqa: E402
from emae.models import EMAE  # noqa: E402
from emae.seeding import derive_seed  # noqa: E402
from emae.train.common import default_device  # noqa: E402

log = logging.getLogger("emae.visualize")
MASKED_GRAY = 0.5  # fill of removed patches in the "masked" column


@torch.no_grad()
def reconstruct(model: EMAE, imgs: torch.Tensor, generator: torch.Generator
                ) -> dict[str, torch.Tensor]:
    """Pixel-space panels. imgs: [B, C, H, W] (normalised) -> masked / recon / pasted: [K, B, C, H, W]
    in the same normalised space, mask: [K, B, L], recon_loss: [K]."""
    model.eval()
    out = model(imgs, generator=generator)
    pred, mask = out.pred.float(), out.mask  # [K, B, L, P], [K, B, L]
    patches = model.patchify(imgs).float()  # [B, L, P]
    target = patch_targets(patches, model.norm_pix_loss)
    recon_loss = ((pred - target).pow(2).mean(-1) * mask).sum((1, 2)) / mask.sum((1, 2))  # [K]
    if model.norm_pix_loss:  # undo the per-patch normalisation with the original's statistics
        mean = patches.mean(-1, keepdim=True)
        var = patches.var(-1, keepdim=True)
        pred = pred * (var + 1e-6) ** 0.5 + mean
    m = mask.unsqueeze(-1).float()  # [K, B, L, 1]
    unpatch = lambda x: torch.stack([model.unpatchify(part) for part in x])  # noqa: E731
    return {
        "recon": unpatch(pred),
        "pasted": unpatch(pred * m + patches * (1 - m)),
        "visible": unpatch((1 - m).expand_as(pred)),  # 1 on visible pixels
        "mask": mask,
        "recon_loss": recon_loss,
    }


def to_display(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Normalised [..., C, H, W] -> [..., H, W, C] in 0..1."""
    m = torch.tensor(mean).view(-1, 1, 1)
    s = torch.tensor(std).view(-1, 1, 1)
    return (x.cpu() * s + m).clamp(0, 1).movedim(-3, -1)


def draw_grid(original: torch.Tensor, panels: dict[str, torch.Tensor], path: Path, cell_pixels: int,
              mean: tuple[float, ...], std: tuple[float, ...], title: str) -> None:
    """Rows: images; columns: original, then (masked, reconstruction, + visible) per part."""
    k, b = panels["recon"].shape[:2]
    orig = to_display(original, mean, std)  # [B, H, W, C]
    recon = to_display(panels["recon"], mean, std)
    pasted = to_display(panels["pasted"], mean, std)
    visible = panels["visible"].cpu().movedim(-3, -1)  # [K, B, H, W, C]
    masked = orig.unsqueeze(0) * visible + MASKED_GRAY * (1 - visible)
    columns = [("original", lambda i: orig[i])]
    for part in range(k):
        name = f"part {part + 1}\n" if k > 1 else ""
        columns += [(f"{name}masked", lambda i, p=part: masked[p, i]),
                    (f"{name}reconstruction", lambda i, p=part: recon[p, i]),
                    (f"{name}+ visible", lambda i, p=part: pasted[p, i])]
    inch = cell_pixels / 100
    fig, axes = plt.subplots(b, len(columns), figsize=(len(columns) * inch, b * inch + 0.6),
                             dpi=100, squeeze=False)
    for i in range(b):
        for j, (label, panel) in enumerate(columns):
            ax = axes[i, j]
            image = panel(i).numpy()
            ax.imshow(image.squeeze(-1) if image.shape[-1] == 1 else image, interpolation="nearest",
                      cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(label, fontsize=max(6, min(10, cell_pixels // 14)))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


# ----------------------------------------------------------------------------------- command


def run(args: argparse.Namespace) -> None:
    run_checkpoint_command(args, visualize)


def visualize(config: Config, checkpoint: Path, out: Path) -> dict[str, Any]:
    cfg: VisualizeConfig = config.section("visualize")
    val_set = build_dataset(config.data, "val", eval_transform(config.data))
    model, trained = load_model_for_data(checkpoint, config)
    device = default_device()
    model.to(device)
    n = min(cfg.num_images, len(val_set))
    indices = torch.linspace(0, len(val_set) - 1, n).round().long().tolist()  # spread over classes
    imgs = torch.stack([val_set[i][0] for i in indices]).to(device)
    generator = torch.Generator(device=device).manual_seed(derive_seed(cfg.seed, "visualize"))
    panels = reconstruct(model, imgs, generator)
    k = panels["recon"].shape[0]
    kind = "MAE" if k == 1 else f"EMAE, K={k} parts (disjoint visible sets)"
    title = f"{kind}, mask ratio {model.mask_ratio:g}: {checkpoint}"
    name = "reconstructions.png"
    draw_grid(imgs, panels, out / name, cfg.cell_pixels, config.data.mean, config.data.std, title)
    metrics = {"images": [name], "num_images": n, "num_parts": k, "mask_ratio": model.mask_ratio,
               "recon_loss": [float(v) for v in panels["recon_loss"]], "checkpoint": str(checkpoint)}
    inputs = {"checkpoint": file_digest(checkpoint), "data": dataset_digest(config.data)}
    metrics = write_metrics(out / "metrics.json", metrics, inputs, world_size=1)
    log.info("wrote %s", out / name)
    return metrics
