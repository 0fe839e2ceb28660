"""What the evaluations exist to show, on the embedded data with the default params: an encoder
pre-trained by `emae pretrain` beats the same architecture randomly initialised (as pre-training
starts) on kNN and on the linear probe, and its linear probe comes within a point of the raw
pixels'. Pre-training is the default pipeline's `mae` variant (K=1, lambda=0: 2.3x faster than
EMAE on the CPU), 50 epochs (1.5 min); the study's figures are in docs/evaluation.md (seed 0, the
constant lr, bf16 on an AMD EPYC with AVX512-BF16: kNN 93.9 vs random 65.8, linear probe 96.7 vs
random 91.1 and pixels 96.1; with the cosine to 0, kNN 90.6; with the earlier recipe, batch 128
and crops from 0.2, kNN was 78 and the probe 93).

Dense transfer needs a better encoder: after 100 epochs (kNN ~90) the pre-trained encoder
fine-tunes to a clearly better segmenter than a random one on generated canvases of single
digits at the pre-training scale; on the default multi-digit canvases it does not yet
(docs/dense.md, "Where the gap comes from"). A 50-epoch encoder of today's recipe would save this
test's second pre-training but is not clearly better there (mIoU 75.2 vs random 70.3, seed 2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import PARAMS

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


@pytest.fixture(scope="module")
def digits32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from emae.data.prepare import prepare_digits

    root = tmp_path_factory.mktemp("digits32")
    prepare_digits(root, image_size=32, val_fraction=0.2, seed=0)
    return root


def pretrain_mae(root: Path, out: Path, *extra: str) -> tuple[list[str], Path]:
    """(overrides, encoder export) of a default-params MAE pre-trained on the embedded 32 px set."""
    from emae.config import load_config
    from emae.train.pretrain import pretrain

    overrides = [f"data.root={root}", "model.num_parts=1", "model.consistency_weight=0"]
    pretrain(load_config([PARAMS], [*overrides, *extra]), out)
    return overrides, out / "encoder.safetensors"


@pytest.fixture(scope="module")
def pretrained(digits32: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], Path]:
    return pretrain_mae(digits32, tmp_path_factory.mktemp("mae"))


def test_knn_and_linear_probe_beat_random_init(pretrained: tuple[list[str], Path], tmp_path: Path) -> None:
    from emae.config import load_config
    from emae.eval.features import PIXELS
    from emae.eval.knn import evaluate_knn
    from emae.eval.linprobe import evaluate_linprobe

    overrides, encoder = pretrained
    config = load_config([PARAMS], overrides)
    knn = evaluate_knn(config, encoder, tmp_path / "knn")["top1"]
    knn_random = evaluate_knn(config, encoder, tmp_path / "knn_random", random_init=True)["top1"]
    probe = evaluate_linprobe(config, encoder, tmp_path / "probe")["top1"]
    probe_random = evaluate_linprobe(config, encoder, tmp_path / "probe_random", random_init=True)["top1"]
    probe_pixels = evaluate_linprobe(config, Path(PIXELS), tmp_path / "probe_pixels")["top1"]
    assert knn > knn_random + 15, (knn, knn_random)
    assert probe > probe_random + 3, (probe, probe_random)
    assert probe > probe_pixels - 1, (probe, probe_pixels)


def test_segmentation_fine_tuned_from_a_longer_pretraining_beats_random_init(
        digits32: Path, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    from emae.config import load_config
    from emae.dense.generate import prepare_dense
    from emae.dense.segment import segment

    overrides, encoder = pretrain_mae(digits32, tmp_path_factory.mktemp("mae100"),
                                      "pretrain.epochs=100", "pretrain.warmup_epochs=5")
    # one digit per canvas at the pre-training scale: 1,000 train / 300 val canvases of 32 px
    dense = ["dense_data.canvas_size=32", "dense_data.min_digit_size=32", "dense_data.max_digit_size=32",
             "dense_data.max_objects=1", "dense_data.num_train=1000", "dense_data.num_val=300",
             f"segment.root={tmp_path / 'dense' / 'ade'}", "segment.crop_size=32"]
    config = load_config([PARAMS], [*overrides, *dense])
    prepare_dense(tmp_path / "dense", config.section("dense_data"), 0.2, 0)
    pre = segment(config, encoder, tmp_path / "pre")
    rand = segment(config, encoder, tmp_path / "random", random_init=True)
    assert pre["iterations"] == rand["iterations"] == config.section("segment").iterations
    assert pre["seg_miou"] > rand["seg_miou"] + 5, (pre["seg_miou"], rand["seg_miou"])
