"""`emae sweep -o results/sweeps/<study>`: run (or continue) an Optuna study over K and the mask ratio.

The command validates everything first (params, space, storage, an existing study's space), then
starts `sweep.workers` workers (`sweep.backend`: local processes, or a submitit job array on SLURM
with the resources of `launcher.stages.sweep_worker`), shows trials done / running / failed while
they run, recovers trials of dead workers, and writes trials.csv, best.yaml and plots. Rerunning
it continues the same study: complete trials are kept, interrupted ones are retried.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from emae.errors import EmaeError
from emae.sweep import worker as worker_mod
from emae.sweep.storage import study_lock
from emae.sweep.study import PARAMS_SNAPSHOT, Sweep, progress

log = logging.getLogger("emae.sweep")

WORKER_STAGE = "sweep_worker"  # launcher.stages.<this>: resources of each worker job (GPUs, time)
WORKERS_DIR = "workers"  # worker logs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from emae.train.common import add_config_arguments

    add_config_arguments(parser, out_required=True)
    parser.add_argument("--results-only", action="store_true",
                        help="run no trials: recover dead workers' trials and rewrite the results")


def run(args: argparse.Namespace) -> int:
    import optuna

    from emae.config import save_config
    from emae.sweep.results import write_results
    from emae.train.common import config_from_args

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out = Path(args.out)
    sweep = Sweep(config_from_args(args), out)  # params, space, data: errors before any write
    if args.results_only:  # nothing runs: a study made with other params may still be reported
        study, new = _load_for_results(sweep), False
    else:
        study, new = sweep.create_study(sweep.open_storage())  # storage, existing study's signature
        save_config(sweep.config, out / PARAMS_SNAPSHOT)
    print(f"emae sweep: study {sweep.name!r} ({'new' if new else 'continued'}) in {out}: "
          f"{sweep.settings.sampler}, {sweep.target} trials, {sweep.settings.workers} "
          f"{sweep.settings.backend} worker(s); space: {sweep.space.describe()}", flush=True)
    code = 0
    if not args.results_only:
        code = run_workers(sweep, study)
    with study_lock(out):
        sweep.recover(study)
    summary = write_results(sweep, study)
    _print_summary(sweep, summary)
    return code


def _load_for_results(sweep: Sweep) -> Any:
    from emae.sweep import storage as storage_mod

    study = storage_mod.load(sweep.open_storage(), sweep.name, sweep.sampler("results"), sweep.pruner())
    try:
        storage_mod.check_signature(study, sweep.signature())
    except storage_mod.StudyMismatchError as err:
        print(f"emae sweep: warning (results only, nothing runs): {err}", file=sys.stderr)
    return study


def _print_summary(sweep: Sweep, summary: dict[str, Any]) -> None:
    print(f"emae sweep: {summary['complete']} complete, {summary['pruned']} pruned, {summary['failed']} "
          f"failed, {summary['running']} running elsewhere, of {summary['target']}; results in {sweep.out}")
    if "best_trial" in summary:
        print(f"emae sweep: best trial {summary['best_trial']}: {summary['best_values']} with "
              f"{json.dumps(summary['best_params'])} -> {sweep.out / 'best.yaml'}")


# ---------------------------------------------------------------------------------- workers


def run_workers(sweep: Sweep, study: Any) -> int:
    """Rounds of workers until the study needs no more trials (a retry found after a round, e.g.
    of a worker killed on another node, gets a new round). Returns 0, or 128+N when interrupted."""
    stalled = 0
    _STOP.signum = None
    with _Progress(sweep, study) as bar:
        while True:
            with study_lock(sweep.out):
                sweep.recover(study)
                todo = sweep.remaining(study)
            if todo == 0:
                return 0
            before = progress(study.get_trials(deepcopy=False)).finished
            n = min(sweep.settings.workers, todo)
            if sweep.settings.backend == "local":
                codes = _local_round(sweep, n, bar)
            else:
                codes = _submitit_round(sweep, n, bar)
            codes = [128 - c if c is not None and c < 0 else c for c in codes]  # -N: killed by N
            if _STOP.signum is not None:
                return 128 + _STOP.signum
            interrupted = [c for c in codes if c is not None and c > 128]
            if any(c not in (0, None) for c in codes):
                print(f"emae sweep: warning: worker exit codes {codes}; their trials are retried. "
                      f"Logs: {sweep.out / WORKERS_DIR}", file=sys.stderr, flush=True)
            if progress(study.get_trials(deepcopy=False)).finished == before:
                stalled += 1
                if stalled >= 2 or interrupted or all(c not in (0, None) for c in codes):
                    raise EmaeError(f"sweep workers made no progress (exit codes {codes}); see their "
                                    f"logs in {sweep.out / WORKERS_DIR}:\n{_log_tails(sweep)}")
            else:
                stalled = 0


class _Stop:
    """The signal that asked the coordinator to stop (workers are stopped the same way)."""

    signum: int | None = None


_STOP = _Stop()


def _install_stop_handlers(stop_workers: Any) -> dict[int, Any]:
    def handler(signum: int, frame: Any) -> None:
        if _STOP.signum is None:
            _STOP.signum = signum
            print(f"emae sweep: {signal.Signals(signum).name}: stopping the workers (their trials "
                  "are retried when the sweep is rerun)", file=sys.stderr, flush=True)
            stop_workers(signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            previous[sig] = signal.signal(sig, handler)
    return previous


def _restore(previous: dict[int, Any]) -> None:
    for sig, old in previous.items():
        signal.signal(sig, old)


def _worker_argv(sweep: Sweep, name: str, parent: bool, threads: int | None) -> list[str]:
    argv = ["--out", str(sweep.out.resolve()), "--worker", name]
    if parent:
        argv += ["--parent-pid", str(os.getpid())]
    if threads:
        argv += ["--threads", str(threads)]
    return argv


def _env() -> dict[str, str]:
    import emae

    env = dict(os.environ)
    root = str(Path(emae.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root, *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
    return env


def _local_round(sweep: Sweep, n: int, bar: "_Progress") -> list[int | None]:
    """`n` worker processes here; their output goes to workers/<name>.log."""
    from emae.launch.runner import local_command

    threads = sweep.settings.threads_per_worker or max(1, (os.cpu_count() or 1) // n)
    # TQDM_MININTERVAL: pre-training's bars go to the worker logs, a line every 30 s is plenty
    env = _env() | {"OMP_NUM_THREADS": str(threads), "TQDM_MININTERVAL": "30"}
    logs = sweep.out / WORKERS_DIR
    logs.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen] = []

    def stop(signum: int) -> None:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    previous = _install_stop_handlers(stop)
    try:
        for i in range(n):
            name = f"local{os.getpid()}-{i}"  # unique across coordinators sharing the study
            argv = _worker_argv(sweep, name, parent=True, threads=threads)
            with (logs / f"{name}.log").open("ab") as handle:
                procs.append(subprocess.Popen(local_command(argv, entry=worker_mod.ENTRY), env=env,
                                              stdout=handle, stderr=subprocess.STDOUT,
                                              stdin=subprocess.DEVNULL))
        while any(p.poll() is None for p in procs):
            bar.update()
            time.sleep(sweep.settings.poll_seconds)
            if _STOP.signum is not None:
                _wait_or_kill(procs, 30.0)
    finally:
        _restore(previous)
    bar.update()
    return [p.returncode for p in procs]


def _wait_or_kill(procs: list[subprocess.Popen], grace: float) -> None:
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _submitit_round(sweep: Sweep, n: int, bar: "_Progress") -> list[int | None]:
    """`n` workers as one submitit job array (SLURM, or submitit's local executor); resources of
    `launcher.stages.sweep_worker`, each job a checkpointable `EmaeCommand` (requeued on time-out)."""
    from emae.launch.config import load_launcher_config
    from emae.launch.job import EmaeCommand
    from emae.launch.runner import LaunchError, cancel, make_executor, watch

    launcher = load_launcher_config(sweep.config.extra.get("launcher"), name="params: launcher")
    launcher = launcher.model_copy(update={"kind": sweep.settings.backend,
                                           "folder": str(sweep.out.resolve() / WORKERS_DIR / "%j")})
    executor = make_executor(launcher, WORKER_STAGE)
    if sweep.settings.backend == "slurm":
        executor.update_parameters(slurm_array_parallelism=n)
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = _env()["PYTHONPATH"]  # the local executor's jobs import this emae
    try:
        with executor.batch():
            jobs = [executor.submit(EmaeCommand(_worker_argv(sweep, f"array{os.getpid()}-{i}", False, None),
                                                entry=worker_mod.ENTRY)) for i in range(n)]
    except Exception as err:  # noqa: BLE001 - sbatch refused / no controller: submitit's errors vary
        output = (getattr(err, "output", b"") or b"")
        detail = str(err).strip() or (output.decode(errors="replace") if isinstance(output, bytes) else str(output))
        raise LaunchError(f"submitting {n} sweep worker job(s) ({sweep.settings.backend}) failed: "
                          f"{type(err).__name__}: {detail}") from None
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old
    print(f"emae sweep: submitted {n} worker job(s): {', '.join(j.job_id for j in jobs)} "
          f"(logs: {sweep.out / WORKERS_DIR})", flush=True)
    outcomes: list[Any] = [None] * n

    def follow(i: int) -> None:
        with (sweep.out / WORKERS_DIR / f"array{os.getpid()}-{i}.log").open("a") as handle:
            outcomes[i] = watch(jobs[i], launcher, out=handle, err=handle, describe=f"sweep worker {i}")

    threads = [threading.Thread(target=follow, args=(i,), daemon=True) for i in range(n)]
    previous = _install_stop_handlers(lambda signum: None)
    try:
        for thread in threads:
            thread.start()
        while any(t.is_alive() for t in threads):
            bar.update()
            time.sleep(sweep.settings.poll_seconds)
            if _STOP.signum is not None:
                for job in jobs:
                    cancel(job)
                return [128 + _STOP.signum] * n
    finally:
        _restore(previous)
    bar.update()
    return [o.returncode if o is not None else 1 for o in outcomes]


def _log_tails(sweep: Sweep, lines: int = 15) -> str:
    parts = []
    for path in sorted((sweep.out / WORKERS_DIR).glob("*.log")):
        text = path.read_text(errors="replace").splitlines()[-lines:]
        parts.append(f"--- {path} ---\n" + "\n".join(text))
    return "\n".join(parts)


class _Progress:
    """A tqdm bar over the study's trials: finished of target, with running / pruned / failed."""

    def __init__(self, sweep: Sweep, study: Any) -> None:
        self.sweep, self.study = sweep, study
        self._last: tuple | None = None
        self.bar = tqdm(total=sweep.target, desc=f"sweep {sweep.name}", unit="trial", dynamic_ncols=True)

    def __enter__(self) -> "_Progress":
        self.update()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.update()
        self.bar.close()

    def update(self) -> None:
        trials = self.study.get_trials(deepcopy=False)
        p = progress(trials)
        scores = [t.values[0] for t in trials if t.values]
        state = (p.finished, p.running, p.pruned, p.failed, p.retried, max(scores) if scores else None)
        if state == self._last:  # redraw on change only (the bar often goes to a log file)
            return
        self._last = state
        self.bar.n = min(p.finished, self.bar.total)
        self.bar.set_postfix(running=p.running, pruned=p.pruned, failed=p.failed, retried=p.retried,
                             best=f"{state[-1]:.2f}" if scores else "-", refresh=False)
        self.bar.refresh()
