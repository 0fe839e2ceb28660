import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from emae.config import load_config
from emae.data import ResumableBatchSampler, SeededDataset, build_dataset, dataset_digest, pretrain_transform
from emae.errors import EmaeError
from emae.seeding import seeded
from tests.conftest import CORE_PARAMS


def _data_cfg(root: Path, *extra: str):
    return load_config(CORE_PARAMS, [f"data.root={root}", "data.image_size=16", *extra]).data


@pytest.fixture()
def small_tree(tmp_path: Path, digits_root: Path) -> Path:
    """A copy of the embedded set with 3 images per class and split."""
    for split in ("train", "val"):
        for class_dir in sorted((digits_root / split).iterdir()):
            target = tmp_path / split / class_dir.name
            target.mkdir(parents=True)
            for image in sorted(class_dir.iterdir())[:3]:
                shutil.copy(image, target / image.name)
    return tmp_path


def test_embedded_set_is_prepared_with_labels_and_split(digits_root: Path) -> None:
    train = build_dataset(_data_cfg(digits_root), "train", pretrain_transform(_data_cfg(digits_root)))
    val = build_dataset(_data_cfg(digits_root), "val", None)
    assert len(train) == 1437 and len(val) == 360
    image, label = train[0]
    assert image.shape == (3, 16, 16) and 0 <= label < 10
    assert sorted(set(val.targets)) == list(range(10))


def test_corrupt_image_is_named_at_build_or_left_out_with_a_warning(small_tree: Path, caplog) -> None:
    bad = sorted((small_tree / "train" / "3").iterdir())[0]
    bad.write_bytes(b"not a png")
    with pytest.raises(EmaeError, match=rf"{bad}: cannot read image: UnidentifiedImageError"):
        build_dataset(_data_cfg(small_tree), "train", None)  # found by the scan, before any loading
    skipping = build_dataset(_data_cfg(small_tree, "data.skip_corrupt=true"), "train", None)
    assert len(skipping) == 29 and str(bad) not in [path for path, _ in skipping.samples]
    assert str(bad) in caplog.text and "leaving out 1 unreadable image(s)" in caplog.text


def test_missing_root_empty_class_and_class_count_are_clear_errors(small_tree: Path, tmp_path: Path) -> None:
    with pytest.raises(EmaeError, match=r"nowhere/train: data split not found"):
        build_dataset(_data_cfg(tmp_path / "nowhere"), "train", None)
    for image in (small_tree / "val" / "7").iterdir():
        image.unlink()
    with pytest.raises(EmaeError, match=r"class folder\(s\) without images: 7"):
        build_dataset(_data_cfg(small_tree), "val", None)
    with pytest.raises(EmaeError, match=r"has 10 classes but data.num_classes=5"):
        build_dataset(_data_cfg(small_tree, "data.num_classes=5"), "train", None)


def test_cifar_offline_is_a_clear_error(tmp_path: Path) -> None:
    cfg = _data_cfg(tmp_path, "data.kind=cifar10")
    with pytest.raises(EmaeError, match=r"cifar10: cannot load or download into"):
        build_dataset(cfg, "train", None)


def test_sampler_resumes_mid_epoch_and_shards_ranks() -> None:
    full = list(ResumableBatchSampler(100, 8, seed=3))
    resumed = ResumableBatchSampler(100, 8, seed=3)
    resumed.set_position(0, start_batch=5)
    assert list(resumed) == full[5:]
    ranks = [list(ResumableBatchSampler(100, 8, seed=3, rank=r, world_size=2)) for r in (0, 1)]
    seen = [i for batches in ranks for batch in batches for i, _ in batch]
    assert len(seen) == len(set(seen))  # ranks take disjoint samples
    other_epoch = ResumableBatchSampler(100, 8, seed=3)
    other_epoch.set_position(1)
    assert list(other_epoch) != full
    # with 5 batches per optimizer step, an epoch of 12 batches yields 2 whole steps
    assert list(ResumableBatchSampler(100, 8, seed=3, accum_iter=5)) == full[:10]


def test_seeded_augmentation_depends_only_on_the_seed(digits_root: Path) -> None:
    cfg = _data_cfg(digits_root)
    dataset = SeededDataset(build_dataset(cfg, "train", pretrain_transform(cfg)))
    a, _ = dataset[(4, 123)]
    torch.rand(10)  # global RNG use in between must not matter
    b, _ = dataset[(4, 123)]
    c, _ = dataset[(4, 124)]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_seeded_draws_what_a_seeded_cpu_generator_draws_and_restores_the_state() -> None:
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    with seeded(7):
        inside = (torch.rand(4), random.random(), np.random.rand())
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
    assert (np.random.get_state()[1] == before[2]).all()
    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    assert torch.equal(inside[0], torch.rand(4)) and inside[1:] == (random.random(), np.random.rand())


def test_decoded_images_are_cached_up_to_cache_mb_and_give_the_same_samples(small_tree: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _data_cfg(small_tree)  # 30 train images of 16 x 16 x 3 bytes
    reads: list[str] = []
    for cache_mb, cached in ((1.0, 30), (5 * 768 / 2**20, 5), (0.0, 0)):
        dataset = SeededDataset(build_dataset(cfg.model_copy(update={"cache_mb": cache_mb}), "train",
                                              pretrain_transform(cfg)))
        folder = dataset.dataset
        monkeypatch.setattr(folder, "loader", lambda path, load=folder.loader: reads.append(path) or load(path))
        first = [dataset[(i, i)] for i in range(len(dataset))]
        reads.clear()
        again = [dataset[(i, i)] for i in range(len(dataset))]
        assert len(reads) == len(dataset) - cached  # only the images beyond the limit are read again
        assert all(torch.equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(first, again))
    uncached = build_dataset(cfg.model_copy(update={"cache_mb": 0.0}), "train", pretrain_transform(cfg))
    assert all(torch.equal(first[i][0], SeededDataset(uncached)[(i, i)][0]) for i in range(len(first)))


def test_dataset_digest_changes_with_any_file_and_only_then(small_tree: Path) -> None:
    cfg = _data_cfg(small_tree)
    first = dataset_digest(cfg)
    assert first == dataset_digest(cfg) and len(first) == 16 and int(first, 16) >= 0
    image = sorted((small_tree / "val" / "2").iterdir())[0]
    seen = {first}
    shutil.copy(image, image.with_name("extra.png"))  # added
    seen.add(dataset_digest(cfg))
    image.with_name("extra.png").rename(image.with_name("renamed.png"))  # renamed
    seen.add(dataset_digest(cfg))
    image.with_name("renamed.png").unlink()  # removed: back to the first tree
    assert dataset_digest(cfg) == first
    stat = image.stat()
    image.write_bytes(image.read_bytes())  # copied again (dvc pull, cp, clone): a new mtime only,
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert dataset_digest(cfg) == first  # so a resumed run still recognises its data
    image.write_bytes(image.read_bytes() + b"\0")  # rewritten: another size
    rewritten = dataset_digest(cfg)
    seen.add(rewritten)
    assert len(seen) == 4, seen
    (small_tree / "train" / "3" / "notes.txt").write_text("not an image")  # not part of the data set
    assert dataset_digest(cfg) == rewritten
