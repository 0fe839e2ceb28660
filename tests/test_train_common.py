"""What the training loops share (emae.train.common): the non-finite check and its numbering,
and the deterministic set-up. The check across ranks is in test_ddp.py."""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import pytest
import torch

from conftest import PARAMS, TINY_OVERRIDES
from emae.errors import NonFiniteLossError
from emae.train.common import CUBLAS_WORKSPACE, LossMeter, micro_batches, set_deterministic
from emae.train.distributed import DistInfo


class _SyncRecorder(torch.nn.Module):
    """Stands in for DDP's `no_sync`: records whether the gradient all-reduce is held back."""

    def __init__(self) -> None:
        super().__init__()
        self.held = False

    @contextlib.contextmanager
    def no_sync(self):
        self.held = True
        try:
            yield
        finally:
            self.held = False


def test_micro_batches_hold_the_all_reduce_until_the_last_of_a_step() -> None:
    model = _SyncRecorder()
    seen = [(micro, last, batch, model.held)
            for micro, last, batch in micro_batches("abcdef", 3, model, DistInfo(rank=0, world_size=2))]
    assert seen == [(0, False, "a", True), (1, False, "b", True), (2, True, "c", False),
                    (0, False, "d", True), (1, False, "e", True), (2, True, "f", False)]
    assert not model.held  # the context is left with the loop
    single = [(micro, last, model.held) for micro, last, _ in micro_batches("ab", 1, model, DistInfo())]
    assert single == [(0, True, False), (0, True, False)]  # one process: never held, every batch steps


def test_non_finite_error_numbers_steps_as_the_logs_do(tmp_path: Path) -> None:
    """The loops feed the 0-based index of the running step; the logs count steps done."""
    meter = LossMeter(["loss", "recon_loss"], torch.device("cpu"))
    ckpt = tmp_path / "last.pt"
    for index, value in enumerate([1.0, 2.0, float("nan"), float("inf")]):
        meter.add(index, [torch.tensor(value), torch.tensor(0.5)])
    with pytest.raises(NonFiniteLossError, match=re.escape(
            f"non-finite loss at step 3 (loss=nan, recon_loss=0.5); no checkpoint was written yet ({ckpt})")):
        meter.raise_if_non_finite(ckpt)
    ckpt.write_bytes(b"good")
    with pytest.raises(NonFiniteLossError, match=re.escape(f"the last good checkpoint is kept at {ckpt}")):
        meter.raise_if_non_finite(ckpt)
    finite = LossMeter(["loss"], torch.device("cpu"))
    finite.add(0, [torch.tensor(1.0)])
    finite.raise_if_non_finite(ckpt)  # nothing to say


def test_linprobe_stops_through_the_loss_meter(digits_root: Path, tmp_path: Path) -> None:
    """The probe's non-finite stop is the loops' one (LossMeter: numbering, collective check)."""
    from timm.models.vision_transformer import VisionTransformer

    from emae.config import load_config
    from emae.data import build_dataset, eval_transform
    from emae.eval.linprobe import linear_probe

    config = load_config([PARAMS], [*TINY_OVERRIDES, f"data.root={digits_root}", "linprobe.epochs=2",
                                    "linprobe.checkpoint_every_steps=1"])
    torch.manual_seed(0)
    encoder = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, num_classes=0)
    train = _NaNImage(build_dataset(config.data, "train", eval_transform(config.data)), index=700)
    val = build_dataset(config.data, "val", eval_transform(config.data))
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step (\d+) \(loss=nan\)") as info:
        linear_probe(encoder, config, tmp_path, train, val, {"encoder": "test"})
    step = int(re.search(r"step (\d+)", str(info.value)).group(1))
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=False)
    assert state["step"] == step - 1  # the step before the one named: saved, and good
    assert all(torch.isfinite(v).all() for v in state["head"].values() if v.is_floating_point())


class _NaNImage(torch.utils.data.Dataset):
    """`dataset` with one image made of NaNs: the probe's step that takes it has a NaN loss."""

    def __init__(self, dataset: torch.utils.data.Dataset, index: int) -> None:
        self.dataset, self.index = dataset, index

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, label = self.dataset[i]
        return (image * float("nan") if i == self.index else image), label


@pytest.fixture()
def restore_determinism():
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark)
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cudnn.benchmark = saved[2]


def test_deterministic_sets_the_cublas_workspace_and_keeps_the_users(
        monkeypatch: pytest.MonkeyPatch, restore_determinism: None) -> None:
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    set_deterministic(False)
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    set_deterministic(True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_WORKSPACE == ":4096:8"
    assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # the smaller workspace, set by the user
    set_deterministic(True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
