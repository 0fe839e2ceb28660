"""Data sets: ImageFolder (ImageNet layout, also what `emae prepare` writes) and CIFAR-10/100.

Bad input fails early with the path: a missing root or split, a class folder without images, an
unreadable image (or, with `data.skip_corrupt`, a warning and the next image instead).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image
from torchvision import datasets, transforms

from emae.data.scan import IMAGE_EXTENSIONS, is_image  # noqa: F401 - IMAGE_EXTENSIONS: emae.dense reads it here
from emae.errors import EmaeError

log = logging.getLogger(__name__)


def pretrain_transform(data_cfg: Any) -> Callable:
    """MAE's pre-training augmentation: RandomResizedCrop (bicubic), horizontal flip, normalise."""
    steps: list[Callable] = [
        transforms.RandomResizedCrop(data_cfg.image_size, scale=(data_cfg.crop_scale_min, 1.0),
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
    """ImageFolder whose errors name the file; optionally skips unreadable images with a warning."""

    def __init__(self, root: str, transform: Callable | None, skip_corrupt: bool) -> None:
        self.skip_corrupt = skip_corrupt
        super().__init__(root, transform=transform, loader=self._load,
                         allow_empty=True, is_valid_file=is_image)
        empty = [c for c, i in self.class_to_idx.items() if not any(t == i for t in self.targets)]
        if empty:
            raise EmaeError(f"{root}: class folder(s) without images: {', '.join(empty[:10])}")
        if not self.samples:
            raise EmaeError(f"{root}: no images found")

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        try:
            return super().find_classes(directory)
        except FileNotFoundError as err:
            raise EmaeError(f"{directory}: no class folders found ({err})") from None

    @staticmethod
    def _load(path: str) -> Image.Image:
        try:
            with open(path, "rb") as handle:
                image = Image.open(handle)
                return image.convert("RGB")
        except Exception as err:  # noqa: BLE001 - PIL raises many kinds
            raise EmaeError(f"{path}: cannot read image: {err}") from None

    def __getitem__(self, index: int) -> tuple[Any, int]:
        for offset in range(len(self.samples)):
            try:
                return super().__getitem__((index + offset) % len(self.samples))
            except EmaeError as err:
                if not self.skip_corrupt:
                    raise
                log.warning("skipping unreadable image: %s", err)
        raise EmaeError(f"{self.root}: no readable image left")


def build_dataset(data_cfg: Any, split: str, transform: Callable | None) -> torch.utils.data.Dataset:
    """The `split` ('train' or 'val') of the configured data set, with `transform` applied."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    root = Path(data_cfg.root)
    if data_cfg.kind == "imagefolder":
        split_dir = root / split
        if not split_dir.is_dir():
            raise EmaeError(f"{split_dir}: data split not found (data.root={data_cfg.root!r} needs "
                            f"train/<class>/* and val/<class>/*; for the embedded set run `emae prepare`)")
        dataset = CheckedImageFolder(str(split_dir), transform, data_cfg.skip_corrupt)
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
