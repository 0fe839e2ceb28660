"""A sweep worker: takes trials from the shared study until it needs no more, runs them, reports.

    python -m emae.launch._entry emae.sweep.worker:main --out results/sweeps/<study> --worker 0

`emae sweep` starts N of them (local processes, or a submitit job array); any number may run on
one storage at once. A SIGTERM/SIGINT (Ctrl-C, scancel, a SLURM time limit) fails the running
trial and queues its retry before the worker exits; a SIGKILL leaves it RUNNING until the next
worker or coordinator sees its owner dead (`emae.sweep.liveness`).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from emae.errors import EmaeError, run_reporting_errors
from emae.sweep import liveness
from emae.sweep.objective import run_trial
from emae.sweep.study import Sweep

log = logging.getLogger("emae.sweep")

ENTRY = "emae.sweep.worker:main"


class Stopped(BaseException):
    """A termination signal arrived (BaseException: the objective's `except Exception` lets it by)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_stopped(signum: int, frame: Any) -> None:
    raise Stopped(signum)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", "-o", required=True, help="the sweep folder (written by `emae sweep`)")
    parser.add_argument("--worker", default=str(os.getpid()), help="this worker's name in trial records")
    parser.add_argument("--parent-pid", type=int, default=None,
                        help="exit when this process (the local coordinator) is gone")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="emae-sweep-worker", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    return run_reporting_errors(run, args)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s worker {args.worker}: %(message)s")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _raise_stopped)
    out = Path(args.out)
    sweep = Sweep.from_snapshot(out)
    study = sweep.load_study(sweep.open_storage(), args.worker)
    ran = 0
    with liveness.Heartbeat(out, sweep.settings.heartbeat_seconds, args.parent_pid) as heartbeat:
        while True:
            trial = sweep.next_trial(study, args.worker)
            if trial is None:
                break
            heartbeat.number = trial.number
            heartbeat.beat()
            try:
                _run_one(study, trial, sweep)
            except Stopped as stop:
                _stopped(study, trial, sweep, stop.signum)
                return 128 + stop.signum
            finally:
                heartbeat.number = None
                liveness.heartbeat_path(out, trial.number).unlink(missing_ok=True)
            ran += 1
    log.info("no more trials to run (%d run here)", ran)
    return 0


def _tell(study: optuna.Study, trial: optuna.Trial, values: Any = None, state: TrialState | None = None) -> bool:
    """`study.tell`, unless someone finished the trial meanwhile (it was taken for dead: a stale
    heartbeat); then its retry carries on and this result is dropped."""
    try:
        study.tell(trial, values, state=state)
        return True
    except (ValueError, RuntimeError) as err:
        log.warning("trial %d was finished by someone else (%s); its retry stands", trial.number, err)
        return False


def _run_one(study: optuna.Study, trial: optuna.Trial, sweep: Sweep) -> None:
    log.info("trial %d starts", trial.number)
    try:
        values = run_trial(trial, sweep.out, sweep.base, sweep.settings, sweep.space)
    except optuna.TrialPruned as pruned:
        if _tell(study, trial, state=TrialState.PRUNED):
            log.info("trial %d pruned: %s", trial.number, pruned)
    except Exception as err:  # noqa: BLE001 - a failing point must not stop the sweep
        # a trial that raises fails the same way again: recorded, not retried
        log.error("trial %d failed:\n%s", trial.number, traceback.format_exc())
        try:
            trial.set_user_attr("failure", f"{type(err).__name__}: {err}"[:2000])
            trial.set_user_attr("retried", False)
        except RuntimeError:
            pass  # finished meanwhile (see _tell)
        _tell(study, trial, state=TrialState.FAIL)
        if not isinstance(err, (EmaeError, RuntimeError, ValueError, ArithmeticError)):
            raise  # a bug (TypeError, KeyError, ...): stop this worker, do not burn the study
    else:
        if _tell(study, trial, values):
            log.info("trial %d complete: %s", trial.number, values)


def _stopped(study: optuna.Study, trial: optuna.Trial, sweep: Sweep, signum: int) -> None:
    from emae.sweep.storage import study_lock

    frozen = study._storage.get_trial(trial._trial_id)  # noqa: SLF001
    if frozen.state != TrialState.RUNNING:
        return
    with study_lock(sweep.out):
        liveness.fail_and_retry(study, frozen, f"worker stopped by {signal.Signals(signum).name}",
                                sweep.settings.max_retries, counts=False)
    log.warning("trial %d interrupted by %s: failed, retry queued", trial.number,
                signal.Signals(signum).name)
