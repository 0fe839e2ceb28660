"""Shared fixtures: the embedded data set (prepared once per session) and tiny configs."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params"
# The core's own params files: core tests do not depend on the sections of later stages.
CORE_PARAMS = [PARAMS / "data.yaml", PARAMS / "model.yaml", PARAMS / "pretrain.yaml"]

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_configure(config: pytest.Config) -> None:
    # emae.sweep.study silences Optuna's ExperimentalWarning (heartbeat, retry: used on purpose) at
    # import, but pytest restores the filters after the test that first imported it
    if importlib.util.find_spec("optuna"):
        config.addinivalue_line("filterwarnings", "ignore::optuna.exceptions.ExperimentalWarning")

# Small enough for a CPU step in well under a second; still a real ViT with L = 16 patches. The
# recipe the tests were written against (blr 1.5e-3, crops from 0.2), not the embedded default's.
TINY_OVERRIDES = [
    "data.image_size=16", "model.patch_size=4", "model.embed_dim=32", "model.depth=2",
    "model.num_heads=2", "model.decoder_embed_dim=32", "model.decoder_depth=1",
    "model.decoder_num_heads=2", "pretrain.batch_size=64", "pretrain.epochs=2",
    "pretrain.warmup_epochs=1", "pretrain.log_every_steps=1", "pretrain.checkpoint_every_steps=4",
    "pretrain.blr=1.5e-3", "pretrain.schedule=cosine", "data.crop_scale_min=0.2",
]


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded data set written by `emae prepare` at 16x16 (for the tiny configs)."""
    from emae.data.prepare import prepare_digits

    root = tmp_path_factory.mktemp("digits16")
    prepare_digits(root, image_size=16, val_fraction=0.2, seed=0)
    return root


@pytest.fixture()
def tiny_overrides(digits_root: Path) -> list[str]:
    return TINY_OVERRIDES + [f"data.root={digits_root}"]


@pytest.fixture()
def tiny_config(tiny_overrides: list[str]):
    from emae.config import load_config

    return load_config(CORE_PARAMS, tiny_overrides)


def cli_env() -> dict[str, str]:
    """Environment for running `python -m emae.cli` in a subprocess from the repo."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


def run_cli(*args: str, cwd: Path = REPO, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["python", "-m", "emae.cli", *args], cwd=cwd, env=cli_env(),
                            capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"emae {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def have(binary: str) -> bool:
    return shutil.which(binary) is not None
