"""Fine-tuning: every encoder key loads, layer decay reaches the lr, metrics are sane and
deterministic, and a run killed with SIGKILL resumes to the exact weights of an uninterrupted one."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from emae.config import Config, load_config
from emae.errors import EmaeError
from emae.eval.finetune import build_model, build_optimizer, finetune
from emae.models import EMAE, save_encoder
from tests.conftest import PARAMS, REPO, TINY_OVERRIDES, cli_env

# all of MAE's randomness switched on, small so a step is quick
AUGMENTED = ["finetune.mixup=0.8", "finetune.cutmix=1.0", "finetune.reprob=0.25",
             "finetune.rand_augment=rand-m9-mstd0.5-inc1", "finetune.drop_path=0.1",
             "finetune.batch_size=16", "finetune.warmup_epochs=1"]


@pytest.fixture(scope="module")
def small_root(digits_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 train and 3 val images per class of the embedded set: fine-tuning epochs of seconds."""
    root = tmp_path_factory.mktemp("digits_small")
    for split, n in (("train", 12), ("val", 3)):
        for cls in sorted((digits_root / split).iterdir()):
            (root / split / cls.name).mkdir(parents=True)
            for image in sorted(cls.iterdir())[:n]:
                shutil.copy(image, root / split / cls.name / image.name)
    return root


def _config(root: Path, *extra: str) -> Config:
    return load_config([PARAMS], TINY_OVERRIDES + [f"data.root={root}", *extra])


@pytest.fixture(scope="module")
def export(small_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = _config(small_root)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("export") / "encoder.safetensors"
    save_encoder(EMAE.from_config(config.model, config.data), path)
    return path


def test_all_encoder_keys_load_only_the_head_is_new(export: Path, small_root: Path) -> None:
    for pool in ("token", "avg"):
        model = build_model(_config(small_root, f"finetune.global_pool={pool}"), export)
        saved = load_file(str(export))
        own = model.state_dict()
        new = sorted(k for k in own if k not in saved)
        assert new == ["head.bias", "head.weight"]
        assert all(torch.equal(own[k], v) for k, v in saved.items())
        assert model.head.out_features == 10


def test_layer_decay_scales_reach_the_learning_rate(export: Path, small_root: Path) -> None:
    from timm.scheduler import CosineLRScheduler

    config = _config(small_root, "finetune.layer_decay=0.5")
    cfg = config.section("finetune")
    model = build_model(config, export)
    optimizer = build_optimizer(model, cfg, lr=1e-3)
    scheduler = CosineLRScheduler(optimizer, t_initial=100, warmup_t=0, t_in_epochs=False)
    scheduler.step_update(10)
    scales = {g["lr_scale"] for g in optimizer.param_groups}
    assert len(scales) == config.model.depth + 2  # embeddings, each block, head
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(optimizer.param_groups[0]["lr"] / optimizer.param_groups[0]["lr_scale"]
                                            * group["lr_scale"])
    assert min(scales) == pytest.approx(0.5 ** (config.model.depth + 1)) and max(scales) == 1.0


def test_finetune_metrics_in_range_and_deterministic(export: Path, small_root: Path, tmp_path: Path) -> None:
    config = _config(small_root, *AUGMENTED, "finetune.epochs=2", "finetune.checkpoint_every_steps=100")
    first = finetune(config, export, tmp_path / "a")
    second = finetune(config, export, tmp_path / "b")
    assert 0 <= first["top1"] <= first["top5"] <= 100 and first["steps"] == 2 * (120 // 16)
    assert first["top1"] == second["top1"] and first["val_loss"] == second["val_loss"]
    a = torch.load(tmp_path / "a" / "checkpoints" / "last.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "b" / "checkpoints" / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["blocks.0.attn.qkv.weight"], load_file(str(export))["blocks.0.attn.qkv.weight"])
    log = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2] and all("top1" in r for r in log)
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["top1"] == first["top1"]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(export: Path, small_root: Path,
                                                                   tmp_path: Path) -> None:
    config = _config(small_root, "finetune.blr=1e30", "finetune.warmup_epochs=0", "finetune.epochs=2",
                     "finetune.checkpoint_every_steps=1", "finetune.batch_size=16")
    with pytest.raises(EmaeError, match=r"non-finite loss at step [1-9]\d* \(loss="):
        finetune(config, export, tmp_path)
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=False)
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def _finetune_cmd(export: Path, root: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "emae.cli", "finetune", "--checkpoint", str(export), "-o", str(out),
            *TINY_OVERRIDES, f"data.root={root}", *AUGMENTED, "finetune.epochs=3",
            "finetune.checkpoint_every_steps=2"]


def test_resume_after_sigkill_is_exact(export: Path, small_root: Path, tmp_path: Path) -> None:
    env = cli_env() | {"OMP_NUM_THREADS": "1"}
    subprocess.run(_finetune_cmd(export, small_root, tmp_path / "full"), cwd=REPO, env=env, check=True,
                   capture_output=True)
    killed_out = tmp_path / "killed"
    ckpt = killed_out / "checkpoints" / "last.pt"
    proc = subprocess.Popen(_finetune_cmd(export, small_root, killed_out), cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    step_at_kill = torch.load(ckpt, weights_only=False)["step"]
    assert 0 < step_at_kill < 3 * (120 // 16) and not (killed_out / "metrics.json").exists()

    subprocess.run(_finetune_cmd(export, small_root, killed_out), cwd=REPO, env=env, check=True,
                   capture_output=True)
    full = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=False)
    resumed = torch.load(ckpt, weights_only=False)
    assert resumed["step"] == full["step"]
    assert all(torch.equal(full["model"][k], resumed["model"][k]) for k in full["model"])
    metrics = [json.loads((out / "metrics.json").read_text()) for out in (tmp_path / "full", killed_out)]
    assert metrics[0]["top1"] == metrics[1]["top1"] and metrics[0]["val_loss"] == metrics[1]["val_loss"]


def test_mismatched_export_lists_the_keys(export: Path, small_root: Path, tmp_path: Path) -> None:
    """An export whose weights are not the architecture its metadata names."""
    from safetensors import safe_open

    with safe_open(str(export), framework="pt") as handle:
        metadata = handle.metadata()
    kwargs = json.loads(metadata["timm_kwargs"]) | {"depth": 3}
    bad = tmp_path / "encoder.safetensors"
    save_file(load_file(str(export)), str(bad), metadata=metadata | {"timm_kwargs": json.dumps(kwargs)})
    with pytest.raises(EmaeError, match=r"missing: blocks\.2\."):
        finetune(_config(small_root), bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_config_errors_name_the_key(small_root: Path) -> None:
    from emae.errors import ConfigError

    with pytest.raises(ConfigError, match=r"finetune.batch_size=15 must be even"):
        _config(small_root, "finetune.mixup=0.8", "finetune.batch_size=15").section("finetune")
    with pytest.raises(ConfigError, match=r"override 'finetune.layer_decay=1.5'.*finetune.layer_decay"):
        _config(small_root, "finetune.layer_decay=1.5").section("finetune")


def test_random_init_is_training_from_scratch_with_the_same_recipe(export: Path, small_root: Path,
                                                                   tmp_path: Path) -> None:
    from emae.eval.finetune import build_model

    config = _config(small_root, "finetune.epochs=1", "finetune.checkpoint_every_steps=100")
    pretrained, scratch = build_model(config, export), build_model(config, export, random_init=True)
    assert not torch.equal(pretrained.blocks[0].attn.qkv.weight, scratch.blocks[0].attn.qkv.weight)
    metrics = finetune(config, export, tmp_path / "scratch", random_init=True)
    saved = json.loads((tmp_path / "scratch" / "metrics.json").read_text())
    assert metrics["random_init"] is True and saved["inputs"]["encoder"].startswith("random-init:")
