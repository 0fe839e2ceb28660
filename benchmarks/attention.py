"""Attention kernels by sequence length: the measurements behind `emae.attention`'s table.

Forward + backward of `F.scaled_dot_product_attention` on [N, heads, L, head_dim] (N * L held near
a fixed token count, as a batch of ViT sequences), for each SDPA backend the device has (CPU: flash,
math; CUDA: flash, efficient, cudnn, math), in fp32 and bf16 (the dtype the kernel sees under
autocast), round-robin, median of the repeats. Each backend runs in `emae.attention`'s
kernel context, as the models run it ("math" in the compute dtype); "math_fp32" is PyTorch's own
math kernel in bf16, upcast to fp32, for reference. Reported per (dtype, L, head_dim): milliseconds
per backend, the fastest, and the backend the table (`sdpa_backends`) picks with its slowdown
against the fastest (1.00 = the table picks the fastest).

    python benchmarks/attention.py                          # CPU, 1 thread, CPU clock (load-robust)
    python benchmarks/attention.py --smoke --out /tmp/x     # seconds; checks the plumbing
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable as a script without installing the package
    sys.path.insert(0, str(REPO))

from emae.io import write_json  # noqa: E402
from emae.attention import kernel_context, sdpa_backends  # noqa: E402
from emae.provenance import cpu_bf16, cpu_model  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
BACKENDS = {"cpu": ("flash", "math", "math_fp32"), "cuda": ("flash", "efficient", "cudnn", "math", "math_fp32")}
SDP = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
       "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def attention_step(n: int, heads: int, length: int, head_dim: int, dtype: torch.dtype, backend: str,
                   device: torch.device) -> Callable[[], None]:
    """One forward + backward of SDPA with `backend` only (an error where it cannot run)."""
    q, k, v = (torch.randn(n, heads, length, head_dim, device=device, dtype=dtype, requires_grad=True)
               for _ in range(3))
    grad = torch.randn(n, heads, length, head_dim, device=device, dtype=dtype)

    context = (lambda: sdpa_kernel(SDPBackend.MATH)) if backend == "math_fp32" else (
        lambda: kernel_context([SDP[backend]]))

    def step() -> None:
        with context():
            out = F.scaled_dot_product_attention(q, k, v)
        out.backward(grad)

    return step


def measure(device: torch.device, lengths: list[int], head_dims: list[int], heads: int, tokens: int,
            repeats: int, calls: int) -> dict[str, Any]:
    clock = time.process_time if device.type == "cpu" else time.perf_counter
    steps: dict[tuple[str, int, int, str], Callable[[], None]] = {}
    for dtype_name, dtype in DTYPES.items():
        for length in lengths:
            for head_dim in head_dims:
                n = max(1, tokens // length)
                for backend in BACKENDS[device.type]:
                    if backend == "math_fp32" and dtype == torch.float32:
                        continue  # the same as math in fp32
                    step = attention_step(n, heads, length, head_dim, dtype, backend, device)
                    try:
                        step()  # warm-up; a backend that cannot take this shape is left out
                    except RuntimeError:
                        continue
                    steps[(dtype_name, length, head_dim, backend)] = step
    times: dict[tuple[str, int, int, str], list[float]] = {key: [] for key in steps}
    for r in range(repeats):
        keys = list(steps)
        for key in keys[r % len(keys):] + keys[: r % len(keys)]:  # rotating order
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = clock()
            for _ in range(calls):
                steps[key]()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[key].append((clock() - start) / calls)
    rows = []
    for dtype_name in DTYPES:
        for length in lengths:
            for head_dim in head_dims:
                ms = {b: statistics.median(times[(dtype_name, length, head_dim, b)]) * 1e3
                      for b in BACKENDS[device.type] if (dtype_name, length, head_dim, b) in times}
                picked = sdpa_backends(device.type, DTYPES[dtype_name], length)
                picked_name = next((name for name, sdp in SDP.items() if picked and sdp == picked[0]), None)
                fastest = min(ms, key=ms.get)
                rows.append({"dtype": dtype_name, "length": length, "head_dim": head_dim,
                             "batch": max(1, tokens // length), "heads": heads, "ms": ms, "fastest": fastest,
                             "picked": picked_name or "default",
                             "picked_vs_fastest": (ms[picked_name] / ms[fastest]) if picked_name in ms else None})
    return {"rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="two lengths, one repeat")
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (CPU clock needs 1)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 7)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for <name>.json")
    parser.add_argument("--name", default=None, help="result name (default attention-<device>-this-machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    lengths = [5, 17] if args.smoke else [5, 17, 33, 50, 65, 101, 129, 197, 257]
    head_dims = [32] if args.smoke else [32, 64]
    tokens = 256 if args.smoke else 8192
    repeats = args.repeats or (1 if args.smoke else 7)
    load_before = os.getloadavg()
    result = measure(device, lengths, head_dims, heads=4, tokens=tokens, repeats=repeats,
                     calls=1 if args.smoke else 2)
    name = args.name or ("attention-smoke" if args.smoke else f"attention-{device.type}-this-machine")
    result = {"name": name, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "command": "python benchmarks/attention.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "processor": cpu_model(), "cpu_bf16": cpu_bf16(), "torch": torch.__version__,
              "threads": args.threads, "clock": "cpu" if device.type == "cpu" else "wall",
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "load_average": {"before": list(load_before), "after": list(os.getloadavg())},
              "tokens_per_call": tokens, "repeats": repeats, **result}
    write_json(args.out / f"{name}.json", result)
    print(f"{'dtype':<5} {'L':>4} {'hd':>3} " + " ".join(f"{b:>9}" for b in BACKENDS[device.type])
          + "  fastest  picked  picked/fastest")
    for row in result["rows"]:
        cells = " ".join(f"{row['ms'].get(b, float('nan')):9.2f}" for b in BACKENDS[device.type])
        ratio = row["picked_vs_fastest"]
        print(f"{row['dtype']:<5} {row['length']:>4} {row['head_dim']:>3} {cells}  {row['fastest']:>7}  "
              f"{row['picked']:>6}  {'-' if ratio is None else f'{ratio:.2f}'}")
    print(f"{cpu_model()} (bf16: {cpu_bf16()}), load {load_before} -> {os.getloadavg()}; wrote "
          f"{args.out / (name + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
