"""`emae plan`: what the configured pipeline will cost, before any job runs.

For every job (variants x seeds x stages, `emae.workflow.stages.Pipeline`) on its stage's launcher
resources: the analytic FLOPs of `emae.flops`, device-hours at a measured (`benchmarks/results`) or
assumed rate, the memory per GPU against the GPU the launcher names, and the time-limit requeues;
a stage that does not fit its named GPU is an error (`check_fits`). Pure arithmetic on the validated
params (every Snakemake start runs it): no model is built, no image read, only an existing
ImageFolder's files counted. docs/pipeline.md describes each figure, the output and its checks.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from emae.errors import ConfigError, EmaeError
from emae.flops import ModelDims, encoder_forward_flops, fit_epochs, forward_flops, train_flops_per_image
from emae.patches import num_visible

GIB = 2**30
ASSUMED_MFU = 0.40  # of the datasheet dense bf16 peak: what a well-fed ViT step reaches on A100/H100
DEFAULT_GPU = "H100"  # what a SLURM stage without `gpu_type` is sized for (labelled assumed)
BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
# benchmarks/step_throughput.py on this machine, 2 threads: the embedded default's dims, a ViT-Tiny's
CPU_RESULTS = ("cpu-embedded-default.json", "cpu-this-machine.json")
RESERVE_BYTES = 1.0 * GIB  # CUDA context, cuBLAS/cuDNN workspaces: outside torch's allocator
FRAGMENTATION = 0.10  # caching-allocator slack, a fraction of the activations
TIGHT = 0.90  # a GPU more than this full is flagged


# ------------------------------------------------------------------------------------ devices


@dataclass(frozen=True)
class Device:
    """What a stage runs on: a GPU model (memory as CUDA reports it, datasheet dense bf16 peak)
    or this machine's CPU."""

    name: str
    memory_gib: float | None  # None: host memory, not checked
    peak_flops: float | None  # dense bf16 tensor-core peak (V100: fp16, it has no bf16)
    card: tuple[str, ...] = ()  # words of torch.cuda.get_device_name() that identify it

    @property
    def is_gpu(self) -> bool:
        return self.memory_gib is not None


# Most specific first: a card name matches the first entry all of whose words it contains.
GPUS: dict[str, Device] = {d.name.lower(): d for d in (
    Device("H200", 139.8, 989e12, ("H200",)),
    Device("H100-PCIE", 79.2, 756e12, ("H100", "PCIE")),
    Device("H100", 79.2, 989e12, ("H100",)),
    Device("A100-40GB", 39.4, 312e12, ("A100", "40GB")),
    Device("A100-80GB", 79.2, 312e12, ("A100",)),
    Device("L40S", 44.4, 362e12, ("L40S",)),
    Device("A10", 22.0, 125e12, ("A10",)),
    Device("V100-16GB", 15.8, 125e12, ("V100", "16GB")),
    Device("V100-32GB", 31.7, 125e12, ("V100",)),
)}
CPU = Device("cpu", None, None)


def gpu(name: str, where: str = "gpu_type") -> Device:
    """The GPU table's entry for `name` (case-insensitive), or an error listing the known ones."""
    try:
        return GPUS[name.lower()]
    except KeyError:
        raise ConfigError(f"{where}: unknown GPU {name!r}; known: {', '.join(d.name for d in GPUS.values())} "
                          f"(add yours to GPUS in emae/workflow/plan.py: memory and dense bf16 peak)") from None


def gpu_of_card(card: str) -> Device | None:
    """The table's GPU for a CUDA device name ("NVIDIA H100 80GB HBM3")."""
    words = card.upper().replace("-", " ")
    return next((d for d in GPUS.values() if all(w in words for w in d.card)), None)


# --------------------------------------------------------------------------------- throughput


def data_rate(data: Any, results_dir: Path = BENCHMARKS) -> tuple[float, str] | None:
    """Images per second one process decodes and augments for pre-training, measured on this data
    set (`benchmarks/data_loading.py --params`: same root, image size and decoded-image cache), else None."""
    for path, result in _results(results_dir):
        same = (result.get("root"), result.get("image_size"), result.get("cache_mb")) == (
            str(data.root), data.image_size, data.cache_mb)
        if path.name.startswith("data-loading") and same and result.get("per_worker_images_per_s"):
            rate = result["per_worker_images_per_s"]
            return rate, f"{path.name}: {rate:,.0f} images/s per process on {result.get('processor', 'this CPU')}"
    return None


@dataclass(frozen=True)
class Throughput:
    """Sustained training FLOP/s of one device, and where the figure comes from."""

    flops_per_s: float
    measured: bool
    source: str

    @property
    def label(self) -> str:
        return "measured" if self.measured else "assumed"


def _results(results_dir: Path) -> Iterable[tuple[Path, dict[str, Any]]]:
    for path in sorted(results_dir.glob("*.json")) if results_dir.is_dir() else ():
        try:
            yield path, json.loads(path.read_text())
        except (OSError, ValueError):
            continue


DIM_KEYS = ("patch_size", "embed_dim", "depth", "decoder_embed_dim", "decoder_depth")


def _same_dims(case: dict[str, Any], model: ModelDims | None) -> bool:
    """Whether a benchmark case measured this model's shape (the keys the case records): FLOP/s
    depend on it, a 16-token ViT-128 runs at a third of a 64-token ViT-192's rate on a CPU."""
    dims = {k: v for k, v in (case.get("dims") or {}).items() if k in DIM_KEYS}
    return model is not None and bool(dims) and all(getattr(model, k) == v for k, v in dims.items())


def _pick_case(cases: dict[str, dict[str, Any]], num_parts: int, compiled: bool,
               model: ModelDims | None) -> tuple[str, dict[str, Any]] | None:
    """The measured case closest to the stage: same K class (1 or more), the same model dims,
    compiled or not, then the nearest K."""
    def score(item: tuple[str, dict[str, Any]]) -> tuple[bool, bool, bool, int]:
        name, case = item
        same_compile = bool(case.get("compile", name.endswith("_compiled"))) == compiled
        distance = abs(case.get("num_parts", 1) - num_parts)
        return _same_dims(case, model), case.get("num_parts") == num_parts, same_compile, -distance

    def ours(name: str, case: dict[str, Any]) -> bool:  # not the comparison models (HF, the naive K-loop)
        return (bool(case.get("flops_per_s")) and not name.startswith(("hf_", "naive"))
                and case.get("variant") != "hf_vitmae" and (case.get("num_parts", 1) > 1) == (num_parts > 1))

    candidates = [(n, c) for n, c in cases.items() if ours(n, c)]
    return max(candidates, key=score) if candidates else None


def _other_dims(case: dict[str, Any]) -> str:
    dims = case.get("dims") or {}
    return ", ".join(f"{k} {dims[k]}" for k in DIM_KEYS if k in dims) or "unrecorded dims"


def throughput(device: Device, num_parts: int = 1, compiled: bool = False, model: ModelDims | None = None,
               results_dir: Path = BENCHMARKS, mfu: float = ASSUMED_MFU) -> Throughput:
    """The training throughput of `device` for a K=`num_parts` step: measured where
    `results_dir` has a benchmark of that device, else `mfu` of its datasheet peak."""
    if not device.is_gpu:
        cases = {}  # (file, case name) -> case, with the file's dims and the precision `amp: auto` ran
        for path, data in _results(results_dir):
            if path.name in CPU_RESULTS:
                precision = data.get("amp_auto", "fp32")
                for name, case in data.get("precisions", {}).get(precision, {}).get("variants", {}).items():
                    cases[f"{path.name} {name} {precision}"] = {**case, "dims": data.get("dims"),
                                                                "environment": data.get("environment", {})}
        picked = _pick_case(cases, num_parts, compiled, model)
        if picked is None:
            return Throughput(50e9, False, "assumed 50 GFLOP/s (no CPU benchmark in benchmarks/results)")
        name, case = picked
        env, same = case["environment"], _same_dims(case, model)
        return Throughput(case["flops_per_s"], same,
                          f"{name}: {case['flops_per_s'] / 1e9:.0f} GFLOP/s ({env.get('processor', 'cpu')}, "
                          f"{env.get('torch_threads', '?')} threads" + (")" if same else
                          f"; measured at {_other_dims(case)}, not this model's)"))
    for path, data in _results(results_dir):
        card = (data.get("environment") or {}).get("gpu")
        if not card or gpu_of_card(card) != device:
            continue
        picked = _pick_case(data.get("cases", {}), num_parts, compiled, model)
        if picked is not None:
            name, case = picked
            rate, same = case["flops_per_s"], _same_dims(case, model)
            return Throughput(rate, same, f"{path.name} {name}: {rate / device.peak_flops:.0%} of "
                                          f"{device.peak_flops / 1e12:.0f} TFLOP/s"
                                          + ("" if same else f", measured at {_other_dims(case)}"))
    return Throughput(mfu * device.peak_flops, False,
                      f"{mfu:.0%} MFU of {device.name}'s {device.peak_flops / 1e12:.0f} TFLOP/s dense bf16")


# ------------------------------------------------------------------------------------- memory


def block_parameters(dim: int, mlp_ratio: float) -> int:
    """A timm `Block` (qkv bias, no layer scale): 2 LayerNorms, qkv, proj, fc1, fc2."""
    hidden = int(dim * mlp_ratio)
    norms, qkv, proj = 4 * dim, 3 * dim * dim + 3 * dim, dim * dim + dim
    return norms + qkv + proj + (dim * hidden + hidden) + (hidden * dim + dim)


def encoder_parameters(model: ModelDims, img_size: int, in_chans: int) -> tuple[int, int]:
    """(all, trainable) parameters of the timm ViT encoder: patch embedding, cls token, fixed
    sin-cos positions (frozen), blocks, final norm."""
    length = (img_size // model.patch_size) ** 2
    trainable = (model.patch_size**2 * in_chans * model.embed_dim + model.embed_dim + model.embed_dim
                 + model.depth * block_parameters(model.embed_dim, model.mlp_ratio) + 2 * model.embed_dim)
    return trainable + (length + 1) * model.embed_dim, trainable


def emae_parameters(model: ModelDims, img_size: int, in_chans: int) -> tuple[int, int]:
    """(all, trainable) parameters of `emae.models.EMAE` (encoder + decoder)."""
    length = (img_size // model.patch_size) ** 2
    dec, pixels = model.decoder_embed_dim, model.patch_size**2 * in_chans
    enc_all, enc_trainable = encoder_parameters(model, img_size, in_chans)
    decoder = (model.embed_dim * dec + dec + dec + model.decoder_depth * block_parameters(dec, model.mlp_ratio)
               + 2 * dec + dec * pixels + pixels)
    return enc_all + decoder + (length + 1) * dec, enc_trainable + decoder


def block_activation_bytes(tokens: float, dim: int, mlp_ratio: float, compute_bytes: int) -> float:
    """Bytes one timm `Block` keeps for backward over `tokens` tokens, with fused (flash / memory-
    efficient) attention, so no tokens x tokens matrix: in the compute dtype the inputs of qkv,
    proj, fc1, fc2 (D, D, D, h), qkv's output (3D), attention's output (D) and GELU's input (h);
    in fp32 the two LayerNorms' inputs (the residual stream, 2D). fp32: 4 (9D + 2h) = 68 D bytes
    per token at mlp_ratio 4; bf16 autocast: 30 D + 8 D = 38 D."""
    hidden = int(dim * mlp_ratio)
    return tokens * (2 * dim * 4 + (7 * dim + 2 * hidden) * compute_bytes)


def _inference_working_set(tokens: float, dim: int, mlp_ratio: float, compute_bytes: int) -> float:
    """The most one block holds at once without autograd: the residual stream and its sum (fp32),
    the MLP's hidden before and after GELU."""
    return tokens * (2 * dim * 4 + 2 * int(dim * mlp_ratio) * compute_bytes)


def _blocks(depth: int, tokens: float, dim: int, mlp_ratio: float, compute_bytes: int,
            checkpointed: bool) -> float:
    """What `depth` blocks keep: all their activations, or with activation checkpointing each
    block's fp32 input (the block being recomputed is added by the caller)."""
    if checkpointed:
        return depth * tokens * dim * 4
    return depth * block_activation_bytes(tokens, dim, mlp_ratio, compute_bytes)


@dataclass(frozen=True)
class Memory:
    """Estimated peak memory of one device, in bytes, by what holds it."""

    parts: dict[str, float]
    lower_bound: bool = False  # only part of the model is counted (dense: the backbone)

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    @property
    def gib(self) -> float:
        return self.total / GIB

    def describe(self) -> str:
        return ", ".join(f"{name} {value / GIB:.2f}" for name, value in self.parts.items() if value) + " GiB"


def _static(params: int, trainable: int, compute_bytes: int, processes: int, train: bool) -> dict[str, float]:
    parts = {"weights": 4.0 * params}
    if train:
        parts |= {"gradients": 4.0 * trainable, "AdamW state": 8.0 * trainable}
        if compute_bytes == 2:  # autocast keeps a bf16 copy of every weight it casts
            parts["autocast weight copies"] = 2.0 * trainable
        if processes > 1:  # DDP's gradient buckets (gradient_as_bucket_view is off)
            parts["DDP buckets"] = 4.0 * trainable
    return parts


def _finish(parts: dict[str, float], device: Device, lower_bound: bool = False) -> Memory:
    if device.is_gpu:
        parts["reserve"] = RESERVE_BYTES + FRAGMENTATION * parts.get("activations", 0.0)
    return Memory(parts, lower_bound)


def _images(batch: int, in_chans: int, img_size: int, compute_bytes: int) -> float:
    """The input batch (fp32) and, under autocast, the patch embedding's cast copy of it."""
    return batch * in_chans * img_size**2 * (4 + (compute_bytes if compute_bytes < 4 else 0))


def pretrain_memory(model: ModelDims, img_size: int, in_chans: int, batch: int, compute_bytes: int,
                    processes: int = 1, device: Device = CPU) -> Memory:
    """Peak memory of one pre-training step of `batch` images per device (K x batch sequences)."""
    length = (img_size // model.patch_size) ** 2
    seqs, pixels = model.num_parts * batch, model.patch_size**2 * in_chans
    enc_tokens = seqs * (num_visible(length, model.mask_ratio) + 1)
    dec_tokens = seqs * (length + 1)
    dim, dec, c, ckpt = model.embed_dim, model.decoder_embed_dim, compute_bytes, model.grad_checkpointing
    acts = (_blocks(model.depth, enc_tokens, dim, model.mlp_ratio, c, ckpt)
            + _blocks(model.decoder_depth, dec_tokens, dec, model.mlp_ratio, c, ckpt))
    if ckpt:  # the one block recomputed at a time
        acts += max(block_activation_bytes(enc_tokens, dim, model.mlp_ratio, c),
                    block_activation_bytes(dec_tokens, dec, model.mlp_ratio, c))
    losses = 1 + (model.num_parts > 1 and model.consistency_weight > 0)
    acts += (_images(batch, in_chans, img_size, c)
             + enc_tokens * dim * (4 + c) + dec_tokens * dec * (4 + c)  # final norms, decoder embed / head
             + dec_tokens * pixels * c  # the prediction (kept by the output)
             + seqs * length * pixels * 4 * losses + 2 * batch * length * pixels * 4)  # loss terms, targets
    parts = _static(*emae_parameters(model, img_size, in_chans), c, processes, train=True)
    parts["activations"] = acts
    return _finish(parts, device)


def encoder_memory(model: ModelDims, img_size: int, in_chans: int, batch: int, compute_bytes: int,
                   train: bool, processes: int = 1, device: Device = CPU, extra_params: int = 0,
                   lower_bound: bool = False) -> Memory:
    """Peak memory of the encoder on whole images: trained (fine-tuning, dense backbones) or
    forward only (kNN, linear probe: one block's working set at a time)."""
    tokens = batch * ((img_size // model.patch_size) ** 2 + 1)
    dim, c = model.embed_dim, compute_bytes
    params, trainable = encoder_parameters(model, img_size, in_chans)
    parts = _static(params + extra_params, trainable + extra_params, c, processes, train)
    image = _images(batch, in_chans, img_size, c)
    if train:
        recomputed = block_activation_bytes(tokens, dim, model.mlp_ratio, c) if model.grad_checkpointing else 0.0
        parts["activations"] = image + recomputed + _blocks(model.depth, tokens, dim, model.mlp_ratio, c,
                                                            model.grad_checkpointing)
    else:
        parts["activations"] = image + _inference_working_set(tokens, dim, model.mlp_ratio, c)
    return _finish(parts, device, lower_bound)


def model_inference_memory(model: ModelDims, img_size: int, in_chans: int, batch: int, compute_bytes: int,
                           device: Device = CPU) -> Memory:
    """Peak memory of the whole model's forward without autograd (consistency, reconstructions):
    the weights and the larger of the encoder's and the decoder's block working sets."""
    length = (img_size // model.patch_size) ** 2
    seqs, c = model.num_parts * batch, compute_bytes
    enc = _inference_working_set(seqs * (num_visible(length, model.mask_ratio) + 1), model.embed_dim,
                                 model.mlp_ratio, c)
    dec = _inference_working_set(seqs * (length + 1), model.decoder_embed_dim, model.mlp_ratio, c)
    pred = seqs * (length + 1) * model.patch_size**2 * in_chans * 4
    parts = {"weights": 4.0 * emae_parameters(model, img_size, in_chans)[0],
             "activations": batch * in_chans * img_size**2 * 4 + max(enc, dec) + pred}
    return _finish(parts, device)


# --------------------------------------------------------------------------------- data sizes


@dataclass(frozen=True)
class DataSizes:
    train: int
    val: int
    source: str


IMAGENET_1K = (1_281_167, 50_000)
CIFAR = (50_000, 10_000)
DIGITS = 1797  # scikit-learn's load_digits, what `emae prepare` splits


def count_images(root: Path) -> tuple[int, int] | None:
    """Files under root/train and root/val (ImageFolder's walk; hidden ones, such as the scan's
    caches, left out), or None without them. Not emae.data's image test: that imports torch, and
    every Snakemake start runs the plan; an estimate needs no decoding."""
    counts = []
    for split in ("train", "val"):
        if not (root / split).is_dir():
            return None
        counts.append(sum(not name.startswith(".")
                          for _, _, files in os.walk(root / split, followlinks=True) for name in files))
    return counts[0], counts[1]


def data_sizes(config: Any, prepare: bool, train: int | None = None,
               val: int | None = None) -> DataSizes | None:
    """The train / val image counts the stages read, the first of: given, CIFAR's, the prepared set's
    manifest, counted in data.root, the embedded set `emae prepare` will write, or ImageNet-1k's for a
    missing 1000-class ImageFolder (assumed); None when none of these applies."""
    data = config.data
    root = Path(data.root)
    if train is not None and val is not None:
        return DataSizes(train, val, "given (--train-images, --val-images)")
    if data.kind in ("cifar10", "cifar100"):
        return DataSizes(*CIFAR, f"torchvision {data.kind}")
    manifest = root / "manifest.json"
    if manifest.is_file():
        try:
            info = json.loads(manifest.read_text())
            return DataSizes(int(info["num_train"]), int(info["num_val"]), f"{manifest}")
        except (OSError, ValueError, KeyError):
            pass
    counted = count_images(root)
    if counted is not None:
        return DataSizes(*counted, f"counted in data.root={data.root}")
    if prepare:  # sklearn's stratified split: ceil(val_fraction x N) val images
        n_val = math.ceil(config.prepare.val_fraction * DIGITS)
        return DataSizes(DIGITS - n_val, n_val, "the embedded digits `emae prepare` writes")
    if data.num_classes == 1000:
        return DataSizes(*IMAGENET_1K, f"assumed: ImageNet-1k's; data.root={data.root} is not here")
    return None


# ---------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Estimate:
    """What one job computes: FLOPs (None: unknown data size), in words, and its memory."""

    counted: str
    flops: float | None
    batch: int | None = None  # per device
    memory: Memory | None = None
    host_flops: float = 0.0  # work done on host tensors (not in the device time)
    trained_images: int = 0  # images the training loop decodes and augments


@dataclass
class StagePlan:
    """The estimate of one job on its launcher resources."""

    stage: str
    run: str  # variant/seed, or "" for a pipeline-wide job
    estimate: Estimate
    device: Device
    devices: int  # GPUs of the job (nodes x gpus_per_node); 1 on the CPU
    throughput: Throughput | None = None
    num_parts: int = 1
    assumed_gpu: bool = False  # the launcher names no GPU: sized for DEFAULT_GPU, not checked
    time_min: int | None = None  # the job's time limit where the launcher enforces one
    max_requeues: int = 0
    signal_delay_s: int = 0
    gpu_key: str = ""  # the launcher key that names the GPU, with its file (for messages)
    data_seconds: float = 0.0  # decoding + augmenting in the job's own process (data.num_workers: 0)

    @property
    def name(self) -> str:
        return f"{self.stage} ({self.run})" if self.run else self.stage

    @property
    def flops(self) -> float | None:
        return self.estimate.flops

    @property
    def memory(self) -> Memory | None:
        return self.estimate.memory

    @property
    def device_hours(self) -> float | None:
        if self.flops is None or self.throughput is None:
            return None
        return (self.flops / self.throughput.flops_per_s + self.data_seconds) / 3600

    @property
    def wall_hours(self) -> float | None:
        hours = self.device_hours
        return None if hours is None else hours / self.devices

    @property
    def requeues(self) -> int | None:
        """Time-limit requeues the job needs: each run ends `signal_delay_s` before the limit."""
        if self.wall_hours is None or self.time_min is None:
            return None
        usable = max(self.time_min - self.signal_delay_s / 60, 1.0)
        return max(math.ceil(self.wall_hours * 60 / usable) - 1, 0)

    @property
    def fits(self) -> bool | None:
        if self.memory is None or not self.device.is_gpu:
            return None
        return self.memory.gib <= self.device.memory_gib


class GpuMemoryError(EmaeError):
    """A stage's estimated memory per GPU exceeds the GPU its launcher names."""


@dataclass
class Plan:
    jobs: list[StagePlan]
    title: str
    sizes: DataSizes | None
    host: Throughput  # this machine's CPU, for the work stages do on host tensors

    @property
    def total_flops(self) -> float:
        return sum(j.flops or 0.0 for j in self.jobs)

    def device_hours(self) -> dict[str, float]:
        """Device-hours per device model (GPU-hours, or CPU-hours of this machine)."""
        hours: dict[str, float] = {}
        for job in self.jobs:
            if job.device_hours is not None:
                hours[job.device.name] = hours.get(job.device.name, 0.0) + job.device_hours
        return hours

    def per_variant(self) -> list[StagePlan]:
        """The first job of each (stage, variant): a variant's seeds cost the same."""
        return [jobs[0] for jobs in self._by_variant().values()]

    def _by_variant(self) -> dict[tuple[str, str], list[StagePlan]]:
        groups: dict[tuple[str, str], list[StagePlan]] = {}
        for job in self.jobs:
            groups.setdefault((job.stage, job.run.split("/")[0]), []).append(job)
        return groups

    def warnings(self) -> list[str]:
        out = []
        for job in self.per_variant():
            if job.requeues is not None and job.requeues > job.max_requeues:
                out.append(f"{job.name}: ~{_hours(job.wall_hours)} needs {job.requeues} time-limit requeues "
                           f"at time_min={job.time_min} but launcher.max_num_timeout={job.max_requeues}: the "
                           "job would fail; raise max_num_timeout, time_min or the stage's GPUs")
            if job.fits and job.memory.gib > TIGHT * job.device.memory_gib:
                out.append(f"{job.name}: an estimated {job.memory.gib:.1f} of {job.device.memory_gib:.1f} "
                           "GiB per GPU: tight")
            if job.fits is False and job.assumed_gpu:
                out.append(f"{job.name}: an estimated {job.memory.gib:.1f} GiB per GPU would not fit the "
                           f"assumed {job.device.name} ({job.device.memory_gib:.1f} GiB)")
            if job.estimate.host_flops > 1e15:
                hours = job.estimate.host_flops / self.host.flops_per_s / 3600
                out.append(f"{job.name}: {job.estimate.host_flops:.2g} FLOP of kNN similarity on host tensors "
                           f"(emae/eval/knn.py knn_scores: CPU features), not on the GPU: ~{_hours(hours)} at "
                           f"this machine's {self.host.flops_per_s / 1e9:.0f} GFLOP/s")
        return out

    def summary(self) -> str:
        """One line: the total (what a pipeline prints before it submits)."""
        per = ", ".join(f"{_num(h)} {name}-hours" for name, h in self.device_hours().items()) or "no estimate"
        timed = [j for j in self.jobs if j.wall_hours is not None]
        longest = max(timed, key=lambda j: j.wall_hours, default=None)
        tail = f"; longest job {longest.name} ~{_hours(longest.wall_hours)}" if longest else ""
        rated = [j.throughput.measured for j in self.jobs if j.flops and j.throughput]
        label = "" if all(rated) else " (rates assumed)" if not any(rated) else " (rates partly assumed)"
        return f"emae plan: {len(self.jobs)} jobs, {self.total_flops:.3g} FLOP, {per}{label}{tail}"

    def table(self) -> str:
        rows = [("stage", "run", "FLOP", "device", "rate", "device time", "devs", "wall time", "limit",
                 "requeues", "batch", "K", "GiB/dev", "fits")]
        for (_, variant), same in self._by_variant().items():
            j, seeds = same[0], len(same)
            fits = {None: "-", True: "yes", False: "NO"}[j.fits]
            if j.fits is not None and j.memory.lower_bound:
                fits += " (>=)"
            rows.append((
                j.stage, (f"{variant} x{seeds} seeds" if seeds > 1 else j.run) or "-",
                "-" if j.flops is None else f"{j.flops:.3g}",
                j.device.name + ("*" if j.assumed_gpu else ""),
                j.throughput.label if j.throughput and j.flops else "-",
                _hours(j.device_hours), str(j.devices), _hours(j.wall_hours),
                "-" if j.time_min is None else f"{j.time_min} min", _opt(j.requeues),
                _opt(j.estimate.batch), str(j.num_parts),
                "-" if j.memory is None else f"{j.memory.gib:.2g}", fits))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                 for r in rows]
        return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:], "(each row: per job)"])

    def render(self) -> str:
        """The whole plan: the table, where the figures come from, what is counted, warnings."""
        sizes = (f"images: {self.sizes.train:,} train, {self.sizes.val:,} val ({self.sizes.source})"
                 if self.sizes else "images: unknown (give --train-images N --val-images N): FLOPs not estimated")
        rates = dict.fromkeys(f"  {j.throughput.label}: {j.device.name}, {j.throughput.source}"
                              for j in self.jobs if j.throughput and j.flops)
        counted = dict.fromkeys(f"  {j.name.split('/')[0] + ')' if j.stage == 'pretrain' else j.stage}: "
                                f"{j.estimate.counted}" for j in self.jobs)
        memory = dict.fromkeys(f"  {j.stage} (batch {j.estimate.batch}, K={j.num_parts}): "
                               f"{j.memory.describe()}" for j in self.jobs if j.memory is not None)
        lines = [self.title, sizes, "", self.table(), "",
                 "rate (per device):", *rates, "counted:", *counted, "memory per device (estimated):", *memory]
        if any(j.assumed_gpu for j in self.jobs):
            lines.append(f"* the launcher names no GPU (resources.gpu_type): sized for {DEFAULT_GPU}, memory "
                         "not checked")
        lines += [f"note: {NOTE}", *(f"warning: {w}" for w in self.warnings())]
        return "\n".join([*lines, "", self.summary()])

    def check_fits(self) -> None:
        """Raise `GpuMemoryError` when a stage's estimate exceeds the memory of the GPU its launcher
        names (an assumed GPU is only warned about)."""
        bad = [j for j in self.per_variant() if j.fits is False and not j.assumed_gpu]
        if not bad:
            return
        lines = [f"stage {j.name}: batch {j.estimate.batch} per GPU x K={j.num_parts} needs an estimated "
                 f"{j.memory.gib:.1f} GiB per GPU ({j.memory.describe()}) but the launcher's GPU "
                 f"{j.device.name} has {j.device.memory_gib:.1f} GiB ({j.gpu_key})" for j in bad]
        fix = ("lower the stage's batch_size (accum_iter: null derives the accumulation), set "
               "model.grad_checkpointing=true, or name a GPU with more memory")
        if len(lines) == 1:
            raise GpuMemoryError(f"{lines[0]}: {fix}")
        raise GpuMemoryError("stages do not fit their GPU's memory:\n  " + "\n  ".join(lines) + f"\n{fix}")


NOTE = ("FLOP: analytic (emae.flops: matmuls and attention, 2 per multiply-add, backward = 2x forward); "
        "device time = FLOP / rate, + on a CPU job that loads its training data in its own process "
        "(data.num_workers: 0) its images / the measured data rate; wall time = device time / devices; "
        "other data loading, checkpoints and queueing are not included")


def _num(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _opt(value: float | None) -> str:
    return "-" if value is None else _num(value)


def _hours(hours: float | None) -> str:
    """A duration for people: seconds, minutes, hours or days."""
    if hours is None:
        return "-"
    seconds = hours * 3600
    if seconds < 90:
        return f"{seconds:.2g} s"
    if hours < 1.5:
        return f"{seconds / 60:.0f} min"
    if hours < 10:
        return f"{hours:.1f} h"
    return f"{hours:,.0f} h" if hours < 48 else f"{hours:,.0f} h ({hours / 24:.1f} d)"


# ---------------------------------------------------------------------------- stage estimates


def _runs_of(epochs: int, every: int) -> int:
    """How often an every-N-epochs evaluation runs (and once more at the end, if not on it)."""
    return math.ceil(epochs / every) if every else 0


class _Estimator:
    """The Estimate of each stage from one run's config (a method per stage name)."""

    def __init__(self, config: Any, sizes: DataSizes | None, device: Device, processes: int,
                 batches: dict[str, tuple[int, int]]) -> None:
        self.config, self.sizes, self.device, self.processes = config, sizes, device, processes
        self.batches = batches  # stage -> (accum_iter, effective batch), the pipeline's check
        self.model, self.img, self.chans = config.model, config.data.image_size, config.data.in_chans
        self.head = self.model.embed_dim * config.data.num_classes + config.data.num_classes

    def _epoch_images(self, stage: str) -> int:
        """Images one epoch trains on: whole optimizer steps (the sampler drops the rest)."""
        effective = self.batches[stage][1]
        return self.sizes.train // effective * effective

    def _encoder(self, images: float) -> float:
        return images * encoder_forward_flops(self.model, self.img, self.chans)

    def _knn_host(self) -> float:
        """The similarity matmul of one kNN evaluation, on host tensors: 2 x val x train x dim."""
        return 2.0 * self.sizes.train * self.sizes.val * self.model.embed_dim if self.sizes else 0.0

    def _bytes(self, amp: str) -> int:
        """Bytes of the autocast dtype: bf16 / fp16 on a GPU unless amp is off; fp32 on the CPU."""
        return 2 if self.device.is_gpu and amp != "off" else 4

    def _encoder_memory(self, cfg: Any, train: bool, img_size: int | None = None, extra_params: int = 0,
                        lower_bound: bool = False) -> Memory:
        """`encoder_memory` at a stage's batch and amp, on whole images (default: the data's size)."""
        size = self.img if img_size is None else img_size
        return encoder_memory(self.model, size, self.chans, cfg.batch_size, self._bytes(cfg.amp), train,
                              self.processes, self.device, extra_params, lower_bound)

    def pretrain(self) -> Estimate:
        cfg = self.config.pretrain
        per_image = train_flops_per_image(self.model, self.img, self.chans)
        memory = pretrain_memory(self.model, self.img, self.chans, cfg.batch_size, self._bytes(cfg.amp),
                                 self.processes, self.device)
        if not self.sizes:
            return Estimate(f"epochs x train images x {per_image:.3g} FLOP", None, cfg.batch_size, memory)
        images = self._epoch_images("pretrain")
        epochs = fit_epochs(cfg.epochs, cfg.warmup_epochs, images, per_image, cfg.budget_flops,
                            cfg.budget_images)[0]  # a budget is met in whole epochs, as pretrain does
        monitors = _runs_of(epochs, cfg.knn_every_epochs)
        counted = f"{epochs} epochs x {images:,} images x {per_image:.3g} FLOP"
        if cfg.budget_flops is not None or cfg.budget_images is not None:
            counted += f" (the epochs of pretrain.budget_{'flops' if cfg.budget_flops else 'images'})"
        if monitors:
            counted += f" + {monitors} kNN monitor passes of the encoder over train + val"
        flops = epochs * images * per_image + monitors * self._encoder(self.sizes.train + self.sizes.val)
        return Estimate(counted, flops, cfg.batch_size, memory, monitors * self._knn_host(), epochs * images)

    def knn(self) -> Estimate:
        cfg = self.config.section("knn")
        return Estimate("encoder forward over train + val (the similarity top-k: host tensors, not counted)",
                        self._encoder(self.sizes.train + self.sizes.val) if self.sizes else None,
                        cfg.batch_size, self._encoder_memory(cfg, train=False), self._knn_host())

    def linprobe(self) -> Estimate:
        cfg = self.config.section("linprobe")
        if cfg.augment:
            counted = f"frozen encoder forward over {cfg.epochs} epochs of train, val once (head not counted)"
            images = cfg.epochs * self._epoch_images("linprobe") + self.sizes.val if self.sizes else None
        else:
            counted = "frozen encoder forward over train + val once (cached features; head not counted)"
            images = self.sizes.train + self.sizes.val if self.sizes else None
        return Estimate(counted, None if images is None else self._encoder(images), cfg.batch_size,
                        self._encoder_memory(cfg, train=False, extra_params=self.head))

    def finetune(self) -> Estimate:
        cfg = self.config.section("finetune")
        evals = _runs_of(cfg.epochs, cfg.eval_every_epochs)
        flops, trained = None, 0
        if self.sizes:
            trained = cfg.epochs * self._epoch_images("finetune")
            flops = 3 * self._encoder(trained) + self._encoder(evals * self.sizes.val)
        return Estimate(f"encoder forward + backward (3x) over {cfg.epochs} epochs of train, {evals} val passes "
                        "(head not counted)", flops, cfg.batch_size,
                        self._encoder_memory(cfg, train=True, extra_params=self.head), trained_images=trained)

    def consistency(self) -> Estimate:
        cfg = self.config.section("consistency")
        single = self.model.model_copy(update={"num_parts": 1})
        images = min(cfg.num_images, self.sizes.val) * cfg.rounds if self.sizes else None
        memory = model_inference_memory(single, self.img, self.chans, cfg.batch_size, 4, self.device)  # fp32
        return Estimate(f"model forward (one mask) over {cfg.num_images} val images x {cfg.rounds} rounds",
                        None if images is None else images * forward_flops(single, self.img, self.chans),
                        cfg.batch_size, memory)

    def visualize(self) -> Estimate:
        cfg = self.config.section("visualize")
        images = min(cfg.num_images, self.sizes.val) if self.sizes else None
        memory = model_inference_memory(self.model, self.img, self.chans, cfg.num_images, 4, self.device)
        return Estimate(f"model forward (K views) over {cfg.num_images} val images",
                        None if images is None else images * forward_flops(self.model, self.img, self.chans),
                        cfg.num_images, memory)

    def _dense(self, stage: str, size: int) -> Estimate:
        cfg = self.config.section(stage)
        images = cfg.iterations * self.batches[stage][1]
        return Estimate(f"backbone forward + backward (3x) at {size} px over {cfg.iterations} iterations, "
                        "attention counted global; heads, FPN and evaluation not counted (a lower bound)",
                        3 * images * encoder_forward_flops(self.model, size, self.chans), cfg.batch_size,
                        self._encoder_memory(cfg, train=True, img_size=size, lower_bound=True))

    def detect(self) -> Estimate:
        return self._dense("detect", self.config.section("detect").max_size)

    def segment(self) -> Estimate:
        return self._dense("segment", self.config.section("segment").crop_size)


NOT_ESTIMATED = {
    "prepare": "CPU work (writes the data set)", "prepare_dense": "CPU work (writes the data set)",
    "report": "CPU work (tables and plots)",
    "sweep": "not estimated (its trials vary K and the mask ratio: params/sweep.yaml)",
}


# --------------------------------------------------------------------------------- the pipeline


def resolve_launcher(pipeline: Any, launcher_params: str | None = None,
                     overrides: Sequence[str] = ()) -> Any:
    """The launcher settings the jobs get, as `emae stage` / `emae launch` resolve them: the
    params tree's `launcher:` section, or `launcher_params` instead, with `overrides` on top."""
    from emae.launch.config import load_launcher_config

    return load_launcher_config(launcher_params or pipeline.config.extra.get("launcher", {}), overrides)


def _device_of(launcher: Any, stage: str) -> tuple[Device, bool, str]:
    """(device, assumed, key) of a stage: the GPU its resources name (a SLURM stage: when it asks
    for GPUs), DEFAULT_GPU for a SLURM GPU stage that names none (assumed), else this CPU."""
    res = launcher.for_stage(stage)
    key = launcher.key_of(stage, "gpu_type")
    where = f"{key} / {launcher.origin_of(key)}"
    wants_gpu = launcher.kind == "local" or res.gpus_per_node > 0
    if res.gpu_type and wants_gpu:
        return gpu(res.gpu_type, where), False, where
    if launcher.kind != "local" and res.gpus_per_node:
        return GPUS[DEFAULT_GPU.lower()], True, where
    return CPU, False, where


def _rate(stage: str, config: Any, device: Device, results_dir: Path, mfu: float) -> Throughput:
    """A pre-training job's measured (or assumed) rate; the other stages' is labelled assumed on a
    GPU even where a pre-training step was measured (another computation)."""
    if stage == "pretrain":
        return throughput(device, config.model.num_parts, config.pretrain.compile, config.model, results_dir,
                          mfu)
    rate = throughput(device, 1, False, config.model, results_dir, mfu)
    if rate.measured and device.is_gpu:
        return Throughput(rate.flops_per_s, False, f"{rate.source}, a pre-training step's rate")
    return rate


def plan(pipeline: Any, launcher: Any = None, train_images: int | None = None,
         val_images: int | None = None, results_dir: Path = BENCHMARKS, mfu: float = ASSUMED_MFU) -> Plan:
    """The plan of every job of `pipeline` (an `emae.workflow.stages.Pipeline`) under `launcher`
    (a `LauncherConfig`; default: the params tree's)."""
    launcher = launcher if launcher is not None else resolve_launcher(pipeline)
    sizes = data_sizes(pipeline.config, pipeline.stage_enabled("prepare"), train_images, val_images)
    jobs = [_job_plan(pipeline, job, launcher, sizes, results_dir, mfu) for job in pipeline.jobs()]
    variants = ", ".join(f"{v} (K={pipeline.run_configs[r].model.num_parts})"
                         for v, r in {r.variant: r for r in pipeline.runs}.items())
    title = (f"emae plan: {pipeline.preset or pipeline.params} | {variants} | {len(pipeline.settings.seeds)} "
             f"seed(s) | launcher {launcher.kind}")
    return Plan(jobs, title, sizes, throughput(CPU, results_dir=results_dir))


def _job_plan(pipeline: Any, job: Any, launcher: Any, sizes: DataSizes | None, results_dir: Path,
              mfu: float) -> StagePlan:
    stage, run = job.stage, job.run
    res = launcher.for_stage(stage)
    device, assumed, key = _device_of(launcher, stage)
    common = dict(device=device, devices=max(res.nodes * res.gpus_per_node, 1) if device.is_gpu else 1,
                  assumed_gpu=assumed, time_min=res.time_min if launcher.kind != "local" else None,
                  max_requeues=launcher.max_num_timeout, signal_delay_s=launcher.signal_delay_s, gpu_key=key)
    if run is None or not hasattr(_Estimator, stage):
        what = NOT_ESTIMATED.get(stage, "not estimated")
        return StagePlan(stage, run.name if run else "", Estimate(what, None), **common)
    if run.variant == "pixels":  # the raw-pixel baseline (no variant may take its name)
        return StagePlan(stage, run.name, Estimate("raw pixels: no encoder (kNN / probe on host tensors)", 0.0),
                         **common)
    config = pipeline.run_configs[run]
    batches = {s: b for (s, r), b in pipeline.batches.items() if r == run}
    estimator = _Estimator(config, sizes, device, res.nodes * res.tasks_per_node, batches)
    estimate: Estimate = getattr(estimator, stage)()
    loads_itself = estimate.trained_images and not device.is_gpu and config.data.num_workers == 0
    measured = data_rate(config.data, results_dir) if loads_itself else None
    data_seconds = 0.0
    if measured:
        data_seconds = estimate.trained_images / measured[0]
        estimate = replace(estimate, counted=f"{estimate.counted} + {estimate.trained_images:,} images decoded and "
                                             f"augmented in the job's process ({measured[1]})")
    return StagePlan(stage, run.name, estimate, throughput=_rate(stage, config, device, results_dir, mfu),
                     num_parts=config.model.num_parts if stage in ("pretrain", "visualize") else 1,
                     data_seconds=data_seconds, **common)


def check_fits(pipeline: Any, launcher_params: str | None = None,
               launcher_overrides: Sequence[str] = ()) -> Plan:
    """Plan the pipeline and raise `GpuMemoryError` when a stage cannot fit the GPU its launcher
    names: what a pipeline runs before any job. Returns the plan (print its `summary()`)."""
    result = plan(pipeline, resolve_launcher(pipeline, launcher_params, launcher_overrides))
    result.check_fits()
    return result


def snakemake_plan(pipeline: Any, config: dict[str, Any]) -> Plan:
    """`check_fits` with the Snakemake config's `launcher` (a kind or a mapping, as the rules pass
    it to `emae stage`) and `launcher_params`."""
    from emae.workflow.stages import flatten

    launcher = config.get("launcher")
    if isinstance(launcher, str):
        launcher = {"kind": launcher}
    return check_fits(pipeline, config.get("launcher_params"), flatten(launcher or {}))


# ---------------------------------------------------------------------------------- command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from emae.workflow.stages import add_pipeline_arguments

    add_pipeline_arguments(parser, "instead of the params tree's launcher: section")
    parser.add_argument("--gpu", default=None, metavar="NAME", help="size every GPU stage for this GPU "
                        f"(resources.gpu_type): {', '.join(d.name for d in GPUS.values())}")
    parser.add_argument("--train-images", type=int, default=None, metavar="N",
                        help="train images (with --val-images; default: counted or known)")
    parser.add_argument("--val-images", type=int, default=None, metavar="N", help="val images")
    parser.add_argument("--mfu", type=float, default=ASSUMED_MFU,
                        help="assumed fraction of the GPU's peak where nothing is measured (default: %(default)s)")
    parser.add_argument("--benchmarks", type=Path, default=BENCHMARKS, metavar="DIR",
                        help="benchmark results to read measured throughput from (default: the repository's)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="params overrides")
    parser.parse_args = parser.parse_intermixed_args  # type: ignore[method-assign]  # options among them


def run(args: argparse.Namespace) -> int:
    from emae.workflow.stages import Pipeline

    if (args.train_images is None) != (args.val_images is None):
        raise ConfigError("--train-images and --val-images go together (got only one)")
    if not 0 < args.mfu <= 1:
        raise ConfigError(f"--mfu {args.mfu}: must be in (0, 1]")
    overrides = list(args.launcher) + ([f"resources.gpu_type={args.gpu}"] if args.gpu else [])
    pipeline = Pipeline(args.params, args.preset, args.overrides)
    launcher = resolve_launcher(pipeline, args.launcher_params, overrides)
    if args.gpu:  # a stage's own gpu_type would win over the common one: --gpu is for all
        for stage in launcher.stages.values():
            stage.gpu_type = None
    result = plan(pipeline, launcher, args.train_images, args.val_images, args.benchmarks, args.mfu)
    print(result.render())
    result.check_fits()
    return 0
