"""Helpers for the launcher tests (test_launcher.py, test_local_slurm.py): run `emae launch` in a
subprocess with its stdout/stderr in files, so a test can watch them while it runs and signal it."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
SELFTEST = "emae.launch.selftest:main"
JOB_ID = re.compile(r"submitted (?:SLURM|submitit-local) job (\d+)")


def launcher_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
    env.setdefault("OMP_NUM_THREADS", "1")
    env.pop("SLURM_JOB_ID", None)  # never look like we run inside a job
    return env


def wait_until(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.2) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


class Launch:
    """A running `emae launch --entry emae.launch.selftest:main ...` in `workdir`."""

    def __init__(self, workdir: Path, command: list[str], overrides: list[str], stage: str = "t",
                 entry: str = SELFTEST, unset: tuple[str, ...] = ()) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        n = len(list(workdir.glob("launch-*.out")))
        self.out_path = workdir / f"launch-{n}.out"
        self.err_path = workdir / f"launch-{n}.err"
        self.argv = [sys.executable, "-m", "emae.cli", "launch", "--stage", stage, "--entry", entry,
                     *overrides, "--", *command]
        self._out = self.out_path.open("w")
        self._err = self.err_path.open("w")
        self.started = time.monotonic()
        env = {k: v for k, v in launcher_env().items() if k not in unset}
        self.proc = subprocess.Popen(self.argv, cwd=workdir, env=env, stdout=self._out,
                                     stderr=self._err, stdin=subprocess.DEVNULL)

    @property
    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def job_id(self, timeout: float = 30.0) -> str:
        match = wait_until(lambda: JOB_ID.search(self.stdout), timeout, "the job id in the launcher output")
        return match.group(1)  # type: ignore[union-attr]

    def wait_for_output(self, text: str, timeout: float) -> None:
        try:
            wait_until(lambda: text in self.output, timeout, f"{text!r} in the launcher output")
        except AssertionError:
            raise AssertionError(f"{text!r} not in the launcher output:\n{self.describe()}") from None

    def wait(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGTERM)  # it cancels its job
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            raise AssertionError(f"emae launch still running after {timeout:g}s:\n{self.describe()}") from None
        finally:
            self.elapsed = time.monotonic() - self.started
        self._out.close()
        self._err.close()
        return code

    def describe(self) -> str:
        return (f"$ {' '.join(self.argv)}\n--- stdout ---\n{self.stdout[-4000:]}\n"
                f"--- stderr ---\n{self.stderr[-4000:]}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is dead for our purposes
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


# The multi-node cluster of `tools/local-slurm.sh up --nodes 2` (beside the single-node one): its
# clients find it through SLURM_CONF.
MULTINODE_CONF = Path(os.environ.get("EMAE_SLURM_MULTI_STATE", "/var/lib/emae-local-slurm-multi")) / "etc" / "slurm.conf"


def slurm_is_up(conf: Path | None = None, nodes: int = 1) -> tuple[bool, str]:
    """(True, "") when sinfo (of the cluster configured by `conf`; None: the default one) shows
    `nodes` usable nodes, else (False, why)."""
    start = "tools/local-slurm.sh up" + (f" --nodes {nodes}" if conf is not None else "")
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return False, "no SLURM client (sinfo/sbatch) on this machine"
    if conf is not None and not conf.exists():
        return False, f"no {nodes}-node cluster is configured ({conf} does not exist); start one with: {start}"
    env = None if conf is None else {**os.environ, "SLURM_CONF": str(conf)}
    try:
        proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, timeout=20, env=env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"sinfo failed: {exc}"
    if proc.returncode != 0:
        return False, f"no SLURM controller answers sinfo ({proc.stderr.strip()[:200]}); start one with: {start}"
    states = [s.strip().rstrip("*~#!%$@^-") for s in proc.stdout.split()]
    usable = sum(s in ("idle", "mixed", "allocated", "completing") for s in states)
    if usable < nodes:
        what = "no SLURM node is up" if nodes == 1 else f"{usable} of the {nodes} nodes needed are up"
        return False, f"{what} (sinfo states: {states}); start one with: {start}"
    return True, ""


def slurm_has_accounting() -> bool:
    try:
        proc = subprocess.run(["sacct", "-n", "-X", "-S", "now"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0
