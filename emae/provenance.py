"""What produced a result: the inputs a run was made from (digests), and the code, packages,
hardware, processes, command and times that made it.

Every stage writes its metrics through `write_metrics`, so each `metrics.json` carries
`"inputs"` (what a resume or a report checks against) and `"provenance"` (what tells two
summaries apart). Nothing here imports torch at module level: a config load stays cheap.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import platform
import shlex
import socket
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

from emae.io import write_json


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (an encoder export, a checkpoint)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def encoder_digest(path: str | Path, random_init: bool = False) -> str:
    """What an evaluation starts from: the export's digest, a random init of its architecture, or
    the raw pixels (the baseline without an encoder)."""
    if str(path) == "pixels":
        return "pixels"
    return ("random-init:" if random_init else "") + file_digest(path)


def tree_digest(root: str | Path) -> str:
    """A folder's identity without reading its files: sha256 over every file's relative path and
    size (an added, removed, renamed or resized file changes it; a copy that only rewrote the
    modification times, as `dvc pull` does, does not)."""
    root = Path(root)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(root).as_posix()}\0{path.stat().st_size}\n".encode())
    return digest.hexdigest()


def _git(root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.decode(errors="replace") if done.returncode == 0 else None


@lru_cache(maxsize=1)
def code_version() -> dict[str, Any]:
    """The git commit of the checkout the package runs from, whether its tree was dirty, and the
    digest of its uncommitted diff (None where the package is not in a git checkout)."""
    root = Path(__file__).resolve().parents[1]
    commit = _git(root, "rev-parse", "HEAD") if (root / ".git").exists() else None
    if commit is None:
        return {"commit": None, "dirty": None, "diff_sha256": None}
    status = _git(root, "status", "--porcelain", "--untracked-files=normal") or ""
    diff = _git(root, "diff", "HEAD", "--binary") or ""
    # the digest covers the diff and the names of untracked files: two dirty trees differ in it
    return {"commit": commit.strip(), "dirty": bool(status.strip()),
            "diff_sha256": hashlib.sha256((status + diff).encode()).hexdigest() if status.strip() else None}


def _cpuinfo(field: str) -> str | None:
    """The first `field` of /proc/cpuinfo (Linux), or None."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), for figures that depend on the machine."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


@lru_cache(maxsize=1)
def cpu_bf16() -> str | None:
    """The CPU's native bf16 matmul support: "amx_bf16" (Intel AMX tiles), "avx512_bf16"
    (AVX512-BF16 dot products: Intel Cooper Lake+, AMD Zen 4+), or None (bf16 is emulated there,
    slower than fp32). From the /proc/cpuinfo flags, else from torch's own CPU probe."""
    flags = set((_cpuinfo("flags") or "").split())
    if not flags:  # no /proc (macOS, Windows): torch reads CPUID itself
        try:
            import torch

            flags = {name for name, on in torch._C._cpu._get_cpu_capability().items() if on is True}
        except Exception:  # noqa: BLE001 - an older torch without the probe: no native bf16 known
            flags = set()
    return next((f for f in ("amx_bf16", "avx512_bf16") if f in flags), None)


def _devices() -> dict[str, Any]:
    import torch

    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return {"device": "cuda", "device_names": names, "device_count": len(names)}
    return {"device": "cpu", "device_names": [cpu_model()], "device_count": 1,
            "cpu_threads": torch.get_num_threads(), "cpu_bf16": cpu_bf16()}


def _versions() -> dict[str, Any]:
    import timm
    import torch
    import torchvision

    from emae import __version__

    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {"emae": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "timm": timm.__version__,
            "cuda": torch.version.cuda, "cudnn": cudnn}


def _hosts() -> list[str]:
    """The job's nodes under SLURM (its compact node list), else this host."""
    nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    return [nodes] if nodes else [socket.gethostname()]


def _program() -> str:
    """`emae` for the CLI however it was started (console script, `python -m emae.cli`, torchrun)."""
    name = Path(sys.argv[0]).name
    return "emae" if name in ("emae", "cli.py", "__main__.py") else name


def _started() -> str:
    try:
        import psutil

        start = psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - psutil missing or /proc unreadable: the time of this call
        start = dt.datetime.now().timestamp()
    return dt.datetime.fromtimestamp(start, dt.timezone.utc).isoformat(timespec="seconds")


def collect(world_size: int) -> dict[str, Any]:
    """The provenance block of a metrics file (read at the end of a stage, on rank 0)."""
    return {**code_version(), **_versions(), **_devices(), "world_size": world_size,
            "hosts": _hosts(), "command": shlex.join([_program(), *sys.argv[1:]]),
            "started": _started(),
            "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def write_metrics(path: str | Path, metrics: dict[str, Any], inputs: dict[str, str],
                  world_size: int, precision: str | None = None) -> dict[str, Any]:
    """Write a stage's metrics.json with its inputs' digests and its provenance; returns it.
    `precision`: what a training stage computed in ("bfloat16", "float32"; `amp: auto` picks by
    device, and it changes the figures), so the report can tell runs apart that differ in it."""
    provenance = collect(world_size) | ({"precision": precision} if precision else {})
    record = {**metrics, "inputs": dict(inputs), "provenance": provenance}
    write_json(path, record)
    return record
