"""`emae check`: scan the configured data set on its own (what every stage does before it starts)
and print what it holds: files and classes per split, and every unreadable file.

Exits non-zero when a file is unreadable (unless data.skip_corrupt is true, which leaves it out) or
the classes of train/ and val/ differ. The scan's manifest makes a rerun cheap (see emae.data.scan).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from emae.config import add_config_arguments, config_from_args
from emae.data.datasets import accept_scan, build_dataset
from emae.data.scan import DatasetScan, scan_imagefolder


add_arguments = add_config_arguments


def run(args: argparse.Namespace) -> int:
    data_cfg = config_from_args(args).data
    if data_cfg.kind != "imagefolder":
        sizes = {split: len(build_dataset(data_cfg, split, None)) for split in ("train", "val")}
        print(f"{data_cfg.kind} at {data_cfg.root}: {sizes['train']} train, {sizes['val']} val images, "
              f"{data_cfg.num_classes} classes (arrays: nothing to decode)")
        return 0
    scan = scan_imagefolder(Path(data_cfg.root))
    print(summary(scan))
    accept_scan(data_cfg, scan)
    return 0


def summary(scan: DatasetScan) -> str:
    """A few lines: per split the files, classes, unreadable files, what was decoded, the manifest."""
    lines = [f"{scan.root}: {len(scan.classes)} classes (same names in train/ and val/)"]
    for split, result in scan.splits.items():
        per_class = len({f.listed.target for f in result.files if f.error is None})
        lines.append(f"  {split}/: {len(result.files)} files, {per_class} classes with readable images, "
                     f"{len(result.bad)} unreadable; {result.decoded} decoded now, manifest "
                     f"{result.manifest or 'not written (no writable place)'}")
    if scan.bad:
        lines.append(f"unreadable:{scan.bad_lines()}")
    return "\n".join(lines)
