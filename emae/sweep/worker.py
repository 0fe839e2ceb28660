"""A sweep worker: takes trials from the shared study until it needs no more, runs them, reports.

    python -m emae.launch._entry emae.sweep.worker:main --out results/sweeps/<study> --worker 0

`emae sweep` starts N of them (local processes, or a submitit job array); any number may share
one storage. A SIGTERM/SIGINT (Ctrl-C, scancel, a SLURM time limit) fails the running trial and
queues its retry before the worker exits; after a SIGKILL the trial stays RUNNING until its owner
is found dead (the journal: `emae.sweep.liveness`; an RDB: Optuna's heartbeat).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from emae.errors import EmaeError, run_reporting_errors
from emae.sweep import liveness
from emae.sweep.objective import run_trial
from emae.sweep.study import Sweep, study_lock

log = logging.getLogger("emae.sweep")

ENTRY = "emae.sweep.worker:main"


class Stopped(BaseException):
    """A termination signal (BaseException: the objective's `except Exception` lets it by)."""


def _raise_stopped(signum: int, frame: Any) -> None:
    raise Stopped(signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="emae-sweep-worker", description=__doc__.splitlines()[0])
    parser.add_argument("--out", "-o", required=True, help="the sweep folder (written by `emae sweep`)")
    parser.add_argument("--worker", default=str(os.getpid()), help="this worker's name in trial records")
    parser.add_argument("--parent-pid", type=int, help="exit when this process (the local coordinator) is gone")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    return run_reporting_errors(run, parser.parse_args(sys.argv[1:] if argv is None else argv))


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s worker {args.worker}: %(message)s")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _raise_stopped)
    sweep = Sweep.from_snapshot(Path(args.out))
    study = sweep.load_study(sweep.open_storage(), args.worker)
    ran = 0
    with liveness.Heartbeat(sweep.settings.heartbeat_seconds, args.parent_pid) as heartbeat:
        while (trial := sweep.next_trial(study, args.worker)) is not None:
            heartbeat.beat = lambda: sweep.beat(trial)  # noqa: B023 - reset before the next trial
            try:
                _run_one(study, trial, sweep)
            except Stopped as stop:
                name = signal.Signals(stop.args[0]).name
                frozen = trial.storage.get_trial(trial._trial_id)  # noqa: SLF001
                with study_lock(sweep.out):
                    sweep.fail(study, frozen, f"worker stopped by {name}", stopped=True)
                return 128 + stop.args[0]
            finally:
                heartbeat.beat = None
                liveness.heartbeat_path(sweep.out, trial.number).unlink(missing_ok=True)
            ran += 1
    log.info("no more trials to run (%d run here)", ran)
    return 0


def _run_one(study: optuna.Study, trial: optuna.Trial, sweep: Sweep) -> None:
    """Run and tell one trial. If someone finished it meanwhile (taken for dead: a stale heartbeat),
    its retry carries on and this result is dropped (`skip_if_finished`)."""
    log.info("trial %d starts", trial.number)
    values, state = None, TrialState.COMPLETE
    try:
        values = run_trial(trial, sweep.out, sweep.base, sweep.settings, sweep.space)
    except optuna.TrialPruned as pruned:
        values, state = str(pruned), TrialState.PRUNED
    except Exception as err:  # noqa: BLE001 - a failing point must not stop the sweep
        log.exception("trial %d failed (it would fail again: not retried)", trial.number)
        with contextlib.suppress(RuntimeError):  # finished meanwhile
            trial.set_user_attr("failure", f"{type(err).__name__}: {err}"[:2000])
        study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        if not isinstance(err, (EmaeError, RuntimeError, ValueError, ArithmeticError)):
            raise  # a bug (TypeError, KeyError, ...): stop this worker, do not burn the study
        return
    told = study.tell(trial, None if state == TrialState.PRUNED else values, state=state, skip_if_finished=True)
    if told.state != state:
        log.warning("trial %d was finished by someone else; its retry stands", trial.number)
    else:
        log.info("trial %d %s: %s", trial.number, state.name.lower(), values)
