"""Run an emae command line locally or as a submitit job (SLURM, or submitit's local executor), stream
its logs, wait for it without ever hanging, and cancel it when we are interrupted.

Public API (re-exported by :mod:`emae.launch`):

- :func:`launch` -- the whole thing, returns an exit code (what ``emae launch`` does);
- :func:`submit` -- submit only, returns the ``submitit.Job``;
- :func:`watch` -- stream and wait for a submitted job, returns an :class:`Outcome`;
- :func:`run_local` -- ``kind: local``: a subprocess (torchrun-style when ``tasks_per_node`` > 1);
- :func:`slurm_job_state` -- a job's state from ``squeue``, or from ``sacct`` once squeue forgot it;
- :func:`precheck` -- refuse a request that no node of its partition can run (before submitting).

Why not ``job.result()``: submitit learns a job's state only from ``sacct``; on a cluster without
accounting sacct fails, the state stays UNKNOWN, and a job that died without writing its result
leaves ``job.result()`` waiting forever. Here the state comes from ``squeue`` first (real time, works
without accounting), then ``sacct``; a job in a final state without a result is a failure after
``result_grace_s``, and a job nobody can tell us about is a failure after ``unknown_state_timeout_s``.
The same squeue call gives a pending job's reason: shown in the log, and a reason that can never
resolve (``PartitionConfig``, ...: see :mod:`emae.launch.slurm`) cancels the job.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from emae.errors import ConfigError, EmaeError
from emae.launch import slurm as slurm_info
from emae.launch.config import LauncherConfig, Resources
from emae.launch.job import DEFAULT_ENTRY, SRUN_ARGS, EmaeCommand
from emae.launch.slurm import slurm_query as _run

# SLURM job states (squeue %T / sacct State). Anything not final is waited on.
FINAL_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
     "DEADLINE", "REVOKED"}
)
GONE = "GONE"  # the scheduler does not know the job (any more)
HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
log = logging.getLogger("emae.launch")


class LaunchError(EmaeError):
    """The job could not be submitted (bad resources, no SLURM client, sbatch refused it)."""


@dataclass
class Outcome:
    """How a watched job ended."""

    job_id: str
    ok: bool
    state: str  # last scheduler state seen (COMPLETED, FAILED, ... or FINISHED/INTERRUPTED locally)
    returncode: int  # what `emae launch` exits with: 0, the command's own code, or 1
    message: str  # one paragraph for humans (empty on success)
    results: list[Any] = field(default_factory=list)  # per task: ("success", code) / ("error", trace) / None


# ------------------------------------------------------------------------------------------ helpers


def _emae_root() -> str:
    import emae

    return str(Path(emae.__file__).resolve().parent.parent)


def _pythonpath_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment with this emae checkout first on PYTHONPATH (jobs import the same code)."""
    env = dict(os.environ if env is None else env)
    root = _emae_root()
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in parts:
        env["PYTHONPATH"] = os.pathsep.join([root, *parts])
    return env


def _tail(path: Path, lines: int = 30) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


# -------------------------------------------------------------------------------------------- state


class SlurmStateProbe:
    """A job's state: ``squeue`` first (real time, no accounting needed; keeps finished jobs for
    MinJobAge), then ``sacct`` when squeue no longer knows it. Returns a state name, :data:`GONE`
    when neither knows the job, or None when the scheduler could not be asked (slurmctld down).
    After a call, `reason` is squeue's reason for the job (``Resources``, ``PartitionConfig``, ...;
    empty when squeue did not answer) and `request` what it asked for, in squeue's words."""

    # state | reason | what it asks for: partition, nodes, CPUs, memory, gres per node, time limit
    SQUEUE_FORMAT = "%T|%r|%P|%D|%C|%m|%b|%l"

    def __init__(self) -> None:
        self.sacct_available: bool | None = None  # None: not tried yet
        self.sacct_error = ""
        self.reason = ""
        self.request = ""

    def _squeue(self, job_id: str) -> str | None:
        self.reason = self.request = ""
        proc = _run(["squeue", "-h", "-j", job_id, "--states=all", "-o", self.SQUEUE_FORMAT])
        if proc is None:
            return None
        if proc.returncode == 0:
            lines = [s.strip() for s in proc.stdout.splitlines() if s.strip()]
            if not lines:
                return GONE
            state, *rest = lines[0].split("|")
            if rest:
                self.reason = rest[0].strip()
                self.request = _describe_request(rest[1:])
            return state.split()[0].upper()
        if "invalid job id" in (proc.stderr or "").lower():
            return GONE
        return None

    def _sacct(self, job_id: str) -> str | None:
        if self.sacct_available is False:
            return None
        proc = _run(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "State"])
        if proc is None or proc.returncode != 0:
            self.sacct_available = False
            self.sacct_error = (proc.stderr.strip() if proc is not None else "sacct did not answer") or "?"
            return None
        self.sacct_available = True
        states = [s.strip() for s in proc.stdout.splitlines() if s.strip()]
        # "CANCELLED by 0" -> CANCELLED
        return states[-1].split()[0].upper() if states else GONE

    def __call__(self, job_id: str) -> str | None:
        state = self._squeue(job_id)
        if state in (None, GONE):
            from_sacct = self._sacct(job_id)
            if from_sacct not in (None, GONE):
                return from_sacct
            if state is None and from_sacct == GONE:
                return None  # slurmctld unreachable and sacct does not know the job yet
        return state


def _describe_request(fields: list[str]) -> str:
    """squeue's %P|%D|%C|%m|%b|%l -> ``partition debug, nodes 1, CPUs 10, memory 4G, gres:gpu:1, ...``"""
    names = ("partition ", "nodes ", "CPUs ", "memory ", "", "time limit ")
    return ", ".join(f"{name}{value}" for name, value in zip(names, fields) if value and value != "N/A")


def slurm_job_state(job_id: str) -> str | None:
    """The state of SLURM job `job_id` (``PENDING``, ``RUNNING``, ``COMPLETED``, ...), ``"GONE"`` when
    neither squeue nor sacct knows it, None when SLURM could not be asked."""
    return SlurmStateProbe()(str(job_id))


def _local_state(job: Any) -> str:
    # submitit.local.LocalJob: RUNNING, FINISHED (the controller exited), INTERRUPTED (killed)
    try:
        return str(job.state).upper()
    except Exception:  # noqa: BLE001 -- never let a state check break the wait
        return "UNKNOWN"


def _is_slurm(job: Any) -> bool:
    from submitit.slurm.slurm import SlurmJob

    return isinstance(job, SlurmJob)


# ------------------------------------------------------------------------------------------ streaming


class LogStreamer:
    """Follows the job's per-task stdout/stderr files and copies complete lines to `out` / `err`
    (prefixed ``[task k]`` when the job has several tasks)."""

    def __init__(self, job: Any, out: IO[str], err: IO[str]) -> None:
        self.out, self.err = out, err
        tasks = [job.task(k) for k in range(job.num_tasks)]
        multi = len(tasks) > 1
        self._files = []
        for k, task in enumerate(tasks):
            prefix = f"[task {k}] " if multi else ""
            self._files.append([task.paths.stdout, self.out, prefix, 0, b""])
            self._files.append([task.paths.stderr, self.err, prefix, 0, b""])

    def pump(self, final: bool = False) -> None:
        for entry in self._files:
            path, stream, prefix, offset, partial = entry
            try:
                with open(path, "rb") as f:
                    f.seek(offset)
                    data = f.read()
            except OSError:
                continue
            if not data and not (final and partial):
                continue
            entry[3] = offset + len(data)
            data = partial + data
            # progress bars (tqdm) redraw with \r: each redraw becomes a line of the log
            if data.endswith(b"\r") and not final:
                keep, data = b"\r", data[:-1]  # may be the first half of \r\n
            else:
                keep = b""
            lines = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
            entry[4] = lines.pop() + keep  # incomplete last line, kept for later
            if final and entry[4]:
                lines.append(entry[4])
                entry[4] = b""
            if lines:
                text = "".join(f"{prefix}{line.decode('utf-8', errors='replace')}\n" for line in lines)
                try:
                    stream.write(text)
                    stream.flush()
                except (OSError, ValueError):
                    pass


# ---------------------------------------------------------------------------------------------- wait


def _read_results(job: Any) -> list[Any]:
    from submitit.core import utils

    results = []
    for k in range(job.num_tasks):
        path = job.task(k).paths.result_pickle
        try:
            results.append(utils.pickle_load(path) if path.exists() else None)
        except Exception:  # noqa: BLE001 -- a result still being written: read it next poll
            results.append(None)
    return results


def _stderr_tails(job: Any, lines: int = 30) -> str:
    parts = []
    for k in range(job.num_tasks):
        paths = job.task(k).paths
        text = _tail(paths.stderr, lines) or _tail(paths.stdout, lines)
        if text:
            head = f"--- task {k}: {paths.stderr} (last {lines} lines) ---" if job.num_tasks > 1 else (
                f"--- {paths.stderr} (last {lines} lines) ---")
            parts.append(f"{head}\n{text}")
    return "\n".join(parts) if parts else f"(no log output; see {job.paths.folder})"


def _outcome_from_results(job: Any, results: list[Any], state: str) -> Outcome:
    for k, res in enumerate(results):
        status, value = res
        if status == "error":
            return Outcome(job.job_id, False, state, 1,
                           f"job {job.job_id} task {k} raised an exception:\n{value}", results)
    for k, (_, value) in enumerate(results):
        code = value if isinstance(value, int) and not isinstance(value, bool) else 0
        if code != 0:
            return Outcome(job.job_id, False, state, code,
                           f"job {job.job_id}: the command exited with code {code} (task {k}).\n"
                           f"{_stderr_tails(job)}", results)
    return Outcome(job.job_id, True, state, 0, "", results)


def watch(
    job: Any,
    config: LauncherConfig,
    *,
    out: IO[str] | None = None,
    err: IO[str] | None = None,
    describe: str = "",
) -> Outcome:
    """Stream `job`'s logs into `out`/`err` and wait until it has a result or is known dead.

    Never waits forever: a job in a final scheduler state (or, locally, whose process exited) without
    a result is failed after ``config.result_grace_s``; a job the scheduler forgot, or that cannot be
    asked about, after ``config.unknown_state_timeout_s``; a SLURM job pending for a reason that
    cannot resolve (``PartitionConfig``, ...) is cancelled at once (``config.cancel_unschedulable``).
    While it pends, every state check prints ``PENDING (<reason>)``.
    """
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    slurm = _is_slurm(job)
    probe = SlurmStateProbe() if slurm else None
    streamer = LogStreamer(job, out, err)
    what = f"job {job.job_id}" + (f" ({describe})" if describe else "")
    poll = config.poll_interval_s
    state_every = max(poll, config.state_interval_s)
    last_state = "SUBMITTED"
    state: str | None = last_state
    next_state_check = 0.0
    final_since: float | None = None
    unknown_since: float | None = None
    seen_active = False
    warned_sacct = False
    pending_since = time.monotonic()  # since submission, or since a requeue put it back in the queue

    def fail(reason: str, final_state: str) -> Outcome:
        streamer.pump(final=True)
        return Outcome(job.job_id, False, final_state, 1, f"{what} {reason}.\n{_stderr_tails(job)}",
                       _read_results(job))

    while True:
        streamer.pump()
        results = _read_results(job)
        if all(r is not None for r in results):
            streamer.pump(final=True)
            return _outcome_from_results(job, results, last_state)
        now = time.monotonic()
        waiting_final = final_since is not None or unknown_since is not None
        if now >= next_state_check or waiting_final:
            next_state_check = now + state_every
            if slurm:
                state = probe(job.job_id)
                if probe.sacct_available is False and not warned_sacct:
                    warned_sacct = True
                    print(f"emae launch: sacct unavailable ({probe.sacct_error.splitlines()[0] if probe.sacct_error else '?'});"
                          " following the job with squeue", file=err, flush=True)
            else:
                local = _local_state(job)
                state = "RUNNING" if local == "RUNNING" else local
            if slurm and state == "PENDING":
                never = slurm_info.never_resolves(probe.reason) if config.cancel_unschedulable else None
                if never:
                    return _cancel_unschedulable(job, probe, never, what, err)
                # every check, not only on changes: a long wait shows why, and that it is alive
                reason = f" ({probe.reason})" if probe.reason not in ("", "None") else ""
                if last_state not in ("PENDING", "SUBMITTED"):
                    pending_since = now
                queued = f", {_duration(now - pending_since)} in the queue" if last_state == "PENDING" else ""
                print(f"emae launch: {what}: PENDING{reason}{queued}", file=err, flush=True)
                last_state = state
            elif state is not None and state != last_state:
                print(f"emae launch: {what}: {state}", file=err, flush=True)
                last_state = state
            if state is None:  # the scheduler cannot be asked
                final_since = None
                unknown_since = unknown_since or now
                if now - unknown_since > config.unknown_state_timeout_s:
                    return fail(f": SLURM could not be asked about it for {config.unknown_state_timeout_s:g}s;"
                                " giving up (it may still be running: check squeue / scancel it)", "UNKNOWN")
            elif state == GONE:
                final_since = final_since or now
                limit = config.result_grace_s if seen_active else config.unknown_state_timeout_s
                if now - final_since > limit:
                    return fail("is no longer known to SLURM (squeue/sacct) and left no result: it died", GONE)
            elif (slurm and state in FINAL_STATES) or (not slurm and state != "RUNNING"):
                unknown_since = None
                final_since = final_since or now
                if now - final_since > config.result_grace_s:
                    if state == "COMPLETED" or state == "FINISHED":
                        reason = "ended without writing its result: the process died (killed or crashed)"
                    else:
                        reason = f"ended in state {state} without a result"
                    if not slurm and getattr(job, "_process", None) is not None:
                        rc = job._process.poll()
                        if rc is not None:
                            reason += f" (controller exit code {rc})"
                    return fail(reason, state)
            else:
                seen_active = True
                final_since = unknown_since = None
        time.sleep(poll)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _cancel_unschedulable(job: Any, probe: SlurmStateProbe, never: str, what: str, err: IO[str]) -> Outcome:
    reason, request = probe.reason, probe.request
    print(f"emae launch: {what}: PENDING ({reason}): it can never start; cancelling it", file=err, flush=True)
    cancel(job, err=err)
    message = (f"{what} can never start: SLURM keeps it pending with reason {reason} ({never}); it was "
               f"cancelled. It asked for: {request or '?'}. Ask for less (what the nodes have: "
               f"sinfo -N -o '%N %c %m %G'), or pick another partition.")
    return Outcome(job.job_id, False, "CANCELLED", 1, message, _read_results(job))


# ----------------------------------------------------------------------------------------- signals


class Interrupted(BaseException):
    """Raised inside the wait when SIGINT/SIGTERM/SIGHUP arrives."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _SignalGuard:
    """While active: a signal is recorded; once `armed`, it raises :class:`Interrupted` at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.armed = False

    def handler(self, signum: int, frame: Any) -> None:
        self.signum = signum
        if self.armed:
            raise Interrupted(signum)

    def arm(self) -> None:
        self.armed = True
        if self.signum is not None:
            raise Interrupted(self.signum)


@contextmanager
def _trap_signals() -> Iterator[_SignalGuard]:
    guard = _SignalGuard()
    if threading.current_thread() is not threading.main_thread():
        yield guard  # signals can only be trapped in the main thread
        return
    previous = {}
    for sig in HANDLED_SIGNALS:
        try:
            previous[sig] = signal.signal(sig, guard.handler)
        except (ValueError, OSError):
            pass
    try:
        yield guard
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def cancel(job: Any, *, err: IO[str] | None = None, confirm_s: float = 5.0) -> None:
    """Cancel `job` (``scancel`` on SLURM; SIGINT to submitit's local controller) and wait a few
    seconds for the scheduler to confirm."""
    err = sys.stderr if err is None else err
    try:
        job.cancel(check=False)
    except Exception as exc:  # noqa: BLE001
        print(f"emae launch: cancelling job {job.job_id} failed: {exc}", file=err, flush=True)
        return
    deadline = time.monotonic() + confirm_s
    if _is_slurm(job):
        probe = SlurmStateProbe()
        state = None
        while time.monotonic() < deadline:
            state = probe(job.job_id)
            if state in FINAL_STATES or state == GONE:
                break
            time.sleep(0.5)
        print(f"emae launch: cancelled SLURM job {job.job_id} (state {state or 'unknown'})", file=err, flush=True)
        return
    proc = getattr(job, "_process", None)
    if proc is not None:
        try:
            proc.wait(timeout=max(confirm_s, 10.0))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    print(f"emae launch: cancelled local job {job.job_id}", file=err, flush=True)


# -------------------------------------------------------------------------------------------- submit


def _slurm_additional(res: Resources) -> dict[str, Any]:
    extra: dict[str, Any] = {"requeue": True}  # preempted / node-failed jobs come back
    for key, value in res.additional_parameters.items():
        key = key.replace("_", "-")
        if key == "requeue" and value is False:
            extra.pop("requeue", None)
            extra["no-requeue"] = True
        elif value is False:
            extra.pop(key, None)
        else:
            extra[key] = value
    return extra


def precheck(config: LauncherConfig, stage: str) -> None:
    """Raise :class:`LaunchError` when no node of the stage's partition can run what it asks for
    (CPUs per node, memory, GPUs, nodes, time vs MaxTime): SLURM would accept the job and keep it
    pending forever. Does nothing when SLURM cannot be asked (a debug log says why)."""
    res = config.for_stage(stage)
    try:
        part = slurm_info.query_partition(res.partition)
    except slurm_info.PartitionNotFound as missing:
        key = config.key_of(stage, "partition")
        raise LaunchError(f"stage {stage} asks for partition {missing.name!r}, which SLURM does not have "
                          f"(partitions: {', '.join(missing.known) or 'none'}) ({key} / {config.origin_of(key)})"
                          ) from None
    if part is None:
        return
    problems = slurm_info.request_problems(config, stage, part)
    if len(problems) == 1:
        raise LaunchError(problems[0])
    if problems:
        raise LaunchError(f"stage {stage} does not fit {part.describe()}:\n  " + "\n  ".join(problems))
    log.debug("stage %s fits %s", stage, part.describe())


def make_executor(config: LauncherConfig, stage: str) -> Any:
    """A configured ``submitit.AutoExecutor`` for `stage` (``kind`` slurm or submitit-local). On
    SLURM, the request is :func:`precheck`-ed against its partition first (unless ``config.precheck``
    is off), so nothing that could never start gets submitted."""
    import submitit

    if config.kind == "local":
        raise ConfigError("launcher kind 'local' runs a subprocess, not a submitit executor")
    res = config.for_stage(stage)
    folder = config.folder.replace("{stage}", stage)
    cluster = "slurm" if config.kind == "slurm" else "local"
    try:
        executor = submitit.AutoExecutor(folder=folder, cluster=cluster,
                                         slurm_max_num_timeout=config.max_num_timeout)
    except RuntimeError as exc:  # 'Could not detect "srun"'
        raise LaunchError(f"launcher kind 'slurm' but this machine has no SLURM client (srun): {exc}") from None
    params: dict[str, Any] = {
        "name": f"emae-{stage}",
        "timeout_min": res.time_min,
        "nodes": res.nodes,
        "tasks_per_node": res.tasks_per_node,
        "cpus_per_task": res.cpus_per_task,
    }
    if res.gpus_per_node:
        params["gpus_per_node"] = res.gpus_per_node
    if res.mem_gb is not None:
        params["mem_gb"] = res.mem_gb
    if cluster == "slurm":
        setup = [f"export PYTHONPATH={_emae_root()}${{PYTHONPATH:+:$PYTHONPATH}}", *res.setup]
        params.update(
            slurm_setup=setup,
            slurm_signal_delay_s=config.signal_delay_s,
            slurm_additional_parameters=_slurm_additional(res),
            slurm_srun_args=list(SRUN_ARGS),
        )
        for key in ("partition", "account", "qos"):
            value = getattr(res, key)
            if value:
                params[f"slurm_{key}"] = value
    elif res.setup:
        params["local_setup"] = list(res.setup)
    try:
        executor.update_parameters(**params)
    except ValueError as exc:
        raise ConfigError(f"launcher resources for stage {stage!r}: {exc}") from None
    if cluster == "slurm" and config.precheck:
        precheck(config, stage)
    return executor


def submit(
    argv: Sequence[str],
    *,
    stage: str,
    config: LauncherConfig,
    entry: str = DEFAULT_ENTRY,
) -> Any:
    """Submit ``entry(argv)`` (an emae command line) as one job; returns the ``submitit.Job``."""
    res = config.for_stage(stage)
    command = EmaeCommand(
        argv, entry=entry,
        bind_gpu_to_task=res.tasks_per_node > 1 and res.gpus_per_node >= res.tasks_per_node,
    )
    executor = make_executor(config, stage)
    old_pythonpath = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = _pythonpath_env()["PYTHONPATH"]  # the local executor's tasks import emae
    try:
        return executor.submit(command)
    except (subprocess.CalledProcessError, OSError) as exc:
        output = getattr(exc, "output", b"") or b""
        if isinstance(output, bytes):
            output = output.decode(errors="replace")
        raise LaunchError(f"submitting stage {stage!r} failed: {exc}\n{output}".rstrip()) from None
    except Exception as exc:
        # submitit's errors when sbatch refuses the job or no controller answers (FailedJobError)
        if type(exc).__name__ in ("FailedSubmissionError", "FailedJobError"):
            raise LaunchError(f"submitting stage {stage!r} failed: {str(exc).strip()}") from None
        raise
    finally:
        if old_pythonpath is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old_pythonpath


# -------------------------------------------------------------------------------------------- local


def local_command(argv: Sequence[str], *, entry: str = DEFAULT_ENTRY, nproc: int = 1) -> list[str]:
    """The command line that ``kind: local`` runs (torchrun-style when `nproc` > 1)."""
    runner = ["-m", "emae.launch._entry", entry, *map(str, argv)]
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *runner]
    return [sys.executable, *runner]


def run_local(
    argv: Sequence[str],
    *,
    stage: str,
    config: LauncherConfig,
    entry: str = DEFAULT_ENTRY,
    err: IO[str] | None = None,
) -> int:
    """``kind: local``: run the command as a subprocess sharing our stdout/stderr; SIGINT/SIGTERM are
    passed on to it (SIGKILL 15 s later). Returns its exit code (128+signal when interrupted)."""
    err = sys.stderr if err is None else err
    res = config.for_stage(stage)
    if res.nodes > 1:
        raise ConfigError(f"launcher kind 'local' cannot run stage {stage!r} on {res.nodes} nodes (nodes must be 1)")
    cmd = local_command(argv, entry=entry, nproc=res.tasks_per_node)
    sys.stdout.flush()
    with _trap_signals() as guard:
        proc = subprocess.Popen(cmd, env=_pythonpath_env())
        try:
            guard.arm()
            return_code = proc.wait()
        except Interrupted as stop:
            try:
                proc.send_signal(stop.signum)
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            print(f"emae launch: stage {stage!r} interrupted by signal {stop.signum}", file=err, flush=True)
            return 128 + stop.signum
    if return_code < 0:
        return_code = 128 - return_code
    if return_code != 0:
        print(f"emae launch: stage {stage!r}: the command exited with code {return_code}", file=err, flush=True)
    return return_code


# ------------------------------------------------------------------------------------------- launch


def launch(
    argv: Sequence[str],
    *,
    stage: str,
    config: LauncherConfig,
    entry: str = DEFAULT_ENTRY,
    out: IO[str] | None = None,
    err: IO[str] | None = None,
) -> int:
    """Run the emae command line `argv` for `stage` as `config` says; returns the exit code.

    ``kind: local``: a subprocess. Otherwise: submit with submitit, print the job id, stream the job's
    logs into `out`/`err`, wait; on SIGINT/SIGTERM/SIGHUP cancel the job (``scancel``) and return
    128+signal; a failed, cancelled or vanished job returns non-zero with the tail of its stderr.
    """
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    if config.kind == "local":
        return run_local(argv, stage=stage, config=config, entry=entry, err=err)
    describe = EmaeCommand(argv, entry=entry).describe()
    with _trap_signals() as guard:
        job = submit(argv, stage=stage, config=config, entry=entry)
        kind = "SLURM" if config.kind == "slurm" else "submitit-local"
        print(f"emae launch: stage {stage!r}: submitted {kind} job {job.job_id}: {describe}", file=out, flush=True)
        print(f"emae launch: job logs: {job.paths.stdout} / {job.paths.stderr.name}", file=out, flush=True)
        try:
            guard.arm()  # a signal that arrived during submission cancels the job now
            outcome = watch(job, config, out=out, err=err, describe=f"stage {stage!r}")
        except Interrupted as stop:
            name = signal.Signals(stop.signum).name
            print(f"emae launch: {name} received: cancelling job {job.job_id}", file=err, flush=True)
            guard.armed = False  # a second signal must not interrupt the cancellation
            cancel(job, err=err)
            return 128 + stop.signum
    if outcome.ok:
        print(f"emae launch: stage {stage!r}: job {job.job_id} completed", file=out, flush=True)
        return 0
    print(f"emae launch: error: stage {stage!r}: {outcome.message}", file=err, flush=True)
    return outcome.returncode or 1
