"""Who runs a trial and whether they are alive: the journal storage's stand-in for Optuna's RDB
heartbeat (which the journal lacks).

Every trial records its owner (host, pid, process start time, worker, SLURM task) and the worker
touches `<out>/heartbeats/<number>` every `heartbeat_seconds`. A RUNNING trial is dead when its
process is gone (same host: /proc, pid reuse ruled out by the start time, zombies count as gone)
or, on another host, when its heartbeat is older than `stale_after_seconds`.
"""

from __future__ import annotations

import datetime
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable

import optuna
from optuna.trial import FrozenTrial, TrialState

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
    proc = _proc_start(os.getpid())
    record = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": proc[1] if proc else None,
              "worker": worker, "started_unix": time.time()}
    if "SLURM_JOB_ID" in os.environ:
        task = os.environ.get("SLURM_ARRAY_TASK_ID")
        record["slurm_job"] = os.environ.get("SLURM_ARRAY_JOB_ID", os.environ["SLURM_JOB_ID"]) + (
            f"_{task}" if task else "")
    return record


def heartbeat_path(out: Path, number: int) -> Path:
    return out / HEARTBEATS / str(number)


def touch(out: Path, number: int) -> None:
    path = heartbeat_path(out, number)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{time.time():.3f}\n")


def owner_alive(trial: FrozenTrial, out: Path, stale_after: float, now: float | None = None) -> bool:
    """Whether the process that runs `trial` is alive (see the module doc)."""
    now = time.time() if now is None else now
    owner = trial.user_attrs.get("owner")
    if not owner:  # killed between `ask` and recording its owner: only its start time is known
        return now - (trial.datetime_start.timestamp() if trial.datetime_start else now) < stale_after
    if owner.get("host") == socket.gethostname():
        proc = _proc_start(int(owner["pid"]))
        return proc is not None and proc[0] not in ("Z", "X") and owner.get("pid_start") in (None, proc[1])
    try:
        last = heartbeat_path(out, trial.number).stat().st_mtime
    except OSError:
        last = float(owner.get("started_unix", now))
    return now - last < stale_after


def dead_trials(study: optuna.Study, out: Path, stale_after: float) -> list[tuple[FrozenTrial, str]]:
    """The RUNNING trials whose owner is dead, with why."""
    dead = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not owner_alive(trial, out, stale_after):
            owner = trial.user_attrs.get("owner") or {}
            who = f"worker {owner.get('worker', '?')} (pid {owner.get('pid', '?')} on {owner.get('host', '?')})"
            dead.append((trial, f"{who} died; detected {datetime.datetime.now():%Y-%m-%dT%H:%M:%S}"))
    return dead


class Heartbeat:
    """Calls `beat` (set per trial) every `interval` s from a daemon thread; exits the process when
    its parent dies (local workers must not outlive a killed `emae sweep`)."""

    def __init__(self, interval: float, parent_pid: int | None = None) -> None:
        self.interval, self.parent_pid = interval, parent_pid
        self.beat: Callable[[], None] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="emae-sweep-heartbeat", daemon=True)

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if self.parent_pid is not None and os.getppid() != self.parent_pid:
                os._exit(137)  # the coordinator is gone (SIGKILL); our trial is recovered on the next run
            try:
                if self.beat is not None:
                    self.beat()
            except Exception:  # noqa: BLE001 - a flaky file system or database must not kill the trial
                pass  # staleness will tell
