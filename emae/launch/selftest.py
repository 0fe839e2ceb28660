"""Cheap commands to check a launcher set-up end to end without training anything.

    emae launch --stage check --entry emae.launch.selftest:main -- echo hello
    emae launch --stage check --entry emae.launch.selftest:main kind=slurm resources.tasks_per_node=2 -- ddp

Commands: ``echo WORDS`` (stdout and stderr), ``env`` (SLURM/CUDA/torch.distributed variables),
``sleep SECONDS`` (ticks every second), ``fail [CODE]``, ``raise``, ``die`` (SIGKILLs itself, like
the OOM killer), ``attempts --file F --until N --sleep S`` (counts its runs in F and sleeps until run
N: checks requeue/resume), ``ddp`` (gloo all-reduce across the job's tasks).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import time
from pathlib import Path

ENV_KEYS = (
    "SLURM_JOB_ID", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_JOB_PARTITION", "SLURM_RESTART_COUNT",
    "CUDA_VISIBLE_DEVICES", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
    "SUBMITIT_EXECUTOR",
)


def _write_pid(path: str | None) -> None:
    if path:
        Path(path).write_text(f"{os.getpid()}\n")


def _echo(args: argparse.Namespace) -> int:
    for word in args.words:
        print(word, flush=True)
    print(f"stderr: {' '.join(args.words)}", file=sys.stderr, flush=True)
    return 0


def _env(args: argparse.Namespace) -> int:
    print(f"host={socket.gethostname()} pid={os.getpid()}")
    for key in ENV_KEYS:
        print(f"{key}={os.environ.get(key, '')}")
    return 0


def _sleep(args: argparse.Namespace) -> int:
    _write_pid(args.pid_file)
    print(f"sleeping {args.seconds:g}s (pid {os.getpid()})", flush=True)
    end = time.monotonic() + args.seconds
    tick = 0
    while time.monotonic() < end:
        time.sleep(min(1.0, max(0.0, end - time.monotonic())))
        tick += 1
        print(f"tick {tick}", flush=True)
    print("slept", flush=True)
    return 0


def _fail(args: argparse.Namespace) -> int:
    print(f"failing with exit code {args.code}", file=sys.stderr, flush=True)
    return args.code


def _raise(args: argparse.Namespace) -> int:
    raise RuntimeError("selftest: raised on purpose")


def _die(args: argparse.Namespace) -> int:
    _write_pid(args.pid_file)
    print(f"about to SIGKILL myself (pid {os.getpid()})", flush=True)
    print("dying", file=sys.stderr, flush=True)
    time.sleep(args.delay)
    os.kill(os.getpid(), signal.SIGKILL)
    return 0  # not reached


def _attempts(args: argparse.Namespace) -> int:
    path = Path(args.file)
    with path.open("a") as f:
        f.write(f"{os.environ.get('SLURM_JOB_ID', os.getpid())}\n")
    n = len(path.read_text().splitlines())
    _write_pid(args.pid_file)
    if n < args.until:
        print(f"attempt {n}: running for {args.sleep:g}s (a requeue should interrupt me)", flush=True)
        time.sleep(args.sleep)
        print(f"attempt {n}: finished without being interrupted", flush=True)
        return 0
    print(f"attempt {n}: done (resumed after requeue)", flush=True)
    return 0


def _ddp(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo", init_method="env://")
    rank = dist.get_rank() if world > 1 else 0
    value = torch.ones(1) * (rank + 1)
    if world > 1:
        dist.all_reduce(value)
        dist.destroy_process_group()
    print(f"ddp rank {rank}/{world}: all_reduce sum = {int(value.item())}", flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emae.launch.selftest", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("echo")
    p.add_argument("words", nargs="*")
    p.set_defaults(func=_echo)
    sub.add_parser("env").set_defaults(func=_env)
    p = sub.add_parser("sleep")
    p.add_argument("seconds", type=float)
    p.add_argument("--pid-file")
    p.set_defaults(func=_sleep)
    p = sub.add_parser("fail")
    p.add_argument("code", type=int, nargs="?", default=3)
    p.set_defaults(func=_fail)
    sub.add_parser("raise").set_defaults(func=_raise)
    p = sub.add_parser("die")
    p.add_argument("--pid-file")
    p.add_argument("--delay", type=float, default=0.5)
    p.set_defaults(func=_die)
    p = sub.add_parser("attempts")
    p.add_argument("--file", required=True)
    p.add_argument("--until", type=int, default=2)
    p.add_argument("--sleep", type=float, default=120.0)
    p.add_argument("--pid-file")
    p.set_defaults(func=_attempts)
    sub.add_parser("ddp").set_defaults(func=_ddp)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
