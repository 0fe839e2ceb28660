"""What an ImageFolder split holds, found by listing (cheap: names, sizes, mtimes) before any decode.

`list_split` walks a split like torchvision's ImageFolder does (same class order, same sample order)
and stats each image; `dataset_digest` identifies the configured data set from those listings.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torchvision.datasets import folder

from emae.errors import EmaeError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SPLITS = ("train", "val")


@dataclass(frozen=True)
class ListedFile:
    """One image of a split: its path relative to the split folder, class index, size and mtime."""

    rel: str
    target: int
    size: int
    mtime_ns: int


def is_image(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def split_dir(root: str | Path, split: str) -> Path:
    """`root/split`, or a clear error naming the layout an ImageFolder root needs."""
    path = Path(root) / split
    if not path.is_dir():
        raise EmaeError(f"{path}: data split not found (data.root={str(root)!r} needs "
                        f"train/<class>/* and val/<class>/*; for the embedded set run `emae prepare`)")
    return path


def class_names(directory: str | Path) -> list[str]:
    """The class folder names of a split, sorted (ImageFolder's order, so index = position)."""
    try:
        return folder.find_classes(str(directory))[0]
    except FileNotFoundError as err:
        raise EmaeError(f"{directory}: no class folders found ({err})") from None


def list_split(directory: str | Path, class_to_idx: dict[str, int]) -> list[ListedFile]:
    """Every image under `directory/<class>/` in ImageFolder's sample order, with size and mtime."""
    directory = str(directory)
    listed = []
    for path, target in folder.make_dataset(directory, class_to_idx, is_valid_file=is_image,
                                            allow_empty=True):
        stat = os.stat(path)
        listed.append(ListedFile(os.path.relpath(path, directory), target, stat.st_size, stat.st_mtime_ns))
    return listed


def _tree_files(directory: Path) -> list[tuple[str, int, int]]:
    """(relative path, size, mtime_ns) of every file under `directory`, sorted by path."""
    files = []
    for dirpath, _, names in os.walk(directory, followlinks=True):
        for name in names:
            stat = os.stat(os.path.join(dirpath, name))
            files.append((os.path.relpath(os.path.join(dirpath, name), directory), stat.st_size,
                          stat.st_mtime_ns))
    return sorted(files)


def dataset_digest(data_cfg: Any) -> str:
    """A short hex digest of the configured data set's content, without decoding an image.

    ImageFolder: over both splits' sorted (split, relative path, size, mtime_ns) of the images
    ImageFolder would load; CIFAR: over the files of the extracted data set folder under data.root.
    An added, removed, renamed or rewritten file changes it; otherwise it is stable.
    """
    digest = hashlib.sha256(data_cfg.kind.encode() + b"\n")
    root = Path(data_cfg.root)
    if data_cfg.kind == "imagefolder":
        for split in SPLITS:
            directory = split_dir(root, split)
            class_to_idx = {name: i for i, name in enumerate(class_names(directory))}
            for item in sorted(list_split(directory, class_to_idx), key=lambda item: item.rel):
                digest.update(f"{split}\0{Path(item.rel).as_posix()}\0{item.size}\0{item.mtime_ns}\n".encode())
    else:
        from torchvision import datasets

        base = root / (datasets.CIFAR10 if data_cfg.kind == "cifar10" else datasets.CIFAR100).base_folder
        if not base.is_dir():
            raise EmaeError(f"{base}: {data_cfg.kind} data not found (build the data set first)")
        for rel, size, mtime_ns in _tree_files(base):
            digest.update(f"{Path(rel).as_posix()}\0{size}\0{mtime_ns}\n".encode())
    return digest.hexdigest()[:16]
