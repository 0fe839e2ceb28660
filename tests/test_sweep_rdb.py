"""`emae sweep` on an RDB storage served by a real MariaDB server (started here, on a private unix
socket), with four workers at once as a SLURM array on the local cluster (tools/local-slurm.sh;
marked `slurm`, skipped when none is up). One worker is SIGKILLed mid-trial: Optuna's heartbeat
fails its trial after the grace period and Optuna's retry callback queues it again; the retry
resumes the checkpoint, no completed trial is lost and the study ends with exactly one trial more
than its grid."""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from conftest_slurm import slurm_is_up, wait_until
from test_sweep import grid, overrides, small_digits, sweep_here  # noqa: F401 - fixture
from test_sweep_slurm import FAST

UP, WHY = slurm_is_up()
SERVER = ("mariadbd", "mariadb-install-db", "mariadb")
pytestmark = [pytest.mark.slurm, pytest.mark.skipif(not UP, reason=WHY),
              pytest.mark.skipif(not all(map(shutil.which, SERVER)),
                                 reason="no MariaDB server (apt-get install mariadb-server)")]


@pytest.fixture(scope="module")
def mariadb_url() -> Iterator[str]:
    """A fresh MariaDB server (socket only, no TCP) with a database and user for Optuna."""
    pytest.importorskip("pymysql", reason="the MySQL driver (pip install -e '.[workflow]')")
    root = Path(tempfile.mkdtemp(prefix="emae-mdb-"))  # short: a unix socket path has 108 bytes
    sock, user = root / "mysqld.sock", getpass.getuser()
    subprocess.run(["mariadb-install-db", "--no-defaults", f"--datadir={root / 'data'}", f"--user={user}",
                    "--auth-root-authentication-method=socket", f"--auth-root-socket-user={user}",
                    "--skip-test-db"], check=True, capture_output=True, timeout=120)
    server = subprocess.Popen(["mariadbd", "--no-defaults", f"--datadir={root / 'data'}", f"--socket={sock}",
                               "--skip-networking", f"--user={user}", f"--log-error={root / 'error.log'}",
                               "--innodb-buffer-pool-size=32M", f"--pid-file={root / 'mysqld.pid'}"])
    sql = ["mariadb", "--no-defaults", f"--socket={sock}", f"-u{user}", "-e"]
    try:
        wait_until(lambda: subprocess.run([*sql, "select 1"], capture_output=True).returncode == 0, 60,
                   "MariaDB to answer")
        subprocess.run([*sql, "CREATE DATABASE optuna; CREATE USER 'emae'@'localhost' IDENTIFIED BY 'emae';"
                        " GRANT ALL ON optuna.* TO 'emae'@'localhost';"], check=True, timeout=30)
        yield f"mysql+pymysql://emae:emae@localhost/optuna?unix_socket={sock}"
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        shutil.rmtree(root, ignore_errors=True)


def _kill_a_worker_mid_trial(out: Path, url: str, found: dict[str, Any], stop: threading.Event) -> None:
    """SIGKILL the worker of the first trial that saved its epoch-1 checkpoint (and is not done)."""
    study = None
    while not stop.is_set() and "killed" not in found:
        time.sleep(0.1)
        for folder in sorted((out / "trials").glob("*")):
            log, ckpt = folder / "log.jsonl", folder / "checkpoints" / "last.pt"
            try:
                ready = (len(log.read_text().splitlines()) == 1 and ckpt.stat().st_mtime >= log.stat().st_mtime
                         and not (folder / "metrics.json").exists())
            except FileNotFoundError:
                continue
            if not ready:
                continue
            study = study or optuna.load_study(study_name=out.name, storage=url)
            trials = study.get_trials()
            trial = next(t for t in trials if t.user_attrs.get("run_dir") == f"trials/{folder.name}")
            pid = trial.user_attrs["owner"]["pid"]
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            assert b"submitit" in cmdline, cmdline  # our array task's process, nothing else
            found.update(first_epoch=log.read_text().splitlines()[0], job=trial.user_attrs["owner"]["slurm_job"],
                         complete={t.number: t.values for t in trials if t.state == TrialState.COMPLETE})
            os.kill(pid, signal.SIGKILL)
            found["killed"] = trial.number
            return


@pytest.mark.slow  # once in CI: its own server, not the cluster's accounting, so no rerun without it
@pytest.mark.timeout(240)
def test_four_slurm_workers_on_mariadb_survive_a_killed_worker(mariadb_url: str, small_digits: Path,  # noqa: F811
                                                               tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "rdb"
    args = ["sweep", "-o", str(out), *overrides(
        small_digits, *grid([0.75], [1, 2, 3, 4]), f"sweep.storage={mariadb_url}", "sweep.backend=slurm",
        "sweep.workers=4", "sweep.budget.epochs=2", "sweep.heartbeat_seconds=1", "sweep.stale_after_seconds=3",
        "sweep.max_retries=1", *FAST, "launcher.stages.sweep_worker.gpus_per_node=0",  # 4 jobs on 2 cores
        "launcher.resources.time_min=10", "launcher.resources.cpus_per_task=1")]
    found: dict[str, Any] = {}
    stop = threading.Event()
    killer = threading.Thread(target=_kill_a_worker_mid_trial, args=(out, mariadb_url, found, stop), daemon=True)
    killer.start()
    try:
        printed = sweep_here(args, capsys)
    finally:
        stop.set()
        killer.join(10)
    assert "killed" in found, f"no trial was caught mid-way:\n{printed}"
    assert "submitted 4 worker job(s)" in printed and not (out / "study.journal").exists()
    study = optuna.load_study(study_name="rdb", storage=mariadb_url)
    trials = {t.number: t for t in study.trials}
    killed = trials[found["killed"]]
    # exact: the 4 grid cells and one retry; the killed trial failed by Optuna's heartbeat, nothing else
    assert len(trials) == 5 and [t.state for t in trials.values()].count(TrialState.COMPLETE) == 4
    assert killed.state == TrialState.FAIL and "failure" not in killed.user_attrs  # stale, not a raise
    retry = next(t for t in trials.values() if t.system_attrs.get("retry_history") == [killed.number])
    assert retry.state == TrialState.COMPLETE and retry.params == killed.params
    assert sorted(t.params["num_parts"] for t in trials.values() if t.state == TrialState.COMPLETE) == [1, 2, 3, 4]
    for number, values in found["complete"].items():  # no completed trial lost
        assert trials[number].state == TrialState.COMPLETE and trials[number].values == values
    # the retry resumed the killed attempt's folder from its checkpoint (the epoch logged before the kill)
    folder = out / killed.user_attrs["run_dir"]
    assert retry.user_attrs["run_dir"] == killed.user_attrs["run_dir"]
    lines = (folder / "log.jsonl").read_text().splitlines()
    assert lines[0] == found["first_epoch"] and len(lines) == 2
    logs = "".join(p.read_text(errors="replace") for p in (out / "workers").glob("*.log"))
    assert f"resuming from {folder.resolve()}/checkpoints/last.pt" in logs
    # four array tasks at once, each a worker of the study
    array = found["job"].split("_")[0]
    assert {t.user_attrs["owner"]["slurm_job"] for t in trials.values() if t.number < 4} == {
        f"{array}_{i}" for i in range(4)}
    table = pd.read_csv(out / "trials.csv").set_index("number")
    print(table[["params_num_parts", "state", "value_knn_top1", "retry_of", "retried_as", "worker"]].to_string())
    assert table.loc[killed.number, "retried_as"] == retry.number and table.loc[retry.number, "retry_of"] == killed.number
    metrics = pd.read_json(out / "metrics.json", typ="series")
    assert (metrics["complete"], metrics["failed"], metrics["retried"], metrics["trials"]) == (4, 1, 1, 5)
