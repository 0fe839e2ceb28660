"""`emae prepare`: write the embedded data set (scikit-learn's bundled digits: 1,797 real 8x8
hand-written digits, 10 classes) as an ImageFolder tree `train/<class>/*.png`, `val/<class>/*.png`
at `data.image_size`, with a stratified split and a manifest, then scans it (`emae check`) so the
stages find the scan's manifest ready. No download needed."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from emae.config import add_config_arguments, config_from_args
from emae.io import write_json


add_arguments = add_config_arguments


def run(args: argparse.Namespace) -> None:
    config = config_from_args(args)
    out = Path(args.out or config.data.root)
    manifest = prepare_digits(out, config.data.image_size, config.prepare.val_fraction,
                              config.prepare.seed)
    print(f"wrote {manifest['num_train']} train and {manifest['num_val']} val images to {out}")
    # the scan every stage runs first: done here, its manifest is ready (and any problem shows now)
    from emae.data.check import summary
    from emae.data.datasets import accept_scan
    from emae.data.scan import scan_imagefolder

    scan = scan_imagefolder(out)
    print(summary(scan))
    accept_scan(config.data, scan)


def digit_split(val_fraction: float, seed: int) -> tuple[Any, dict[str, np.ndarray]]:
    """scikit-learn's digits and the sorted indices of their stratified train / val split: the one
    split of the embedded set, which the dense set reuses (no evaluated digit seen in pre-training)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    train_idx, val_idx = train_test_split(np.arange(len(digits.images)), test_size=val_fraction,
                                          random_state=seed, stratify=digits.target)
    return digits, {"train": np.sort(train_idx), "val": np.sort(val_idx)}


def prepare_digits(out: Path, image_size: int, val_fraction: float, seed: int) -> dict[str, Any]:
    digits, splits = digit_split(val_fraction, seed)
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)  # [N, 8, 8], 0..16 -> 0..255
    files: dict[str, list[str]] = {}
    for split, split_idx in splits.items():
        for i in split_idx:
            label = int(digits.target[i])
            path = out / split / str(label) / f"{i:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            image = Image.fromarray(images[i]).resize((image_size, image_size), Image.BICUBIC)
            image.convert("RGB").save(path)
            files.setdefault(split, []).append(str(path.relative_to(out)))
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode())
    for split in files:
        for rel in files[split]:
            digest.update((out / rel).read_bytes())
    manifest = {"source": "sklearn.datasets.load_digits", "image_size": image_size,
                "num_classes": 10, "num_train": len(splits["train"]), "num_val": len(splits["val"]),
                "val_fraction": val_fraction, "seed": seed, "sha256": digest.hexdigest()}
    write_json(out / "manifest.json", manifest)
    return manifest
