"""The benchmarks run (smoke sizes) and count what they claim; timings themselves are not tested."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from conftest import PARAMS, REPO, cli_env
from emae.provenance import cpu_bf16

BENCH = REPO / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # gpu_step imports step_throughput by name
    spec.loader.exec_module(module)
    return module


st = _load("step_throughput")
HAVE_HF = importlib.util.find_spec("transformers") is not None


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    # one thread: tiny sizes at two threads on a busy machine mostly wait for each other
    result = subprocess.run([sys.executable, str(BENCH / script), *args], cwd=REPO,
                            env=cli_env() | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _forward_counted(model: torch.nn.Module, call) -> int:
    # the math attention backend: its matmuls are counted (the fused CPU kernel is not)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        call(model)
    return counter.get_total_flops()


# (our model's count, emae.flops, is checked against FlopCounterMode in tests/test_flops.py)
@pytest.mark.skipif(not HAVE_HF, reason="transformers (the bench extra) is not installed")
def test_hf_vitmae_has_our_dimensions() -> None:
    d = st.SMOKE_DIMS
    hf = st.build_hf_vitmae(d).eval()
    ours = st.build_emae(d, 1, 0.0)
    imgs = torch.randn(d.batch_size, 3, d.img_size, d.img_size)
    assert hf.config._attn_implementation == "sdpa"
    assert hf.config.mask_ratio == d.mask_ratio and hf.config.norm_pix_loss
    # the same work per image: the same matmul FLOPs and the same parameter count
    hf_flops = _forward_counted(hf, lambda m: m(pixel_values=imgs))
    assert hf_flops == pytest.approx(st.forward_flops(d, 1) * d.batch_size, rel=1e-9)
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    assert count(hf) == count(ours)


def test_hf_missing_is_reported_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # import fails as if not installed
    with pytest.raises(SystemExit, match=r"pip install -e '\.\[bench\]'"):
        st.build_hf_vitmae(st.SMOKE_DIMS)


def test_naive_parts_compute_the_batched_loss() -> None:
    d = st.SMOKE_DIMS
    model = st.build_emae(d, 4, 1.0)
    imgs = torch.randn(d.batch_size, 3, d.img_size, d.img_size)
    batched = model(imgs, generator=torch.Generator().manual_seed(3)).loss
    naive = st.NaiveParts(model)(imgs, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(batched, naive, rtol=1e-5, atol=1e-6)


def test_step_throughput_smoke_writes_its_json(tmp_path: Path) -> None:
    """Both precisions in one run, each against its own dtype's matmul peak; the CPU's bf16."""
    variants = "mae,emae_k4,naive_k4" + (",hf_vitmae" if HAVE_HF else "")
    _run("step_throughput.py", "--smoke", "--threads", "1", "--variants", variants, "--out", str(tmp_path))
    data = json.loads((tmp_path / "smoke.json").read_text())
    assert set(data["precisions"]) == {"fp32", "bf16"}
    for precision, run in data["precisions"].items():
        assert run["matmul_peak"]["dtype"] == {"fp32": "torch.float32", "bf16": "torch.bfloat16"}[precision]
        assert run["matmul_peak"]["flops_per_s"] > 0
        assert set(run["variants"]) == set(variants.split(","))
        for name, res in run["variants"].items():
            assert res["peak_memory_mb"] is not None and res["step_seconds"] > 0, (precision, name)
            assert res["masked_patches_per_s"] == pytest.approx(
                res["images_per_s"] * res["num_parts"] * 12)  # 16 patches, 4 visible per view
            assert res["fraction_of_matmul_peak"] == pytest.approx(
                res["flops_per_s"] / run["matmul_peak"]["flops_per_s"])
    assert data["environment"]["cpu_bf16"] == cpu_bf16()
    assert data["amp_auto"] == ("bf16" if cpu_bf16() else "fp32")
    assert len(data["load_average"]["before"]) == 3
    expected = {f"{p}:{key}" for p in ("fp32", "bf16") for key in (
        "emae_k4_vs_mae_masked_patches_per_s", "emae_k4_vs_naive_k4_masked_patches_per_s",
        "mae_fraction_of_matmul_peak")} | {"auto:mae_vs_fp32_mae_images_per_s"}
    if HAVE_HF:
        expected.add("auto:mae_vs_best_hf_vitmae_images_per_s")
    assert set(data["targets"]) == expected
    table = st.markdown_table(data)
    assert "| mae | bf16 | 1 |" in table and "| bf16:emae_k4_vs_naive_k4_masked_patches_per_s |" in table


def test_attention_benchmark_smoke(tmp_path: Path) -> None:
    attention = _load("attention")
    threads = torch.get_num_threads()
    try:
        attention.main(["--smoke", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    rows = json.loads((tmp_path / "attention-smoke.json").read_text())["rows"]
    assert {(r["dtype"], r["length"]) for r in rows} == {(d, n) for d in ("fp32", "bf16") for n in (5, 17)}
    assert all(r["picked"] == "math" and set(r["ms"]) >= {"flash", "math"} for r in rows)  # short: math


def test_step_throughput_measures_at_a_params_trees_dims() -> None:
    """`--params` gives the dims `emae plan` matches a CPU job against (the embedded default's)."""
    d = st.dims_for(st.parse_args(["--params", str(PARAMS)]))
    assert (d.patch_size, d.embed_dim, d.depth, d.decoder_embed_dim, d.batch_size) == (8, 128, 6, 96, 64)
    committed = json.loads((BENCH / "results" / "cpu-embedded-default.json").read_text())
    assert committed["dims"] == asdict(d)  # the committed figures are of today's default


def test_step_throughput_rejects_unknown_variant(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        st.parse_args(["--smoke", "--variants", "mae,vit_huge"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "vit_huge" in err and "allowed: mae" in err


def test_gpu_step_smoke_runs_on_cpu(tmp_path: Path) -> None:
    _run("gpu_step.py", "--smoke", "--no-compile", "--only", "mae,emae_k4,vitl_emae_k4_ckpt",
         "--out", str(tmp_path))
    data = json.loads((tmp_path / "gpu-smoke.json").read_text())
    assert set(data["cases"]) == {"mae", "emae_k4", "vitl_emae_k4_ckpt"}
    assert data["cases"]["vitl_emae_k4_ckpt"]["grad_checkpointing"] is True
    assert data["ratios"]["emae_k4_vs_mae_masked_patches_per_s"] > 0


def test_data_loading_measures_a_params_trees_own_data(digits_root: Path) -> None:
    """`--params`: the rate `emae plan` adds to a CPU job that loads in its own process."""
    from conftest import CORE_PARAMS

    entry = _load("data_loading").params_rate(CORE_PARAMS, 1, [f"data.root={digits_root}", "data.image_size=16"])
    train = sum(1 for _ in (digits_root / "train").rglob("*.png"))
    assert (entry["root"], entry["image_size"], entry["images"]) == (str(digits_root), 16, train)
    assert entry["per_worker_images_per_s"] > 0 and len(entry["per_worker_repeats"]["cpu"]) == 1


def test_data_loading_smoke(tmp_path: Path) -> None:
    _run("data_loading.py", "--smoke", "--out", str(tmp_path), "--gpu-images-per-s", "1000")
    data = json.loads((tmp_path / "data-loading-smoke.json").read_text())
    entry = data["sizes"]["64x48"]
    assert entry["per_worker_images_per_s"] > 0
    assert entry["loader"]["workers_1"]["images_per_s"] > 0
    assert data["workers_needed"]["given:1000.0"]["64x48"] == pytest.approx(
        1000 / entry["per_worker_images_per_s"])
