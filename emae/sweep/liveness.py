"""Who runs a trial, whether they are still alive, and what happens to trials of dead workers.

Journal storage has no heartbeat, and RDB heartbeats only cover trials run through
`study.optimize`. So every trial records its owner in its user attrs (host, pid, process start
time, heartbeat file) and the worker touches `<out>/heartbeats/<number>` every
`heartbeat_seconds`. A RUNNING trial is dead when its process is gone (same host: /proc, pid reuse
ruled out by the start time; zombies count as gone) or, on another host, when its heartbeat is
older than `stale_after_seconds`. Recovery marks it FAIL and enqueues a retry with the same
params that adopts (renames) its folder, so the retry resumes the pre-training checkpoint
instead of starting over; the failed trial's `run_dir` then names the retry's folder (and
`retried_as` the retry). After `max_retries` retries of one point it stays failed.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable

import optuna
from optuna.trial import FrozenTrial, TrialState

from emae.sweep.objective import run_dir_name

log = logging.getLogger("emae.sweep")

HEARTBEATS = "heartbeats"


def _proc_start(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks) of a process from /proc, None when it does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
    return fields[0], fields[19]


def owner_record(worker: str) -> dict[str, Any]:
    """What identifies this process as a trial's owner."""
    pid = os.getpid()
    proc = _proc_start(pid)
    record = {"host": socket.gethostname(), "pid": pid, "pid_start": proc[1] if proc else None,
              "worker": worker, "started_unix": time.time()}
    if "SLURM_JOB_ID" in os.environ:
        record["slurm_job"] = os.environ.get("SLURM_ARRAY_JOB_ID", os.environ["SLURM_JOB_ID"]) + (
            f"_{os.environ['SLURM_ARRAY_TASK_ID']}" if "SLURM_ARRAY_TASK_ID" in os.environ else "")
    return record


def heartbeat_path(out: Path, number: int) -> Path:
    return out / HEARTBEATS / str(number)


def owner_alive(trial: FrozenTrial, out: Path, stale_after: float, now: float | None = None) -> bool:
    """Whether the process that runs `trial` is alive (see the module doc)."""
    now = time.time() if now is None else now
    owner = trial.user_attrs.get("owner")
    if not owner:
        # killed between `ask` and recording its owner: only the trial's start time is known
        start = trial.datetime_start.timestamp() if trial.datetime_start else now
        return now - start < stale_after
    if owner.get("host") == socket.gethostname():
        proc = _proc_start(int(owner["pid"]))
        if proc is None or proc[0] in ("Z", "X"):
            return False
        if owner.get("pid_start") is not None and proc[1] != owner["pid_start"]:
            return False  # the pid was reused by another process
        return True
    beat = heartbeat_path(out, trial.number)
    try:
        last = beat.stat().st_mtime
    except OSError:
        last = float(owner.get("started_unix", now))
    return now - last < stale_after


class Heartbeat:
    """Touches the current trial's heartbeat file from a daemon thread; optionally exits the
    process when its parent dies (local workers must not outlive a killed `emae sweep`)."""

    def __init__(self, out: Path, interval: float, parent_pid: int | None = None) -> None:
        self.out, self.interval, self.parent_pid = out, interval, parent_pid
        self.number: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="emae-sweep-heartbeat", daemon=True)

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def beat(self) -> None:
        if self.number is not None:
            path = heartbeat_path(self.out, self.number)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"{time.time():.3f}\n")

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if self.parent_pid is not None and os.getppid() != self.parent_pid:
                # the coordinator is gone (SIGKILL): stop now; our trial is recovered on the next run
                os._exit(137)
            try:
                self.beat()
            except OSError:
                pass  # a full or flaky filesystem must not kill the trial; staleness will tell


def fail_and_retry(study: optuna.Study, trial: FrozenTrial, reason: str, max_retries: int,
                   counts: bool = True) -> int | None:
    """Mark a RUNNING `trial` failed (`reason` recorded) and enqueue its retry when allowed.
    `counts=False` (the user stopped the sweep) retries without using up `max_retries`.
    Returns the number of retries left after this one, or None when none is enqueued.
    Call under `study_lock` (two recoverers must not both retry it)."""
    attempt = int(trial.user_attrs.get("attempt", 0))
    retry = attempt < max_retries or not counts
    folder = trial.user_attrs.get("run_dir")
    # every trial is created under study_lock, so the retry's number is the count of trials now;
    # a finished trial cannot be updated, so its run_dir names the retry's folder (which the retry
    # renames its folder to) before it is failed
    retry_number = len(study.get_trials(deepcopy=False)) if retry else None
    storage, tid = study._storage, trial._trial_id  # noqa: SLF001 - attrs of a trial we do not own
    try:
        storage.set_trial_user_attr(tid, "failure", reason)
        storage.set_trial_user_attr(tid, "retried", retry)
        if retry_number is not None:
            storage.set_trial_user_attr(tid, "retried_as", retry_number)
            if folder:
                storage.set_trial_user_attr(tid, "run_dir", run_dir_name(retry_number))
        study.tell(trial.number, state=TrialState.FAIL)
    except (ValueError, RuntimeError):
        return None  # finished meanwhile (its owner was alive after all): nothing to recover
    if not retry:
        return None
    # a grid cell popped but not yet suggested has its point in the fixed params only
    params = {**trial.system_attrs.get("fixed_params", {}), **trial.params}
    study.enqueue_trial(params, user_attrs={
        "attempt": attempt + int(counts), "retry_of": trial.number, "resume_dir": folder,
        "first_trial": trial.user_attrs.get("first_trial", trial.number)})
    queued = study.get_trials(deepcopy=False)[-1].number
    if queued != retry_number:  # a trial created outside study_lock
        log.warning("trial %d: its retry is trial %d, not %d as recorded in its retried_as/run_dir",
                    trial.number, queued, retry_number)
    return max_retries - attempt - int(counts)


def recover_stale(study: optuna.Study, out: Path, stale_after: float, max_retries: int,
                  is_alive: Callable[[FrozenTrial], bool] | None = None) -> list[tuple[int, str]]:
    """Fail (and retry) every RUNNING trial whose owner is dead. Returns [(number, reason)]."""
    alive = is_alive or (lambda t: owner_alive(t, out, stale_after))
    recovered = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if alive(trial):
            continue
        owner = trial.user_attrs.get("owner") or {}
        reason = (f"worker {owner.get('worker', '?')} (pid {owner.get('pid', '?')} on "
                  f"{owner.get('host', '?')}) died; detected "
                  f"{datetime.datetime.now().isoformat(timespec='seconds')}")
        left = fail_and_retry(study, trial, reason, max_retries)
        recovered.append((trial.number, reason + ("; retried" if left is not None else "; not retried")))
    return recovered
