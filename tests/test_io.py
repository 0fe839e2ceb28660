"""Writes on a real, full (or read-only) tmpfs: a clear error, the old file intact, no temp file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from emae.errors import StorageError
from emae.io import append_jsonl, atomic_write, write_json
from emae.train.checkpoint import save_checkpoint
from tests.conftest import CORE_PARAMS, REPO, cli_env

NO_SPACE = "no space left on device writing"


@pytest.fixture()
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 256 KiB tmpfs, unmounted afterwards."""
    mount = tmp_path / "fs"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                            capture_output=True, text=True)
    if result.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.strip()}")
    try:
        yield mount
    finally:  # lazily if a failed test still holds a file open there
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode:
            subprocess.run(["umount", "--lazy", str(mount)], check=True)


def _fill(fs: Path, leave: int = 8192) -> None:
    """Take all the space of `fs` but about `leave` bytes."""
    stats = os.statvfs(fs)
    (fs / "filler").write_bytes(b"\0" * max(0, stats.f_bavail * stats.f_frsize - leave))


def _only(fs: Path, *names: str) -> None:
    assert sorted(p.name for p in fs.iterdir()) == sorted(names)  # no .tmp left behind


def test_checkpoint_larger_than_the_space_keeps_the_old_one(tiny_fs: Path) -> None:
    path = tiny_fs / "last.pt"
    save_checkpoint(path, {"step": 1, "w": torch.zeros(100)})
    before = path.read_bytes()
    with pytest.raises(StorageError) as err:
        save_checkpoint(path, {"step": 2, "w": torch.randn(200_000)})  # 800 KB
    assert str(err.value).startswith(f"{NO_SPACE} {path} ([Errno 28] No space left on device)")
    assert path.read_bytes() == before
    _only(tiny_fs, "last.pt")


def test_a_writer_that_hides_the_errno_is_still_a_full_disk(tiny_fs: Path) -> None:
    # torch.save to a path writes in C++: "RuntimeError: ... unexpected pos", no errno
    path = tiny_fs / "raw.pt"
    with pytest.raises(StorageError, match=NO_SPACE):
        atomic_write(path, lambda tmp: torch.save({"w": torch.randn(200_000)}, tmp))
    _only(tiny_fs)


def test_encoder_export_on_a_full_disk(tiny_fs: Path, tiny_config) -> None:
    from emae.models import EMAE, save_encoder

    model = EMAE.from_config(tiny_config.model, tiny_config.data)
    _fill(tiny_fs)
    with pytest.raises(StorageError, match=f"{NO_SPACE} {tiny_fs / 'encoder.safetensors'}"):
        save_encoder(model, tiny_fs / "encoder.safetensors")  # safetensors writes in Rust
    _only(tiny_fs, "filler")


def test_write_json_and_jsonl_append_on_a_full_disk(tiny_fs: Path) -> None:
    metrics, log = tiny_fs / "metrics.json", tiny_fs / "log.jsonl"
    write_json(metrics, {"top1": 0.5})
    append_jsonl(log, {"step": 1})
    old_metrics, old_log = metrics.read_bytes(), log.read_bytes()
    _fill(tiny_fs)
    with pytest.raises(StorageError, match=f"{NO_SPACE} {metrics}"):
        write_json(metrics, {"top1": 0.6, "pad": "x" * 20_000})
    with pytest.raises(StorageError, match=f"{NO_SPACE} {log}"):
        append_jsonl(log, {"step": 2, "pad": "x" * 20_000})  # part of it would fit
    assert metrics.read_bytes() == old_metrics and log.read_bytes() == old_log  # no half line
    _only(tiny_fs, "metrics.json", "log.jsonl", "filler")


def test_read_only_file_system(tiny_fs: Path) -> None:
    write_json(tiny_fs / "metrics.json", {"top1": 0.5})
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_fs)], check=True)
    with pytest.raises(StorageError, match=rf"read-only file system writing {tiny_fs / 'metrics.json'} "
                                           r"\(\[Errno 30\] Read-only file system\)"):
        write_json(tiny_fs / "metrics.json", {"top1": 0.6})
    with pytest.raises(StorageError, match="read-only file system writing"):
        append_jsonl(tiny_fs / "log.jsonl", {"step": 1})
    assert json.loads((tiny_fs / "metrics.json").read_text()) == {"top1": 0.5}


def test_pretrain_on_a_full_disk_is_one_clear_error(tiny_fs: Path, tiny_overrides: list[str]) -> None:
    out = tiny_fs / "run"  # the tiny model's first checkpoint (~590 KB) does not fit
    result = subprocess.run(
        [sys.executable, "-m", "emae.cli", "pretrain", *[a for f in CORE_PARAMS for a in ("-p", str(f))],
         *tiny_overrides, "pretrain.checkpoint_every_steps=1", "pretrain.knn_every_epochs=0", "-o", str(out)],
        cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert f"emae: error: {NO_SPACE} {out / 'checkpoints' / 'last.pt'}" in result.stderr
    assert "Traceback" not in result.stderr
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_written_files_get_the_usual_mode(tmp_path: Path) -> None:
    umask = os.umask(0o027)
    try:
        write_json(tmp_path / "metrics.json", {"top1": 0.5})  # not mkstemp's 0o600
        assert (tmp_path / "metrics.json").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(umask)
    (tmp_path / "metrics.json").chmod(0o604)
    write_json(tmp_path / "metrics.json", {"top1": 0.6})  # a replaced file keeps its mode
    assert (tmp_path / "metrics.json").stat().st_mode & 0o777 == 0o604
