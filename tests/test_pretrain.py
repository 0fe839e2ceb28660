import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from emae.config import Config, DataConfig, PretrainConfig, load_config
from emae.data import dataset_digest
from emae.errors import EmaeError, NonFiniteLossError
from emae.provenance import file_digest
from emae.train.checkpoint import RunCheckpoint
from emae.train.common import autocast_dtype, precision_name
from emae.train.pretrain import pretrain
from tests.conftest import CORE_PARAMS, REPO, cli_env


def _final_weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)["model"]


@pytest.mark.parametrize("variant", [["model.num_parts=1", "model.consistency_weight=0"],
                                     ["model.num_parts=4", "model.consistency_weight=1"]],
                         ids=["mae", "emae"])
def test_loss_falls_and_outputs_are_written(tmp_path: Path, tiny_overrides: list[str], variant: list[str]) -> None:
    config = load_config(CORE_PARAMS, tiny_overrides + variant + ["pretrain.epochs=2", "pretrain.blr=5e-3"])
    metrics = pretrain(config, tmp_path)
    epochs = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert epochs[-1]["recon_loss"] < 0.9 * epochs[0]["recon_loss"]
    assert metrics["steps"] == 2 * (1437 // 64)
    for name in ("config.yaml", "encoder.safetensors", "metrics.json", "steps.jsonl", "checkpoints/last.pt"):
        assert (tmp_path / name).exists(), name
    assert set(load_file(str(tmp_path / "encoder.safetensors"))) >= {"cls_token", "pos_embed", "norm.weight"}
    # a rerun of a finished run does nothing and returns the same metrics
    assert pretrain(config, tmp_path) == json.loads((tmp_path / "metrics.json").read_text())
    # killed after the last checkpoint, before metrics.json: the rerun completes the figures
    (tmp_path / "metrics.json").unlink()
    assert _untimed(pretrain(config, tmp_path)) == _untimed(metrics)


def _untimed(metrics: dict) -> dict:
    """Metrics without the provenance's clock times (a rerun finishes at another second)."""
    times = ("started", "finished")
    return {**metrics, "provenance": {k: v for k, v in metrics["provenance"].items() if k not in times}}


def test_resume_after_sigkill_is_exact(tmp_path: Path, tiny_overrides: list[str]) -> None:
    args = [sys.executable, "-m", "emae.cli", "pretrain", *[a for f in CORE_PARAMS for a in ("-p", str(f))], *tiny_overrides,
            "pretrain.epochs=2", "pretrain.checkpoint_every_steps=4"]
    env = cli_env() | {"OMP_NUM_THREADS": "1"}
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    subprocess.run(args + ["-o", str(reference)], env=env, cwd=REPO, check=True, capture_output=True)

    proc = subprocess.Popen(args + ["-o", str(resumed)], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = resumed / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (resumed / "metrics.json").exists(), "the run finished before it could be killed"
    killed_at = torch.load(ckpt, weights_only=False)["step"]
    assert 0 < killed_at < 1437 // 64  # inside the first epoch

    subprocess.run(args + ["-o", str(resumed)], env=env, cwd=REPO, check=True, capture_output=True)
    ref, res = _final_weights(reference), _final_weights(resumed)
    assert ref.keys() == res.keys()
    assert all(torch.equal(ref[k], res[k]) for k in ref)
    steps = [json.loads(line)["step"] for line in (resumed / "steps.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)), "steps logged twice after the resume"


class _StopAfterFirstEpoch(Exception):
    pass


def _stop_after_first_epoch(stats: dict) -> None:
    raise _StopAfterFirstEpoch


def test_gradient_accumulation_leaves_nothing_over_at_an_epoch_end(tmp_path: Path,
                                                                   tiny_overrides: list[str]) -> None:
    # 1437 // 64 = 22 batches, 7 steps of 3: the 22nd batch must not reach the next epoch's first step
    config = load_config(CORE_PARAMS, tiny_overrides + ["pretrain.accum_iter=3", "pretrain.checkpoint_every_steps=100"])
    reference = pretrain(config, tmp_path / "reference")
    assert reference["steps"] == 2 * 7
    with pytest.raises(_StopAfterFirstEpoch):  # killed at the end of epoch 1, after its checkpoint
        pretrain(config, tmp_path / "resumed", epoch_callback=_stop_after_first_epoch)
    assert pretrain(config, tmp_path / "resumed")["steps"] == 2 * 7
    ref, res = _final_weights(tmp_path / "reference"), _final_weights(tmp_path / "resumed")
    assert all(torch.equal(ref[k], res[k]) for k in ref)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path, tiny_overrides: list[str]) -> None:
    config = load_config(CORE_PARAMS, tiny_overrides + ["pretrain.blr=1e30", "pretrain.warmup_epochs=0",
                                                     "pretrain.checkpoint_every_steps=1"])
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step \d+ \(loss="):
        pretrain(config, tmp_path)
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=False)
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def _checkpoint_of(config: Config, path: Path, precision: str | None = None) -> RunCheckpoint:
    """A checkpoint of `config`'s run; by default in the precision this machine computes it in
    (`amp: auto` is bf16 on a CPU with AMX, fp32 on one without)."""
    if precision is None:
        precision = precision_name(autocast_dtype(config.pretrain.amp, torch.device("cpu")))
    return RunCheckpoint(path / "checkpoints" / "last.pt", {"data": dataset_digest(config.data)}, 1,
                         params={"model": config.model, "pretrain": config.pretrain, "data": config.data},
                         precision=precision)


def test_resuming_with_other_params_is_refused(tmp_path: Path, tiny_overrides: list[str]) -> None:
    earlier = load_config(CORE_PARAMS, tiny_overrides)
    ckpt = _checkpoint_of(earlier, tmp_path)
    ckpt.save({"step": 3})
    before = file_digest(ckpt.path)
    other = load_config(CORE_PARAMS, tiny_overrides + ["model.num_parts=2", "pretrain.blr=1e-3"])
    with pytest.raises(EmaeError, match=r"model.num_parts: 4 -> 2; pretrain.blr: 0.0015 -> 0.001"):
        pretrain(other, tmp_path)
    assert file_digest(ckpt.path) == before  # nothing lost
    # fewer epochs than the checkpoint has trained: refused (more extend the run: tests/test_pipeline_e2e.py)
    ckpt.save({"step": 2 * (1437 // 64)})
    shorter = load_config(CORE_PARAMS, tiny_overrides + ["pretrain.epochs=1"])
    with pytest.raises(EmaeError, match=r"pretrain.epochs: 2 -> 1 \(the checkpoint has trained 2 epochs\)"):
        pretrain(shorter, tmp_path)


def test_resumable_keys_may_change_and_are_declared_once() -> None:
    """The keys a resumed run may change are the fields marked RESUMABLE: every resume check
    (pretrain, linprobe, finetune, dense) and the sweep's study signature read them from there."""
    from emae.dense.config import DetectConfig
    from emae.eval.config import FinetuneConfig, LinprobeConfig

    assert DataConfig.resumable_keys() == {"root", "num_workers", "cache_mb"}
    assert PretrainConfig.resumable_keys() == {"epochs", "checkpoint_every_steps", "log_every_steps",
                                               "knn_every_epochs"}
    assert LinprobeConfig.resumable_keys() == {"epochs", "checkpoint_every_steps"}
    assert FinetuneConfig.resumable_keys() == {"epochs", "checkpoint_every_steps", "eval_every_epochs"}
    assert DetectConfig.resumable_keys() == {"root", "num_workers", "log_every", "checkpoint_every",
                                             "eval_batch_size"}


def test_a_retry_that_changes_only_resumable_keys_resumes(tmp_path: Path, tiny_overrides: list[str]) -> None:
    """A sweep's retried trial may come back with other checkpoint / log intervals or workers."""
    config = load_config(CORE_PARAMS, tiny_overrides + ["pretrain.checkpoint_every_steps=5"])
    with pytest.raises(_StopAfterFirstEpoch):
        pretrain(config, tmp_path, epoch_callback=_stop_after_first_epoch)
    retried = load_config(CORE_PARAMS, tiny_overrides + ["pretrain.checkpoint_every_steps=3",
                                                         "pretrain.log_every_steps=2", "data.num_workers=0"])
    assert pretrain(retried, tmp_path)["steps"] == 2 * (1437 // 64)


def test_resuming_in_another_precision_is_refused(tmp_path: Path, tiny_overrides: list[str]) -> None:
    """`amp: auto` is bf16 on one machine and fp32 on another: a requeue onto the other kind of node
    would continue the run in another precision."""
    config = load_config(CORE_PARAMS, tiny_overrides + ["pretrain.amp=off"])
    _checkpoint_of(config, tmp_path, precision="bfloat16").save({"step": 3})
    with pytest.raises(EmaeError, match=r"trained in bfloat16 but this run computes in float32"):
        pretrain(config, tmp_path)


def test_missing_data_is_a_clear_error(tmp_path: Path, tiny_overrides: list[str]) -> None:
    config = load_config(CORE_PARAMS, tiny_overrides + [f"data.root={tmp_path / 'nowhere'}"])
    with pytest.raises(EmaeError, match=r"nowhere/train: data split not found"):
        pretrain(config, tmp_path / "run")


def test_a_flop_budget_fits_the_epochs_and_equal_flops_give_k_times_fewer_epochs(
        tmp_path: Path, tiny_overrides: list[str]) -> None:
    from emae.flops import train_flops_per_image

    mae = load_config(CORE_PARAMS, tiny_overrides + ["model.num_parts=1", "model.consistency_weight=0",
                                                     "pretrain.epochs=4"])
    steps = 1437 // 64
    mae_flops = 4 * steps * 64 * train_flops_per_image(mae.model, 16, 3)
    # EMAE K=4 at MAE's 4-epoch FLOPs: one epoch (K views cost ~4x), warm-up shortened alike
    emae = load_config(CORE_PARAMS, tiny_overrides + ["model.num_parts=4", "pretrain.epochs=4",
                                                      f"pretrain.budget_flops={mae_flops}"])
    metrics = pretrain(emae, tmp_path / "emae")
    assert metrics["epochs"] == 1 and metrics["steps"] == steps
    assert metrics["pretrain_flops"] == pytest.approx(mae_flops, rel=0.1)  # the views share the patch embedding
    assert metrics["budget_flops"] == mae_flops and metrics["images_seen"] == steps * 64
    saved = (tmp_path / "emae" / "config.yaml").read_text()
    assert "epochs: 1\n" in saved and "warmup_epochs: 0.25\n" in saved
    log = [json.loads(line) for line in (tmp_path / "emae" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["flops"] == metrics["pretrain_flops"]
    # images: 2 epochs' worth -> 2 epochs
    two = load_config(CORE_PARAMS, tiny_overrides + [f"pretrain.budget_images={2 * steps * 64}",
                                                     "pretrain.checkpoint_every_steps=1000"])
    assert pretrain(two, tmp_path / "two")["epochs"] == 2
    with pytest.raises(EmaeError, match="budget_flops=1e.* and pretrain.budget_images=5 are both set"):
        load_config(CORE_PARAMS, tiny_overrides + ["pretrain.budget_flops=1e12", "pretrain.budget_images=5"])


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_the_lr_after_the_warm_up_follows_pretrain_schedule(tmp_path: Path, tiny_overrides: list[str],
                                                           schedule: str) -> None:
    config = load_config(CORE_PARAMS, tiny_overrides + [f"pretrain.schedule={schedule}"])
    metrics = pretrain(config, tmp_path)
    # what the run computed in is recorded with it (the report compares it across runs)
    assert metrics["provenance"]["precision"] == precision_name(autocast_dtype("auto", torch.device("cpu")))
    steps = [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    peak, per_epoch = config.pretrain.blr * 64 / 256, 1437 // 64  # 1 warm-up epoch of 2
    warm, after = [s["lr"] for s in steps[:per_epoch - 1]], [s["lr"] for s in steps[per_epoch:]]
    assert warm == sorted(warm) and warm[-1] < peak  # the linear warm-up, in both
    if schedule == "constant":
        assert after == pytest.approx([peak] * len(after))
    else:  # half a cosine to min_lr (0)
        assert after == sorted(after, reverse=True) and after[-1] < 0.01 * peak
