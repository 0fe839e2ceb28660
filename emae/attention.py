"""Which SDPA kernel attention runs on: by device, dtype and sequence length, from measurements.

PyTorch takes the fused kernel whenever it can; on a CPU that is the flash kernel, which is slow in
bf16 (1.7-6x slower than the math kernel in bf16 at every length measured, 5-257 tokens) and, in
fp32, for short sequences (1.0-1.7x at 5-17 tokens), which is what MAE's encoder (the visible
tokens only) and small decoders run. The table `CPU_MATH_UP_TO` is measured by `benchmarks/attention.py` (docs/performance.md); on
CUDA PyTorch's own order (flash, cuDNN, efficient, math) is kept: not measured here yet.

"math" here runs in the compute dtype: under bf16 autocast its matmuls and softmax stay in bf16
(fp32 accumulation), as the fused kernels keep P in bf16 for P @ V, instead of PyTorch's default
of upcasting the math kernel to fp32 (casts and fp32 matmuls: a ViT block 1.1-1.3x slower).

A part ("encoder", "decoder") can be pinned to one kernel: `EMAE(encoder_attention=..., decoder_attention=...)`,
or, for every model of a run, the environment: `EMAE_ATTENTION=math` or
`EMAE_ATTENTION=encoder=math,decoder=flash` (which wins over the model's arguments). Every new
(part, device, dtype, length) decision is logged once.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from emae.errors import EmaeError

log = logging.getLogger("emae.attention")

KERNELS: dict[str, SDPBackend] = {
    "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH,
}
CHOICES = ("auto", *KERNELS)
PARTS = ("encoder", "decoder")
ENV = "EMAE_ATTENTION"

# CPU: the longest sequence (tokens, cls included) that runs the math kernel, forward + backward,
# head_dim 32-64 (benchmarks/results/attention-cpu-this-machine.json). fp32: flash wins from ~33
# tokens (its tiling, once the L x L scores stop fitting in cache; at 33 within 10% either way).
# bf16: math wins at every length measured; beyond 257 tokens flash, whose memory does not grow
# with L x L.
CPU_MATH_UP_TO: dict[torch.dtype, int] = {torch.float32: 32, torch.bfloat16: 257}

_logged: set[tuple[Any, ...]] = set()


def sdpa_backends(device_type: str, dtype: torch.dtype, length: int) -> list[SDPBackend] | None:
    """The measured choice for `length` tokens of `dtype` (under autocast: the autocast dtype), or
    None: PyTorch's own. Flash keeps math as its fallback (a shape flash cannot take still runs)."""
    limit = CPU_MATH_UP_TO.get(dtype) if device_type == "cpu" else None
    if limit is None:
        return None
    return [SDPBackend.MATH] if length <= limit else [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]


def environment_choice(part: str) -> str | None:
    """The kernel `EMAE_ATTENTION` pins for `part`, or None (not set, or not for this part)."""
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return None
    allowed = (f"allowed: one of {', '.join(CHOICES)} for every part, or per part as "
               "'encoder=KERNEL,decoder=KERNEL'")
    if "=" not in raw:
        if raw not in CHOICES:
            raise EmaeError(f"{ENV}={raw!r}: unknown attention kernel {raw!r}; {allowed}")
        return None if raw == "auto" else raw
    pinned: dict[str, str] = {}
    for item in raw.split(","):
        name, _, kernel = (s.strip() for s in item.partition("="))
        if name not in PARTS or kernel not in CHOICES:
            raise EmaeError(f"{ENV}={raw!r}: {item.strip()!r} is not PART=KERNEL with PART in "
                            f"{', '.join(PARTS)}; {allowed}")
        pinned[name] = kernel
    choice = pinned.get(part)
    return None if choice in (None, "auto") else choice


def check_choice(name: str, choice: str) -> str:
    if choice not in CHOICES:
        raise EmaeError(f"{name}={choice!r}: unknown attention kernel; allowed: {', '.join(CHOICES)}")
    return choice


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype attention sees for input `x`: the autocast dtype where autocast is on."""
    device_type = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def choose(part: str, choice: str, device_type: str, dtype: torch.dtype, length: int
           ) -> list[SDPBackend] | None:
    """The backends `part` may run on (None: leave them as they are), logged once per decision.
    "auto" inside a caller's `sdpa_kernel` context keeps the caller's choice."""
    pinned = environment_choice(part)
    if not pinned and choice == "auto" and _backends_pinned():
        return None
    source = f"{ENV}" if pinned else ("table" if choice == "auto" else f"{part}_attention")
    choice = pinned or choice
    backends = sdpa_backends(device_type, dtype, length) if choice == "auto" else [KERNELS[choice]]
    key = (part, device_type, dtype, length, choice)
    if key not in _logged:
        _logged.add(key)
        picked = "PyTorch's default" if backends is None else backends[0].name.lower()
        log.info("%s attention on %s, %s, %d tokens: %s kernel (%s)", part, device_type,
                 str(dtype).removeprefix("torch."), length, picked, source)
    return backends


@contextlib.contextmanager
def kernel_context(backends: list[SDPBackend] | None) -> Iterator[None]:
    """`sdpa_kernel(backends)` (None: nothing changed); the math kernel alone runs in the compute
    dtype (PyTorch's fp16/bf16 reduction switch, restored after)."""
    if not backends:
        yield
        return
    cuda = torch.backends.cuda
    before = cuda.fp16_bf16_reduction_math_sdp_allowed()
    with sdpa_kernel(backends):
        cuda.allow_fp16_bf16_reduction_math_sdp(backends == [SDPBackend.MATH] or before)
        try:
            yield
        finally:
            cuda.allow_fp16_bf16_reduction_math_sdp(before)


def _backends_pinned() -> bool:
    """Whether some caller already restricted the SDPA backends (an `sdpa_kernel` context)."""
    cuda = torch.backends.cuda
    return not (cuda.flash_sdp_enabled() and cuda.mem_efficient_sdp_enabled()
                and cuda.math_sdp_enabled() and cuda.cudnn_sdp_enabled())


class AttentionKernels(TorchFunctionMode):
    """Applies the table to every `F.scaled_dot_product_attention` call of any model run inside it
    (timm's ViT in the evaluation and dense stages: part "encoder"), by the call's own device,
    dtype and length. A call inside an explicit `sdpa_kernel` (EMAE pins its own parts) is left
    as it is. Entered by `emae.train.common.autocast`, the one precision context of every stage."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if (func is not F.scaled_dot_product_attention or torch.compiler.is_compiling()
                or _backends_pinned()):
            return func(*args, **kwargs)
        query = args[0] if args else kwargs["query"]
        backends = choose("encoder", "auto", query.device.type, compute_dtype(query), query.shape[-2])
        if backends is None:
            return func(*args, **kwargs)
        with kernel_context(backends):
            return func(*args, **kwargs)
