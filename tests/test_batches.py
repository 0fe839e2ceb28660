"""The effective batch is stated once per recipe; accum_iter follows from it and from the processes
the launcher grants; numbers that disagree are an error before any job."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from emae.config import load_config
from emae.errors import ConfigError
from emae.train.pretrain import pretrain
from emae.workflow.stages import Pipeline
from tests.conftest import CORE_PARAMS, PARAMS, run_cli

# the recipes' batches (MAE, BEiT / ViTDet): what every GPU count must train with
RECIPES = {"imagenet_vit_b16": {"pretrain": 4096, "linprobe": 16384, "finetune": 1024, "detect": 64,
                                "segment": 16},
           "imagenet_vit_l16": {"pretrain": 4096, "linprobe": 16384, "finetune": 1024}}


@pytest.mark.parametrize("preset", sorted(RECIPES))
@pytest.mark.parametrize("gpus", [None, 1, 4, 8], ids=["shipped-launcher", "1gpu", "4gpus", "8gpus"])
def test_presets_train_with_their_recipe_batch_on_any_gpu_count(preset: str, gpus: int | None) -> None:
    overrides = [f"pipeline.stages.{stage}=true" for stage in ("detect", "segment") if stage in RECIPES[preset]]
    overrides += [] if gpus is None else [f"launcher.resources.tasks_per_node={gpus}"]
    pipeline = Pipeline(PARAMS, preset, overrides)
    world = gpus or 1  # the shipped launcher: one process per stage
    for stage, target in RECIPES[preset].items():
        for run in pipeline.runs:
            accum, effective = pipeline.batches[stage, run]
            cfg = pipeline.run_configs[run]
            section = cfg.pretrain if stage == "pretrain" else cfg.section(stage)
            assert effective == target and section.batch_size * accum * world == target, (stage, run)


def test_a_gpu_count_that_does_not_divide_the_recipe_is_an_error_before_any_job() -> None:
    with pytest.raises(ConfigError, match=r"pretrain.effective_batch_size=4096 is not a multiple of "
                                          r"pretrain.batch_size=64 x 3 process\(es\) = 192.*3 task"):
        Pipeline(PARAMS, "imagenet_vit_b16", ["launcher.resources.tasks_per_node=3"])
    with pytest.raises(ConfigError, match=r"finetune.effective_batch_size=1024 but finetune.batch_size=128 "
                                          r"x 1 process\(es\) x accum_iter=2 = 256: set finetune.accum_iter=8"):
        Pipeline(PARAMS, "imagenet_vit_b16", ["finetune.accum_iter=2"])
    with pytest.raises(ConfigError, match="pretrain.accum_iter is null"):
        Pipeline(PARAMS, None, ["pretrain.accum_iter=null"])


def test_pretraining_derives_accum_iter_and_reports_batch_and_lr(tiny_overrides: list[str], tmp_path: Path) -> None:
    config = load_config(CORE_PARAMS, tiny_overrides + [
        "pretrain.epochs=1", "pretrain.batch_size=32", "pretrain.accum_iter=null",
        "pretrain.effective_batch_size=128"])
    metrics = pretrain(config, tmp_path)
    assert metrics["effective_batch_size"] == 128 and metrics["steps"] == 1437 // 128
    assert metrics["lr"] == pytest.approx(config.pretrain.blr * 128 / 256)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["effective_batch_size"] == 128 and saved["lr"] == metrics["lr"]


def test_each_training_job_prints_its_batch_and_lr() -> None:
    shipped = run_cli("stage", "pretrain", "--variant", "emae", "--seed", "0", "--preset", "imagenet_vit_b16",
                      "--print")
    assert ("pretrain emae/seed0: effective batch 4096 = batch_size 64 x 1 process(es) x accum_iter 64; "
            "lr 0.0024") in shipped.stderr
    assert shipped.stdout.startswith("emae launch --stage pretrain")
    eight = run_cli("stage", "linprobe", "--variant", "mae", "--seed", "0", "--preset", "imagenet_vit_b16",
                    "--print", "--launcher", "resources.tasks_per_node=8")
    assert "linprobe mae/seed0: effective batch 16384 = batch_size 2048 x 8 process(es) x accum_iter 1; lr 6.4" \
        in eight.stderr
