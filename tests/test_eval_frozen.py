"""kNN and linear probe on frozen features: the metrics, their determinism, the frozen encoder,
DDP agreement of the kNN monitor, and the errors for bad input."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import TensorDataset

from emae.config import Config, load_config
from emae.errors import EmaeError
from emae.eval.knn import evaluate_knn, knn_monitor, knn_scores, monitor_datasets
from emae.eval.linprobe import evaluate_linprobe, linear_probe
from emae.models import EMAE, save_encoder
from emae.train.distributed import DistInfo
from tests.conftest import PARAMS, TINY_OVERRIDES, run_cli


def _config(digits_root: Path, *extra: str) -> Config:
    return load_config([PARAMS], TINY_OVERRIDES + [f"data.root={digits_root}", *extra])


@pytest.fixture(scope="module")
def export(digits_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An encoder export of the tiny architecture (weights as pre-training initialises them)."""
    config = _config(digits_root)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("export") / "encoder.safetensors"
    save_encoder(EMAE.from_config(config.model, config.data), path)
    return path


def test_knn_scores_vote_with_weighted_neighbours() -> None:
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [-1.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 1, 2])
    query = torch.tensor([[2.0, 0.1], [0.05, 3.0]])  # cosine: scale does not matter
    scores = knn_scores(train, labels, query, num_classes=3, k=3, temperature=0.07)
    assert scores.argmax(1).tolist() == [0, 1]
    # the third neighbour of the first query is class 1 with cosine ~0.15 -> weight exp(0.15/0.07)
    cos = torch.nn.functional.cosine_similarity(query[:1], train[3:4])
    assert scores[0, 1] == pytest.approx(float((cos / 0.07).exp()), rel=1e-5)
    assert scores[0, 2] == 0  # the opposite vector is not among the 3 nearest


def test_knn_metrics_in_range_and_deterministic(export: Path, digits_root: Path, tmp_path: Path) -> None:
    config = _config(digits_root)
    first = evaluate_knn(config, export, tmp_path / "a")
    second = evaluate_knn(config, export, tmp_path / "b")
    assert 0 <= first["top1"] <= first["top5"] <= 100
    assert first["top1"] > 10  # 10 classes: even random ViT features beat chance on digits
    assert (first["top1"], first["top5"]) == (second["top1"], second["top5"])
    saved = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert saved["top1"] == first["top1"] and saved["num_val"] == 360 and saved["k"] == 20


INPUTS = {"encoder": "export", "data": "digits"}  # the digests a resumed checkpoint must match


def test_linprobe_freezes_encoder_and_is_deterministic(export: Path, digits_root: Path,
                                                       tmp_path: Path) -> None:
    from emae.data import build_dataset, eval_transform
    from emae.eval.features import build_encoder

    config = _config(digits_root, "linprobe.epochs=10", "linprobe.batch_size=128")
    sets = [build_dataset(config.data, split, eval_transform(config.data)) for split in ("train", "val")]
    encoder = build_encoder(export, config.data)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    first = linear_probe(encoder, config, tmp_path / "a", *sets, INPUTS)
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())
    assert not any(p.requires_grad for p in encoder.parameters())
    second = linear_probe(encoder, config, tmp_path / "b", *sets, INPUTS)
    assert 0 <= first["top1"] <= first["top5"] <= 100 and first["top1"] > 10
    assert first["top1"] == second["top1"] and first["steps"] == 10 * (1437 // 128)
    # the probe learnt something: its last epoch beats its first
    log = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < log[0]["loss"]
    # rerunning a finished probe resumes at the end and gives the same figure
    again = linear_probe(encoder, config, tmp_path / "a", *sets, INPUTS)
    assert again["top1"] == first["top1"] and again["steps"] == first["steps"]


def test_linprobe_with_augmentation_runs_the_encoder(export: Path, digits_root: Path, tmp_path: Path) -> None:
    config = _config(digits_root, "linprobe.epochs=1", "linprobe.augment=true", "linprobe.batch_size=256")
    metrics = evaluate_linprobe(config, export, tmp_path)
    assert metrics["augment"] is True and metrics["steps"] == 1437 // 256
    assert 0 <= metrics["top1"] <= 100


def _monitor_rank(rank: int, world_size: int, port: int, root: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from emae.eval.features import build_encoder
    from emae.train.distributed import cleanup, init_distributed

    info = init_distributed()
    config = _config(Path(root))
    encoder = build_encoder(Path(out) / "encoder.safetensors", config.data)
    result = knn_monitor(encoder, config, torch.device("cpu"), info, monitor_datasets(config))
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))
    cleanup(info)


def test_knn_monitor_agrees_across_ddp_ranks(export: Path, digits_root: Path, tmp_path: Path) -> None:
    """Two gloo ranks each encode half of the data (kept as tensors); both return the figures of
    one process that decodes and transforms the images (data.cache_mb=0: datasets, not tensors)."""
    import shutil

    shutil.copy(export, tmp_path / "encoder.safetensors")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_monitor_rank, args=(2, port, str(digits_root), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    from emae.eval.features import build_encoder

    config = _config(digits_root, "data.cache_mb=0")
    datasets = monitor_datasets(config)
    assert not any(isinstance(d, TensorDataset) for d in datasets)
    assert all(isinstance(d, TensorDataset) for d in monitor_datasets(_config(digits_root)))
    single = knn_monitor(build_encoder(export, config.data), config, torch.device("cpu"), DistInfo(), datasets)
    assert results[0] == results[1]
    assert results[0]["knn_top1"] == pytest.approx(single["knn_top1"])
    assert results[0]["knn_top5"] == pytest.approx(single["knn_top5"])


def test_random_init_flag_changes_the_encoder(export: Path, digits_root: Path, tmp_path: Path) -> None:
    from emae.eval.features import build_encoder

    config = _config(digits_root)
    loaded = build_encoder(export, config.data)
    fresh = build_encoder(export, config.data, random_init=True, seed=1)
    differ = [k for k, v in loaded.state_dict().items() if not torch.equal(v, fresh.state_dict()[k])]
    assert "blocks.0.attn.qkv.weight" in differ


def test_bad_inputs_fail_early_with_clear_errors(export: Path, digits_root: Path, tmp_path: Path) -> None:
    config = _config(digits_root)
    with pytest.raises(EmaeError, match="encoder export not found"):
        evaluate_knn(config, tmp_path / "nope.safetensors", tmp_path / "o")
    with pytest.raises(EmaeError, match="last.pt.*consistency"):
        (tmp_path / "last.pt").write_bytes(b"x")
        evaluate_knn(config, tmp_path / "last.pt", tmp_path / "o")
    with pytest.raises(EmaeError, match="has 10 classes but data.num_classes=7"):
        evaluate_knn(_config(digits_root, "data.num_classes=7"), export, tmp_path / "o")
    with pytest.raises(EmaeError, match="image size 16 vs data.image_size=32"):
        evaluate_knn(_config(digits_root, "data.image_size=32"), export, tmp_path / "o")
    empty = tmp_path / "empty"
    for cls in range(10):
        (empty / "train" / str(cls)).mkdir(parents=True)
        (empty / "train" / str(cls) / "a.png").write_bytes((digits_root / "train" / "0").iterdir().__next__().read_bytes())
    (empty / "val").mkdir()
    with pytest.raises(EmaeError, match="val"):
        evaluate_linprobe(load_config([PARAMS], TINY_OVERRIDES + [f"data.root={empty}"]), export, tmp_path / "o")
    assert not (tmp_path / "o").exists()  # nothing written before the error


def test_cli_reports_errors_without_traceback(tmp_path: Path, digits_root: Path) -> None:
    result = run_cli("knn", "--checkpoint", str(tmp_path / "missing.safetensors"), "-o", str(tmp_path / "o"),
                     *TINY_OVERRIDES, f"data.root={digits_root}", check=False)
    assert result.returncode == 2
    assert "encoder export not found" in result.stderr and "Traceback" not in result.stderr


def test_pooling_matches_timm_heads(export: Path, digits_root: Path) -> None:
    """`pool: token` is the encoder's own output; `avg` is timm's avg pool of the normed tokens."""
    from emae.eval.features import build_encoder, pooled

    config = _config(digits_root)
    imgs = torch.randn(4, 3, 16, 16)
    token = build_encoder(export, config.data).eval()
    avg = build_encoder(export, config.data, global_pool="avg", fc_norm=False).eval()
    with torch.no_grad():
        assert torch.allclose(pooled(token, imgs, "token"), token(imgs), atol=1e-6)
        assert torch.allclose(pooled(token, imgs, "avg"), avg(imgs), atol=1e-6)
        assert not torch.allclose(pooled(token, imgs, "avg"), token(imgs), atol=1e-3)


def test_pixel_baseline_is_knn_and_probe_on_the_raw_pixels(digits_root: Path, tmp_path: Path) -> None:
    from emae.data import build_dataset, eval_transform

    config = _config(digits_root, "linprobe.epochs=2")
    metrics = evaluate_knn(config, Path("pixels"), tmp_path / "knn")
    assert metrics["feature_dim"] == 3 * 16 * 16
    # the same vote computed here from the images themselves
    images = {split: build_dataset(config.data, split, eval_transform(config.data)) for split in ("train", "val")}
    feats = {s: (torch.stack([x.flatten() for x, _ in d]), torch.tensor([y for _, y in d])) for s, d in images.items()}
    scores = knn_scores(*feats["train"], feats["val"][0], num_classes=10, k=20, temperature=0.07)
    assert metrics["top1"] == pytest.approx(100 * (scores.argmax(1) == feats["val"][1]).float().mean().item())
    assert metrics["top1"] > 90  # pixels are strong on the embedded digits: the bar pre-training must clear
    saved = json.loads((tmp_path / "knn" / "metrics.json").read_text())
    assert saved["inputs"]["encoder"] == "pixels"
    probe = evaluate_linprobe(config, Path("pixels"), tmp_path / "probe")
    assert probe["feature_dim"] == 3 * 16 * 16 and probe["top1"] > 50
