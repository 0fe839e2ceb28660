"""The data set scan: class names agree across splits, every unreadable image is found before
training (all of them, once: a cached manifest), skip_corrupt leaves them out at scan time, and
odd image modes load as the right RGB values. Tiny generated ImageFolder trees, no model."""

from __future__ import annotations

import io
import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from emae.cli import main
from emae.config import load_config
from emae.data import build_dataset
from emae.data import scan as scan_module
from emae.data.scan import manifest_paths, scan_imagefolder
from emae.errors import EmaeError
from tests.conftest import CORE_PARAMS, TINY_OVERRIDES, run_cli


def _tree(root: Path, classes: dict[str, list[str]], per_class: int = 2) -> Path:
    """`root/<split>/<class>/<i>.png`: 8x8 images, a different grey per class and image."""
    for split, names in classes.items():
        for c, name in enumerate(names):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (8, 8), (40 * c + i,) * 3).save(root / split / name / f"{i}.png")
    return root


def _cfg(root: Path, *extra: str):
    return load_config(CORE_PARAMS, [f"data.root={root}", "data.num_classes=3", *extra]).data


@pytest.fixture(autouse=True)
def _user_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))  # the lock, never ~/.cache


def _with_bad_files(root: Path) -> tuple[Path, Path]:
    """A zero-byte PNG in train/ and a truncated JPEG in val/."""
    empty = root / "train" / "1" / "empty.png"
    empty.write_bytes(b"")
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    photo.save(buffer, "JPEG")
    truncated = root / "val" / "2" / "truncated.jpg"
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return empty, truncated


def test_val_with_other_class_names_is_refused_with_the_names(tmp_path: Path) -> None:
    root = _tree(tmp_path / "x", {"train": ["0", "1", "2"], "val": ["0", "1", "3"]})
    for split in ("train", "val"):  # same count, other names: refused whichever split is built
        with pytest.raises(EmaeError, match=rf"{root}: train/ and val/ have different classes: "
                                            r"missing in val/: 2; missing in train/: 3$"):
            build_dataset(_cfg(root), split, None)
    assert not manifest_paths(root / "train")[0].exists()  # refused before any decode
    (root / "val" / "3").rename(root / "val" / "2")
    (root / "train" / "2").rename(root / "train" / "5")
    with pytest.raises(EmaeError, match=r"missing in val/: 5; missing in train/: 2$"):
        build_dataset(_cfg(root), "val", None)


def test_matching_splits_share_one_class_mapping(tmp_path: Path) -> None:
    root = _tree(tmp_path / "x", {"train": ["cat", "dog", "eel"], "val": ["cat", "dog", "eel"]})
    train, val = (build_dataset(_cfg(root), split, None) for split in ("train", "val"))
    assert train.class_to_idx == val.class_to_idx == {"cat": 0, "dog": 1, "eel": 2}
    assert [Path(path).parent.name for path, target in val.samples if target == 2] == ["eel", "eel"]


def test_unreadable_images_are_all_listed_before_the_first_training_step(tmp_path: Path, capsys) -> None:
    root = _tree(tmp_path / "x", {"train": ["0", "1", "2"], "val": ["0", "1", "2"]})
    empty, truncated = _with_bad_files(root)
    out = tmp_path / "run"
    result = run_cli("pretrain", "-o", str(out), *TINY_OVERRIDES, f"data.root={root}", "data.num_classes=3",
                     "pretrain.batch_size=2", check=False)
    assert result.returncode == 2, result.stderr
    assert (f"emae: error: {root}: 2 unreadable image(s) (fix or delete them, or set data.skip_corrupt=true "
            f"to leave them out):\n  {empty}: cannot read image: empty file (0 bytes)\n  {truncated}: cannot "
            f"read image: OSError: image file is truncated") in result.stderr
    assert not (out / "checkpoints" / "last.pt").exists()
    # `emae check` says the same, after a summary of what it found
    capsys.readouterr()
    assert main(["check", *(f"-p{p}" for p in CORE_PARAMS), f"data.root={root}", "data.num_classes=3"]) == 2
    printed = capsys.readouterr()
    assert printed.out.splitlines()[:3] == [
        f"{root}: 3 classes (same names in train/ and val/)",
        f"  train/: 7 files, 3 classes with readable images, 1 unreadable; 0 decoded now, manifest "
        f"{root / '.emae-scan-train.json'}",
        f"  val/: 7 files, 3 classes with readable images, 1 unreadable; 0 decoded now, manifest "
        f"{root / '.emae-scan-val.json'}"]
    assert f"{empty}: cannot read image: empty file" in printed.out and "2 unreadable image(s)" in printed.err


def test_a_second_scan_decodes_nothing_and_a_changed_file_only_itself(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    root = _tree(tmp_path / "x", {"train": ["0", "1", "2"], "val": ["0", "1", "2"]})
    decoded: list[str] = []
    real_probe = scan_module.probe
    monkeypatch.setattr(scan_module, "probe", lambda path: decoded.append(path) or real_probe(path))
    first = scan_imagefolder(root)
    assert len(decoded) == 12 and [s.decoded for s in first.splits.values()] == [6, 6]
    manifest = manifest_paths(root / "train")[0]
    assert manifest == root / ".emae-scan-train.json" and first.splits["train"].manifest == manifest
    entries = json.loads(manifest.read_text())["files"]
    stat = (root / "train" / "1" / "0.png").stat()
    assert entries[os.path.join("1", "0.png")] == [stat.st_size, stat.st_mtime_ns, "RGB", 8, 8, None]
    written = manifest.stat().st_mtime_ns

    decoded.clear()
    again = scan_imagefolder(root)
    assert decoded == [] and [s.decoded for s in again.splits.values()] == [0, 0]
    assert manifest.stat().st_mtime_ns == written  # not even rewritten
    assert again.splits["train"].files == first.splits["train"].files

    Image.new("RGB", (4, 4)).save(root / "train" / "2" / "new.png")  # added
    changed = root / "val" / "0" / "1.png"
    Image.new("RGB", (5, 7), (9, 9, 9)).save(changed)  # rewritten
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    (root / "train" / "0" / "0.png").unlink()  # removed
    third = scan_imagefolder(root)
    assert sorted(decoded) == sorted([str(root / "train" / "2" / "new.png"), str(changed)])
    assert os.path.join("0", "0.png") not in json.loads(manifest.read_text())["files"]
    assert [f.width for f in third.splits["val"].files if f.listed.rel == os.path.join("0", "1.png")] == [5]


def test_skip_corrupt_leaves_them_out_at_scan_time_with_one_warning(tmp_path: Path, caplog) -> None:
    root = _tree(tmp_path / "x", {"train": ["0", "1", "2"], "val": ["0", "1", "2"]})
    empty, truncated = _with_bad_files(root)
    cfg = _cfg(root, "data.skip_corrupt=true")
    train, val = (build_dataset(cfg, split, None) for split in ("train", "val"))
    assert len(train) == 6 and len(val) == 6  # the readable ones; indices do not move at load time
    assert str(empty) not in [p for p, _ in train.samples] and str(truncated) not in [p for p, _ in val.samples]
    warnings = [r.getMessage() for r in caplog.records if "leaving out" in r.getMessage()]
    assert len(warnings) == 1 and str(empty) in warnings[0] and str(truncated) in warnings[0]
    assert all(train[i][0].size == (8, 8) for i in range(len(train)))


def test_odd_image_modes_load_as_the_right_rgb(tmp_path: Path) -> None:
    root = tmp_path / "x"
    for split in ("train", "val"):
        (root / split / "a").mkdir(parents=True)
    folder = root / "train" / "a"
    sixteen = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)  # 0, 1, 128, 255 in 8 bits
    Image.fromarray(sixteen).save(folder / "grey16.png")
    Image.new("CMYK", (4, 1), (0, 128, 255, 64)).save(folder / "cmyk.jpg", quality=100)
    palette = Image.new("P", (4, 1))
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putdata([0, 1, 0, 1])
    palette.save(folder / "palette.png", transparency=1)  # index 1 (green) is transparent
    Image.new("RGBA", (4, 1), (200, 100, 50, 128)).save(folder / "rgba.png")
    Image.new("RGB", (4, 1)).save(root / "val" / "a" / "plain.png")

    dataset = build_dataset(_cfg(root, "data.num_classes=1"), "train", None)
    images = {Path(path).stem: np.asarray(dataset[i][0]) for i, (path, _) in enumerate(dataset.samples)}
    assert all(image.dtype == np.uint8 and image.shape == (1, 4, 3) for image in images.values())
    assert images["grey16"][0, :, 0].tolist() == [0, 1, 128, 255] and (images["grey16"] == images["grey16"][..., :1]).all()
    assert np.abs(images["cmyk"].astype(int) - [191, 95, 0]).max() <= 2  # (255-C)(255-K)/255 per channel
    assert images["palette"][0].tolist() == [[255, 0, 0], [0, 0, 0], [255, 0, 0], [0, 0, 0]]  # on black
    assert np.abs(images["rgba"].astype(int) - [100, 50, 25]).max() <= 1  # composited on black
    modes = {f.listed.rel: f.mode for f in scan_imagefolder(root).splits["train"].files}
    assert modes == {"a/cmyk.jpg": "CMYK", "a/grey16.png": "I;16", "a/palette.png": "P", "a/rgba.png": "RGBA"}


def test_prepare_leaves_the_scan_manifest_ready(tmp_path: Path, capsys) -> None:
    out = tmp_path / "digits"
    assert main(["prepare", *(f"-p{p}" for p in CORE_PARAMS), "-o", str(out), "data.image_size=16",
                 "model.patch_size=4"]) == 0
    printed = capsys.readouterr().out
    assert "  train/: 1437 files, 10 classes with readable images, 0 unreadable; 1437 decoded now" in printed
    again = scan_imagefolder(out)
    assert [s.decoded for s in again.splits.values()] == [0, 0] and len(again.splits["val"].files) == 360


def test_concurrent_scanners_take_turns_so_only_one_decodes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """DDP ranks build the data set at the same time: the lock lets the first decode, the rest read."""
    root = _tree(tmp_path / "x", {"train": ["0", "1", "2"], "val": ["0", "1", "2"]})
    decoded: list[str] = []
    real_probe = scan_module.probe
    monkeypatch.setattr(scan_module, "probe", lambda path: decoded.append(path) or real_probe(path))
    start = threading.Barrier(3)
    results: list[int] = []

    def scanner() -> None:
        start.wait()
        results.append(sum(s.decoded for s in scan_imagefolder(root).splits.values()))

    threads = [threading.Thread(target=scanner) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(results) == [0, 0, 12] and len(decoded) == 12


def test_a_data_folder_that_takes_no_manifest_uses_the_user_cache(tmp_path: Path) -> None:
    root = _tree(tmp_path / "x", {"train": ["0", "1", "2"], "val": ["0", "1", "2"]})
    beside, user = manifest_paths(root / "train")
    beside.mkdir()  # a directory in the way: the write beside the data fails as on a read-only mount
    first = scan_imagefolder(root)
    assert first.splits["train"].manifest == user and user.is_relative_to(tmp_path / "user-cache")
    again = scan_imagefolder(root)
    assert again.splits["train"].decoded == 0 and again.splits["train"].manifest == user
    assert again.splits["val"].manifest == root / ".emae-scan-val.json"
