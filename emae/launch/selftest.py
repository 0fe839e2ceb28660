"""Cheap commands to check a launcher set-up end to end without training anything.

    emae launch --stage check --entry emae.launch.selftest:main -- echo hello
    emae launch --stage check --entry emae.launch.selftest:main kind=slurm resources.tasks_per_node=2 -- ddp

Commands: ``echo WORDS`` (stdout and stderr), ``env`` (SLURM/CUDA/torch.distributed variables),
``sleep SECONDS`` (ticks every second), ``fail [CODE]``, ``raise``, ``die`` (SIGKILLs itself, like
the OOM killer), ``attempts --file F --until N --sleep S`` (counts its runs in F and sleeps until run
N: checks requeue/resume), ``ddp`` (gloo all-reduce across the job's tasks). ``--pid-file`` (sleep,
die, attempts) writes the process id first.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import time
from pathlib import Path

ENV_KEYS = ("SLURM_JOB_ID", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_JOB_PARTITION", "SLURM_RESTART_COUNT",
            "CUDA_VISIBLE_DEVICES", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
            "SUBMITIT_EXECUTOR", "SLURM_CPUS_PER_TASK", "OMP_NUM_THREADS")


def _echo(args: argparse.Namespace) -> int:
    for word in args.words:
        print(word, flush=True)
    print(f"stderr: {' '.join(args.words)}", file=sys.stderr, flush=True)
    return 0


def _env(args: argparse.Namespace) -> int:
    print(f"host={socket.gethostname()} pid={os.getpid()}")
    print("\n".join(f"{key}={os.environ.get(key, '')}" for key in ENV_KEYS))
    return 0


def _sleep(args: argparse.Namespace) -> int:
    print(f"sleeping {args.seconds:g}s (pid {os.getpid()})", flush=True)
    end, tick = time.monotonic() + args.seconds, 0
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
    if n >= args.until:
        print(f"attempt {n}: done (resumed after requeue)", flush=True)
        return 0
    print(f"attempt {n}: running for {args.sleep:g}s (a requeue should interrupt me)", flush=True)
    time.sleep(args.sleep)
    print(f"attempt {n}: finished without being interrupted", flush=True)
    return 0


def _ddp(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    value, rank = torch.ones(1), 0
    if world > 1:
        dist.init_process_group("gloo", init_method="env://")
        rank = dist.get_rank()
        value *= rank + 1
        dist.all_reduce(value)
        dist.destroy_process_group()
    print(f"ddp rank {rank}/{world}: all_reduce sum = {int(value.item())}", flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emae.launch.selftest", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    arguments = {  # command -> (function, its arguments as (flags, add_argument options))
        "echo": (_echo, [(["words"], {"nargs": "*"})]),
        "env": (_env, []),
        "sleep": (_sleep, [(["seconds"], {"type": float})]),
        "fail": (_fail, [(["code"], {"type": int, "nargs": "?", "default": 3})]),
        "raise": (_raise, []),
        "die": (_die, [(["--delay"], {"type": float, "default": 0.5})]),
        "attempts": (_attempts, [(["--file"], {"required": True}), (["--until"], {"type": int, "default": 2}),
                                 (["--sleep"], {"type": float, "default": 120.0})]),
        "ddp": (_ddp, []),
    }
    for name, (func, options) in arguments.items():
        command = sub.add_parser(name)
        for flags, kwargs in options:
            command.add_argument(*flags, **kwargs)
        if name in ("sleep", "die", "attempts"):
            command.add_argument("--pid-file")
        command.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "pid_file", None):
        Path(args.pid_file).write_text(f"{os.getpid()}\n")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
