"""`emae sweep -o results/sweeps/<study>`: run (or continue) an Optuna study over K and the mask ratio.

Everything is validated first (params, space, storage, an existing study's signature); then rounds
of `sweep.workers` workers (`emae.sweep.backends`) run until the study is finished, with a progress
bar, and trials.csv, best.yaml and plots are written. Rerunning continues the same study.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from tqdm import tqdm

from emae.errors import EmaeError
from emae.sweep.study import PARAMS_SNAPSHOT, StudyMismatchError, Sweep, progress, study_lock


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from emae.config import add_config_arguments

    add_config_arguments(parser, out_required=True)
    parser.add_argument("--results-only", action="store_true",
                        help="run no trials: recover dead workers' trials and rewrite the results")


def run(args: argparse.Namespace) -> int:
    import optuna

    from emae.config import config_from_args, save_config
    from emae.sweep.results import write_results

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out = Path(args.out)
    sweep = Sweep(config_from_args(args), out)  # params, space, data: errors before any write
    if args.results_only:  # nothing runs: a study made with other params may still be reported
        study, new = sweep.load_study(sweep.open_storage(), "results", check=False), False
        try:
            sweep.check_signature(study)
        except StudyMismatchError as err:
            print(f"emae sweep: warning (results only, nothing runs): {err}", file=sys.stderr)
    else:
        study, new = sweep.create_study(sweep.open_storage())
        save_config(sweep.config, out / PARAMS_SNAPSHOT)
    s = sweep.settings
    print(f"emae sweep: study {sweep.name!r} ({'new' if new else 'continued'}) in {out}: {s.sampler}, "
          f"{sweep.target} trials, {s.workers} {s.backend} worker(s); space: {sweep.space.describe()}", flush=True)
    code = 0 if args.results_only else run_workers(sweep, study)
    with study_lock(out):
        sweep.recover(study)
    summary = write_results(sweep, study)
    print(f"emae sweep: {summary['complete']} complete, {summary['pruned']} pruned, {summary['failed']} failed, "
          f"{summary['running']} running elsewhere, of {summary['target']}; results in {out}")
    if "best_trial" in summary:
        print(f"emae sweep: best trial {summary['best_trial']}: {summary['best_values']} with "
              f"{json.dumps(summary['best_params'])} -> {out / 'best.yaml'}")
    return code


def run_workers(sweep: Sweep, study: Any) -> int:
    """Rounds of workers until the study is finished. Trials still RUNNING after a round are waited
    for: another sweep's, or a killed worker's until it is found dead (an RDB fails it after
    Optuna's grace period) and its retry gets a round. Returns 0, or 128+N when stopped by signal N."""
    from emae.launch.signals import SignalGuard
    from emae.sweep.backends import WORKERS_DIR, run_round

    def stopping(signum: int) -> None:
        print(f"emae sweep: {signal.Signals(signum).name}: stopping the workers (their trials are retried "
              "when the sweep is rerun)", file=sys.stderr, flush=True)

    stalled = 0
    with _progress_bar(sweep, study) as update, SignalGuard(stopping) as guard:
        while guard.signum is None:
            with study_lock(sweep.out):
                sweep.recover(study)
                todo = sweep.remaining(study)
            before = progress(study.get_trials(deepcopy=False))
            if todo == 0:
                if before.running == 0:
                    return 0
                update()
                time.sleep(sweep.settings.poll_seconds)
                continue
            codes = run_round(sweep, min(sweep.settings.workers, todo), update, guard)
            if guard.signum is not None:
                break
            if any(c != 0 for c in codes):
                print(f"emae sweep: warning: worker exit codes {codes}; their trials are retried. Logs: "
                      f"{sweep.out / WORKERS_DIR}", file=sys.stderr, flush=True)
            stalled = 0 if progress(study.get_trials(deepcopy=False)).finished > before.finished else stalled + 1
            if stalled >= 2 or (stalled and (all(c != 0 for c in codes) or any(c > 128 for c in codes))):
                tails = "\n".join(f"--- {p} ---\n" + "\n".join(p.read_text(errors="replace").splitlines()[-15:])
                                  for p in sorted((sweep.out / WORKERS_DIR).glob("*.log")))
                raise EmaeError(f"sweep workers made no progress (exit codes {codes}); see their logs in "
                                f"{sweep.out / WORKERS_DIR}:\n{tails}")
    return 128 + guard.signum


@contextlib.contextmanager
def _progress_bar(sweep: Sweep, study: Any) -> Iterator[Callable[[], None]]:
    """A tqdm bar over the study's trials (finished of target; running, pruned, failed, best), redrawn
    on change only: it often goes to a log file."""
    bar, last = tqdm(total=sweep.target, desc=f"sweep {sweep.name}", unit="trial", dynamic_ncols=True), [None]

    def update() -> None:
        trials = study.get_trials(deepcopy=False)
        p, best = progress(trials), max((t.values[0] for t in trials if t.values), default=None)
        if (p, best) != last[0]:
            last[0], bar.n = (p, best), min(p.finished, sweep.target)
            bar.set_postfix(running=p.running, pruned=p.pruned, failed=p.failed, retried=p.retried,
                            best="-" if best is None else f"{best:.2f}", refresh=False)
            bar.refresh()

    update()
    try:
        yield update
    finally:
        update()
        bar.close()
