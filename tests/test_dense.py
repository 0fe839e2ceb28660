"""Dense transfer: generated COCO / ADE20K-format data, the ViTDet-style adapter, tiny `emae
detect` / `emae segment` runs (metrics from pycocotools / the confusion matrix), resume, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import PARAMS, TINY_OVERRIDES, run_cli
from emae.config import load_config
from emae.errors import ConfigError, EmaeError

pytest.importorskip("pycocotools")

DENSE_DATA = ["dense_data.canvas_size=32", "dense_data.num_train=48", "dense_data.num_val=16",
              "dense_data.min_digit_size=12", "dense_data.max_digit_size=16", "dense_data.max_objects=3"]
BACKBONE = ["backbone.window_size=4", "backbone.global_blocks=[1]", "backbone.out_channels=16",
            "backbone.scale_factors=[1.0,0.5,0.25,0.125]"]
TRAIN = ["iterations=4", "batch_size=4", "warmup_iters=1", "checkpoint_every=2", "log_every=1",
         "eval_batch_size=8"]
DETECT = ["detect.min_size=[32]", "detect.test_min_size=32", "detect.max_size=32",
          "detect.box_head_dim=32", "detect.mask_head_layers=1", "detect.mask_head_channels=16"]
SEGMENT = ["segment.crop_size=32", "segment.head_channels=16", "segment.pool_scales=[1,2]"]


def stage_overrides(section: str, root: Path) -> list[str]:
    sub = "coco" if section == "detect" else "ade"
    return ([f"{section}.root={root / sub}"] + [f"{section}.{o}" for o in BACKBONE + TRAIN]
            + (DETECT if section == "detect" else SEGMENT))


@pytest.fixture(scope="session")
def dense_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The generated set (tiny: 32x32 canvases), written by `emae prepare-dense`."""
    root = tmp_path_factory.mktemp("dense")
    run_cli("prepare-dense", "-p", str(PARAMS), "-o", str(root), *DENSE_DATA)
    return root


@pytest.fixture(scope="session")
def encoder(tmp_path_factory: pytest.TempPathFactory, digits_root: Path) -> Path:
    """A tiny encoder exported by a real (short) `emae pretrain`."""
    out = tmp_path_factory.mktemp("pretrain")
    run_cli("pretrain", "-p", str(PARAMS), "-o", str(out), *TINY_OVERRIDES, f"data.root={digits_root}",
            "pretrain.epochs=1")
    return out / "encoder.safetensors"


def tiny(section: str, root: Path, *extra: str):
    return load_config([PARAMS], TINY_OVERRIDES + DENSE_DATA + stage_overrides(section, root) + list(extra))


# ------------------------------------------------------------------------------- generated data


def test_generated_sets_agree_with_each_other(dense_root: Path) -> None:
    from pycocotools import mask as mask_utils

    from emae.dense.data import CocoInstances, ade_pairs

    manifest = json.loads((dense_root / "manifest.json").read_text())
    assert manifest["num_train"] == 48 and manifest["num_val"] == 16
    coco = CocoInstances(dense_root / "coco", "val2017", train=False, hflip=False).coco
    pairs = dict((p[0].name, p[1]) for p in ade_pairs(dense_root / "ade", "validation"))
    assert len(coco.imgs) == len(pairs) == 16
    objects = 0
    for image_id, info in coco.imgs.items():
        labels = np.asarray(Image.open(pairs[info["file_name"]]))
        image = np.asarray(Image.open(dense_root / "coco" / "val2017" / info["file_name"]).convert("L"))
        union = np.zeros_like(labels, dtype=bool)
        for ann in coco.imgToAnns[image_id]:
            mask = coco.annToMask(ann).astype(bool)
            # the instance mask is exactly the pixels its semantic label gives its category
            assert (labels[mask] == ann["category_id"]).all()
            assert ann["area"] == mask.sum() == mask_utils.area(ann["segmentation"]) > 0  # the RLE itself
            x, y, w, h = ann["bbox"]
            ys, xs = np.nonzero(mask)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x, y, x + w, y + h)
            assert image[mask].mean() > image[~mask].mean() + 50  # ink is bright on the dark canvas
            assert not (union & mask).any()  # instances do not overlap
            union |= mask
            objects += 1
        assert (labels[~union] == 0).all()
    assert objects >= 16


def test_prepare_dense_is_deterministic_and_skips_when_done(dense_root: Path, tmp_path: Path) -> None:
    from emae.dense.generate import prepare_dense

    before = json.loads((dense_root / "manifest.json").read_text())["sha256"]
    config = load_config([PARAMS], DENSE_DATA)
    other = tmp_path / "again"
    assert prepare_dense(other, config.section("dense_data"), 0.2, 0)["sha256"] == before
    stamp = (other / "coco" / "val2017" / "000000.png").stat().st_mtime_ns
    prepare_dense(other, config.section("dense_data"), 0.2, 0)
    assert (other / "coco" / "val2017" / "000000.png").stat().st_mtime_ns == stamp  # not rewritten
    reseeded = load_config([PARAMS], DENSE_DATA + ["dense_data.seed=1"]).section("dense_data")
    assert prepare_dense(other, reseeded, 0.2, 0)["sha256"] != before


# ------------------------------------------------------------------------------------- adapter


def test_window_attention_is_local_and_global_when_one_window() -> None:
    from timm.models.vision_transformer import VisionTransformer

    from emae.dense.backbone import ViTDetBackbone

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=16, depth=1, num_heads=2, num_classes=0).eval()
    windowed = ViTDetBackbone(vit, 2, [], [1.0], 8).eval()
    glob = ViTDetBackbone(vit, 0, [], [1.0], 8).eval()
    big_window = ViTDetBackbone(vit, 4, [], [1.0], 8).eval()
    images = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        base = windowed.forward_vit(images)  # [1, D, 4, 4]: four 2x2 windows
        changed = images.clone()
        changed[..., :4, :4] += 1.0  # only the top-left patch (window 0)
        after = windowed.forward_vit(changed)
        assert torch.allclose(glob.forward_vit(images), big_window.forward_vit(images), atol=1e-5)
        glob_after = glob.forward_vit(changed)
    diff = (after - base).abs().amax(dim=1)[0]  # [4, 4]
    assert diff[:2, :2].max() > 1e-3 and diff[2:, :].max() == 0 and diff[:, 2:].max() == 0
    assert (glob_after - glob.forward_vit(images)).abs().amax(dim=1)[0][2:, 2:].max() > 1e-4
    padded = ViTDetBackbone(vit, 3, [], [1.0], 8).eval()  # the 4x4 grid pads to 6x6: windows of 3x3
    with torch.no_grad():
        padded_diff = (padded.forward_vit(changed) - padded.forward_vit(images)).abs().amax(dim=1)[0]
    assert padded_diff.shape == (4, 4) and padded_diff[:3, :3].max() > 1e-3
    assert padded_diff[3:, :].max() == 0 and padded_diff[:, 3:].max() == 0


def test_adapter_loads_every_encoder_key(encoder: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from emae.dense.backbone import build_backbone

    cfg = tiny("detect", tmp_path).section("detect")
    backbone = build_backbone(encoder, cfg.backbone, "detect")
    exported = load_file(str(encoder))
    own = backbone.vit.state_dict()
    assert set(exported) <= set(own)
    for key, value in exported.items():
        assert torch.equal(own[key], value), key
    # pyramid: strides 4, 8, 16, 32 (+ pool 64) at any size the patch divides, positions resampled
    for h, w in ((32, 32), (64, 32)):
        feats = backbone(torch.randn(2, 3, h, w))
        assert list(feats) == ["0", "1", "2", "3", "pool"]
        assert [tuple(f.shape[-2:]) for f in feats.values()] == [
            (-(-h // s), -(-w // s)) for s in (4, 8, 16, 32, 64)]
        assert all(f.shape[:2] == (2, 16) for f in feats.values())


def test_layer_decay_scales_follow_depth(encoder: Path, tmp_path: Path) -> None:
    from emae.dense.backbone import build_backbone, no_weight_decay
    from emae.dense.engine import build_optimizer
    from emae.dense.segment import Segmenter

    cfg = tiny("segment", tmp_path).section("segment")
    model = Segmenter(build_backbone(encoder, cfg.backbone, "segment", with_pool_level=False), cfg)
    optimizer, _ = build_optimizer(model, cfg, no_weight_decay())
    scale_of = {id(p): g["lr_scale"] for g in optimizer.param_groups for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    d, depth = cfg.backbone.layer_decay, len(model.backbone.vit.blocks)
    assert scale_of[id(named["backbone.vit.patch_embed.proj.weight"])] == pytest.approx(d ** (depth + 1))
    for i in range(depth):
        assert scale_of[id(named[f"backbone.vit.blocks.{i}.attn.qkv.weight"])] == pytest.approx(d ** (depth - i))
    assert scale_of[id(named["head.classifier.1.weight"])] == 1.0
    assert decay_of[id(named["backbone.vit.pos_embed"])] == 0.0
    assert decay_of[id(named["head.classifier.1.weight"])] == cfg.weight_decay


# ---------------------------------------------------------------------------------- the stages


def test_detect_cli_tiny_run(encoder: Path, dense_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "detect"
    args = ["detect", "--checkpoint", str(encoder), "-o", str(out), "-p", str(PARAMS),
            *TINY_OVERRIDES, *stage_overrides("detect", dense_root)]
    run_cli(*args)
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("det_ap_box", "det_ap_mask", "det_ap50_box", "det_ap50_mask"):
        assert 0.0 <= metrics[key] <= 100.0, key
    assert metrics["iterations"] == 4 and metrics["num_val_images"] == 16
    assert "Average Precision" in (out / "coco_eval.txt").read_text()
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in lines] == [1, 2, 3, 4]
    assert {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"} <= set(lines[0])
    # a rerun finds the finished checkpoint and only evaluates again: same figures
    run_cli(*args)
    assert json.loads((out / "metrics.json").read_text())["det_ap_box"] == metrics["det_ap_box"]
    assert len((out / "log.jsonl").read_text().splitlines()) == 4


def test_segment_cli_tiny_run(encoder: Path, dense_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "segment"
    run_cli("segment", "--checkpoint", str(encoder), "-o", str(out), "-p", str(PARAMS),
            *TINY_OVERRIDES, *stage_overrides("segment", dense_root))
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["seg_miou"] <= 100.0 and 0.0 <= metrics["seg_pixel_acc"] <= 100.0
    assert len(metrics["seg_iou_per_class"]) == 11
    per_class = [v for v in metrics["seg_iou_per_class"] if v is not None]
    assert all(0.0 <= v <= 100.0 for v in per_class)
    assert metrics["seg_miou"] == pytest.approx(sum(per_class) / len(per_class))


def test_segment_resume_matches_uninterrupted_run(encoder: Path, dense_root: Path, tmp_path: Path) -> None:
    """A run killed after its checkpoint at iteration 2 and rerun ends with the same weights."""
    from emae.dense import segment as seg

    config = tiny("segment", dense_root, "segment.iterations=4")
    cfg = config.section("segment")
    real_fit, calls = seg.fit, {"n": 0}

    def crashing_fit(model, train_set, collate, step, *args, **kwargs):
        def step_or_crash(m, batch):
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt  # killed during iteration 3, after the checkpoint at 2
            return step(m, batch)
        return real_fit(model, train_set, collate, step_or_crash, *args, **kwargs)

    whole, broken = tmp_path / "whole", tmp_path / "broken"
    seg.segment(config, encoder, whole)
    seg.fit = crashing_fit
    try:
        with pytest.raises(KeyboardInterrupt):
            seg.segment(config, encoder, broken)
    finally:
        seg.fit = real_fit
    assert torch.load(broken / "checkpoints" / "last.pt", weights_only=False)["iteration"] == 2
    metrics = seg.segment(config, encoder, broken)
    a = torch.load(whole / "checkpoints" / "last.pt", weights_only=False)["model"]
    b = torch.load(broken / "checkpoints" / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert metrics["seg_miou"] == json.loads((whole / "metrics.json").read_text())["seg_miou"]
    assert cfg.checkpoint_every == 2
    with pytest.raises(EmaeError, match="other params"):
        seg.segment(tiny("segment", dense_root, "segment.iterations=4", "segment.lr=0.5"), encoder, broken)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(encoder: Path, dense_root: Path,
                                                                   tmp_path: Path) -> None:
    from emae.dense import segment as seg

    real_fit, calls = seg.fit, {"n": 0}

    def nan_fit(model, train_set, collate, step, *args, **kwargs):
        def step_then_nan(m, batch):
            calls["n"] += 1
            losses = step(m, batch)
            return {k: v * float("nan") for k, v in losses.items()} if calls["n"] == 3 else losses
        return real_fit(model, train_set, collate, step_then_nan, *args, **kwargs)

    seg.fit = nan_fit
    try:
        # the third step, numbered as log.jsonl numbers iterations (steps done)
        with pytest.raises(EmaeError, match=r"segment: non-finite loss at step 3 \(loss=nan"):
            seg.segment(tiny("segment", dense_root), encoder, tmp_path)
    finally:
        seg.fit = real_fit
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=False)
    assert state["iteration"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values()
                                           if v.is_floating_point())


@pytest.mark.parametrize("section, keys", [("segment", ("seg_miou", "seg_pixel_acc")),
                                           ("detect", ("det_ap_box", "det_ap_mask"))])
def test_two_process_ddp_with_accumulation(encoder: Path, dense_root: Path, tmp_path: Path,
                                          section: str, keys: tuple[str, ...]) -> None:
    """torchrun, 2 gloo processes, 2 batches per step: training and the sharded evaluation run; a
    1-process rerun finds the finished checkpoint, evaluates the whole val set alone and gets the
    same figures (so the shards covered every image exactly once)."""
    import subprocess
    import sys

    from conftest import REPO, cli_env
    from test_ddp import _free_port

    out = tmp_path / section
    argv = ["-m", "emae.cli", section, "--checkpoint", str(encoder), "-o", str(out), "-p", str(PARAMS),
            *TINY_OVERRIDES, *stage_overrides(section, dense_root), f"{section}.batch_size=2",
            f"{section}.accum_iter=2", f"{section}.iterations=3", f"{section}.checkpoint_every=3"]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          "--master_port", str(_free_port()), *argv],
                         cwd=REPO, env=cli_env() | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["iterations"] == 3
    assert [json.loads(line)["iteration"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3]
    run_cli(*argv[2:])  # one process: evaluation only
    alone = json.loads((out / "metrics.json").read_text())
    assert alone["world_size"] == 1
    for key in keys:
        assert 0.0 <= metrics[key] <= 100.0
        assert alone[key] == pytest.approx(metrics[key], abs=1e-9), key


def test_random_init_baseline_keeps_apart_from_the_pretrained_run(encoder: Path, dense_root: Path,
                                                                  tmp_path: Path) -> None:
    """`--random-init`: the export's architecture with the weights pre-training starts from; a
    rerun into its folder with the pre-trained weights starts afresh (saying so), not resumed."""
    from emae.dense.backbone import build_backbone
    from emae.models.export import load_encoder

    cfg = tiny("segment", dense_root).section("segment").backbone
    pretrained = load_encoder(encoder).state_dict()
    fresh = build_backbone(encoder, cfg, "segment", random_init=True).vit.state_dict()
    assert fresh.keys() == pretrained.keys()
    assert not fresh["blocks.0.attn.qkv.weight"].equal(pretrained["blocks.0.attn.qkv.weight"])
    assert fresh["pos_embed"].equal(pretrained["pos_embed"])  # fixed sin-cos in both

    out = tmp_path / "segment"
    args = ["segment", "--checkpoint", str(encoder), "-o", str(out), "-p", str(PARAMS)]
    overrides = [*TINY_OVERRIDES, *stage_overrides("segment", dense_root), "segment.iterations=2"]
    run_cli(*args, "--random-init", *overrides)
    assert json.loads((out / "metrics.json").read_text())["random_init"] is True
    again = run_cli(*args, *overrides)
    assert "made from other inputs (encoder random-init:" in again.stderr
    assert "starting this stage again from scratch" in again.stderr
    rerun = json.loads((out / "metrics.json").read_text())
    fresh_out = tmp_path / "fresh"
    run_cli("segment", "--checkpoint", str(encoder), "-o", str(fresh_out), "-p", str(PARAMS), *overrides)
    fresh = json.loads((fresh_out / "metrics.json").read_text())
    assert rerun["random_init"] is False and rerun["inputs"] == fresh["inputs"]
    assert rerun["seg_miou"] == fresh["seg_miou"] and rerun["final_loss"] == fresh["final_loss"]


# ----------------------------------------------------------------------------------- bad input


def _copy_coco(dense_root: Path, tmp_path: Path) -> tuple[Path, dict]:
    import shutil

    root = tmp_path / "coco"
    shutil.copytree(dense_root / "coco", root)
    path = root / "annotations" / "instances_val2017.json"
    return root, json.loads(path.read_text())


@pytest.mark.parametrize("damage, expected", [
    ("missing_image", r"images not found in .*val2017: image id 1 file_name '000000.png'"),
    ("box_out_of_bounds", r"annotation 1 \(image '000000.png', 32x32\): bbox \[20.0, 20.0, 30.0, 5.0\] is out of the image bounds"),
    ("unknown_category", r"annotation 1: category_id 99 is not in categories"),
    ("unknown_image", r"annotation 1: image_id 12345 is not in images"),
])
def test_bad_coco_input_names_file_and_entry(dense_root: Path, tmp_path: Path, damage: str, expected: str) -> None:
    from emae.dense.data import CocoInstances

    root, data = _copy_coco(dense_root, tmp_path)
    ann = data["annotations"][0]
    if damage == "missing_image":
        (root / "val2017" / "000000.png").unlink()
    elif damage == "box_out_of_bounds":
        ann["bbox"] = [20.0, 20.0, 30.0, 5.0]
    elif damage == "unknown_category":
        ann["category_id"] = 99
    else:
        ann["image_id"] = 12345
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(data))
    with pytest.raises(EmaeError, match=r"instances_val2017.json: .*" + expected):
        CocoInstances(root, "val2017", train=False, hflip=False)


def test_bad_segmentation_input_names_file(dense_root: Path, tmp_path: Path, encoder: Path) -> None:
    import shutil

    root = tmp_path / "ade"
    shutil.copytree(dense_root / "ade", root)
    bad = root / "annotations" / "training" / "000003.png"
    labels = np.asarray(Image.open(bad)).copy()
    labels[0, 0] = 42
    Image.fromarray(labels).save(bad)
    out = tmp_path / "out"
    result = run_cli("segment", "--checkpoint", str(encoder), "-o", str(out), "-p", str(PARAMS),
                     *TINY_OVERRIDES, *stage_overrides("segment", dense_root), f"segment.root={root}",
                     check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "000003.png: label values [42] outside the class range (allowed: 0..10, 255 = ignore)" in result.stderr
    assert not (out / "checkpoints").exists()  # failed before any training

    (root / "annotations" / "validation" / "000001.png").unlink()
    from emae.dense.data import ade_pairs
    with pytest.raises(EmaeError, match=r"annotations/validation: images without a label PNG: 000001.png"):
        ade_pairs(root, "validation")


def test_config_errors_name_source_key_and_value(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"override 'detect.anchor_sizes=\[8,16\]': detect.anchor_sizes = "
                                          r"\[8, 16\]: .*has 2 entries; the pyramid has 5 levels"):
        tiny("detect", tmp_path, "detect.anchor_sizes=[8,16]").section("detect")
    with pytest.raises(ConfigError, match=r"segment.backbone.scale_factors = \[3.0\]: .*not powers of 2"):
        tiny("segment", tmp_path, "segment.backbone.scale_factors=[3.0]").section("segment")
    with pytest.raises(ConfigError, match=r"dense_data.max_digit_size = 16: .*must be >= min_digit_size \(20\)"):
        tiny("detect", tmp_path, "dense_data.min_digit_size=20").section("dense_data")
    with pytest.raises(ConfigError, match=r"detect.backbone.global_blocks=\[7\]: \[7\] are not blocks"):
        from emae.dense.backbone import build_backbone
        build_backbone(_random_encoder(tmp_path), tiny("detect", tmp_path, "detect.backbone.global_blocks=[7]")
                       .section("detect").backbone, "detect")


def _random_encoder(tmp_path: Path) -> Path:
    from emae.models import EMAE, save_encoder

    config = load_config([PARAMS], TINY_OVERRIDES)
    path = tmp_path / "random.safetensors"
    save_encoder(EMAE.from_config(config.model, config.data), path)
    return path
