"""What the evaluations share: loading a frozen encoder (checked against the data before any
heavy work), sharded feature extraction that every rank ends up with in full, top-k accuracy,
and the command line of the evaluations that read an encoder export."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from timm.models.vision_transformer import VisionTransformer
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from emae.config import add_config_arguments, config_from_args
from emae.errors import EmaeError
from emae.models.export import encoder_kwargs, load_encoder, reinitialise
from emae.seeding import derive_seed, seed_everything
from emae.train.common import autocast
from emae.train.distributed import DistInfo


PIXELS = "pixels"  # --checkpoint of the raw-pixel baseline (kNN, linear probe)


def add_checkpoint_argument(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--checkpoint", "-c", required=True, metavar="PATH", help=what)


class PixelFeatures(torch.nn.Module):
    """The raw-pixel baseline as a frozen 'encoder': its class token and its one patch token are
    both the normalised image, flattened, so either pool gives the pixels themselves."""

    num_prefix_tokens = 1

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.num_features = self.embed_dim = dim

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, 2, C*H*W]
        flat = imgs.flatten(1)
        return torch.stack([flat, flat], dim=1)


def add_random_init_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--random-init", action="store_true",
                        help="baseline: the same architecture, freshly initialised as pre-training "
                             "starts (the checkpoint only gives the architecture)")


def add_encoder_evaluation_arguments(parser: argparse.ArgumentParser) -> None:
    """The command line of kNN, linear probe, fine-tuning and dense transfer: an encoder export, or
    the random-init baseline of its architecture, and the params."""
    add_checkpoint_argument(parser, "encoder export (runs/<variant>/encoder.safetensors)")
    add_random_init_argument(parser)
    add_config_arguments(parser, out_required=True)


def run_encoder_evaluation(evaluate: Callable[..., dict[str, Any]], args: argparse.Namespace,
                           hidden: tuple[str, ...] = ()) -> None:
    """`evaluate(config, checkpoint, out, random_init=...)` from the parsed command line; prints its
    metrics but the `hidden` ones (none on the ranks other than the first)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    metrics = evaluate(config_from_args(args), Path(args.checkpoint), Path(args.out), random_init=args.random_init)
    if metrics:
        print(json.dumps({k: v for k, v in metrics.items() if k not in hidden}, indent=2, sort_keys=True))


def export_kwargs(path: str | Path) -> dict[str, Any]:
    """timm kwargs of an encoder export, with a clear error for anything that is not one."""
    path = Path(path)
    if not path.is_file():
        raise EmaeError(f"{path}: encoder export not found (run `emae pretrain`, which writes "
                        "encoder.safetensors)")
    if path.suffix != ".safetensors":
        raise EmaeError(f"{path}: expected an encoder export (encoder.safetensors); a pre-training "
                        "checkpoint (last.pt) is for `emae consistency` / `emae visualize`")
    try:
        return encoder_kwargs(path)
    except SafetensorError as err:
        raise EmaeError(f"{path}: not a readable safetensors file ({err})") from None


def check_data_fits(kwargs: dict[str, Any], data_cfg: Any, path: str | Path) -> None:
    """The encoder's input size and channels must be the data's (no silent resizing)."""
    problems = []
    if kwargs.get("img_size") != data_cfg.image_size:
        problems.append(f"image size {kwargs.get('img_size')} vs data.image_size={data_cfg.image_size}")
    if kwargs.get("in_chans") != data_cfg.in_chans:
        problems.append(f"{kwargs.get('in_chans')} channels vs data.in_chans={data_cfg.in_chans}")
    if problems:
        raise EmaeError(f"{path}: encoder does not fit the data: " + "; ".join(problems))


def build_encoder(path: str | Path, data_cfg: Any, random_init: bool = False, seed: int = 0,
                  **timm_overrides: Any) -> VisionTransformer:
    """The exported encoder as a timm ViT (all keys checked), or with `random_init` the same
    architecture initialised like pre-training initialises it (sin-cos positions, xavier).
    `path` = "pixels": the raw pixels (`PixelFeatures`) for the frozen-feature protocols."""
    if str(path) == PIXELS:
        return PixelFeatures(data_cfg.in_chans * data_cfg.image_size**2)  # type: ignore[return-value]
    kwargs = export_kwargs(path)
    check_data_fits(kwargs, data_cfg, path)
    seed_everything(derive_seed(seed, "init"))  # heads and random baselines: same on every rank
    encoder = load_encoder(path, **timm_overrides)
    if random_init:
        reinitialise(encoder, kwargs)
    return encoder


def eval_loader(dataset: Dataset, batch_size: int, num_workers: int, device: torch.device) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      pin_memory=device.type == "cuda")


def shard(dataset: Dataset, dist_info: DistInfo) -> tuple[Dataset, int]:
    """Rank r's strided share, padded (by wrapping) so every rank has `per_rank` items."""
    n = len(dataset)  # type: ignore[arg-type]
    if not dist_info.enabled:
        return dataset, n
    per_rank = -(-n // dist_info.world_size)
    indices = [(dist_info.rank + j * dist_info.world_size) % n for j in range(per_rank)]
    return Subset(dataset, indices), per_rank


def gather_rows(local: torch.Tensor, n: int, dist_info: DistInfo) -> torch.Tensor:
    """Undo `shard`: local [per_rank, ...] of every rank -> [n, ...] in data-set order, on all ranks."""
    if not dist_info.enabled:
        return local
    parts = [torch.empty_like(local) for _ in range(dist_info.world_size)]
    dist.all_gather(parts, local.contiguous())
    # row j of rank r is item r + j * W: interleave the ranks
    stacked = torch.stack(parts, dim=1)  # [per_rank, W, ...]
    return stacked.reshape(-1, *local.shape[1:])[:n]


def pooled(encoder: VisionTransformer, imgs: torch.Tensor, pool: str) -> torch.Tensor:
    """imgs: [B, C, H, W] -> [B, D]: the class token ("token"), or the mean of the patch tokens
    ("avg"), both after the encoder's final norm, whatever pooling the encoder was built with."""
    tokens = encoder.forward_features(imgs)  # [B, prefix + L, D]
    if pool == "token":
        return tokens[:, 0]
    return tokens[:, encoder.num_prefix_tokens:].mean(dim=1)


@torch.no_grad()
def extract_features(encoder: torch.nn.Module, dataset: Dataset, batch_size: int, num_workers: int,
                     device: torch.device, dist_info: DistInfo, amp_dtype: torch.dtype | None = None,
                     pool: str = "token", desc: str = "features") -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled (`pool`) encoder output of every item: (features [N, D] float32 on CPU, labels [N]).
    Each rank encodes its share; all ranks return the whole set."""
    was_training = encoder.training
    encoder.eval()
    n = len(dataset)  # type: ignore[arg-type]
    local_set, _ = shard(dataset, dist_info)
    feats, labels = [], []
    for imgs, target in tqdm(eval_loader(local_set, batch_size, num_workers, device), desc=desc,
                             unit="batch", disable=not dist_info.is_main, dynamic_ncols=True, leave=False):
        with autocast(device, amp_dtype):
            out = pooled(encoder, imgs.to(device, non_blocking=True), pool)  # [b, D]
        feats.append(out.float())
        labels.append(torch.as_tensor(target, device=device))
    encoder.train(was_training)
    features = gather_rows(torch.cat(feats), n, dist_info)
    targets = gather_rows(torch.cat(labels), n, dist_info)
    return features.cpu(), targets.cpu()


def topk_correct(scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)
                 ) -> dict[int, int]:
    """Number of rows whose label is among the k best scores (k capped at the class count)."""
    num_classes = scores.shape[1]
    top = scores.topk(min(max(ks), num_classes), dim=1).indices  # [N, kmax]
    hits = top == labels.unsqueeze(1)
    return {k: int(hits[:, : min(k, num_classes)].any(dim=1).sum()) for k in ks}


def accuracy(scores: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """top1 / top5 in percent (0-100)."""
    correct = topk_correct(scores, labels)
    n = max(len(labels), 1)
    return {"top1": 100.0 * correct[1] / n, "top5": 100.0 * correct[5] / n}
