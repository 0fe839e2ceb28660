"""`emae prepare-dense`: a small detection / segmentation set generated offline, with true boxes,
instance masks and per-pixel labels, written in the real formats so the real loaders read it:

  ROOT/coco/{train2017,val2017}/*.png + ROOT/coco/annotations/instances_{train2017,val2017}.json
  ROOT/ade/images/{training,validation}/*.png + ROOT/ade/annotations/{training,validation}/*.png

Objects are scikit-learn's embedded 8x8 digits (as in `emae prepare`), upsampled to a random
size and pasted without overlap on a dark noisy canvas; a digit's ink pixels are its instance
mask, its class is its category (COCO ids 1..10 = digits 0..9) and its semantic label (1..10,
0 = background). Canvases of the val split use only digits of the val split of `emae prepare`
(same val_fraction and seed), so no evaluated object was seen in pre-training.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from emae.config import add_config_arguments, config_from_args
from emae.data.prepare import digit_split
from emae.io import read_json, write_json
from emae.seeding import derive_seed

SPLITS = {"train": ("train2017", "training"), "val": ("val2017", "validation")}
CATEGORIES = [{"id": d + 1, "name": str(d), "supercategory": "digit"} for d in range(10)]


add_arguments = add_config_arguments


def run(args: argparse.Namespace) -> None:
    config = config_from_args(args)
    cfg = config.section("dense_data")
    out = Path(args.out or cfg.root)
    manifest = prepare_dense(out, cfg, config.prepare.val_fraction, config.prepare.seed)
    print(f"{out}: {manifest['num_train']} train / {manifest['num_val']} val canvases, "
          f"{manifest['num_objects']['train']} / {manifest['num_objects']['val']} objects")


def prepare_dense(out: Path, cfg: Any, val_fraction: float, split_seed: int) -> dict[str, Any]:
    """Write both sets under `out` (skipped when its manifest says they were made with `cfg`)."""
    settings = {**cfg.model_dump(mode="json"), "val_fraction": val_fraction, "split_seed": split_seed}
    settings.pop("root")
    manifest_path = out / "manifest.json"
    if manifest_path.exists() and read_json(manifest_path).get("settings") == settings:
        return read_json(manifest_path)
    digits, pools = digit_split(val_fraction, split_seed)  # the digits as 0..1 glyphs, `emae prepare`'s split
    glyphs, targets = digits.images / 16.0, digits.target
    counts, files = {}, []
    for split, (coco_split, ade_split) in SPLITS.items():
        num = cfg.num_train if split == "train" else cfg.num_val
        rng = np.random.default_rng(derive_seed(cfg.seed, "dense", split) % (1 << 63))
        images, annotations = [], []
        for index in tqdm(range(num), desc=f"prepare-dense {split}", unit="canvas"):
            canvas, labels, objects = make_canvas(rng, glyphs, targets, pools[split], cfg)
            name = f"{index:06d}.png"
            image = Image.fromarray(canvas).convert("RGB")
            for path in (out / "coco" / coco_split / name, out / "ade" / "images" / ade_split / name):
                path.parent.mkdir(parents=True, exist_ok=True)
                image.save(path)
            label_path = out / "ade" / "annotations" / ade_split / name
            label_path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(labels).save(label_path)
            files += [f"coco/{coco_split}/{name}", f"ade/annotations/{ade_split}/{name}"]
            image_id = index + 1
            images.append({"id": image_id, "file_name": name, "width": cfg.canvas_size,
                           "height": cfg.canvas_size})
            for mask, digit in objects:
                annotations.append(_annotation(len(annotations) + 1, image_id, mask, digit))
        write_json(out / "coco" / "annotations" / f"instances_{coco_split}.json",
                   {"info": {"description": "emae prepare-dense: digits on canvases"},
                    "images": images, "annotations": annotations, "categories": CATEGORIES})
        counts[split] = len(annotations)
    digest = hashlib.sha256()
    for rel in sorted(files) + [f"coco/annotations/instances_{s[0]}.json" for s in SPLITS.values()]:
        digest.update(rel.encode() + (out / rel).read_bytes())
    manifest = {"source": "sklearn.datasets.load_digits on canvases", "settings": settings,
                "num_train": cfg.num_train, "num_val": cfg.num_val, "num_objects": counts,
                "num_classes": 10, "sha256": digest.hexdigest()}
    write_json(manifest_path, manifest)
    return manifest



def make_canvas(rng: np.random.Generator, glyphs: np.ndarray, targets: np.ndarray, pool: np.ndarray,
                cfg: Any) -> tuple[np.ndarray, np.ndarray, list[tuple[np.ndarray, int]]]:
    """One canvas: uint8 image [S, S], uint8 labels [S, S] (0 = background, d + 1 = digit d) and
    the objects as (full-canvas bool mask, digit). Boxes never overlap (objects that find no free
    place in `max_overlap_tries` draws are left out), so no mask occludes another."""
    size = cfg.canvas_size
    canvas = np.clip(rng.normal(0.0, cfg.noise_std, (size, size)), 0.0, 1.0)
    labels = np.zeros((size, size), np.uint8)
    taken = np.zeros((size, size), bool)
    objects = []
    for _ in range(int(rng.integers(cfg.min_objects, cfg.max_objects + 1))):
        side = int(rng.integers(cfg.min_digit_size, cfg.max_digit_size + 1))
        index = int(rng.choice(pool))
        glyph = Image.fromarray((glyphs[index] * 255).astype(np.uint8)).resize((side, side), Image.BICUBIC)
        glyph = np.asarray(glyph, np.float64) / 255.0
        ink = glyph > cfg.ink_threshold * glyph.max()
        for _ in range(cfg.max_overlap_tries):
            y, x = (int(v) for v in rng.integers(0, size - side + 1, 2))
            # one free pixel of margin keeps neighbouring objects apart
            if not taken[max(y - 1, 0): y + side + 1, max(x - 1, 0): x + side + 1].any():
                break
        else:
            continue
        taken[y: y + side, x: x + side] = True
        window = canvas[y: y + side, x: x + side]
        canvas[y: y + side, x: x + side] = np.maximum(window, glyph)
        mask = np.zeros((size, size), bool)
        mask[y: y + side, x: x + side] = ink
        labels[mask] = targets[index] + 1
        objects.append((mask, int(targets[index])))
    return (canvas * 255).round().astype(np.uint8), labels, objects


def _annotation(ann_id: int, image_id: int, mask: np.ndarray, digit: int) -> dict[str, Any]:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    bbox = [float(v) for v in mask_utils.toBbox(rle)]  # tight box of the ink: [x, y, w, h]
    rle["counts"] = rle["counts"].decode("ascii")
    return {"id": ann_id, "image_id": image_id, "category_id": digit + 1, "bbox": bbox,
            "area": float(mask.sum()), "iscrowd": 0, "segmentation": rle}

