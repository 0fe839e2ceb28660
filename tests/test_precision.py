"""The precision policy (`amp: auto`) and the attention kernels chosen by device, dtype and length."""

from __future__ import annotations

import logging
import re
from collections import Counter

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

import emae.models.emae as emae_module
from emae.errors import EmaeError
from emae.models import EMAE
from emae.attention import CPU_MATH_UP_TO, environment_choice, sdpa_backends
from emae.provenance import cpu_bf16
from emae.train import common

FLASH_OP = "_scaled_dot_product_flash_attention_for_cpu"


class KernelLog(TorchDispatchMode):
    """Counts the CPU flash kernel's calls and the math kernel's (its softmax) per forward."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name == FLASH_OP:
            self.calls["flash"] += 1
        elif name in ("_safe_softmax", "_softmax"):
            self.calls["math"] += 1
        return func(*args, **(kwargs or {}))


def tiny_emae(**kwargs) -> EMAE:
    # encoder: 4 visible + cls = 5 tokens; decoder: 16 + cls = 17 tokens
    return EMAE(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32,
                decoder_depth=1, decoder_num_heads=2, num_parts=2, **kwargs)


def kernels_of(model: EMAE, dtype: torch.dtype | None) -> Counter[str]:
    imgs = torch.randn(2, 3, 16, 16)
    with common.autocast(torch.device("cpu"), dtype), KernelLog() as log:
        model(imgs, generator=torch.Generator().manual_seed(0))
    return log.calls


def test_amp_auto_follows_the_cpus_native_bf16(monkeypatch: pytest.MonkeyPatch,
                                               caplog: pytest.LogCaptureFixture) -> None:
    cpu = torch.device("cpu")
    for native, expected in (("avx512_bf16", torch.bfloat16), ("amx_bf16", torch.bfloat16), (None, None)):
        monkeypatch.setattr(common, "cpu_bf16", lambda native=native: native)
        common._log_auto_choice.cache_clear()
        with caplog.at_level(logging.INFO, logger="emae.precision"):
            caplog.clear()
            assert common.autocast_dtype("auto", cpu) == expected
            assert common.autocast_dtype("auto", cpu) == expected
        lines = [r.getMessage() for r in caplog.records if r.name == "emae.precision"]
        assert len(lines) == 1, lines  # logged once
        assert ("bf16 autocast" in lines[0] and native in lines[0]) if native else "fp32" in lines[0]
    assert common.autocast_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert common.autocast_dtype("off", cpu) is None and common.autocast_dtype("bf16", cpu) == torch.bfloat16


def test_cpu_bf16_reads_this_machines_flags() -> None:
    flags = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")), [])
    expected = "amx_bf16" if "amx_bf16" in flags else "avx512_bf16" if "avx512_bf16" in flags else None
    assert cpu_bf16() == expected


def test_table_picks_math_for_short_and_flash_for_long_sequences() -> None:
    for dtype, limit in CPU_MATH_UP_TO.items():
        assert sdpa_backends("cpu", dtype, limit) == [SDPBackend.MATH]
        assert sdpa_backends("cpu", dtype, limit + 1)[0] == SDPBackend.FLASH_ATTENTION
    assert sdpa_backends("cuda", torch.bfloat16, 17) is None  # PyTorch's own order there


def test_emae_runs_each_part_on_its_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    # bf16: 5 and 17 tokens are both short -> math; PyTorch alone would run flash on both
    assert kernels_of(tiny_emae(), torch.bfloat16) == {"math": 2}
    # pinned parts: encoder flash, decoder math
    assert kernels_of(tiny_emae(encoder_attention="flash"), torch.bfloat16) == {"flash": 1, "math": 1}
    # a long decoder (L = 16 > the table's limit) runs flash
    monkeypatch.setitem(CPU_MATH_UP_TO, torch.bfloat16, 8)
    assert kernels_of(tiny_emae(), torch.bfloat16) == {"math": 1, "flash": 1}
    # the environment wins over the model's arguments
    monkeypatch.setenv("EMAE_ATTENTION", "encoder=math,decoder=flash")
    assert kernels_of(tiny_emae(encoder_attention="flash"), torch.bfloat16) == {"math": 1, "flash": 1}
    # a caller's sdpa_kernel context is kept by "auto"
    monkeypatch.delenv("EMAE_ATTENTION")
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        assert kernels_of(tiny_emae(), None) == {"flash": 2}


def test_stage_context_applies_the_table_to_any_model() -> None:
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, num_classes=0)
    imgs = torch.randn(2, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16), KernelLog() as plain:
        vit(imgs)
    with common.autocast(torch.device("cpu"), torch.bfloat16), KernelLog() as staged:
        vit(imgs)
    assert plain.calls == {"flash": 1} and staged.calls == {"math": 1}  # 17 tokens in bf16


@pytest.mark.parametrize("value, message", [
    ("fast", "EMAE_ATTENTION='fast': unknown attention kernel 'fast'; allowed: one of auto, flash, "
             "efficient, cudnn, math for every part, or per part as 'encoder=KERNEL,decoder=KERNEL'"),
    ("encoder=math,head=flash", "EMAE_ATTENTION='encoder=math,head=flash': 'head=flash' is not "
                                "PART=KERNEL with PART in encoder, decoder; allowed: one of auto"),
])
def test_bad_attention_settings_are_clear_errors(monkeypatch: pytest.MonkeyPatch, value: str, message: str) -> None:
    monkeypatch.setenv("EMAE_ATTENTION", value)
    with pytest.raises(EmaeError, match="^" + re.escape(message)):
        environment_choice("encoder")
    with pytest.raises(EmaeError, match=re.escape("decoder_attention='fused': unknown attention kernel; "
                                                  "allowed: auto, flash, efficient, cudnn, math")):
        tiny_emae(decoder_attention="fused")


def test_cpu_chunks_change_nothing_but_the_speed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The blocks over chunks of sequences: the same loss and gradients as one batch."""
    torch.manual_seed(0)
    model = tiny_emae(consistency_weight=1.0)
    imgs = torch.randn(4, 3, 16, 16)

    def loss_and_grads() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        loss = model(imgs, generator=torch.Generator().manual_seed(1)).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    monkeypatch.setattr(emae_module, "CPU_CHUNK_TOKENS", 10**9)
    whole = loss_and_grads()
    monkeypatch.setattr(emae_module, "CPU_CHUNK_TOKENS", 17 * 3)  # decoder: 8 sequences in 2 chunks
    chunked = loss_and_grads()
    assert torch.allclose(whole[0], chunked[0], rtol=1e-6)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(whole[1], chunked[1]))


def test_grad_checkpointing_recomputes_on_the_same_kernel() -> None:
    """Recomputed in backward, outside the forward's kernel context: a different kernel would save
    other tensors, which torch.utils.checkpoint refuses."""
    model = tiny_emae(grad_checkpointing=True)
    with common.autocast(torch.device("cpu"), torch.bfloat16):
        loss = model(torch.randn(2, 3, 16, 16), generator=torch.Generator().manual_seed(0)).loss
    loss.backward()
    assert model.encoder.blocks[0].attn.qkv.weight.grad is not None
