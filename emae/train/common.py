"""What every stage command shares: params arguments, devices, autocast."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import torch

from emae.config import Config, load_config
from emae.errors import NonFiniteLossError


def add_config_arguments(parser: argparse.ArgumentParser, out_required: bool = False) -> None:
    parser.add_argument("--params", "-p", action="append", default=None, metavar="PATH",
                        help="params file or directory (repeatable, later wins; default: params/)")
    parser.add_argument("--preset", default=None,
                        help="overlay params/presets/<PRESET>.yaml (e.g. cifar10, imagenet_vit_b16)")
    parser.add_argument("--out", "-o", required=out_required, default=None, metavar="DIR",
                        help="output folder")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="override params, e.g. model.num_parts=4 pretrain.epochs=2")


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(args.params or ["params"], args.overrides, args.preset)


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """None means full precision. 'auto' is bf16 on CUDA and off on CPU (CPU bf16 is slower)."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "fp16":
        return torch.float16
    return torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   scaler: torch.amp.GradScaler, clip_grad: float | None) -> None:
    """The end of a (possibly accumulated) step: unscale and clip if asked, step, update the
    loss scaler, clear the gradients."""
    if clip_grad is not None:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


class LossMeter:
    """Running sums of loss terms kept on the device, and the first step whose terms were not
    finite: a training step never waits for the accelerator to read a loss back; the sums and the
    non-finite check are read (one host sync) only at log points, checkpoints and epoch ends."""

    def __init__(self, names: list[str], device: torch.device) -> None:
        self.names = names
        self.sums = torch.zeros(len(names), device=device)
        self.last = torch.zeros(len(names), device=device)
        self.bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self.bad_values = torch.zeros(len(names), device=device)

    def add(self, step: int, values: list[torch.Tensor], weight: float = 1.0) -> None:
        v = torch.stack([x.detach().float() for x in values])  # [len(names)]
        first_bad = ~torch.isfinite(v).all() & (self.bad_step < 0)
        self.bad_step = torch.where(first_bad, step, self.bad_step)
        self.bad_values = torch.where(first_bad, v, self.bad_values)
        self.sums += v * weight
        self.last = v

    def raise_if_non_finite(self, ckpt_path: Path, prefix: str = "") -> None:
        """Called before every save (a host sync), so no checkpoint holds weights a non-finite loss
        updated: NonFiniteLossError naming the first such step and its terms."""
        step = int(self.bad_step)
        if step >= 0:
            values = ", ".join(f"{n}={v:.4g}" for n, v in zip(self.names, self.bad_values.tolist()))
            raise NonFiniteLossError(f"{prefix}non-finite loss at step {step} ({values}); the last good "
                                     f"checkpoint is kept at {ckpt_path} (a lower learning rate?)")

    def totals(self) -> dict[str, float]:
        return dict(zip(self.names, self.sums.tolist()))

    def latest(self) -> dict[str, float]:
        return dict(zip(self.names, self.last.tolist()))
