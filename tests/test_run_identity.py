"""A stage resumes only what it made itself: the same inputs (encoder export, data set) and the
same number of processes; every metrics.json says what produced it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from emae.config import load_config
from emae.errors import EmaeError
from emae.provenance import file_digest
from emae.train.checkpoint import RunCheckpoint
from emae.train.pretrain import pretrain
from tests.conftest import CORE_PARAMS, PARAMS, REPO, TINY_OVERRIDES, cli_env, run_cli
from tests.test_ddp import _free_port


def _tiny(root: Path) -> list[str]:
    return [*TINY_OVERRIDES, f"data.root={root}", "pretrain.epochs=1", "pretrain.knn_every_epochs=0"]


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def test_a_probe_of_a_new_encoder_reports_the_new_encoder(digits_root: Path, tmp_path: Path) -> None:
    """Pre-train A, probe it, pre-train B into the same run folder, rerun the probe: it finds its
    finished checkpoint, sees another encoder, and trains again (at ee70ea8 it resumed at the last
    step and reported A's head for B)."""
    run, probe = tmp_path / "run", tmp_path / "probe"
    tiny = [*_tiny(digits_root), "linprobe.epochs=10", "linprobe.batch_size=128", "linprobe.blr=2"]
    pretrain_argv = ["pretrain", "-p", str(PARAMS), "-o", str(run), *tiny]
    probe_argv = ["linprobe", "-p", str(PARAMS), "--checkpoint", str(run / "encoder.safetensors"), *tiny]
    run_cli(*pretrain_argv)
    run_cli(*probe_argv, "-o", str(probe))
    first = _metrics(probe)

    shutil.rmtree(run / "checkpoints")  # the user moves the old run's checkpoint away, then
    run_cli(*pretrain_argv, "pretrain.seed=1", "pretrain.blr=1e-2")  # pre-trains B into the folder
    again = run_cli(*probe_argv, "-o", str(probe))
    assert "made from other inputs (encoder" in again.stderr
    assert "starting this stage again from scratch" in again.stderr
    stale_fixed = _metrics(probe)
    run_cli(*probe_argv, "-o", str(tmp_path / "fresh"))
    fresh = _metrics(tmp_path / "fresh")
    assert stale_fixed["inputs"]["encoder"] == file_digest(run / "encoder.safetensors") != first["inputs"]["encoder"]
    for key in ("top1", "top5", "best_top1", "steps"):
        assert stale_fixed[key] == fresh[key], key
    assert first["top1"] != fresh["top1"]  # A's head would have told another figure
    log = [json.loads(line) for line in (probe / "log.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in log] == list(range(1, 11))  # the stale run's lines are gone


def test_pretraining_restarts_when_its_data_changed(digits_root: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(digits_root, data)
    out = tmp_path / "run"
    pretrain(load_config(CORE_PARAMS, _tiny(data)), out)
    for image in sorted((data / "train" / "3").iterdir())[:70]:  # the user edits the data set
        image.unlink()
    config = load_config(CORE_PARAMS, _tiny(data))
    metrics = pretrain(config, out)  # at ee70ea8: "complete; nothing to do", the old figures
    fresh = pretrain(config, tmp_path / "fresh")
    assert metrics["inputs"]["data"] == fresh["inputs"]["data"] != "" and metrics["steps"] == (1437 - 70) // 64
    weights = torch.load(out / "checkpoints" / "last.pt", weights_only=False)["model"]
    fresh_weights = torch.load(tmp_path / "fresh" / "checkpoints" / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(weights[k], fresh_weights[k]) for k in weights)


def test_resuming_with_another_process_count_is_refused(digits_root: Path, tmp_path: Path) -> None:
    """2 processes pre-train one epoch; resumed by 1 process for a second epoch: refused, naming
    both counts (the data shards, steps per epoch, lr and masks depend on the count)."""
    out = tmp_path / "run"
    argv = ["pretrain", *[a for f in CORE_PARAMS for a in ("-p", str(f))], "-o", str(out),
            *_tiny(digits_root), "pretrain.batch_size=32"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
                str(_free_port()), "-m", "emae.cli"]
    done = subprocess.run([*torchrun, *argv], cwd=REPO, env=cli_env() | {"OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    before = file_digest(out / "checkpoints" / "last.pt")
    again = run_cli(*argv, "pretrain.epochs=2", check=False)
    assert again.returncode != 0 and "Traceback" not in again.stderr
    assert "was written by 2 process(es) but this run has 1: resume with 2" in again.stderr
    assert file_digest(out / "checkpoints" / "last.pt") == before  # nothing lost


def test_run_checkpoint_ties_a_checkpoint_to_its_inputs(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    RunCheckpoint(path, {"encoder": "a", "data": "d"}, 1).save({"step": 3})
    same = RunCheckpoint(path, {"encoder": "a", "data": "d"}, 1)
    assert same.load()["step"] == 3 and not same.restarted
    other = RunCheckpoint(path, {"encoder": "b", "data": "d"}, 1)
    assert other.load() is None and other.restarted
    with pytest.raises(EmaeError, match="written by 1 process"):
        RunCheckpoint(path, {"encoder": "a", "data": "d"}, 4).load()


def test_metrics_carry_provenance(digits_root: Path, tmp_path: Path) -> None:
    metrics = pretrain(load_config(CORE_PARAMS, _tiny(digits_root)), tmp_path)
    saved = _metrics(tmp_path)
    assert saved == metrics
    prov = saved["provenance"]
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert prov["commit"] == head.stdout.strip() and isinstance(prov["dirty"], bool)
    assert prov["torch"] == torch.__version__ and prov["world_size"] == 1 and prov["device"] == "cpu"
    for key in ("emae", "python", "timm", "torchvision", "cuda", "cudnn", "device_names", "hosts",
                "command", "started", "finished"):
        assert key in prov, key
    assert prov["started"] <= prov["finished"]
    assert saved["lr"] == pytest.approx(1.5e-3 * 64 / 256) and saved["effective_batch_size"] == 64
