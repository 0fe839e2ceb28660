"""One round of sweep workers: `backend: local` processes here, or a submitit job array (`slurm`,
or `submitit-local`: the same code path without SLURM) with the resources of
`launcher.stages.sweep_worker`, each job a checkpointable `EmaeCommand` (a time-out requeues it).
Each returns the workers' exit codes; a signal (the coordinator's guard) stops them."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from typing import Callable

from emae.launch.signals import SignalGuard
from emae.sweep.study import Sweep
from emae.sweep.worker import ENTRY

WORKER_STAGE = "sweep_worker"  # launcher.stages.<this>: the resources of each worker job
WORKERS_DIR = "workers"  # worker logs


def run_round(sweep: Sweep, n: int, update: Callable[[], None], guard: SignalGuard) -> list[int]:
    names = [f"{'local' if sweep.settings.backend == 'local' else 'array'}{os.getpid()}-{i}" for i in range(n)]
    (sweep.out / WORKERS_DIR).mkdir(parents=True, exist_ok=True)  # names: unique across coordinators
    if sweep.settings.backend == "local":
        return _local(sweep, names, update, guard)
    return _array(sweep, names, update, guard)


def _argv(sweep: Sweep, name: str, *extra: str) -> list[str]:
    return ["--out", str(sweep.out.resolve()), "--worker", name, *extra]


def _local(sweep: Sweep, names: list[str], update: Callable[[], None], guard: SignalGuard) -> list[int]:
    """Worker processes here, each exiting when we die; output in workers/<name>.log."""
    from emae.launch.runner import checkout_env, local_command

    threads = sweep.settings.threads_per_worker or max(1, (os.cpu_count() or 1) // len(names))
    # TQDM_MININTERVAL: pre-training's bars go to the worker logs, a line every 30 s is plenty
    env = checkout_env() | {"OMP_NUM_THREADS": str(threads), "TQDM_MININTERVAL": "30"}
    procs = []
    for name in names:
        argv = _argv(sweep, name, "--parent-pid", str(os.getpid()), "--threads", str(threads))
        with (sweep.out / WORKERS_DIR / f"{name}.log").open("ab") as log:
            procs.append(subprocess.Popen(local_command(argv, entry=ENTRY), env=env, stdout=log,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
    while any(p.poll() is None for p in procs):
        update()
        time.sleep(sweep.settings.poll_seconds)
        if guard.signum is not None:  # the workers fail and retry their trials, then exit
            deadline = time.monotonic() + 30.0
            for proc in [p for p in procs if p.poll() is None]:
                proc.send_signal(guard.signum)
            for proc in procs:
                try:
                    proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    return [128 - p.returncode if p.returncode < 0 else p.returncode for p in procs]


def _array(sweep: Sweep, names: list[str], update: Callable[[], None], guard: SignalGuard) -> list[int]:
    """The workers as one submitit job array; each job's log streamed into workers/<name>.log."""
    from emae.launch.job import EmaeCommand
    from emae.launch.runner import cancel, make_executor, submitting, watch

    launcher = sweep.config.section("launcher").model_copy(update={
        "kind": sweep.settings.backend, "folder": str(sweep.out.resolve() / WORKERS_DIR / "%j")})
    executor = make_executor(launcher, WORKER_STAGE)
    if sweep.settings.backend == "slurm":
        executor.update_parameters(slurm_array_parallelism=len(names))
    with submitting(f"submitting {len(names)} sweep worker job(s) ({sweep.settings.backend})"), executor.batch():
        jobs = [executor.submit(EmaeCommand(_argv(sweep, name), entry=ENTRY)) for name in names]
    print(f"emae sweep: submitted {len(jobs)} worker job(s): {', '.join(j.job_id for j in jobs)} "
          f"(logs: {sweep.out / WORKERS_DIR})", flush=True)
    codes = [1] * len(jobs)  # a watcher that dies says nothing: a failure

    def follow(i: int) -> None:
        with (sweep.out / WORKERS_DIR / f"{names[i]}.log").open("a") as log:
            codes[i] = watch(jobs[i], launcher, out=log, err=log, describe=f"sweep worker {i}").returncode

    watchers = [threading.Thread(target=follow, args=(i,), daemon=True) for i in range(len(jobs))]
    for thread in watchers:
        thread.start()
    while any(t.is_alive() for t in watchers):
        update()
        time.sleep(sweep.settings.poll_seconds)
        if guard.signum is not None:
            for job in jobs:
                cancel(job)
            return [128 + guard.signum] * len(jobs)
    return codes
