"""Readers of the real dense formats, with the checks that turn bad input into clear errors
before training starts:

- COCO instances (`ROOT/<split>/` + `ROOT/annotations/instances_<split>.json`), read with
  pycocotools: images that do not exist, annotations of unknown images or categories, boxes
  outside their image, missing masks -> EmaeError naming the file and the entries.
- ADE20K-style semantic sets (`ROOT/images/<split>/*` + `ROOT/annotations/<split>/<stem>.png`):
  images without a label PNG (or the reverse), label values outside the class range.

Augmentation uses torchvision.transforms.v2 on tv_tensors (boxes and masks follow the image).
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from tqdm import tqdm

from emae.data.datasets import IMAGE_EXTENSIONS
from emae.data.images import load_rgb
from emae.errors import EmaeError

BOX_TOLERANCE = 1.0  # pixels a COCO box may reach past its image (float rounding in real sets)
MAX_LISTED = 5


def _fail(path: Path | str, what: str, problems: list[str]) -> None:
    if problems:
        shown = "; ".join(problems[:MAX_LISTED])
        more = f" ... ({len(problems)} in all)" if len(problems) > MAX_LISTED else ""
        raise EmaeError(f"{path}: {what}: {shown}{more}")


# ----------------------------------------------------------------------------------- COCO


def coco_paths(root: str | Path, split: str) -> tuple[Path, Path]:
    root = Path(root)
    images, annotations = root / split, root / "annotations" / f"instances_{split}.json"
    for path, what in ((images, "image folder"), (annotations, "annotation file")):
        if not path.exists():
            raise EmaeError(f"{path}: COCO {what} not found (layout: ROOT/<split>/ and "
                            f"ROOT/annotations/instances_<split>.json)")
    return images, annotations


def load_coco(annotation_file: Path, image_dir: Path, need_masks: bool = True) -> Any:
    """pycocotools' COCO index of a checked annotation file."""
    from pycocotools.coco import COCO

    try:
        data = json.loads(annotation_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise EmaeError(f"{annotation_file}: cannot read COCO annotations ({err})") from None
    check_coco(data, annotation_file, image_dir, need_masks)
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    return coco


def check_coco(data: Any, path: Path, image_dir: Path, need_masks: bool) -> None:
    if not isinstance(data, dict):
        raise EmaeError(f"{path}: expected a COCO object with images, annotations, categories")
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    _fail(path, "missing COCO lists", missing)
    categories = {c.get("id") for c in data["categories"] if isinstance(c, dict)}
    images: dict[Any, dict[str, Any]] = {}
    problems = []
    for entry in data["images"]:
        if not all(k in entry for k in ("id", "file_name", "width", "height")):
            problems.append(f"image entry {entry!r:.80} lacks id/file_name/width/height")
        elif entry["id"] in images:
            problems.append(f"image id {entry['id']} appears twice")
        else:
            images[entry["id"]] = entry
    _fail(path, "bad image entries", problems)
    not_found = [f"image id {i} file_name {e['file_name']!r}" for i, e in images.items()
                 if not (image_dir / e["file_name"]).is_file()]
    _fail(path, f"images not found in {image_dir}", not_found)
    problems = []
    for ann in data["annotations"]:
        ann_id = ann.get("id")
        if ann.get("image_id") not in images:
            problems.append(f"annotation {ann_id}: image_id {ann.get('image_id')!r} is not in images")
            continue
        if ann.get("category_id") not in categories:
            problems.append(f"annotation {ann_id}: category_id {ann.get('category_id')!r} is not in "
                            f"categories {sorted(categories)}")
        if need_masks and not ann.get("segmentation"):
            problems.append(f"annotation {ann_id}: no segmentation (Mask R-CNN needs masks)")
        problems += _box_problems(ann, images[ann["image_id"]])
    _fail(path, "bad annotations", problems)


def _box_problems(ann: dict[str, Any], image: dict[str, Any]) -> list[str]:
    box = ann.get("bbox")
    where = f"annotation {ann.get('id')} (image {image['file_name']!r}, {image['width']}x{image['height']})"
    if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
        return [f"{where}: bbox {box!r} is not [x, y, w, h]"]
    x, y, w, h = box
    t = BOX_TOLERANCE
    if w < 0 or h < 0 or x < -t or y < -t or x + w > image["width"] + t or y + h > image["height"] + t:
        return [f"{where}: bbox {box} is out of the image bounds"]
    return []


class CocoInstances(Dataset):
    """Items: (image [3, H, W] float 0..1, target) with target boxes [N, 4] xyxy, labels [N]
    (contiguous 1..C, in category-id order), masks [N, H, W] uint8, image_id. Training skips crowd
    and degenerate boxes and images left without objects (as torchvision's references do)."""

    def __init__(self, root: str | Path, split: str, train: bool, hflip: bool) -> None:
        self.image_dir, self.annotation_file = coco_paths(root, split)
        self.coco = load_coco(self.annotation_file, self.image_dir)
        self.cat_ids = sorted(self.coco.getCatIds())
        self.label_of = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        self.train = train
        ids = sorted(self.coco.imgs)
        if train:
            ids = [i for i in ids if self._objects(i)]
            if not ids:
                raise EmaeError(f"{self.annotation_file}: no image has a usable (non-crowd) object")
        self.ids = ids
        steps: list[Callable] = [v2.RandomHorizontalFlip()] if train and hflip else []
        self.transform = v2.Compose([*steps, v2.ToDtype(torch.float32, scale=True)])

    @property
    def num_classes(self) -> int:
        return len(self.cat_ids)

    def _objects(self, image_id: int) -> list[dict[str, Any]]:
        anns = self.coco.imgToAnns.get(image_id, [])
        return [a for a in anns if not a.get("iscrowd", 0) and a["bbox"][2] > 0 and a["bbox"][3] > 0]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        path = self.image_dir / info["file_name"]
        image = load_rgb(str(path))
        if image.size != (info["width"], info["height"]):
            raise EmaeError(f"{path}: image is {image.size[0]}x{image.size[1]} but "
                            f"{self.annotation_file} says {info['width']}x{info['height']}")
        anns = self._objects(image_id)
        h, w = info["height"], info["width"]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        boxes[:, 0::2].clamp_(0, w)
        boxes[:, 1::2].clamp_(0, h)
        masks = np.stack([self.coco.annToMask(a) for a in anns]) if anns else np.zeros((0, h, w), np.uint8)
        target = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w)),
            "labels": torch.tensor([self.label_of[a["category_id"]] for a in anns], dtype=torch.int64),
            "masks": tv_tensors.Mask(torch.from_numpy(masks)),
            "image_id": image_id,
        }
        img, target = self.transform(tv_tensors.Image(v2.functional.pil_to_tensor(image)), target)
        return img.as_subclass(torch.Tensor), {k: (v.as_subclass(torch.Tensor) if isinstance(v, torch.Tensor) else v)
                                               for k, v in target.items()}


# ------------------------------------------------------------------------------ ADE20K-style


def ade_pairs(root: str | Path, split: str) -> list[tuple[Path, Path]]:
    """(image, label PNG) pairs of a split; every image needs its label and the reverse."""
    root = Path(root)
    image_dir, label_dir = root / "images" / split, root / "annotations" / split
    for path in (image_dir, label_dir):
        if not path.is_dir():
            raise EmaeError(f"{path}: not found (ADE20K layout: ROOT/images/<split>/ and "
                            f"ROOT/annotations/<split>/ with one <stem>.png per image)")
    images = {p.stem: p for p in sorted(image_dir.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS}
    labels = {p.stem: p for p in sorted(label_dir.glob("*.png"))}
    _fail(label_dir, "images without a label PNG", [f"{images[s].name}" for s in images if s not in labels])
    _fail(image_dir, "label PNGs without an image", [f"{labels[s].name}" for s in labels if s not in images])
    if not images:
        raise EmaeError(f"{image_dir}: no images found")
    return [(images[s], labels[s]) for s in sorted(images)]


def map_labels(raw: np.ndarray, reduce_zero_label: bool, ignore_index: int) -> np.ndarray:
    """ADE20K convention (mmseg's reduce_zero_label): 0 ('other') -> ignore, 1..C -> 0..C-1."""
    labels = raw.astype(np.int64)
    if reduce_zero_label:
        labels = np.where(labels == 0, ignore_index, labels - 1)
        labels[raw == ignore_index] = ignore_index
    return labels


def check_labels(pairs: list[tuple[Path, Path]], num_classes: int, reduce_zero_label: bool,
                 ignore_index: int) -> None:
    """Every label value must be a class (0..num_classes-1 after mapping) or ignore_index."""
    problems = []
    for _, label_path in tqdm(pairs, desc="checking labels", unit="file", leave=False):
        raw = _read_label(label_path)
        values = np.unique(map_labels(np.unique(raw), reduce_zero_label, ignore_index))
        bad = [int(v) for v in values if v >= num_classes and v != ignore_index]
        if bad:
            raw_bad = [v + 1 for v in bad] if reduce_zero_label else bad
            problems.append(f"{label_path}: label values {raw_bad} outside the class range "
                            f"(allowed: {'1' if reduce_zero_label else '0'}.."
                            f"{num_classes if reduce_zero_label else num_classes - 1}, "
                            f"{'0 and ' if reduce_zero_label else ''}{ignore_index} = ignore)")
    if problems:
        _fail(pairs[0][1].parent, f"labels outside segment.num_classes={num_classes}", problems)


def _read_label(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as label:
            if label.mode not in ("L", "P", "I", "I;16"):
                raise EmaeError(f"{path}: label PNG has mode {label.mode}; expected one channel of class ids")
            return np.asarray(label)
    except OSError as err:
        raise EmaeError(f"{path}: cannot read label PNG ({err})") from None


class SemanticSegmentation(Dataset):
    """Items: (image [3, h, w] normalised, label [h, w] int64 with ignore_index). Train: random
    resize of the short side to crop_size * U(scale_range), random crop (label padded with
    ignore_index), flip. Eval: the short side resized to crop_size; the label stays at its size."""

    def __init__(self, root: str | Path, split: str, cfg: Any, mean: tuple[float, ...],
                 std: tuple[float, ...], train: bool) -> None:
        self.pairs = ade_pairs(root, split)
        check_labels(self.pairs, cfg.num_classes, cfg.reduce_zero_label, cfg.ignore_index)
        self.cfg, self.train = cfg, train
        crop = cfg.crop_size
        if train:
            lo, hi = (int(round(crop * s)) for s in cfg.scale_range)
            steps: list[Callable] = [
                v2.RandomResize(lo, hi + 1),
                v2.RandomCrop(crop, pad_if_needed=True, fill={tv_tensors.Mask: cfg.ignore_index, "others": 0}),
            ]
            if cfg.hflip:
                steps.append(v2.RandomHorizontalFlip())
        else:
            steps = []
        self.transform = v2.Compose(steps) if steps else None
        self.resize = v2.Resize(crop)
        self.normalize = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_path, label_path = self.pairs[index]
        image = tv_tensors.Image(v2.functional.pil_to_tensor(load_rgb(str(image_path))))
        raw = _read_label(label_path)
        if raw.shape != tuple(image.shape[-2:]):
            raise EmaeError(f"{label_path}: label is {raw.shape[1]}x{raw.shape[0]} but its image "
                            f"{image_path.name} is {image.shape[-1]}x{image.shape[-2]}")
        labels = map_labels(raw, self.cfg.reduce_zero_label, self.cfg.ignore_index)
        label = tv_tensors.Mask(torch.from_numpy(labels))
        if self.transform is not None:
            image, label = self.transform(image, label)
        if not self.train:
            image = self.resize(image)
        return self.normalize(image).as_subclass(torch.Tensor), label.as_subclass(torch.Tensor)


def pad_batch(images: list[torch.Tensor], divisor: int, value: float = 0.0) -> torch.Tensor:
    """[C, h_i, w_i] each -> [B, C, H, W] padded right/bottom to a common size divisible by divisor."""
    h = max(i.shape[-2] for i in images)
    w = max(i.shape[-1] for i in images)
    h, w = -(-h // divisor) * divisor, -(-w // divisor) * divisor
    out = images[0].new_full((len(images), images[0].shape[0], h, w), value)
    for k, image in enumerate(images):
        out[k, :, : image.shape[-2], : image.shape[-1]] = image
    return out


def list_collate(batch: list[tuple[Any, Any]]) -> tuple[list[Any], list[Any]]:
    """(images, targets) as two lists: the dense sets' images differ in size, so they are not stacked."""
    images, targets = zip(*batch)
    return list(images), list(targets)
