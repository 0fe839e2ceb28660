"""Run an emae command line locally or as a submitit job (SLURM, or submitit's local executor), stream
its logs, wait for it without ever hanging, and cancel it when we are interrupted.

submitit submits, requeues (EmaeCommand.checkpoint), tells a local job's state and gives the
results. What it lacks is added here: a SLURM job's state from squeue first (:mod:`emae.launch.slurm`:
without accounting, submitit's ``job.result()`` of a job that died waits forever), with bounded
waits for a job that ended or vanished without a result; the pending reason in the log, and the
cancellation of a job that can never start; the job's log streamed while it runs; ``scancel`` when
we get a signal.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable

from emae.errors import ConfigError, EmaeError
from emae.launch import slurm
from emae.launch.config import LauncherConfig, Resources
from emae.launch.job import DEFAULT_ENTRY, SRUN_ARGS, EmaeCommand
from emae.launch.signals import Interrupted, SignalGuard
from emae.launch.slurm import FINAL_STATES, GONE


class LaunchError(EmaeError):
    """The job could not be submitted (bad resources, no SLURM client, sbatch refused it)."""


@dataclass
class Outcome:
    """How a watched job ended."""

    job_id: str
    ok: bool
    state: str  # last scheduler state seen (COMPLETED, FAILED, ... or FINISHED/INTERRUPTED locally)
    returncode: int  # what `emae launch` exits with: 0, the command's own code, or 1
    message: str = ""  # one paragraph for humans (empty on success)


# ----------------------------------------------------------------------------------- environment

CHECKOUT = str(Path(__file__).resolve().parents[2])  # jobs import the emae of this checkout


def checkout_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment (default: ours) with this emae checkout first on PYTHONPATH."""
    env = dict(os.environ if env is None else env)
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != CHECKOUT]
    env["PYTHONPATH"] = os.pathsep.join([CHECKOUT, *parts])
    return env


@contextmanager
def submitting(what: str) -> Iterator[None]:
    """Around ``executor.submit``: this checkout on PYTHONPATH (the local executor's tasks inherit our
    environment), and sbatch's or submitit's refusal as one LaunchError naming `what`."""
    from submitit.core.utils import FailedJobError, FailedSubmissionError

    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = checkout_env()["PYTHONPATH"]
    try:
        yield
    except (subprocess.CalledProcessError, OSError, FailedJobError, FailedSubmissionError) as exc:
        output = getattr(exc, "output", None) or b""
        detail = output.decode(errors="replace") if isinstance(output, bytes) else str(output)
        raise LaunchError(f"{what} failed: {str(exc).strip()}\n{detail}".rstrip()) from None
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


# ---------------------------------------------------------------------------------------- submit


def _sbatch_options(res: Resources) -> dict[str, Any]:
    """``additional_parameters`` as submitit passes them to sbatch; preempted or node-failed jobs
    come back (``--requeue``) unless ``requeue: false``; ``key: false`` drops an option."""
    extra: dict[str, Any] = {"requeue": True}
    for key, value in res.additional_parameters.items():
        key = key.replace("_", "-")
        extra.pop(key, None)
        if key == "requeue" and value is False:
            extra["no-requeue"] = True
        elif value is not False:
            extra[key] = value
    return extra


def precheck(config: LauncherConfig, stage: str) -> None:
    """Raise :class:`LaunchError` when no node of the stage's partition can run what it asks for
    (CPUs per node, memory, GPUs, nodes, time vs MaxTime): SLURM would accept the job and keep it
    pending forever. Does nothing when SLURM cannot be asked (a debug log says why)."""
    try:
        part = slurm.query_partition(config.for_stage(stage).partition)
    except slurm.PartitionNotFound as missing:
        key = config.key_of(stage, "partition")
        raise LaunchError(f"stage {stage} asks for partition {missing.name!r}, which SLURM does not have "
                          f"(partitions: {', '.join(missing.known) or 'none'}) ({key} / {config.origin_of(key)})"
                          ) from None
    problems = slurm.request_problems(config, stage, part) if part is not None else []
    if len(problems) > 1:
        raise LaunchError(f"stage {stage} does not fit {part.describe()}:\n  " + "\n  ".join(problems))
    if problems:
        raise LaunchError(problems[0])


def make_executor(config: LauncherConfig, stage: str) -> Any:
    """A configured ``submitit.AutoExecutor`` for `stage` (``kind`` slurm or submitit-local). On
    SLURM, the request is :func:`precheck`-ed against its partition first (unless ``config.precheck``
    is off), so nothing that could never start gets submitted."""
    import submitit

    if config.kind == "local":
        raise ConfigError("launcher kind 'local' runs a subprocess, not a submitit executor")
    res = config.for_stage(stage)
    cluster = "slurm" if config.kind == "slurm" else "local"
    try:
        executor = submitit.AutoExecutor(folder=config.folder.replace("{stage}", stage), cluster=cluster,
                                         slurm_max_num_timeout=config.max_num_timeout)
    except RuntimeError as exc:  # 'Could not detect "srun"'
        raise LaunchError(f"launcher kind 'slurm' but this machine has no SLURM client (srun): {exc}") from None
    params: dict[str, Any] = {"name": f"emae-{stage}", "timeout_min": res.time_min, "nodes": res.nodes,
                              "tasks_per_node": res.tasks_per_node, "cpus_per_task": res.cpus_per_task}
    if res.gpus_per_node:
        params["gpus_per_node"] = res.gpus_per_node
    if res.mem_gb is not None:
        params["mem_gb"] = res.mem_gb
    if cluster == "slurm":
        params.update(slurm_setup=[f"export PYTHONPATH={CHECKOUT}${{PYTHONPATH:+:$PYTHONPATH}}", *res.setup],
                      slurm_signal_delay_s=config.signal_delay_s, slurm_srun_args=list(SRUN_ARGS),
                      slurm_additional_parameters=_sbatch_options(res),
                      **{f"slurm_{key}": getattr(res, key) for key in ("partition", "account", "qos")
                         if getattr(res, key)})
    elif res.setup:
        params["local_setup"] = list(res.setup)
    try:
        executor.update_parameters(**params)
    except ValueError as exc:
        raise ConfigError(f"launcher resources for stage {stage!r}: {exc}") from None
    if cluster == "slurm" and config.precheck:
        precheck(config, stage)
    return executor


def submit(argv: Sequence[str], *, stage: str, config: LauncherConfig, entry: str = DEFAULT_ENTRY) -> Any:
    """Submit the emae command line `argv` (run by `entry`) as one job; returns the ``submitit.Job``."""
    res = config.for_stage(stage)
    command = EmaeCommand(argv, entry=entry,
                          bind_gpu_to_task=res.tasks_per_node > 1 and res.gpus_per_node >= res.tasks_per_node)
    executor = make_executor(config, stage)
    with submitting(f"submitting stage {stage!r}"):
        return executor.submit(command)


# ----------------------------------------------------------------------------------------- watch


@dataclass
class _Followed:
    """A log file being copied to `stream`: how far it was read, and its incomplete last line."""

    path: Path
    stream: IO[str]
    prefix: str
    offset: int = 0
    partial: bytes = b""


class LogStreamer:
    """Follows the job's per-task stdout/stderr files and copies complete lines to `out` / `err`
    (prefixed ``[task k]`` when the job has several tasks)."""

    def __init__(self, job: Any, out: IO[str], err: IO[str]) -> None:
        self._files = []
        for k in range(job.num_tasks):
            paths, prefix = job.task(k).paths, f"[task {k}] " if job.num_tasks > 1 else ""
            self._files += [_Followed(paths.stdout, out, prefix), _Followed(paths.stderr, err, prefix)]

    def pump(self, final: bool = False) -> None:
        """Copy what was added since the last call; `final`: the incomplete last lines too."""
        for log in self._files:
            try:
                with open(log.path, "rb") as f:
                    f.seek(log.offset)
                    data = f.read()
            except OSError:
                continue
            log.offset += len(data)
            data = log.partial + data
            # progress bars (tqdm) redraw with \r: each redraw becomes a line of the log; a trailing
            # \r may be the first half of \r\n
            keep = b"\r" if data.endswith(b"\r") and not final else b""
            *lines, rest = data[:len(data) - len(keep)].replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
            if final and rest:
                lines.append(rest)
            log.partial = b"" if final else rest + keep
            text = "".join(f"{log.prefix}{line.decode('utf-8', errors='replace')}\n" for line in lines)
            try:
                log.stream.write(text)
                log.stream.flush()
            except (OSError, ValueError):  # our own output is gone (a closed pipe): keep following the job
                pass


def _has_results(job: Any) -> bool:
    return all(job.task(k).paths.result_pickle.exists() for k in range(job.num_tasks))


def _stderr_tails(job: Any, lines: int = 30) -> str:
    """The last `lines` of each task's stderr (its stdout when stderr is empty), for a failure."""
    parts = []
    for k in range(job.num_tasks):
        task = job.task(k)
        text = "\n".join((task.stderr() or task.stdout() or "").splitlines()[-lines:])
        if text:
            which = f"task {k}: " if job.num_tasks > 1 else ""
            parts.append(f"--- {which}{task.paths.stderr} (last {lines} lines) ---\n{text}")
    return "\n".join(parts) or f"(no log output; see {job.paths.folder})"


def _srun_task_errors(job: Any) -> str:
    """srun's own lines about tasks that ended badly, in its words and order (``srun: emae-n2: task 1:
    Killed; ...``): which node's task brought a multi-task job down. srun writes them to the batch log,
    which is task 0's."""
    found = re.findall(r"(?:^|\r)srun: error: (\S+: tasks? [\d,-]+: [^\r\n]+)", job.task(0).stderr() or "", re.M)
    return f"srun: {'; '.join(dict.fromkeys(found))}\n" if found else ""


def _outcome(job: Any, state: str) -> Outcome:
    """The outcome of a job whose tasks all wrote their result."""
    error = job.exception()
    if error is not None:
        return Outcome(job.job_id, False, state, 1, f"job {job.job_id} raised an exception: {error}")
    codes = job.results()
    for k, code in enumerate(codes):
        if isinstance(code, int) and not isinstance(code, bool) and code != 0:
            return Outcome(job.job_id, False, state, code, f"job {job.job_id}: the command exited with "
                           f"code {code} (task {k}).\n{_stderr_tails(job)}")
    return Outcome(job.job_id, True, state, 0)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def watch(job: Any, config: LauncherConfig, *, out: IO[str] | None = None, err: IO[str] | None = None,
          describe: str = "") -> Outcome:
    """Stream `job`'s logs into `out`/`err` and wait until it has a result or is known dead.

    Never waits forever: a job in a final state (locally: whose controller exited) without a result
    fails after ``config.result_grace_s``; a job SLURM forgot, or that it cannot be asked about,
    after ``config.unknown_state_timeout_s`` (``result_grace_s`` once it was seen running). A job
    pending for a reason that cannot resolve (``PartitionConfig``, ...) is cancelled at once
    (``config.cancel_unschedulable``); any other pending reason is printed at every state check.
    """
    import submitit

    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    on_slurm = isinstance(job, submitit.SlurmJob)
    streamer = LogStreamer(job, out, err)
    what = f"job {job.job_id}" + (f" ({describe})" if describe else "")
    last, queued_at, next_check = "SUBMITTED", time.monotonic(), 0.0
    seen_active, trouble_since, told_gone = False, None, False

    def say(text: str) -> None:
        print(f"emae launch: {what}: {text}", file=err, flush=True)

    while True:
        streamer.pump()
        if _has_results(job):
            streamer.pump(final=True)
            return _outcome(job, last)
        now = time.monotonic()
        if now < next_check:
            time.sleep(config.poll_interval_s)
            continue
        next_check = now + config.state_interval_s
        found = slurm.job_state(job.job_id) if on_slurm else slurm.JobState(str(job.state).upper())
        state = found.state
        if state == "PENDING":
            never = slurm.never_resolves(found.reason) if config.cancel_unschedulable else None
            if never:
                return _cancel_unschedulable(job, found, never, what, say, err)
            if last not in ("PENDING", "SUBMITTED"):
                queued_at = now  # back in the queue after a requeue
            reason = f" ({found.reason})" if found.reason not in ("", "None") else ""
            # every check, not only on changes: a long wait shows why, and that it is alive
            say(f"PENDING{reason}" + (f", {_duration(now - queued_at)} in the queue" if last == "PENDING" else ""))
        elif state is not None and state != last:
            say(state)
        last = state or last
        if state is not None and not _ended(state, on_slurm):
            seen_active, trouble_since = True, None
            continue
        trouble_since = trouble_since or now
        limit, why = _patience(state, seen_active, config)
        if state == GONE and not told_gone:
            told_gone = True
            say(f"squeue no longer lists it and sacct has no state for it (no accounting?); waiting "
                f"{limit:g}s for its result")
        if now - trouble_since > limit:
            streamer.pump(final=True)
            return Outcome(job.job_id, False, state or "UNKNOWN", 1,
                           f"{what} {why}.\n{_srun_task_errors(job)}{_stderr_tails(job)}")
        next_check = now  # no longer running: look again at every poll
        time.sleep(config.poll_interval_s)


def _ended(state: str, on_slurm: bool) -> bool:
    """Whether the job runs no more: a final SLURM state or GONE; locally, its controller exited."""
    return (state in FINAL_STATES or state == GONE) if on_slurm else state != "RUNNING"


def _patience(state: str | None, seen_active: bool, config: LauncherConfig) -> tuple[float, str]:
    """How long a job in `state` (None: SLURM cannot be asked) is waited on for its result, and why
    it failed when that is over."""
    if state is None:
        return config.unknown_state_timeout_s, (f"is unknown: SLURM could not be asked about it for "
                                                f"{config.unknown_state_timeout_s:g}s; giving up (it may "
                                                "still be running: check squeue / scancel it)")
    if state == GONE:
        return (config.result_grace_s if seen_active else config.unknown_state_timeout_s,
                "is no longer known to SLURM (squeue/sacct) and left no result: it died")
    return config.result_grace_s, (f"ended in state {state} without writing its result (killed, crashed, "
                                   "out of memory or time)")


def _cancel_unschedulable(job: Any, found: slurm.JobState, never: str, what: str,
                          say: Callable[[str], None], err: IO[str]) -> Outcome:
    say(f"PENDING ({found.reason}): it can never start; cancelling it")
    cancel(job, err=err)
    return Outcome(job.job_id, False, "CANCELLED", 1, (
        f"{what} can never start: SLURM keeps it pending with reason {found.reason} ({never}); it was "
        f"cancelled. It asked for: {found.request or '?'}. Ask for less (what the nodes have: "
        f"sinfo -N -o '%N %c %m %G'), or pick another partition."))


def cancel(job: Any, *, err: IO[str] | None = None, confirm_s: float = 10.0) -> None:
    """Cancel `job` (``scancel`` on SLURM; SIGINT to submitit's local controller, which stops the
    tasks) and wait up to `confirm_s` for it to end."""
    import submitit

    err = sys.stderr if err is None else err
    try:
        job.cancel(check=False)
    except Exception as exc:  # noqa: BLE001 -- say so, and let the caller exit
        print(f"emae launch: cancelling job {job.job_id} failed: {exc}", file=err, flush=True)
        return
    on_slurm = isinstance(job, submitit.SlurmJob)
    deadline, state = time.monotonic() + confirm_s, None
    while time.monotonic() < deadline:
        state = slurm.job_state(job.job_id).state if on_slurm else str(job.state).upper()
        if state is not None and _ended(state, on_slurm):
            break
        time.sleep(0.5)
    print(f"emae launch: cancelled {'SLURM' if on_slurm else 'local'} job {job.job_id} "
          f"(state {state or 'unknown'})", file=err, flush=True)


# ----------------------------------------------------------------------------------------- local


def local_command(argv: Sequence[str], *, entry: str = DEFAULT_ENTRY, nproc: int = 1) -> list[str]:
    """The command line that ``kind: local`` runs (torchrun-style when `nproc` > 1)."""
    runner = ["-m", entry] if ":" not in entry else ["-m", "emae.launch._entry", entry]
    runner += map(str, argv)
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *runner]
    return [sys.executable, *runner]


def run_local(argv: Sequence[str], *, stage: str, config: LauncherConfig, entry: str = DEFAULT_ENTRY,
              err: IO[str] | None = None) -> int:
    """``kind: local``: run the command as a subprocess sharing our stdout/stderr; SIGINT/SIGTERM/SIGHUP
    are passed on to it (SIGKILL 15 s later). Returns its exit code (128+signal when interrupted)."""
    err = sys.stderr if err is None else err
    res = config.for_stage(stage)
    if res.nodes > 1:
        raise ConfigError(f"launcher kind 'local' cannot run stage {stage!r} on {res.nodes} nodes (nodes must be 1)")
    sys.stdout.flush()
    with SignalGuard() as guard:
        proc = subprocess.Popen(local_command(argv, entry=entry, nproc=res.tasks_per_node), env=checkout_env())
        try:
            guard.arm()
            code = proc.wait()
        except Interrupted as stop:
            proc.send_signal(stop.signum)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            print(f"emae launch: stage {stage!r} interrupted by signal {stop.signum}", file=err, flush=True)
            return 128 + stop.signum
    code = 128 - code if code < 0 else code
    if code:
        print(f"emae launch: stage {stage!r}: the command exited with code {code}", file=err, flush=True)
    return code


# ---------------------------------------------------------------------------------------- launch


def launch(argv: Sequence[str], *, stage: str, config: LauncherConfig, entry: str = DEFAULT_ENTRY,
           out: IO[str] | None = None, err: IO[str] | None = None) -> int:
    """Run the emae command line `argv` for `stage` as `config` says; returns the exit code.

    ``kind: local``: a subprocess. Otherwise: submit with submitit, print the job id, stream the job's
    logs into `out`/`err`, wait; on SIGINT/SIGTERM/SIGHUP cancel the job (``scancel``) and return
    128+signal; a failed, cancelled or vanished job returns non-zero with the tail of its stderr.
    """
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    if config.kind == "local":
        return run_local(argv, stage=stage, config=config, entry=entry, err=err)
    with SignalGuard() as guard:
        job = submit(argv, stage=stage, config=config, entry=entry)
        kind = "SLURM" if config.kind == "slurm" else "submitit-local"
        print(f"emae launch: stage {stage!r}: submitted {kind} job {job.job_id}: "
              f"{EmaeCommand(argv, entry=entry).describe()}", file=out, flush=True)
        print(f"emae launch: job logs: {job.paths.stdout} / {job.paths.stderr.name}", file=out, flush=True)
        try:
            guard.arm()  # a signal that arrived during submission cancels the job now
            outcome = watch(job, config, out=out, err=err, describe=f"stage {stage!r}")
        except Interrupted as stop:
            print(f"emae launch: {signal.Signals(stop.signum).name} received: cancelling job {job.job_id}",
                  file=err, flush=True)
            cancel(job, err=err)
            return 128 + stop.signum
    if outcome.ok:
        print(f"emae launch: stage {stage!r}: job {job.job_id} completed", file=out, flush=True)
        return 0
    print(f"emae launch: error: stage {stage!r}: {outcome.message}", file=err, flush=True)
    return outcome.returncode or 1
