"""GPU pre-training step: ViT-B/16 at 224, bf16 autocast, SDPA (flash) attention, fused AdamW.

One short script for a lent H100/H200 (about 10 minutes of machine time with the default cases;
needs only torch + timm + this repository on PYTHONPATH; transformers is optional). Cases, each
measured after its warm-up (and its compilation) as the median of `--repeats` timings of `--steps`
steps:

  mae            our MAE mode (K=1, lambda=0)           eager and torch.compile
  emae_k4        EMAE K=4, lambda=1                     eager and torch.compile
  hf_vitmae      transformers' ViTMAEForPreTraining     eager and torch.compile (when installed)
  vitl_emae_k4   ViT-L/16 EMAE K=4 with activation checkpointing (`grad_checkpointing=True`)

Reported: images/s, masked patches/s, MFU = analytic train FLOPs per second (`emae.flops`) / a
bf16 matmul measured in the same run (and, labelled, / the card's datasheet dense bf16 peak), peak
memory (torch.cuda.max_memory_allocated during the timed steps), the SDPA backend that ran. The JSON is rewritten after every case, so a run cut short
keeps what it measured.

    python benchmarks/gpu_step.py --out "$OUT"          # on the GPU machine
    python benchmarks/gpu_step.py --smoke --no-compile  # CPU: tiny dims, fp32, seconds
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # step_throughput, beside this file
import step_throughput as st  # noqa: E402

from emae.io import write_json  # noqa: E402
from emae.workflow.plan import gpu_of_card  # noqa: E402

VIT_B16 = st.Dims(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                  decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, batch_size=128)
VIT_L16 = replace(VIT_B16, embed_dim=1024, depth=24, num_heads=16)
SMOKE = st.SMOKE_DIMS
# dense bf16 tensor-core peaks from the datasheets (SXM parts), for a labelled second MFU figure
@dataclass(frozen=True)
class Case:
    name: str
    variant: str  # a step_throughput variant: mae | emae_k4 | hf_vitmae
    dims: st.Dims
    compile: bool
    grad_checkpointing: bool = False


def cases(args: argparse.Namespace) -> list[Case]:
    base = SMOKE if args.smoke else VIT_B16
    if args.batch_size:
        base = replace(base, batch_size=args.batch_size)
    large = replace(SMOKE, depth=3) if args.smoke else replace(VIT_L16, batch_size=base.batch_size)
    modes = [False] + ([True] if args.compile else [])
    out = [Case(f"{v}{'_compiled' if c else ''}", v, base, c)
           for c in modes for v in ("mae", "emae_k4", "hf_vitmae")]
    if args.vit_l:
        out.append(Case(f"vitl_emae_k4_ckpt{'_compiled' if args.compile else ''}", "emae_k4", large,
                        args.compile, grad_checkpointing=True))
    return [c for c in out if args.only is None or c.name in args.only]


def loss_fn(case: Case, device: torch.device) -> tuple[torch.nn.Module, Callable[[torch.Tensor], torch.Tensor], int]:
    """The model and `imgs -> loss` as `emae pretrain` runs it (`pretrain.compile=true`: the whole
    model compiled, masks drawn from a seeded generator; HF: its noise passed in)."""
    d = case.dims
    generator = torch.Generator(device=device).manual_seed(0)
    if case.variant == "hf_vitmae":
        model = st.build_hf_vitmae(d).to(device).train()
        run = torch.compile(model, dynamic=False) if case.compile else model
        return model, (lambda imgs: run(pixel_values=imgs, noise=torch.rand(
            imgs.shape[0], d.num_patches, device=device, generator=generator)).loss), 1
    num_parts = {"mae": 1, "emae_k4": 4}[case.variant]
    model = st.build_emae(d, num_parts, 0.0 if num_parts == 1 else 1.0,
                          grad_checkpointing=case.grad_checkpointing).to(device).train()
    run = torch.compile(model, dynamic=False) if case.compile else model

    return model, (lambda imgs: run(imgs, generator=generator).loss), num_parts


def train_step(model: torch.nn.Module, loss: Callable[[torch.Tensor], torch.Tensor],
               device: torch.device, amp_dtype: torch.dtype | None) -> Callable[[torch.Tensor], None]:
    """The rest of `emae pretrain`'s step: backward and fused AdamW, no loss read back (the loop
    reads losses only at log points). Left out: the per-step lr update, clipping (off by default)
    and the fp16 GradScaler (bf16 needs none)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05,
                                  fused=device.type == "cuda")

    def step(imgs: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            value = loss(imgs)
        value.backward()
        optimizer.step()

    return step


def sdpa_backend(device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """Which fused SDPA kernel accepts a ViT-shaped call (flash first, as PyTorch picks)."""
    if device.type != "cuda":
        return "cpu (fused sdpa)"
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(2, 12, 197, head_dim, device=device, dtype=dtype, requires_grad=True)
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                    SDPBackend.EFFICIENT_ATTENTION):
        try:
            with sdpa_kernel(backend):
                torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().backward()
            return backend.name.lower()
        except RuntimeError:
            continue
    return "math"


def measure_case(case: Case, device: torch.device, amp_dtype: torch.dtype | None,
                 args: argparse.Namespace, peak: float) -> dict[str, Any]:
    d = case.dims
    torch.manual_seed(0)
    model, loss, num_parts = loss_fn(case, device)
    step = train_step(model, loss, device, amp_dtype)
    imgs = torch.randn(d.batch_size, d.in_chans, d.img_size, d.img_size, device=device)
    start = time.perf_counter()
    for _ in range(args.warmup):  # includes compilation
        step(imgs)
    st.synchronize(device)
    warmup_s = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = [st.time_calls(lambda: step(imgs), args.steps, device) for _ in range(args.repeats)]
    step_s = statistics.median(times)
    flops = st.train_flops_per_image(d, num_parts) * d.batch_size
    images_per_s = d.batch_size / step_s
    result = {
        "variant": case.variant, "compile": case.compile, "grad_checkpointing": case.grad_checkpointing,
        "dims": asdict(d), "num_parts": num_parts, "warmup_seconds": warmup_s,
        "step_seconds": step_s, "step_seconds_repeats": times, "images_per_s": images_per_s,
        "masked_patches_per_s": images_per_s * num_parts * d.num_masked,
        "flops_per_step": flops, "flops_per_s": flops / step_s, "mfu": flops / step_s / peak,
        "peak_memory_mb": (torch.cuda.max_memory_allocated(device) / 2**20
                           if device.type == "cuda" else None),
    }
    del model, loss, step
    torch._dynamo.reset()  # each case compiles afresh (no shapes or K carried over as dynamic)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def datasheet_peak(device: torch.device) -> float | None:
    """The dense bf16 peak of `emae plan`'s GPU table (one table: an H100 PCIe is 756, not 989 TFLOP/s)."""
    if device.type != "cuda":
        return None
    card = gpu_of_card(torch.cuda.get_device_name(device))
    return card.peak_flops if card else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny dims, fp32, few steps (CPU check)")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="eager cases only")
    parser.add_argument("--no-vit-l", dest="vit_l", action="store_false", help="skip the ViT-L case")
    parser.add_argument("--only", type=lambda s: s.split(","), default=None,
                        help="comma-separated case names (e.g. mae,emae_k4_compiled)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per step (default 128)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per case (default 5)")
    parser.add_argument("--steps", type=int, default=None, help="steps per timing (default 5)")
    parser.add_argument("--repeats", type=int, default=None, help="timings per case (default 5)")
    parser.add_argument("--budget-s", type=float, default=540.0,
                        help="skip the cases left once this many seconds have passed")
    parser.add_argument("--name", default=None, help="result name (default gpu-<card>)")
    parser.add_argument("--out", type=Path, default=st.RESULTS, help="folder for <name>.json")
    args = parser.parse_args(argv)
    small = args.smoke
    args.warmup = args.warmup if args.warmup is not None else (1 if small else 5)
    args.steps = args.steps or (1 if small else 5)
    args.repeats = args.repeats or (2 if small else 5)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    amp_dtype = torch.bfloat16 if device.type == "cuda" else None  # smoke: fp32
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    name = args.name or ("gpu-smoke" if args.smoke else "gpu-" + re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-"))
    path = args.out / f"{name}.json"

    mm, mm_flops = st.matmul_op(256 if args.smoke else 8192, device, amp_dtype or torch.float32)
    mm_times = st.round_robin({"matmul": mm}, {"matmul": 2 if args.smoke else 50}, 2, 5, device,
                              progress=False)["matmul"]
    peak = mm_flops / min(mm_times)  # the best of the same run: MFU is against what the card does
    todo = cases(args)
    head_dim = todo[0].dims.embed_dim // todo[0].dims.num_heads if todo else 64
    result: dict[str, Any] = {
        "name": name, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": "python benchmarks/gpu_step.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "environment": st.environment(device) | {"sdpa_backend": sdpa_backend(device, amp_dtype or torch.float32, head_dim)},
        "load_average": list(os.getloadavg()),
        "amp": str(amp_dtype) if amp_dtype else "fp32",
        "matmul_peak": {"dtype": str(amp_dtype or torch.float32), "flops_per_s": peak,
                        "flops_per_s_median": mm_flops / statistics.median(mm_times),
                        "datasheet_bf16_flops_per_s": datasheet_peak(device)},
        "settings": {"warmup": args.warmup, "steps": args.steps, "repeats": args.repeats},
        "cases": {}, "skipped": [],
    }
    print(f"{card}: matmul peak {peak / 1e12:.1f} TFLOP/s, {len(todo)} cases", flush=True)
    for case in todo:
        if time.perf_counter() - started > args.budget_s:
            result["skipped"].append({"case": case.name, "why": f"over --budget-s {args.budget_s}"})
            continue
        try:
            res = measure_case(case, device, amp_dtype, args, peak)
        except SystemExit as err:  # transformers missing: say so, go on
            result["skipped"].append({"case": case.name, "why": str(err)})
            print(f"{case.name}: skipped ({err})", flush=True)
            continue
        except (RuntimeError, torch.cuda.OutOfMemoryError) as err:  # e.g. compile or OOM
            result["skipped"].append({"case": case.name, "why": f"{type(err).__name__}: {str(err)[:500]}"})
            print(f"{case.name}: failed: {str(err)[:300]}", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        result["cases"][case.name] = res
        mem = res["peak_memory_mb"]
        print(f"{case.name:<26} {res['images_per_s']:>8.1f} img/s  {res['masked_patches_per_s']:>10.0f} "
              f"masked/s  MFU {res['mfu']:.1%}  peak {mem if mem is None else f'{mem / 1024:.1f} GiB'}"
              f"  (warm-up {res['warmup_seconds']:.0f} s)", flush=True)
        result["ratios"] = ratios(result["cases"])
        result["seconds"] = time.perf_counter() - started
        write_json(path, result)
    result["ratios"] = ratios(result["cases"])
    result["seconds"] = time.perf_counter() - started
    write_json(path, result)
    for key, value in result["ratios"].items():
        print(f"{key}: {value:.3f}")
    print(f"wrote {path} in {result['seconds']:.0f} s")
    return 0


def ratios(res: dict[str, dict[str, Any]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for suffix in ("", "_compiled"):
        mae, k4, hf = (res.get(n + suffix) for n in ("mae", "emae_k4", "hf_vitmae"))
        if mae and hf:
            out[f"mae_vs_hf_images_per_s{suffix}"] = mae["images_per_s"] / hf["images_per_s"]
        if mae and k4:
            out[f"emae_k4_vs_mae_masked_patches_per_s{suffix}"] = (
                k4["masked_patches_per_s"] / mae["masked_patches_per_s"])
        if k4:
            out[f"emae_k4_mfu{suffix}"] = k4["mfu"]
    return out


if __name__ == "__main__":
    sys.exit(main())
