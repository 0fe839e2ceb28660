"""`emae knn`: weighted cosine k-nearest-neighbour classification on frozen features (DINO's
protocol): each val image votes with its k most similar train images, weighted by
exp(cosine / temperature). Also the pre-training monitor (`knn_monitor`).

Output folder: metrics.json {top1, top5 (percent), k, temperature, num_train, num_val,
feature_dim, random_init, checkpoint, seconds}.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from emae.config import Config
from emae.data import build_dataset, dataset_digest, eval_transform
from emae.eval.config import KnnConfig
from emae.eval.features import (accuracy, add_encoder_evaluation_arguments, build_encoder, extract_features,
                                run_encoder_evaluation)
from emae.provenance import encoder_digest, write_metrics
from emae.train import distributed
from emae.train.common import autocast_dtype, default_device

log = logging.getLogger("emae.knn")


@torch.no_grad()
def knn_scores(train_feats: torch.Tensor, train_labels: torch.Tensor, query_feats: torch.Tensor,
               num_classes: int, k: int, temperature: float, chunk: int = 1024) -> torch.Tensor:
    """Class scores [Nq, C]: sum over the k nearest train features of exp(cos / T) per class."""
    train = F.normalize(train_feats.float(), dim=1)  # [Nt, D]
    k = min(k, train.shape[0])
    scores = []
    for start in range(0, query_feats.shape[0], chunk):
        query = F.normalize(query_feats[start : start + chunk].float(), dim=1)  # [q, D]
        sim, idx = (query @ train.T).topk(k, dim=1)  # [q, k]
        weights = (sim / temperature).exp()
        votes = torch.zeros(query.shape[0], num_classes, dtype=weights.dtype)
        votes.scatter_add_(1, train_labels[idx], weights)  # [q, C]
        scores.append(votes)
    return torch.cat(scores)


def knn_accuracy(train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor],
                 num_classes: int, k: int, temperature: float) -> dict[str, float]:
    scores = knn_scores(train[0], train[1], val[0], num_classes, k, temperature)
    return accuracy(scores, val[1])


def knn_features(encoder: torch.nn.Module, config: Config, device: torch.device,
                 dist_info: distributed.DistInfo, datasets: tuple[Any, Any] | None = None):
    """(train, val) features of the eval view of the data, each (features, labels), on every rank."""
    cfg: KnnConfig = config.section("knn")
    train_set, val_set = datasets or _datasets(config)
    amp = autocast_dtype(cfg.amp, device)
    common = dict(batch_size=cfg.batch_size, num_workers=config.data.num_workers, device=device,
                  dist_info=dist_info, amp_dtype=amp, pool=cfg.pool)
    train = extract_features(encoder, train_set, desc="kNN train features", **common)
    val = extract_features(encoder, val_set, desc="kNN val features", **common)
    return train, val


def knn_monitor(encoder: torch.nn.Module, config: Config, device: torch.device,
                dist_info: distributed.DistInfo, datasets: tuple[Any, Any]) -> dict[str, float]:
    """kNN top-1/top-5 of `encoder` on `datasets` (`monitor_datasets`; the pre-training monitor).
    Under DDP every rank encodes its share, features are all-gathered, and every rank computes
    (and returns) the same figures."""
    cfg: KnnConfig = config.section("knn")
    train, val = knn_features(encoder, config, device, dist_info, datasets)
    result = knn_accuracy(train, val, config.data.num_classes, cfg.k, cfg.temperature)
    return {"knn_top1": result["top1"], "knn_top5": result["top5"]}


def monitor_datasets(config: Config) -> tuple[Any, Any]:
    """The eval view of both splits, built once for all of a run's monitor passes. The view is
    deterministic, so where the transformed images of a split fit in `data.cache_mb` (the embedded
    digits: 22 MB of 64) they are kept as tensors and a pass runs the encoder alone (decoding and
    transforming were 60% of a pass on the digits)."""
    return tuple(_as_tensors(dataset, config.data.cache_mb) for dataset in _datasets(config))


def _as_tensors(dataset: Any, cache_mb: float) -> Any:
    image, _ = dataset[0]
    if len(dataset) * image.numel() * image.element_size() > cache_mb * 2**20:
        return dataset
    images, labels = zip(*(dataset[i] for i in range(len(dataset))))
    return TensorDataset(torch.stack(images), torch.as_tensor(labels))


def _datasets(config: Config) -> tuple[Any, Any]:
    transform = eval_transform(config.data)
    return build_dataset(config.data, "train", transform), build_dataset(config.data, "val", transform)


# ----------------------------------------------------------------------------------- command


add_arguments = add_encoder_evaluation_arguments


def run(args: argparse.Namespace) -> None:
    run_encoder_evaluation(evaluate_knn, args)


def evaluate_knn(config: Config, checkpoint: Path, out: Path, random_init: bool = False
                 ) -> dict[str, Any]:
    cfg: KnnConfig = config.section("knn")  # params errors first,
    datasets = _datasets(config)  # then data errors,
    encoder = build_encoder(checkpoint, config.data, random_init=random_init, seed=cfg.seed)  # then checkpoint ones
    dist_info = distributed.init_distributed()
    device = default_device()
    start = time.perf_counter()
    encoder.to(device)
    train, val = knn_features(encoder, config, device, dist_info, datasets)
    metrics: dict[str, Any] = knn_accuracy(train, val, config.data.num_classes, cfg.k, cfg.temperature)
    metrics |= {"k": cfg.k, "temperature": cfg.temperature, "pool": cfg.pool, "num_train": len(train[1]),
                "num_val": len(val[1]), "feature_dim": int(train[0].shape[1]),
                "random_init": random_init, "checkpoint": str(checkpoint),
                "seconds": time.perf_counter() - start}
    if dist_info.is_main:
        inputs = {"encoder": encoder_digest(checkpoint, random_init), "data": dataset_digest(config.data)}
        metrics = write_metrics(out / "metrics.json", metrics, inputs, dist_info.world_size)
        log.info("kNN (k=%d, T=%g): top-1 %.2f%%, top-5 %.2f%% -> %s", cfg.k, cfg.temperature,
                 metrics["top1"], metrics["top5"], out / "metrics.json")
    distributed.barrier(dist_info)
    distributed.cleanup(dist_info)
    return metrics if dist_info.is_main else {}
