"""Pre-training step throughput: our MAE mode and EMAE against Hugging Face's ViTMAE, in one run,
at both precisions (fp32 and bf16 autocast).

A step is what `emae pretrain` does per batch: masks, forward, backward, AdamW update, on synthetic
in-memory images (no data loading: `data_loading.py` measures that); ours runs in the stages'
precision context (`emae.train.common.autocast`: autocast + the measured attention kernels), HF's
in plain `torch.autocast`, as it ships. Variants, each at every precision, measured round-robin
(repeat r of every (variant, precision) before repeat r+1 of any, so load changes hit all of them
alike), median of the repeats, warm-up steps excluded:

  mae         our model, K=1, lambda=0 (plain MAE in the same code path)
  emae_k2     EMAE, K=2, lambda=1 (consistency l1)
  emae_k4     EMAE, K=4, lambda=1
  naive_k4    EMAE K=4 done as K separate forward passes of B images (what batching the parts buys)
  hf_vitmae   transformers' ViTMAEForPreTraining, same dims, mask ratio, norm_pix_loss, sdpa
  matmul      a large matmul per precision: the machine's measured peak of that dtype, same run

Reported per variant and precision: images/s, masked patches reconstructed per second (images/s *
K * masked patches per view), FLOP/s from the analytic count (`emae.flops`) and its fraction of the
same dtype's matmul peak, peak memory above the weights (CPU: growth of the peak RSS over the first
steps of a fresh model, peak reset through /proc; GPU: torch.cuda.max_memory_allocated); the CPU's
native bf16 (`emae.provenance.cpu_bf16`) and what `amp: auto` picks on it. Ratios and the targets
of issue 16 go to `benchmarks/results/<name>.json`.

    python benchmarks/step_throughput.py                      # CPU: ViT-Tiny-sized, batch 64
    python benchmarks/step_throughput.py --params params --variants mae,emae_k4 --name cpu-embedded-default
    python benchmarks/step_throughput.py --smoke --out /tmp/x # seconds; checks the plumbing
    python benchmarks/step_throughput.py --profile mae --precisions bf16   # where the time goes
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import socket
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch
import torch.nn as nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable as a script without installing the package
    sys.path.insert(0, str(REPO))

from emae import flops  # noqa: E402
from emae.io import write_json  # noqa: E402
from emae.masking import num_visible, parallel_masks, visible_indices  # noqa: E402
from emae.models import EMAE  # noqa: E402
from emae.provenance import cpu_bf16, cpu_model  # noqa: E402
from emae.train.common import autocast, autocast_dtype  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
VARIANTS = ("mae", "emae_k2", "emae_k4", "naive_k4", "hf_vitmae")
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}
OPTIONAL = ("mae_compiled", "emae_k4_compiled", "hf_vitmae_compiled")  # CPU compile takes minutes


@dataclass(frozen=True)
class Dims:
    """Model and batch dimensions shared by every variant (ours and Hugging Face's)."""

    img_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    decoder_embed_dim: int
    decoder_depth: int
    decoder_num_heads: int
    batch_size: int
    mlp_ratio: float = 4.0
    mask_ratio: float = 0.75
    in_chans: int = 3

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def num_masked(self) -> int:
        """Masked (reconstructed) patches per view."""
        return self.num_patches - num_visible(self.num_patches, self.mask_ratio)


# ViT-Tiny-sized encoder on 32x32 images (the CPU targets of issue 7)
CPU_DIMS = Dims(img_size=32, patch_size=4, embed_dim=192, depth=12, num_heads=3,
                decoder_embed_dim=128, decoder_depth=4, decoder_num_heads=4, batch_size=64)
SMOKE_DIMS = Dims(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                  decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, batch_size=8)


# ---------------------------------------------------------------------------------------- FLOPs

def model_dims(d: Dims, num_parts: int) -> SimpleNamespace:
    """`d` as the model config `emae.flops` counts (its ModelDims)."""
    return SimpleNamespace(**asdict(d), num_parts=num_parts)


def forward_flops(d: Dims, num_parts: int) -> float:
    """Forward FLOPs per image with K views: `emae.flops`, the project's one count."""
    return flops.forward_flops(model_dims(d, num_parts), d.img_size, d.in_chans)


def train_flops_per_image(d: Dims, num_parts: int) -> float:
    return flops.train_flops_per_image(model_dims(d, num_parts), d.img_size, d.in_chans)


# ------------------------------------------------------------------------------------- variants

def build_emae(d: Dims, num_parts: int, consistency_weight: float, **kwargs: Any) -> EMAE:
    return EMAE(img_size=d.img_size, patch_size=d.patch_size, in_chans=d.in_chans,
                embed_dim=d.embed_dim, depth=d.depth, num_heads=d.num_heads,
                decoder_embed_dim=d.decoder_embed_dim, decoder_depth=d.decoder_depth,
                decoder_num_heads=d.decoder_num_heads, mlp_ratio=d.mlp_ratio, norm_pix_loss=True,
                mask_ratio=d.mask_ratio, num_parts=num_parts, consistency_weight=consistency_weight,
                consistency_distance="l1", **kwargs)


class NaiveParts(nn.Module):
    """EMAE as K separate MAE forward passes of B images each, then the same loss: the parts
    without batching (what one would write by looping an MAE implementation over the K masks)."""

    def __init__(self, model: EMAE) -> None:
        super().__init__()
        self.model = model

    def forward(self, imgs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        m = self.model
        mask = parallel_masks(imgs.shape[0], m.num_patches, m.num_parts, m.mask_ratio,
                              generator=generator, device=imgs.device)  # [K, B, L]
        ids_keep = visible_indices(mask)  # [K, B, n]
        preds = [m.forward_decoder(m.forward_encoder(imgs, ids_keep[k:k + 1]), ids_keep[k:k + 1])
                 for k in range(m.num_parts)]  # K x [1, B, L, P]
        loss, _, _ = m.forward_loss(imgs, torch.cat(preds, dim=0), mask)
        return loss


def build_hf_vitmae(d: Dims) -> nn.Module:
    """transformers' ViTMAEForPreTraining with our dims, mask ratio, norm_pix_loss, LayerNorm eps
    (MAE's 1e-6), exact GELU (as timm's) and SDPA attention."""
    try:
        from transformers import ViTMAEConfig, ViTMAEForPreTraining
    except ImportError as err:
        raise SystemExit(
            f"hf_vitmae needs Hugging Face transformers ({err}): pip install -e '.[bench]' "
            "(or pass --variants without hf_vitmae)") from None
    config = ViTMAEConfig(
        hidden_size=d.embed_dim, num_hidden_layers=d.depth, num_attention_heads=d.num_heads,
        intermediate_size=int(d.embed_dim * d.mlp_ratio), image_size=d.img_size,
        patch_size=d.patch_size, num_channels=d.in_chans, qkv_bias=True,
        decoder_hidden_size=d.decoder_embed_dim, decoder_num_hidden_layers=d.decoder_depth,
        decoder_num_attention_heads=d.decoder_num_heads,
        decoder_intermediate_size=int(d.decoder_embed_dim * d.mlp_ratio),
        mask_ratio=d.mask_ratio, norm_pix_loss=True, layer_norm_eps=1e-6, hidden_act="gelu",
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="sdpa",
    )
    model = ViTMAEForPreTraining(config)
    assert model.config._attn_implementation == "sdpa", model.config._attn_implementation
    return model


@dataclass
class Variant:
    """A model and the step that trains it; `num_parts` views per image."""

    name: str
    model: nn.Module
    num_parts: int
    loss: Callable[[torch.Tensor], torch.Tensor]  # imgs -> scalar loss (masks drawn inside)
    ours: bool = True  # runs in the stages' precision context (else plain torch.autocast)


def make_variant(name: str, d: Dims, device: torch.device, grad_checkpointing: bool = False,
                 seed: int = 0) -> Variant:
    """`name` from VARIANTS, optionally suffixed `_compiled` (the whole model under torch.compile,
    masks still drawn from the generator, as `emae pretrain` with `pretrain.compile=true`).
    Compiled with static shapes: models with another K in the same process would otherwise make
    dynamo trace K as a symbolic int, which `parallel_masks`' range check cannot take."""
    torch.manual_seed(seed)
    generator = torch.Generator(device=device).manual_seed(seed)
    base = name.removesuffix("_compiled")
    if base == "hf_vitmae":
        model = build_hf_vitmae(d).to(device).train()
        run = torch.compile(model, dynamic=False) if name != base else model
        return Variant(name, model, 1, lambda imgs: run(pixel_values=imgs).loss, ours=False)
    num_parts = {"mae": 1, "emae_k2": 2, "emae_k4": 4, "naive_k4": 4}[base]
    weight = 0.0 if base == "mae" else 1.0
    emae = build_emae(d, num_parts, weight, grad_checkpointing=grad_checkpointing).to(device).train()
    module: nn.Module = NaiveParts(emae) if base.startswith("naive") else emae
    run = torch.compile(module, dynamic=False) if name != base else module
    if base.startswith("naive"):
        return Variant(name, module, num_parts, lambda imgs: run(imgs, generator=generator))
    return Variant(name, emae, num_parts, lambda imgs: run(imgs, generator=generator).loss)


def precision_context(variant: Variant, device: torch.device,
                      amp_dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Ours: the stages' context (autocast + measured attention kernels); HF: torch.autocast."""
    if variant.ours:
        return autocast(device, amp_dtype)
    return torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)


def make_step(variant: Variant, device: torch.device,
              amp_dtype: torch.dtype | None) -> Callable[[torch.Tensor], None]:
    """One optimizer step: zero grads, forward (autocast when asked), backward, AdamW. The same
    AdamW for every variant, fused (one kernel per step; also on CPU since torch 2.4)."""
    params = [p for p in variant.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05, fused=True)

    def step(imgs: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        with precision_context(variant, device, amp_dtype):
            loss = variant.loss(imgs)
        loss.backward()
        optimizer.step()

    return step


# -------------------------------------------------------------------------------------- timing

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def time_calls(fn: Callable[[], None], calls: int, device: torch.device, clock: str = "wall") -> float:
    """Seconds per call of `fn`, averaged over `calls` back-to-back calls. `clock="cpu"` counts
    the process's CPU seconds instead: with one thread, time lost to other processes on a busy
    machine is not counted (with more, OpenMP's spin-waits would be)."""
    now = CLOCKS[clock]
    synchronize(device)
    start = now()
    for _ in range(calls):
        fn()
    synchronize(device)
    return (now() - start) / calls


def matmul_op(size: int, device: torch.device, dtype: torch.dtype) -> tuple[Callable[[], None], float]:
    """A square matmul and its FLOPs: the machine's practical peak for that dtype."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    return (lambda: torch.matmul(a, b, out=out)), 2.0 * size**3


def round_robin(fns: dict[str, Callable[[], None]], calls: dict[str, int], warmup: int,
                repeats: int, device: torch.device, progress: bool = True,
                clock: str = "wall") -> dict[str, list[float]]:
    """Seconds per call of each fn: `warmup` untimed calls each, then `repeats` rounds in which
    every fn runs `calls[name]` timed calls, in a rotating order."""
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        synchronize(device)
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]  # no variant always first
        for name in order:
            times[name].append(time_calls(fns[name], calls[name], device, clock))
        if progress:
            line = "  ".join(f"{n}={statistics.median(t) * 1e3:.1f}ms" for n, t in times.items())
            print(f"  round {r + 1}/{repeats}: {line}", file=sys.stderr, flush=True)
    return times


# -------------------------------------------------------------------------------------- memory

def _proc_status_mb(key: str) -> float:
    """A `VmRSS` / `VmHWM` line of /proc/self/status, MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def _reset_cpu_peak() -> float | None:
    """Return freed heap to the OS and reset the peak RSS (Linux `clear_refs` 5); the current RSS,
    or None where the kernel does not allow it (then CPU memory is not reported)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # else freed pages of earlier variants are reused
        Path("/proc/self/clear_refs").write_text("5")
        return _proc_status_mb("VmRSS")
    except (OSError, KeyError, AttributeError):
        return None


def measure_memory(name: str, d: Dims, device: torch.device, amp_dtype: torch.dtype | None,
                   steps: int = 2) -> float | None:
    """Peak memory of the first training steps above the model and its input batch, MiB:
    activations, gradients and the optimizer state. GPU: torch.cuda.max_memory_allocated;
    CPU: growth of the process's peak RSS (VmHWM), reset before the steps."""
    variant = make_variant(name, d, device)
    step = make_step(variant, device, amp_dtype)
    imgs = torch.randn(d.batch_size, d.in_chans, d.img_size, d.img_size, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        for _ in range(steps):
            step(imgs)
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    before = _reset_cpu_peak()
    if before is None:
        return None
    for _ in range(steps):
        step(imgs)
    return _proc_status_mb("VmHWM") - before


# ------------------------------------------------------------------------------------- results

def environment(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__,
        "platform": platform.platform(), "processor": cpu_model(),
        "cpu_bf16": cpu_bf16(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    for module in ("timm", "transformers"):
        try:
            info[module] = __import__(module).__version__
        except ImportError:
            info[module] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        from timm.layers import use_fused_attn
        info["timm_fused_attn"] = bool(use_fused_attn())
    except ImportError:
        pass
    return info


def summarise(times: dict[str, list[float]], variants: dict[str, Variant], d: Dims,
              peak_flops: float) -> dict[str, dict[str, Any]]:
    """Figures of each variant at one precision; `peak_flops`: that dtype's matmul peak."""
    out: dict[str, dict[str, Any]] = {}
    for name, variant in variants.items():
        step_s = statistics.median(times[name])
        images_per_s = d.batch_size / step_s
        flops_per_step = train_flops_per_image(d, variant.num_parts) * d.batch_size
        out[name] = {
            "num_parts": variant.num_parts,
            "step_seconds": step_s,
            "step_seconds_repeats": times[name],
            "images_per_s_best": d.batch_size / min(times[name]),
            "images_per_s": images_per_s,
            "masked_patches_per_s": images_per_s * variant.num_parts * d.num_masked,
            "flops_per_step": flops_per_step,
            "flops_per_s": flops_per_step / step_s,
            "fraction_of_matmul_peak": flops_per_step / step_s / peak_flops,
            "parameters": sum(p.numel() for p in variant.model.parameters() if p.requires_grad),
        }
    return out


def ratios_and_targets(runs: dict[str, dict[str, Any]], auto: str, device: torch.device,
                       ) -> tuple[dict[str, float], dict[str, dict[str, Any]]]:
    """Issue 16's targets that this run can check (those whose variants were measured). `runs`:
    precision -> {"variants": ...}; `auto`: the precision `amp: auto` picks here."""
    ratios: dict[str, float] = {}
    wanted: dict[str, float] = {}

    def ratio(key: str, num: tuple[str, str], den: tuple[str, str], field: str,
              goal: float | None = None) -> None:
        a, b = (runs.get(p, {}).get("variants", {}).get(n) for n, p in (num, den))
        if a and b:
            ratios[key] = a[field] / b[field]
            if goal is not None:
                wanted[key] = goal

    for p in runs:
        ratio(f"{p}:mae_vs_hf_vitmae_images_per_s", ("mae", p), ("hf_vitmae", p), "images_per_s")
        ratio(f"{p}:emae_k2_vs_mae_masked_patches_per_s", ("emae_k2", p), ("mae", p), "masked_patches_per_s")
        ratio(f"{p}:emae_k4_vs_mae_masked_patches_per_s", ("emae_k4", p), ("mae", p), "masked_patches_per_s", 1.0)
        ratio(f"{p}:emae_k4_vs_naive_k4_masked_patches_per_s", ("emae_k4", p), ("naive_k4", p),
              "masked_patches_per_s", 1.1)
        ratio(f"{p}:mae_compiled_vs_mae_images_per_s", ("mae_compiled", p), ("mae", p), "images_per_s")
        ratio(f"{p}:mae_compiled_vs_hf_vitmae_compiled_images_per_s", ("mae_compiled", p),
              ("hf_vitmae_compiled", p), "images_per_s")
        for name in ("mae", "emae_k4", "hf_vitmae", "mae_compiled"):
            res = runs[p]["variants"].get(name)
            if res:
                ratios[f"{p}:{name}_fraction_of_matmul_peak"] = res["fraction_of_matmul_peak"]
    if "mae" in runs.get("fp32", {}).get("variants", {}):
        wanted["fp32:mae_fraction_of_matmul_peak"] = 0.60
    if "mae" in runs.get("bf16", {}).get("variants", {}):
        wanted["bf16:mae_fraction_of_matmul_peak"] = 0.30
    # ours under amp: auto, against ours in fp32 and against the faster of HF's precisions
    ratio("auto:mae_vs_fp32_mae_images_per_s", ("mae", auto), ("mae", "fp32"), "images_per_s",
          1.5 if device.type == "cpu" else None)
    hf = {p: r["variants"]["hf_vitmae"]["images_per_s"] for p, r in runs.items() if "hf_vitmae" in r["variants"]}
    if hf and "mae" in runs.get(auto, {}).get("variants", {}):
        best = max(hf, key=hf.get)
        ratios["auto:mae_vs_best_hf_vitmae_images_per_s"] = runs[auto]["variants"]["mae"]["images_per_s"] / hf[best]
        ratios["best_hf_vitmae_precision"] = best  # type: ignore[assignment]
        wanted["auto:mae_vs_best_hf_vitmae_images_per_s"] = 1.3
    targets = {key: {"value": ratios[key], "target": goal, "met": ratios[key] >= goal}
               for key, goal in wanted.items() if key in ratios}
    return ratios, targets


def print_table(runs: dict[str, dict[str, Any]], targets: dict[str, dict[str, Any]]) -> None:
    print(f"{'variant':<20} {'prec':>4} {'K':>2} {'step ms':>8} {'img/s':>8} {'masked/s':>10} "
          f"{'GFLOP/s':>8} {'of peak':>7} {'mem MiB':>8}")
    for p, run in runs.items():
        for name, r in run["variants"].items():
            mem = r.get("peak_memory_mb")
            print(f"{name:<20} {p:>4} {r['num_parts']:>2} {r['step_seconds'] * 1e3:>8.1f} "
                  f"{r['images_per_s']:>8.1f} {r['masked_patches_per_s']:>10.0f} "
                  f"{r['flops_per_s'] / 1e9:>8.1f} {r['fraction_of_matmul_peak']:>7.1%} "
                  f"{'-' if mem is None else f'{mem:.0f}':>8}")
        print(f"{'matmul peak':<20} {p:>4} {run['matmul_peak']['flops_per_s'] / 1e9:>53.1f}")
    for key, t in targets.items():
        print(f"{key}: {t['value']:.3f} (target >= {t['target']}) {'MET' if t['met'] else 'NOT MET'}")


def markdown_table(result: dict[str, Any]) -> str:
    """The performance table of a results JSON, for the READMEs."""
    env, d = result["environment"], result["dims"]
    runs = {p: result["precisions"][p] for p in PRECISIONS if p in result["precisions"]}  # JSON sorts keys
    peaks = "; ".join(f"{p} matmul {run['matmul_peak']['size']}^3: {run['matmul_peak']['flops_per_s'] / 1e9:.0f} GFLOP/s"
                      for p, run in runs.items())
    lines = [
        f"{env['processor']} (native bf16: {env['cpu_bf16'] or 'none'}; amp auto: {result['amp_auto']}), "
        f"{env['torch_threads']} thread(s) ({result['settings']['clock']} clock), torch {env['torch']}, "
        f"timm {env['timm']}, transformers {env['transformers']}; load average "
        f"{result['load_average']['before'][0]:.1f} -> {result['load_average']['after'][0]:.1f}; ViT dim "
        f"{d['embed_dim']} depth {d['depth']} heads {d['num_heads']}, {d['img_size']}px patch {d['patch_size']}, "
        f"decoder {d['decoder_embed_dim']}x{d['decoder_depth']}, mask {d['mask_ratio']}, batch "
        f"{d['batch_size']}; {peaks} (medians).",
        "",
        "| variant | precision | K | step (ms) | images/s | masked patches/s | GFLOP/s | of the dtype's matmul peak | peak memory (MiB) |",
        "| --- | --- | --: | --: | --: | --: | --: | --: | --: |",
    ]
    for name in VARIANTS + OPTIONAL:
        for p, run in runs.items():
            r = run["variants"].get(name)
            if r is None:
                continue
            mem = r.get("peak_memory_mb")
            lines.append(f"| {name} | {p} | {r['num_parts']} | {r['step_seconds'] * 1e3:.0f} | "
                         f"{r['images_per_s']:.1f} | {r['masked_patches_per_s']:.0f} | "
                         f"{r['flops_per_s'] / 1e9:.1f} | {r['fraction_of_matmul_peak']:.0%} | "
                         f"{'-' if mem is None else f'{mem:.0f}'} |")
    lines += ["", "| target | value | goal | met |", "| --- | --: | --: | --- |"]
    for key, t in result["targets"].items():
        lines.append(f"| {key} | {t['value']:.2f} | >= {t['target']} | {'yes' if t['met'] else 'no'} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- main

def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny dims, 1 repeat: checks the plumbing")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from "
                        + ", ".join(VARIANTS + OPTIONAL) + " (default: the first five)")
    parser.add_argument("--precisions", default=",".join(PRECISIONS),
                        help="comma-separated, from " + ", ".join(PRECISIONS) + " (default: both)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per step (default 64)")
    parser.add_argument("--params", type=Path, default=None, metavar="DIR",
                        help="measure at the model dims, image size and batch of this params tree "
                        "(e.g. params: the embedded default, what `emae plan` reads on this CPU)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 7; smoke 1)")
    parser.add_argument("--steps", type=int, default=None, help="steps per variant per round (default 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per variant (default 3)")
    parser.add_argument("--matmul-size", type=int, default=None, help="peak matmul size (default 2048)")
    parser.add_argument("--threads", type=int, default=default_threads(), help="torch CPU threads")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                        help="wall (default) or cpu: CPU seconds of this process, robust to other "
                        "load on the machine; meaningful with --threads 1 on CPU only")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--name", default=None, help="result name (default cpu-this-machine / smoke)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for <name>.json")
    parser.add_argument("--markdown", type=Path, metavar="JSON", default=None,
                        help="print the Markdown table of a results JSON and exit")
    parser.add_argument("--profile", metavar="VARIANT", default=None,
                        help="print a torch.profiler table of a few steps of VARIANT (at the first "
                        "of --precisions) and exit")
    args = parser.parse_args(argv)
    if args.clock == "cpu" and args.threads != 1:
        parser.error(f"--clock cpu needs --threads 1 (got {args.threads}): with more threads the "
                     "CPU clock counts OpenMP's spin-waits")
    args.variant_list = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(args.variant_list) - set(VARIANTS + OPTIONAL))
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)}; allowed: {', '.join(VARIANTS + OPTIONAL)}")
    args.precision_list = [p.strip() for p in args.precisions.split(",") if p.strip()]
    unknown = sorted(set(args.precision_list) - set(PRECISIONS))
    if unknown or not args.precision_list:
        parser.error(f"--precisions: unknown {', '.join(unknown) or '(none given)'}; allowed: {', '.join(PRECISIONS)}")
    return args


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def dims_for(args: argparse.Namespace) -> Dims:
    d = SMOKE_DIMS if args.smoke else CPU_DIMS
    if args.params:
        from emae.config import load_config

        cfg = load_config([args.params])
        m = cfg.model
        d = Dims(img_size=cfg.data.image_size, patch_size=m.patch_size, embed_dim=m.embed_dim, depth=m.depth,
                 num_heads=m.num_heads, decoder_embed_dim=m.decoder_embed_dim, decoder_depth=m.decoder_depth,
                 decoder_num_heads=m.decoder_num_heads, batch_size=cfg.pretrain.batch_size,
                 mlp_ratio=m.mlp_ratio, mask_ratio=m.mask_ratio, in_chans=cfg.data.in_chans)
    return replace(d, batch_size=args.batch_size) if args.batch_size else d


def profile(name: str, d: Dims, device: torch.device, amp_dtype: torch.dtype | None) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    step = make_step(make_variant(name, d, device), device, amp_dtype)
    imgs = torch.randn(d.batch_size, d.in_chans, d.img_size, d.img_size, device=device)
    for _ in range(3):
        step(imgs)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(3):
            step(imgs)
        synchronize(device)
    sort = "cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=30))


def auto_precision(device: torch.device) -> str:
    """What `amp: auto` runs here (emae.train.common.autocast_dtype, the stages' policy)."""
    return "fp32" if autocast_dtype("auto", device) is None else "bf16"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.markdown:
        print(markdown_table(json.loads(args.markdown.read_text())))
        return 0
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    d = dims_for(args)

    if args.profile:
        profile(args.profile, d, device, PRECISIONS[args.precision_list[0]])
        return 0

    repeats = args.repeats or (1 if args.smoke else 7)
    steps = args.steps or (1 if args.smoke else 3)
    warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 3)
    matmul_size = args.matmul_size or (256 if args.smoke else 2048 if device.type == "cpu" else 8192)
    load_before = os.getloadavg()
    print(f"step throughput on {device} ({args.threads} threads; {cpu_model()}, native bf16: "
          f"{cpu_bf16()}), load average {load_before}, dims {asdict(d)}", file=sys.stderr)

    variants = {name: make_variant(name, d, device) for name in args.variant_list}
    imgs = torch.randn(d.batch_size, d.in_chans, d.img_size, d.img_size, device=device)
    fns: dict[str, Callable[[], None]] = {}
    mm_flops: dict[str, float] = {}
    for p in args.precision_list:
        for name, variant in variants.items():
            step = make_step(variant, device, PRECISIONS[p])
            fns[f"{name}@{p}"] = lambda step=step: step(imgs)
        mm, mm_flops[p] = matmul_op(matmul_size, device, PRECISIONS[p] or torch.float32)
        fns[f"matmul@{p}"] = mm
    calls = {key: (10 if device.type == "cpu" else 50) if key.startswith("matmul@") else steps for key in fns}
    times = round_robin(fns, calls, warmup, repeats, device, clock=args.clock)

    runs: dict[str, dict[str, Any]] = {}
    for p in args.precision_list:
        peak = mm_flops[p] / statistics.median(times[f"matmul@{p}"])
        res = summarise({name: times[f"{name}@{p}"] for name in variants}, variants, d, peak)
        runs[p] = {"matmul_peak": {"size": matmul_size, "dtype": str(PRECISIONS[p] or torch.float32),
                                   "flops_per_s": peak,
                                   "flops_per_s_best": mm_flops[p] / min(times[f"matmul@{p}"])},
                   "variants": res}
    if not args.no_memory:
        del variants, fns, step  # free the timed models before the memory runs
        for p, run in runs.items():
            for name in run["variants"]:
                run["variants"][name]["peak_memory_mb"] = measure_memory(name, d, device, PRECISIONS[p])
    auto = auto_precision(device)
    ratios, targets = ratios_and_targets(runs, auto, device)
    load_after = os.getloadavg()

    name = args.name or ("smoke" if args.smoke else f"{device.type}-this-machine")
    result = {
        "name": name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": socket.gethostname(),
        "command": "python benchmarks/step_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "environment": environment(device),
        "load_average": {"before": list(load_before), "after": list(load_after)},
        "dims": asdict(d),
        "settings": {"repeats": repeats, "steps_per_repeat": steps, "warmup_steps": warmup,
                     "statistic": "median", "clock": args.clock, "threads": args.threads},
        "amp_auto": auto,
        "flops_per_image": {n: train_flops_per_image(d, r["num_parts"])
                            for n, r in next(iter(runs.values()))["variants"].items()},
        "precisions": runs,
        "ratios": ratios,
        "targets": targets,
    }
    path = args.out / f"{name}.json"
    write_json(path, result)
    print_table(runs, targets)
    print(f"amp auto here: {auto}; load average {load_before} -> {load_after}; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
