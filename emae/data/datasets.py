"""Data sets: ImageFolder (ImageNet layout, also what `emae prepare` writes) and CIFAR-10/100.

Bad input fails early with the path: a missing root or split, other classes in val/ than in train/,
a class folder without images, and every unreadable image (found by the scan, before training or
evaluation starts; or, with `data.skip_corrupt`, left out with one warning).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import torch
from torchvision import datasets, transforms

from emae.data.images import load_rgb
from emae.data.scan import IMAGE_EXTENSIONS  # noqa: F401 - emae.dense reads it here
from emae.data.scan import DatasetScan, check_same_classes, is_image, scan_imagefolder
from emae.errors import EmaeError

log = logging.getLogger(__name__)


def pretrain_transform(data_cfg: Any, crop_scale_min: float | None = None) -> Callable:
    """MAE's pre-training (and augmented linear-probe) augmentation: RandomResizedCrop (bicubic,
    smallest area `crop_scale_min`, by default the data's), horizontal flip, normalise."""
    scale_min = data_cfg.crop_scale_min if crop_scale_min is None else crop_scale_min
    steps: list[Callable] = [
        transforms.RandomResizedCrop(data_cfg.image_size, scale=(scale_min, 1.0),
                                     interpolation=transforms.InterpolationMode.BICUBIC),
    ]
    if data_cfg.hflip:
        steps.append(transforms.RandomHorizontalFlip())
    steps += [transforms.ToTensor(), transforms.Normalize(data_cfg.mean, data_cfg.std)]
    return transforms.Compose(steps)


def eval_transform(data_cfg: Any) -> Callable:
    """Deterministic evaluation view: resize the short side to size/0.875, centre crop (MAE/DeiT);
    at the embedded set's tiny size the images already have the size, so only a resize."""
    size = data_cfg.image_size
    resize = size if size < 64 else int(size / 0.875)
    return transforms.Compose([
        transforms.Resize(resize, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(size),
        transforms.ToTensor(),
        transforms.Normalize(data_cfg.mean, data_cfg.std),
    ])


class CheckedImageFolder(datasets.ImageFolder):
    """ImageFolder over the samples a scan found readable, with the train split's class mapping
    (so a class has the same index in both splits); a file that fails later is named in the error."""

    def __init__(self, root: str | Path, classes: list[str], samples: list[tuple[str, int]],
                 transform: Callable | None, cache_mb: float = 0) -> None:
        self._scanned = classes, samples
        # decoded images by index, up to cache_mb per process: a small set (the embedded digits) is
        # decoded once instead of every epoch; transforms return new images, the cached ones stay
        self._cache: dict[int, Any] = {}
        self._cache_left = cache_mb * 2**20
        super().__init__(str(root), transform=transform, loader=load_rgb, allow_empty=True,
                         is_valid_file=is_image)
        empty = [c for c, i in self.class_to_idx.items() if not any(t == i for t in self.targets)]
        if empty:
            raise EmaeError(f"{root}: class folder(s) without images: {', '.join(empty[:10])}")
        if not self.samples:
            raise EmaeError(f"{root}: no images found")

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = self._cache.get(index)
        if image is None:
            image = self.loader(self.samples[index][0])
            if (size := image.width * image.height * len(image.getbands())) <= self._cache_left:
                self._cache[index], self._cache_left = image, self._cache_left - size
        target = self.targets[index]
        return (self.transform(image) if self.transform else image), (
            self.target_transform(target) if self.target_transform else target)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        classes = self._scanned[0]
        return list(classes), {name: i for i, name in enumerate(classes)}

    def make_dataset(self, directory: str, class_to_idx: dict[str, int], *args: Any,
                     **kwargs: Any) -> list[tuple[str, int]]:
        return list(self._scanned[1])


def build_dataset(data_cfg: Any, split: str, transform: Callable | None) -> torch.utils.data.Dataset:
    """The `split` ('train' or 'val') of the configured data set, with `transform` applied.

    An ImageFolder is checked and scanned first, both splits (see `emae.data.scan`): other class
    names in val/ than in train/, a class count other than data.num_classes, and every unreadable
    image of either split are errors before anything is loaded; with data.skip_corrupt the
    unreadable images are left out (one warning lists them), so sample indices stay stable.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    root = Path(data_cfg.root)
    if data_cfg.kind == "imagefolder":
        dataset = _imagefolder(data_cfg, split, transform)
        num_classes = len(dataset.classes)
    else:
        cls = datasets.CIFAR10 if data_cfg.kind == "cifar10" else datasets.CIFAR100
        try:
            dataset = cls(str(root), train=split == "train", transform=transform, download=True)
        except Exception as err:  # noqa: BLE001 - offline: URLError and friends
            raise EmaeError(f"{data_cfg.kind}: cannot load or download into {root}: {err} (offline? "
                            f"place the extracted data set under {root})") from None
        num_classes = len(dataset.classes)
    if num_classes != data_cfg.num_classes:
        raise EmaeError(f"{root}/{split}: has {num_classes} classes but data.num_classes="
                        f"{data_cfg.num_classes}")
    if len(dataset) == 0:
        raise EmaeError(f"{root}/{split}: the split is empty")
    return dataset


def _imagefolder(data_cfg: Any, split: str, transform: Callable | None) -> CheckedImageFolder:
    root = Path(data_cfg.root)
    _check_class_count(root, check_same_classes(root), data_cfg)  # before any decode
    scan = scan_imagefolder(root)
    accept_scan(data_cfg, scan)
    return CheckedImageFolder(root / split, scan.classes, scan.splits[split].samples(), transform,
                              data_cfg.cache_mb)


def accept_scan(data_cfg: Any, scan: DatasetScan) -> None:
    """Refuse a scanned ImageFolder with a class count other than data.num_classes or with
    unreadable images (all of them listed); with data.skip_corrupt, warn about those instead."""
    _check_class_count(scan.root, scan.classes, data_cfg)
    if not scan.bad:
        return
    if not data_cfg.skip_corrupt:
        raise EmaeError(f"{scan.root}: {len(scan.bad)} unreadable image(s) (fix or delete them, or set "
                        f"data.skip_corrupt=true to leave them out):{scan.bad_lines()}")
    lines = scan.bad_lines()
    if (str(scan.root), lines) not in _warned:  # once per process, not per split or kNN monitor run
        _warned.add((str(scan.root), lines))
        log.warning("%s: leaving out %d unreadable image(s) (data.skip_corrupt=true):%s", scan.root,
                    len(scan.bad), lines)


_warned: set[tuple[str, str]] = set()


def _check_class_count(root: Path, classes: list[str], data_cfg: Any) -> None:
    if len(classes) != data_cfg.num_classes:
        raise EmaeError(f"{root}: has {len(classes)} classes but data.num_classes={data_cfg.num_classes}")
