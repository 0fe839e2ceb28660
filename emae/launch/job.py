"""What runs inside a job: an emae command line, in-process.

:class:`EmaeCommand` is the callable that submitit pickles. It is checkpointable: on a time-out or a
preemption submitit calls :meth:`EmaeCommand.checkpoint`, which resubmits the same command line; emae
commands that train resume from their last checkpoint when rerun with the same ``--out``, so a
requeued job carries on where it stopped.

An entry is what runs the command line: ``MODULE`` runs it as ``python -m MODULE ARGS`` would (the
default, ``emae``: the emae program, which the launcher runs as Snakemake and DVC do, without
importing the CLI layer), ``MODULE:FUNCTION`` calls ``FUNCTION(ARGS)`` (selftest, sweep workers).
"""

from __future__ import annotations

import importlib
import os
import runpy
import sys
from collections.abc import Sequence
from typing import Any, Callable

DEFAULT_ENTRY = "emae"
# How srun starts a job's tasks: a task that exits non-zero ends the job step, so the other ranks
# of a distributed run never wait for it in a collective until the NCCL timeout.
SRUN_ARGS = ("--kill-on-bad-exit=1",)


def resolve_entry(entry: str) -> Callable[[list[str]], Any]:
    """``"package.module:function"`` -> the function; ``"package"`` -> a call running it as a program."""
    module_name, sep, func_name = entry.partition(":")
    if not module_name or (sep and not func_name):
        raise ValueError(f"entry {entry!r}: expected 'package.module:function' or a module to run")
    if not sep:
        return lambda argv: _run_program(module_name, argv)
    module = importlib.import_module(module_name)
    try:
        return getattr(module, func_name)
    except AttributeError:
        raise ValueError(f"entry {entry!r}: {module_name} has no {func_name}") from None


def _run_program(module: str, argv: list[str]) -> None:
    sys.argv = [module, *argv]  # runpy puts the module's file first, as `python -m` does
    runpy.run_module(module, run_name="__main__", alter_sys=True)


# Set (in this process only, never pickled) when submitit's signal handler has called
# EmaeCommand.checkpoint(): the SystemExit it raises next must end the job without a result, so that
# the requeued job runs again, instead of being taken for the command's own exit code.
_REQUEUEING = False


def call_entry(entry: str, argv: Sequence[str]) -> int:
    """Call the entry with `argv`; its return value or ``SystemExit`` becomes an exit code."""
    func = resolve_entry(entry)
    try:
        code = func(list(argv))
    except BaseException as stop:
        if _REQUEUEING:
            # submitit's handler raised its SystemExit wherever the command was: inside torch.save
            # it comes back as a RuntimeError ("unexpected pos"), which must not end the job as failed
            raise SystemExit(-1) from stop
        if not isinstance(stop, SystemExit):
            raise
        code = stop.code
    return exit_code(code)


def exit_code(code: Any) -> int:
    """An entry function's return value / ``SystemExit.code`` -> an int exit status."""
    if code is None:
        return 0
    if isinstance(code, int):  # bool included: True is 1
        return int(code)
    print(code, file=sys.stderr)  # sys.exit("message") convention
    return 1


def threads_from_slurm(environ: dict[str, str] | os._Environ[str]) -> None:
    """OMP_NUM_THREADS = the task's CPUs (SLURM_CPUS_PER_TASK) unless the user set it: where SLURM
    does not bind CPUs, torch would start a thread per core of the node in every task."""
    if "OMP_NUM_THREADS" not in environ and environ.get("SLURM_CPUS_PER_TASK", "").isdigit():
        environ["OMP_NUM_THREADS"] = environ["SLURM_CPUS_PER_TASK"]


class EmaeCommand:
    """A checkpointable submitit callable running `argv` with `entry` (by default the emae program).

    In a multi-task job (``tasks_per_node`` x ``nodes`` > 1) every task first exports the
    torch.distributed env:// variables (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK,
    LOCAL_WORLD_SIZE) with ``submitit.helpers.TorchDistributedEnvironment``; with one GPU per task
    (`bind_gpu_to_task`) CUDA_VISIBLE_DEVICES is narrowed to the task's local rank.
    """

    def __init__(self, argv: Sequence[str], entry: str = DEFAULT_ENTRY, bind_gpu_to_task: bool = False) -> None:
        self.argv = [str(a) for a in argv]
        self.entry = entry
        self.bind_gpu_to_task = bind_gpu_to_task

    def __call__(self) -> int:
        import submitit

        env = submitit.JobEnvironment()
        threads_from_slurm(os.environ)
        rendezvous = ""
        if env.num_tasks > 1:
            dist_env = submitit.helpers.TorchDistributedEnvironment().export(
                set_cuda_visible_devices=self.bind_gpu_to_task, overwrite=True
            )
            rendezvous = f", rendezvous {dist_env.master_addr}:{dist_env.master_port}"  # the first node of the job
        print(
            f"[emae.launch] job {env.job_id} task {env.global_rank}/{env.num_tasks} on {env.hostname}{rendezvous}"
            f" (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')!r}): {self.describe()}",
            flush=True,
        )
        code = call_entry(self.entry, self.argv)
        sys.stdout.flush()
        sys.stderr.flush()
        return code

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Requeue the same command: training resumes from its own last checkpoint."""
        import submitit

        global _REQUEUEING
        _REQUEUEING = True
        print(f"[emae.launch] checkpoint: requeueing {self.describe()}", flush=True)
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)

    def describe(self) -> str:
        return " ".join([self.entry, *self.argv])

    def __repr__(self) -> str:
        return f"EmaeCommand({self.argv!r}, entry={self.entry!r})"
