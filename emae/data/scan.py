"""The scan of an ImageFolder data set: every image decoded once, before any training or evaluation.

`scan_imagefolder(root)` checks that train/ and val/ have the same class names (the train split's
mapping is the one every consumer uses), lists both splits as torchvision's ImageFolder does
(same class and sample order) with each file's size and mtime, and decodes every file not seen
before in a thread pool (PIL releases the GIL while decoding), recording its mode and size or why
it cannot be read. `build_dataset`, `emae check` and `emae prepare` run it.

The results are cached per split in a manifest of (relative path, size, mtime_ns, mode, width,
height, error): `<root>/.emae-scan-<split>.json` beside the data where that folder is writable,
else `$XDG_CACHE_HOME/emae/scan/` (default `~/.cache/emae/scan/`), named by a digest of the split's
absolute path. Both places are read. A rerun decodes only new or changed files (size or mtime_ns
differ) and rewrites the manifest only when it changed; it is written atomically (`emae.io`).
Processes that find something to decode in the same split (DDP ranks) take turns through a lock
in the user cache folder, so only the first one decodes; the others then read its manifest.

`dataset_digest` identifies the configured data set from the same listing, without decoding.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from torchvision.datasets import folder

from emae.data.images import probe
from emae.errors import EmaeError
from emae.io import atomic_write_text

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SPLITS = ("train", "val")
SCAN_VERSION = 1  # bump when `probe` changes what it accepts: every file is decoded again
DECODE_CHUNK = 64  # images per thread-pool task
PROGRESS_CHUNKS = 200  # log progress every 200 chunks (12,800 images)
MAX_LISTED_CLASSES = 20


@dataclass(frozen=True, slots=True)
class ListedFile:
    """One image of a split: its path relative to the split folder, class index, size and mtime."""

    rel: str
    target: int
    size: int
    mtime_ns: int


def is_image(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def split_dir(root: str | Path, split: str) -> Path:
    """`root/split`, or a clear error naming the layout an ImageFolder root needs."""
    path = Path(root) / split
    if not path.is_dir():
        raise EmaeError(f"{path}: data split not found (data.root={str(root)!r} needs "
                        f"train/<class>/* and val/<class>/*; for the embedded set run `emae prepare`)")
    return path


def class_names(directory: str | Path) -> list[str]:
    """The class folder names of a split, sorted (ImageFolder's order, so index = position)."""
    try:
        return folder.find_classes(str(directory))[0]
    except FileNotFoundError as err:
        raise EmaeError(f"{directory}: no class folders found ({err})") from None


def list_split(directory: str | Path, class_to_idx: dict[str, int]) -> list[ListedFile]:
    """Every image under `directory/<class>/` in ImageFolder's sample order, with size and mtime."""
    directory = str(directory)
    listed = []
    for path, target in folder.make_dataset(directory, class_to_idx, is_valid_file=is_image,
                                            allow_empty=True):
        try:
            stat = os.stat(path)
            size, mtime_ns = stat.st_size, stat.st_mtime_ns
        except OSError:  # a dangling link: listed, and the decode names why it cannot be read
            size, mtime_ns = -1, -1
        listed.append(ListedFile(os.path.relpath(path, directory), target, size, mtime_ns))
    return listed



@dataclass(frozen=True, slots=True)
class ScannedFile:
    """A listed image and what decoding it found: its mode and size, or why it cannot be read."""

    split: str
    listed: ListedFile
    mode: str | None
    width: int | None
    height: int | None
    error: str | None


@dataclass
class SplitScan:
    directory: Path
    files: list[ScannedFile]
    decoded: int  # files decoded by this scan (0 when the manifest knew them all)
    manifest: Path | None  # where the manifest was read or written (None: nowhere writable)

    @property
    def bad(self) -> list[ScannedFile]:
        return [f for f in self.files if f.error is not None]

    def samples(self) -> list[tuple[str, int]]:
        """ImageFolder's (path, class index) of every readable image, in its order."""
        return [(str(self.directory / f.listed.rel), f.listed.target) for f in self.files if f.error is None]


@dataclass
class DatasetScan:
    root: Path
    classes: list[str]  # the train split's, sorted: class index = position, in both splits
    splits: dict[str, SplitScan] = field(default_factory=dict)

    @property
    def class_to_idx(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.classes)}

    @property
    def bad(self) -> list[ScannedFile]:
        return [f for scan in self.splits.values() for f in scan.bad]

    def bad_lines(self) -> str:
        return "".join(f"\n  {self.root / f.split / f.listed.rel}: cannot read image: {f.error}"
                       for f in self.bad)


def check_same_classes(root: str | Path) -> list[str]:
    """The class names of train/ (sorted); an error naming what each side lacks if val/ differs."""
    names = {split: class_names(split_dir(root, split)) for split in SPLITS}
    if names["train"] != names["val"]:
        train, val = set(names["train"]), set(names["val"])
        parts = [f"missing in {side}/: {_some(sorted(a - b))}"
                 for side, a, b in (("val", train, val), ("train", val, train)) if a - b]
        raise EmaeError(f"{root}: train/ and val/ have different classes: " + "; ".join(parts))
    return names["train"]


def _some(names: list[str]) -> str:
    shown = ", ".join(names[:MAX_LISTED_CLASSES])
    return shown + (f" ... ({len(names) - MAX_LISTED_CLASSES} more)" if len(names) > MAX_LISTED_CLASSES else "")


def scan_imagefolder(root: str | Path, workers: int | None = None) -> DatasetScan:
    """Check the classes of both splits, then scan both (cached; see the module docstring)."""
    root = Path(root)
    result = DatasetScan(root, check_same_classes(root))
    for split in SPLITS:
        result.splits[split] = scan_split(root / split, result.class_to_idx, workers)
    return result


def scan_split(directory: Path, class_to_idx: dict[str, int], workers: int | None = None) -> SplitScan:
    """List `directory` and decode every image its manifest does not know (same size and mtime)."""
    listed = list_split(directory, class_to_idx)
    entries, todo, known, manifest = _against_manifests(directory, listed)
    if todo or set(entries) != set(known) or manifest is None:
        with _turn(directory):  # another process may have scanned meanwhile: look again
            entries, todo, known, manifest = _against_manifests(directory, listed)
            if todo:
                log.info("%s: decoding %d new or changed of %d images", directory, len(todo), len(listed))
                for item, found in zip(todo, _decode_all(directory, todo, workers)):
                    entries[item.rel] = [item.size, item.mtime_ns, *found]
            if todo or set(entries) != set(known) or manifest is None:
                manifest = _write_manifest(directory, entries)
    files = [ScannedFile(directory.name, item, *entries[item.rel][2:]) for item in listed]
    return SplitScan(directory, files, len(todo), manifest)


def _against_manifests(directory: Path, listed: list[ListedFile]
                       ) -> tuple[dict[str, list[Any]], list[ListedFile], dict[str, list[Any]], Path | None]:
    """(the manifests' entries still valid, the files to decode, all entries read, where from)."""
    known, read_from = _read_manifests(directory)
    entries: dict[str, list[Any]] = {}
    todo = []
    for item in listed:
        entry = known.get(item.rel)
        if entry is not None and entry[:2] == [item.size, item.mtime_ns]:
            entries[item.rel] = entry
        else:
            todo.append(item)
    return entries, todo, known, read_from


def _decode_all(directory: Path, todo: list[ListedFile], workers: int | None) -> Iterator[list[Any]]:
    """Decode `todo` in a thread pool, in order; chunks keep the number of futures small."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = workers or min(32, 2 * cpus)
    paths = [str(directory / item.rel) for item in todo]
    chunks = [paths[i:i + DECODE_CHUNK] for i in range(0, len(paths), DECODE_CHUNK)]
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(chunks)))) as pool:
        for done, found in enumerate(pool.map(_decode_chunk, chunks), 1):
            if done % PROGRESS_CHUNKS == 0:
                log.info("%s: decoded %d of %d", directory, done * DECODE_CHUNK, len(paths))
            yield from found


def _decode_chunk(paths: list[str]) -> list[list[Any]]:
    return [_decode_one(path) for path in paths]


def _decode_one(path: str) -> list[Any]:
    """[mode, width, height, None] of a readable image, [None, None, None, why] otherwise."""
    try:
        return [*probe(path), None]
    except Exception as err:  # noqa: BLE001 - PIL and the OS raise many kinds
        return [None, None, None, _reason(path, err)]


def _reason(path: str, err: Exception) -> str:
    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
    except OSError:
        pass
    # PIL names the open file object; the path is already at the start of the line
    message = str(err).replace(f" <_io.BufferedReader name={path!r}>", "")
    return f"{type(err).__name__}: {message}"


def manifest_paths(directory: Path) -> tuple[Path, Path]:
    """(beside the data, in the user cache folder) for the split at `directory`."""
    directory = directory.resolve()
    key = hashlib.sha256(str(directory).encode()).hexdigest()[:16]
    return (directory.parent / f".emae-scan-{directory.name}.json",
            _user_cache() / f"{key}-{directory.name}.json")


def _user_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "emae" / "scan"


def _read_manifests(directory: Path) -> tuple[dict[str, list[Any]], Path | None]:
    """The entries of both manifests (beside the data wins) and the path they came from."""
    entries: dict[str, list[Any]] = {}
    read_from = None
    for path in reversed(manifest_paths(directory)):
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as err:
            log.warning("%s: unreadable scan manifest (%s); scanning again", path, err)
            continue
        if isinstance(data, dict) and data.get("version") == SCAN_VERSION and isinstance(data.get("files"), dict):
            entries.update(data["files"])
            read_from = path
    return entries, read_from


def _write_manifest(directory: Path, entries: dict[str, list[Any]]) -> Path | None:
    text = json.dumps({"version": SCAN_VERSION, "files": entries}, sort_keys=True, separators=(",", ":"))
    beside, user = manifest_paths(directory)
    for path in (beside, user):
        try:
            atomic_write_text(path, text + "\n")
            return path
        except OSError as err:
            log.info("%s: cannot write the scan manifest here (%s)", path, err)
    log.warning("%s: no writable place for the scan manifest: every run decodes every image", directory)
    return None


class _turn:
    """A lock per split (in the user cache folder): concurrent scanners take turns, the first decodes."""

    def __init__(self, directory: Path) -> None:
        from filelock import FileLock  # a dependency of torch

        self.path = manifest_paths(directory)[1].with_suffix(".lock")
        self.lock: Any = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.lock = FileLock(self.path)
        except OSError:
            pass  # no user cache folder: scan without taking turns

    def __enter__(self) -> None:
        from filelock import Timeout

        if self.lock is None:
            return
        try:
            self.lock.acquire(timeout=0)
        except Timeout:
            log.info("%s: another process is scanning this data set; waiting for it", self.path)
            self.lock.acquire()
        except OSError:
            self.lock = None  # a file system without locks: scan without taking turns

    def __exit__(self, *exc: object) -> None:
        if self.lock is not None:
            self.lock.release()


def _tree_files(directory: Path) -> list[tuple[str, int, int]]:
    """(relative path, size, mtime_ns) of every file under `directory`, sorted by path."""
    files = []
    for dirpath, _, names in os.walk(directory, followlinks=True):
        for name in names:
            stat = os.stat(os.path.join(dirpath, name))
            files.append((os.path.relpath(os.path.join(dirpath, name), directory), stat.st_size,
                          stat.st_mtime_ns))
    return sorted(files)


def dataset_digest(data_cfg: Any) -> str:
    """A short hex digest of the configured data set's content, without decoding an image.

    ImageFolder: over both splits' sorted (split, relative path, size) of the images ImageFolder
    would load, and the content digest of `emae prepare`'s manifest.json when there is one; CIFAR:
    over the files of the extracted data set folder under data.root. An added, removed, renamed or
    resized file changes it. Modification times do not: `dvc pull`, `cp` and `git clone` rewrite
    them, and a resumed run must recognise its own data after them.
    """
    digest = hashlib.sha256(data_cfg.kind.encode() + b"\n")
    root = Path(data_cfg.root)
    if data_cfg.kind == "imagefolder":
        for split in SPLITS:
            directory = split_dir(root, split)
            class_to_idx = {name: i for i, name in enumerate(class_names(directory))}
            for item in sorted(list_split(directory, class_to_idx), key=lambda item: item.rel):
                digest.update(f"{split}\0{Path(item.rel).as_posix()}\0{item.size}\n".encode())
        manifest = root / "manifest.json"
        if manifest.is_file():
            digest.update(manifest.read_bytes())
    else:
        from torchvision import datasets

        base = root / (datasets.CIFAR10 if data_cfg.kind == "cifar10" else datasets.CIFAR100).base_folder
        if not base.is_dir():
            raise EmaeError(f"{base}: {data_cfg.kind} data not found (build the data set first)")
        for rel, size, _ in _tree_files(base):
            digest.update(f"{Path(rel).as_posix()}\0{size}\n".encode())
    return digest.hexdigest()[:16]
