"""Data loading throughput: MAE's pre-training augmentation on an ImageFolder of JPEGs, per worker.

Writes a temporary ImageFolder of synthetic photo-like JPEGs (smooth colour fields plus grain, so
they compress and decode like photographs, not like noise), at ImageNet's typical size (500x375)
and at 224x224, then measures with the package's own pieces (`build_dataset`,
`pretrain_transform`: RandomResizedCrop(224, scale 0.2-1, bicubic) + flip + normalise,
`SeededDataset` + `ResumableBatchSampler` as `emae pretrain` uses them):

  per_worker     images per CPU second of one process decoding + augmenting (what each
                 DataLoader worker does; the wall-clock rate is recorded too)
  loader_w<N>    images/s of a DataLoader with N workers, batches of 64 (collation, IPC included)

and how many workers keep a GPU fed at a given step rate (`--gpu-images-per-s`, or the rates in
benchmarks/results/gpu-*.json when a GPU run left one). Results: benchmarks/results/<name>.json.

    python benchmarks/data_loading.py                 # ~1-2 minutes on 2 cores
    python benchmarks/data_loading.py --params params --name data-loading-embedded-default
    python benchmarks/data_loading.py --smoke --out /tmp/x
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from emae.config import load_config  # noqa: E402
from emae.data import ResumableBatchSampler, SeededDataset, build_dataset, pretrain_transform  # noqa: E402
from emae.io import write_json  # noqa: E402
from emae.provenance import cpu_model  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
CORE_PARAMS = [REPO / "params" / f for f in ("data.yaml", "model.yaml", "pretrain.yaml")]
NUM_CLASSES = 4


def write_image_folder(root: Path, num_images: int, size: tuple[int, int], seed: int = 0) -> None:
    """`root/train/c<k>/<i>.jpg` (and a small val split, which build_dataset requires)."""
    rng = np.random.default_rng(seed)
    width, height = size
    for split, count in (("train", num_images), ("val", NUM_CLASSES)):
        for i in tqdm(range(count), desc=f"writing {split} {width}x{height} JPEGs", leave=False):
            folder = root / split / f"c{i % NUM_CLASSES}"
            folder.mkdir(parents=True, exist_ok=True)
            coarse = rng.uniform(0, 255, size=(height // 32 + 2, width // 32 + 2, 3)).astype(np.uint8)
            smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.float32)
            grain = rng.normal(0, 8, size=smooth.shape)
            pixels = np.clip(smooth + grain, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)


def data_config(root: Path, image_size: int) -> Any:
    """The package's data config for ImageNet-style pre-training on `root`."""
    overrides = [f"data.root={root}", f"data.image_size={image_size}", f"data.num_classes={NUM_CLASSES}",
                 "data.hflip=true", "data.crop_scale_min=0.2", "data.mean=[0.485,0.456,0.406]",
                 "data.std=[0.229,0.224,0.225]", "data.kind=imagefolder", "data.cache_mb=0"]  # decode every pass
    return load_config(CORE_PARAMS, overrides).data


def per_worker_rate(dataset: SeededDataset, repeats: int) -> tuple[list[float], list[float]]:
    """Images/s of one process running decode + augmentation over the whole set, `repeats` times:
    per wall second, and per CPU second of the process (what a worker costs; unlike the wall
    clock it does not count time lost to other processes on a busy machine)."""
    for i in range(min(16, len(dataset))):  # warm-up: first-call costs of PIL and torchvision
        dataset[(i, i)]
    wall, cpu = [], []
    for r in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        for i in range(len(dataset)):
            dataset[(i, r * len(dataset) + i)]
        wall.append(len(dataset) / (time.perf_counter() - start))
        cpu.append(len(dataset) / (time.process_time() - start_cpu))
    return wall, cpu


def loader_rate(dataset: SeededDataset, workers: int, batch_size: int, epochs: int) -> list[float]:
    """Images/s of the DataLoader as pre-training builds it (workers started before timing)."""
    sampler = ResumableBatchSampler(len(dataset), batch_size, seed=0)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                        persistent_workers=workers > 0, prefetch_factor=2 if workers else None)
    rates = []
    for epoch in range(epochs + 1):  # epoch 0 starts the workers: not timed
        sampler.set_position(epoch)
        start = time.perf_counter()
        images = sum(batch[0].shape[0] for batch in loader)
        if epoch:
            rates.append(images / (time.perf_counter() - start))
    return rates


def gpu_rates(path_glob: str) -> dict[str, float]:
    """Measured GPU step rates (images/s) from gpu_step.py results, when a GPU run left some."""
    rates: dict[str, float] = {}
    for path in sorted(glob.glob(path_glob)):
        data = json.loads(Path(path).read_text())
        for case, res in data.get("cases", {}).items():
            if res.get("dims", {}).get("img_size") == 224:
                rates[f"{data['name']}:{case}"] = res["images_per_s"]
    return rates


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a few small images: checks the plumbing")
    parser.add_argument("--num-images", type=int, default=None, help="train images per size (default 256)")
    parser.add_argument("--sizes", default=None, help="on-disk sizes WxH, comma-separated (default 500x375,224x224)")
    parser.add_argument("--image-size", type=int, default=None, help="crop size (default 224)")
    parser.add_argument("--workers", default=None, help="DataLoader worker counts (default 1,2)")
    parser.add_argument("--repeats", type=int, default=None, help="timed passes (default 3)")
    parser.add_argument("--batch-size", type=int, default=None, help="loader batch (default 64)")
    parser.add_argument("--gpu-images-per-s", type=float, action="append", default=None, metavar="RATE",
                        help="GPU step rate(s) to size the workers for (default: benchmarks/results/gpu-*.json)")
    parser.add_argument("--params", type=Path, default=None, metavar="DIR",
                        help="measure the data set and augmentation of this params tree instead (e.g. "
                        "params: the embedded digits `emae prepare` wrote; what `emae plan` adds to a CPU "
                        "job that loads in its own process)")
    parser.add_argument("--name", default=None, help="result name (default data-loading-cpu-this-machine)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    small = args.smoke
    args.num_images = args.num_images or (8 if small else 256)
    args.sizes = [tuple(int(v) for v in s.lower().split("x"))
                  for s in (args.sizes or ("64x48" if small else "500x375,224x224")).split(",")]
    args.image_size = args.image_size or (32 if small else 224)
    args.workers = [int(w) for w in (args.workers or ("1" if small else "1,2")).split(",")]
    args.repeats = args.repeats or (1 if small else 3)
    args.batch_size = args.batch_size or (4 if small else 64)
    return args


def params_rate(params: list[Path], repeats: int, overrides: list[str] = ()) -> dict[str, Any]:
    """The per-process rate of a params tree's own training data and pre-training augmentation."""
    cfg = load_config(params, overrides).data
    dataset = SeededDataset(build_dataset(cfg, "train", pretrain_transform(cfg)))
    wall, cpu = per_worker_rate(dataset, repeats)
    # with the params' data.cache_mb: the median pass is what every epoch after the first costs
    return {"params": ", ".join(map(str, params)), "root": str(cfg.root), "image_size": cfg.image_size,
            "images": len(dataset), "cache_mb": cfg.cache_mb,
            "per_worker_images_per_s": statistics.median(cpu), "per_worker_images_per_wall_s": statistics.median(wall),
            "per_worker_repeats": {"cpu": cpu, "wall": wall}}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)  # a DataLoader worker runs single-threaded
    if args.params:
        command = "python benchmarks/data_loading.py " + " ".join(argv if argv is not None else sys.argv[1:])
        result = {"name": args.name or "data-loading-params", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "command": command,
                  "processor": cpu_model(), "torch": torch.__version__, "pillow": Image.__version__,
                  "augmentation": "the params' pretrain_transform", "load_average": list(os.getloadavg()),
                  **params_rate([args.params], args.repeats)}
        write_json(args.out / f"{result['name']}.json", result)
        print(f"{result['root']}: {result['per_worker_images_per_s']:.0f} images per CPU second; wrote "
              f"{args.out / (result['name'] + '.json')}")
        return 0
    load_before = os.getloadavg()
    name = args.name or ("data-loading-smoke" if args.smoke else "data-loading-cpu-this-machine")
    result: dict[str, Any] = {
        "name": name, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": "python benchmarks/data_loading.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "pillow": Image.__version__, "crop_size": args.image_size, "num_images": args.num_images,
        "augmentation": "RandomResizedCrop(scale 0.2-1, bicubic) + hflip + ToTensor + Normalize",
        "sizes": {},
    }
    with tempfile.TemporaryDirectory(prefix="emae-bench-data-") as tmp:
        for width, height in args.sizes:
            root = Path(tmp) / f"{width}x{height}"
            write_image_folder(root, args.num_images, (width, height))
            cfg = data_config(root, args.image_size)
            dataset = SeededDataset(build_dataset(cfg, "train", pretrain_transform(cfg)))
            wall, cpu = per_worker_rate(dataset, args.repeats)
            entry: dict[str, Any] = {
                "jpeg_kib_mean": sum(p.stat().st_size for p in root.rglob("*.jpg")) / 1024
                / (args.num_images + NUM_CLASSES),
                "per_worker_images_per_s": statistics.median(cpu),  # per CPU second of a worker
                "per_worker_images_per_wall_s": statistics.median(wall),
                "per_worker_repeats": {"cpu": cpu, "wall": wall},
                "loader": {},
            }
            for workers in args.workers:
                rates = loader_rate(dataset, workers, args.batch_size, args.repeats)
                entry["loader"][f"workers_{workers}"] = {"images_per_s": statistics.median(rates),
                                                         "repeats": rates}
            result["sizes"][f"{width}x{height}"] = entry
            print(f"{width}x{height} JPEG ({entry['jpeg_kib_mean']:.0f} KiB): "
                  f"{entry['per_worker_images_per_s']:.0f} img/s per worker; loader "
                  + ", ".join(f"{k} {v['images_per_s']:.0f} img/s" for k, v in entry["loader"].items()),
                  flush=True)

    rates = {f"given:{r}": r for r in args.gpu_images_per_s or []} or gpu_rates(str(RESULTS / "gpu-*.json"))
    result["workers_needed"] = {
        gpu: {size: rate / entry["per_worker_images_per_s"] for size, entry in result["sizes"].items()}
        for gpu, rate in rates.items()
    }
    for gpu, need in result["workers_needed"].items():
        print(f"{gpu}: " + ", ".join(f"{size}: {n:.1f} workers" for size, n in need.items()))
    result["load_average"] = {"before": list(load_before), "after": list(os.getloadavg())}
    path = args.out / f"{name}.json"
    write_json(path, result)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
