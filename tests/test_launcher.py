"""`emae launch` without SLURM: the settings, and the submitit code path with submitit's local
executor (`kind: submitit-local`) and a plain subprocess (`kind: local`). Cheap selftest commands
(emae.launch.selftest) stand in for training."""

from __future__ import annotations

import io
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest_slurm import SELFTEST, Launch, launcher_env, pid_alive, wait_until
from emae.errors import ConfigError
from emae.launch import (GONE, JobState, LauncherConfig, LaunchError, SignalGuard, call_entry, job_state, launch,
                         load_launcher_config, local_command, precheck, watch)
from emae.launch.cli import split_rest
from emae.launch.signals import Interrupted
from emae.launch.slurm import fit_resources, gres_gpus, never_resolves, parse_slurm_minutes, query_partition, request_problems

pytestmark = pytest.mark.timeout(120)

FAST = ["poll_interval_s=0.2", "state_interval_s=0.2", "result_grace_s=2"]


def sublocal(tmp_path: Path) -> list[str]:
    return ["kind=submitit-local", f"folder={tmp_path}/logs/%j", *FAST]


# ------------------------------------------------------------------------------------------ settings


def test_defaults_run_locally() -> None:
    config = load_launcher_config(None)
    assert config.kind == "local"
    assert config.for_stage("anything").gpus_per_node == 0


def test_per_stage_overrides_merge() -> None:
    config = LauncherConfig.model_validate({
        "kind": "slurm",
        "resources": {"partition": "cpu", "time_min": 30, "additional_parameters": {"constraint": "x"},
                      "setup": ["module load a"]},
        "stages": {"pretrain": {"partition": "gpu", "gpus_per_node": 4, "tasks_per_node": 4,
                                "additional_parameters": {"exclusive": True}, "setup": ["module load b"]}},
    })
    pre = config.for_stage("pretrain")
    assert (pre.partition, pre.gpus_per_node, pre.tasks_per_node, pre.time_min) == ("gpu", 4, 4, 30)
    assert pre.additional_parameters == {"constraint": "x", "exclusive": True}
    assert pre.setup == ["module load a", "module load b"]
    report = config.for_stage("report")
    assert (report.partition, report.gpus_per_node) == ("cpu", 0)


def test_yaml_launcher_section_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "launcher.yaml"
    path.write_text("launcher:\n  kind: slurm\n  resources: {partition: gpu}\n")
    config = load_launcher_config(path, ["stages.pretrain.gpus_per_node=2", "launcher.resources.mem_gb=7.5",
                                         "resources.qos=null"])
    assert config.kind == "slurm"
    assert config.for_stage("pretrain").gpus_per_node == 2
    assert config.resources.mem_gb == 7.5 and config.resources.qos is None
    # a bare mapping is accepted too
    path.write_text("kind: submitit-local\n")
    assert load_launcher_config(path).kind == "submitit-local"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("launcher:\n  kind: pbs\n", ["launcher.yaml: launcher", "kind", "'pbs'", "local"]),
        ("launcher:\n  resources: {gpus: 2}\n", ["launcher.resources.gpus is not a known key"]),
        ("launcher:\n  stages: {pretrain: {time_min: -5}}\n", ["stages.pretrain.time_min", "-5"]),
        ("- 1\n- 2\n", ["expected a mapping"]),
    ],
)
def test_bad_settings_name_file_key_value(tmp_path: Path, text: str, expected: list[str]) -> None:
    path = tmp_path / "launcher.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_launcher_config(path)
    for part in expected:
        assert part in str(info.value)


def test_bad_override() -> None:
    with pytest.raises(ConfigError, match="key=value"):
        load_launcher_config(None, ["kind"])
    with pytest.raises(ConfigError, match="nodes"):
        load_launcher_config(None, ["resources.nodes=zero"])


def test_cli_needs_double_dash() -> None:
    assert split_rest(["kind=slurm", "--", "pretrain", "--out", "x"]) == (["kind=slurm"], ["pretrain", "--out", "x"])
    with pytest.raises(ConfigError, match="--"):
        split_rest(["pretrain"])
    with pytest.raises(ConfigError, match="before"):
        split_rest(["kind=slurm", "--stage", "x", "--", "pretrain"])


def test_call_entry_exit_codes() -> None:
    assert call_entry(SELFTEST, ["echo", "x"]) == 0
    assert call_entry(SELFTEST, ["fail", "4"]) == 4
    assert call_entry("emae.cli:main", ["--version"]) == 0  # argparse's SystemExit(0)
    assert call_entry("emae.cli:main", ["no-such-command"]) == 2
    assert call_entry("emae", ["--version"]) == 0  # the default: the emae program, `python -m emae`


def test_a_requeue_that_breaks_a_checkpoint_write_still_ends_the_job_as_requeued(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """submitit's time-out handler calls EmaeCommand.checkpoint and raises SystemExit wherever the
    command is. Inside torch.save that SystemExit comes back as a RuntimeError: the job must still
    leave as requeued (SystemExit, no result), or its failed result ends the requeued job (seen in CI)."""
    import torch

    from emae.launch import job
    from emae.train.checkpoint import save_checkpoint

    class TimeLimitMidWrite(io.RawIOBase):
        writes = 0

        def writable(self) -> bool:
            return True

        def write(self, data: bytes) -> int:  # type: ignore[override]
            TimeLimitMidWrite.writes += 1
            if TimeLimitMidWrite.writes == 3:
                job.EmaeCommand(["pretrain"]).checkpoint()  # what submitit's SIGUSR2 handler does
                raise SystemExit(-1)
            return len(data)

    def train(argv: list[str]) -> int:
        torch.save({"w": torch.zeros(64)}, TimeLimitMidWrite())
        return 0

    monkeypatch.setattr(job, "_REQUEUEING", False)
    monkeypatch.setattr(job, "resolve_entry", lambda entry: train)
    with pytest.raises(RuntimeError, match="unexpected pos"):  # the mechanism: torch rewraps the exit
        train([])
    TimeLimitMidWrite.writes = 0
    monkeypatch.setattr(job, "_REQUEUEING", False)
    with pytest.raises(SystemExit) as stop:
        job.call_entry("emae", ["pretrain"])
    assert stop.value.code == -1
    # the checkpoint a requeue interrupts is left as it was: the requeued run resumes from it
    save_checkpoint(tmp_path / "last.pt", {"step": 1})
    TimeLimitMidWrite.writes = 0
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda state, handle: real_save(state, TimeLimitMidWrite()))
    with pytest.raises(RuntimeError, match="unexpected pos"):
        save_checkpoint(tmp_path / "last.pt", {"step": 2})
    assert torch.load(tmp_path / "last.pt")["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_local_command_uses_torchrun_for_several_tasks() -> None:
    assert local_command(["x"], nproc=1)[1:] == ["-m", "emae", "x"]
    assert local_command(["x"], entry=SELFTEST)[1:] == ["-m", "emae.launch._entry", SELFTEST, "x"]
    cmd = local_command(["x"], nproc=2)
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--standalone"] and "--nproc-per-node=2" in cmd


def test_dry_run_prints_stage_resources(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "emae.cli", "launch", "--stage", "t", "--dry-run", "kind=slurm",
         "stages.t.gpus_per_node=3", "--", "pretrain"],
        cwd=tmp_path, env=launcher_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "gpus_per_node: 3" in proc.stdout and "kind: slurm" in proc.stdout


def test_bad_settings_exit_2_with_a_clean_message(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "emae.cli", "launch", "--stage", "t", "kind=pbs", "--", "pretrain"],
        cwd=tmp_path, env=launcher_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith("emae: error: invalid params:\n  override 'kind=pbs': launcher.kind = 'pbs'")
    assert "Traceback" not in proc.stderr


def test_signal_guard_records_the_first_signal_and_interrupts_once_armed() -> None:
    """The guard `emae launch` and `emae sweep` share: before `arm()` a signal is only recorded (and
    `on_signal` runs once); arming raises it; a second signal during the clean-up does not."""
    seen: list[int] = []
    previous = signal.getsignal(signal.SIGHUP)
    with SignalGuard(on_signal=seen.append) as guard:
        os.kill(os.getpid(), signal.SIGHUP)
        os.kill(os.getpid(), signal.SIGTERM)
        assert (guard.signum, seen) == (signal.SIGHUP, [signal.SIGHUP])
        with pytest.raises(Interrupted) as info:
            guard.arm()
        assert info.value.signum == signal.SIGHUP
        os.kill(os.getpid(), signal.SIGINT)  # disarmed: recorded, not raised
    assert signal.getsignal(signal.SIGHUP) is previous and seen == [signal.SIGHUP]


# ---------------------------------------------------------------------------- submitit local executor


def test_submitit_local_runs_and_streams(tmp_path: Path) -> None:
    run = Launch(tmp_path, ["echo", "hello", "world"], sublocal(tmp_path))
    assert run.wait(60) == 0, run.describe()
    assert "hello\nworld\n" in run.stdout
    assert "stderr: hello world" in run.stderr
    assert "completed" in run.stdout


def test_submitit_local_emae_version(tmp_path: Path) -> None:
    run = Launch(tmp_path, ["--version"], sublocal(tmp_path), entry="emae")
    assert run.wait(60) == 0, run.describe()
    assert "emae " in run.stdout


def test_in_process_api_streams_into_given_files(tmp_path: Path) -> None:
    config = load_launcher_config(None, sublocal(tmp_path))
    out, err = io.StringIO(), io.StringIO()
    code = launch(["echo", "api"], stage="t", config=config, entry=SELFTEST, out=out, err=err)
    assert code == 0, err.getvalue()
    assert "api\n" in out.getvalue() and "stderr: api" in err.getvalue()


@pytest.mark.parametrize("command, code, message", [
    (["fail", "3"], 3, "exited with code 3"),
    (["raise"], 1, "RuntimeError: selftest: raised on purpose"),
])
def test_submitit_local_failure_is_reported(tmp_path: Path, command: list[str], code: int, message: str) -> None:
    run = Launch(tmp_path, command, sublocal(tmp_path))
    assert run.wait(60) == code, run.describe()
    assert message in run.stderr


def test_submitit_local_killed_job_fails_in_bounded_time(tmp_path: Path) -> None:
    run = Launch(tmp_path, ["die"], sublocal(tmp_path))
    assert run.wait(60) == 1, run.describe()
    assert "without writing its result" in run.stderr
    assert "dying" in run.stderr  # the tail of the job's stderr is in the message
    assert run.elapsed < 30


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_submitit_local_interrupt_cancels_the_job(tmp_path: Path, sig: signal.Signals) -> None:
    pid_file = tmp_path / "task.pid"
    run = Launch(tmp_path, ["sleep", "120", "--pid-file", str(pid_file)], sublocal(tmp_path))
    run.wait_for_output("tick 1", 30)
    task_pid = int(pid_file.read_text())
    assert pid_alive(task_pid)
    run.proc.send_signal(sig)
    assert run.wait(30) == 128 + sig, run.describe()
    assert "cancelled" in run.stderr
    wait_until(lambda: not pid_alive(task_pid), 20, f"the job's process {task_pid} to exit")


# ----------------------------------------------------------------------------------------- kind: local


def test_local_subprocess_streams_and_propagates_codes(tmp_path: Path) -> None:
    run = Launch(tmp_path, ["echo", "plain"], [])
    assert run.wait(60) == 0, run.describe()
    assert "plain" in run.stdout and "stderr: plain" in run.stderr
    run = Launch(tmp_path, ["fail", "5"], [])
    assert run.wait(60) == 5
    assert "exited with code 5" in run.stderr


def test_local_subprocess_interrupt(tmp_path: Path) -> None:
    pid_file = tmp_path / "task.pid"
    run = Launch(tmp_path, ["sleep", "120", "--pid-file", str(pid_file)], [])
    run.wait_for_output("tick 1", 30)
    task_pid = int(pid_file.read_text())
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait(30) == 128 + signal.SIGTERM
    wait_until(lambda: not pid_alive(task_pid), 20, "the command to exit")


# ------------------------------------------------------------- SLURM state without a cluster (fake CLI)


def _fake_slurm(bin_dir: Path, squeue: str, sacct: str, **more: str) -> None:
    """squeue, sacct (and any of `more`: scancel, scontrol, sinfo) as shell scripts on PATH."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    tools = {"squeue": squeue, "sacct": sacct, "srun": "exit 0", "scancel": "exit 0", **more}
    for name, body in tools.items():
        path = bin_dir / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_state_probe_without_accounting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """squeue alone answers: the state, a pending job's reason and request; a job it forgot (and
    sacct cannot tell about) is GONE. Job ids differ per test: submitit's sacct watcher is shared."""
    bin_dir = tmp_path / "bin"
    state = tmp_path / "state"
    _fake_slurm(bin_dir,
                squeue=f'if [ -s {state} ]; then cat {state}; else echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1; fi',
                sacct='echo "sacct: error: Slurm accounting storage is disabled" >&2; exit 1')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    state.write_text("RUNNING\n")
    assert job_state("41").state == "RUNNING"
    state.write_text("PENDING|Priority|debug|1|10|4G|N/A|1:00:00\n")
    assert job_state("41") == JobState("PENDING", "Priority", "partition debug, nodes 1, CPUs 10, memory 4G, time limit 1:00:00")
    state.write_text("")
    assert job_state("41").state == GONE


def test_state_probe_uses_sacct_once_squeue_forgot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    _fake_slurm(bin_dir, squeue="exit 0", sacct='printf "JobID|State|NodeList\\n43|CANCELLED by 0|n1\\n"')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert job_state("43").state == "CANCELLED"


def test_watch_never_hangs_on_a_job_that_vanished(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No accounting, the job ran, then disappeared from squeue without a result: failure, bounded."""
    from submitit.slurm.slurm import SlurmJob

    bin_dir = tmp_path / "bin"
    count = tmp_path / "count"
    # RUNNING for the first 3 squeue calls, then unknown to squeue
    _fake_slurm(bin_dir,
                squeue=f'echo x >> {count}; if [ $(wc -l < {count}) -le 3 ]; then echo RUNNING; else '
                       'echo "Invalid job id specified" >&2; exit 1; fi',
                sacct='echo "accounting storage is disabled" >&2; exit 1')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "42_0_log.err").write_text("Killed\n")
    job = SlurmJob(folder=tmp_path / "logs", job_id="42")
    config = load_launcher_config(None, ["poll_interval_s=0.1", "state_interval_s=0.1", "result_grace_s=1",
                                         "unknown_state_timeout_s=5"])
    out, err = io.StringIO(), io.StringIO()
    start = time.monotonic()
    outcome = watch(job, config, out=out, err=err)
    assert not outcome.ok and outcome.state == GONE
    assert "no longer known" in outcome.message and "Killed" in outcome.message
    assert "squeue no longer lists it and sacct has no state for it" in err.getvalue()
    assert time.monotonic() - start < 10


def test_watch_shows_the_pending_reason_and_cancels_a_job_that_can_never_start(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """squeue says PENDING (Priority) twice, then PartitionConfig: the reason is printed at every
    state check, then the job is scancel'ed and reported with the reason and what it asked for."""
    from submitit.slurm.slurm import SlurmJob

    bin_dir, count, cancelled = tmp_path / "bin", tmp_path / "count", tmp_path / "cancelled"
    _fake_slurm(bin_dir,
                squeue=f'echo x >> {count}; if [ -e {cancelled} ]; then echo "CANCELLED|None|debug|1|10|4G|N/A|1:00:00"; '
                       f'elif [ $(wc -l < {count}) -le 2 ]; then echo "PENDING|Priority|debug|1|1|4G|N/A|1:00:00"; '
                       'else echo "PENDING|PartitionConfig|debug|1|10|4G|gres:gpu:1|1:00:00"; fi',
                sacct='echo "accounting storage is disabled" >&2; exit 1',
                scancel=f'echo "$@" > {cancelled}')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    (tmp_path / "logs").mkdir()
    job = SlurmJob(folder=tmp_path / "logs", job_id="42")
    config = load_launcher_config(None, ["poll_interval_s=0.05", "state_interval_s=0.05"])
    out, err = io.StringIO(), io.StringIO()
    start = time.monotonic()
    outcome = watch(job, config, out=out, err=err, describe="stage 'pretrain'")
    assert time.monotonic() - start < 5
    log = err.getvalue()
    assert "job 42 (stage 'pretrain'): PENDING (Priority)\n" in log
    assert "job 42 (stage 'pretrain'): PENDING (Priority), 0s in the queue\n" in log  # every check
    assert "PENDING (PartitionConfig): it can never start; cancelling it" in log
    assert cancelled.read_text().split() == ["42"]
    assert not outcome.ok and outcome.state == "CANCELLED" and outcome.returncode == 1
    assert outcome.message.startswith("job 42 (stage 'pretrain') can never start: SLURM keeps it pending with "
                                      "reason PartitionConfig (no node of its partition has the CPUs")
    assert "It asked for: partition debug, nodes 1, CPUs 10, memory 4G, gres:gpu:1, time limit 1:00:00" in outcome.message


@pytest.mark.parametrize("reason, never", [
    ("PartitionConfig", True), ("PartitionNodeLimit", True), ("PartitionTimeLimit", True), ("BadConstraints", True),
    ("ReqNodeNotAvail, UnavailableNodes:", True), ("ReqNodeNotAvail, UnavailableNodes:gpu[1-2]", False),
    ("QOSMaxCpuPerJobLimit", True), ("AssocMaxNodesPerJobLimit", True), ("QOSMaxCpuPerUserLimit", False),
    ("Resources", False), ("Priority", False), ("BeginTime", False), ("JobHeldUser", False), ("None", False),
])
def test_pending_reasons_that_never_resolve(reason: str, never: bool) -> None:
    assert bool(never_resolves(reason)) == never


def test_slurm_times_and_gres() -> None:
    assert [parse_slurm_minutes(t) for t in ("UNLIMITED", "30", "30:30", "2:00:00", "1-00:00:00", "2-12")] == \
        [None, 30, 30.5, 120, 1440, 3600]
    assert [gres_gpus(g) for g in ("(null)", "gpu:1", "gpu:a100:4(S:0-1)", "gpu:a100:2,gpu:v100:2,mps:100")] == [0, 1, 4, 4]


# A cluster as `scontrol show -o partition` and `sinfo -N` describe it: partition gpu (MaxTime one day,
# MaxNodes 4) with a many-CPU node and a big-memory node, partition cpu (the default).
SCONTROL = (
    "PartitionName=gpu AllowGroups=ALL Default=NO MaxNodes=4 MaxTime=1-00:00:00 MinNodes=0 MaxCPUsPerNode=UNLIMITED "
    "Nodes=g[1-2] State=UP TotalCPUs=48 TotalNodes=2 MaxMemPerNode=UNLIMITED TRES=cpu=48,mem=757000M,gres/gpu=8\n"
    "PartitionName=cpu AllowGroups=ALL Default=YES MaxNodes=UNLIMITED MaxTime=UNLIMITED Nodes=c1 State=UP\n")
SINFO = 'case "$*" in *gpu*) printf "g1|32|257000|gpu:a100:4(S:0-1)\\ng2|16|500000|gpu:a100:4(S:0)\\n";; *) echo "c1|64|128000|(null)";; esac'


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The fake cluster's scontrol/sinfo on PATH; params/launcher.yaml in the working directory."""
    bin_dir = tmp_path / "bin"
    (tmp_path / "scontrol.out").write_text(SCONTROL)
    _fake_slurm(bin_dir, squeue="exit 1", sacct="exit 1", scontrol=f"cat {tmp_path / 'scontrol.out'}", sinfo=SINFO)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params").mkdir()
    return tmp_path


def _stage_config(cluster: Path, pretrain: str, *overrides: str) -> LauncherConfig:
    (cluster / "params" / "launcher.yaml").write_text(
        f"launcher:\n  kind: slurm\n  resources: {{partition: gpu, time_min: 60}}\n  stages:\n    pretrain: {pretrain}\n")
    return load_launcher_config(Path("params/launcher.yaml"), list(overrides))


def test_precheck_names_the_request_what_the_partition_offers_and_the_setting(cluster: Path) -> None:
    config = _stage_config(cluster, "{cpus_per_task: 40, gpus_per_node: 4, mem_gb: 64}", "resources.time_min=2880")
    with pytest.raises(LaunchError) as info:
        precheck(config, "pretrain")
    assert str(info.value).splitlines() == [
        "stage pretrain does not fit partition 'gpu' (2 nodes; largest: 32 CPUs, 488.3 GB memory, 4 GPUs; "
        "MaxTime 1-00:00:00, MaxNodes 4):",
        "  stage pretrain asks for 40 CPUs per node but the largest node of partition 'gpu' has 32 "
        "(launcher.stages.pretrain.cpus_per_task / params/launcher.yaml)",
        "  stage pretrain asks for 2880 minutes but partition 'gpu' allows at most 1440 (MaxTime 1-00:00:00) "
        "(launcher.resources.time_min / override 'resources.time_min=2880')",
    ]
    config = _stage_config(cluster, "{gpus_per_node: 8}")
    with pytest.raises(LaunchError, match=r"^stage pretrain asks for 8 GPUs per node but the largest node of "
                       r"partition 'gpu' has 4 \(launcher.stages.pretrain.gpus_per_node / params/launcher.yaml\)$"):
        precheck(config, "pretrain")


def test_precheck_node_shapes_node_counts_and_the_default_partition(cluster: Path) -> None:
    # enough CPUs on g1 and enough memory on g2, but not both on one node
    with pytest.raises(LaunchError, match=r"asks for 20 CPUs, 300 GB and 0 GPUs per node but no node of partition "
                       r"'gpu' has them all \(its nodes: 32 CPUs, 251 GB, 4 GPUs; 16 CPUs, 488.3 GB, 4 GPUs\)"):
        precheck(_stage_config(cluster, "{cpus_per_task: 20, mem_gb: 300}"), "pretrain")
    with pytest.raises(LaunchError, match=r"asks for 2 nodes but partition 'gpu' has 1 that can give it what it "
                       r"asks per node \(launcher.stages.pretrain.nodes / params/launcher.yaml\)"):
        precheck(_stage_config(cluster, "{cpus_per_task: 20, nodes: 2}"), "pretrain")
    with pytest.raises(LaunchError, match=r"asks for 5 nodes but partition 'gpu' allows 4 per job \(MaxNodes\)"):
        precheck(_stage_config(cluster, "{nodes: 5}"), "pretrain")
    with pytest.raises(LaunchError, match=r"partition 'nope', which SLURM does not have \(partitions: cpu, gpu\) "
                       r"\(launcher.stages.pretrain.partition / params/launcher.yaml\)"):
        precheck(_stage_config(cluster, "{partition: nope}"), "pretrain")
    precheck(_stage_config(cluster, "{cpus_per_task: 16, tasks_per_node: 2, mem_gb: 250, gpus_per_node: 4}"), "pretrain")
    # no partition asked: the cluster's default one (cpu: 64 CPUs, no GPU)
    with pytest.raises(LaunchError, match=r"asks for 1 GPU per node but the largest node of partition 'cpu' has none"):
        precheck(_stage_config(cluster, "{gpus_per_node: 1}", "resources.partition=null"), "pretrain")


def test_fitted_resources_pass_the_precheck(cluster: Path) -> None:
    config = _stage_config(cluster, "{cpus_per_task: 40, tasks_per_node: 1, mem_gb: 600, gpus_per_node: 8, nodes: 3}",
                           "resources.time_min=2880")
    part = query_partition("gpu")
    fitted = fit_resources(config.for_stage("pretrain"), part)
    assert (fitted.cpus_per_task, fitted.mem_gb, fitted.gpus_per_node, fitted.nodes, fitted.time_min) == \
        (32, 250, 4, 1, 1440)  # the node keeping most of the request: g1
    small = _stage_config(cluster, "{}").for_stage("report")
    assert fit_resources(small, part) == small  # what fits is left alone
    config.stages["pretrain"] = config.stages["pretrain"].model_copy(update=fitted.model_dump(include={
        "cpus_per_task", "mem_gb", "gpus_per_node", "nodes", "time_min"}))
    assert request_problems(config, "pretrain", part) == []


def test_precheck_is_skipped_when_slurm_cannot_be_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    bin_dir = tmp_path / "bin"
    _fake_slurm(bin_dir, squeue="exit 1", sacct="exit 1",
                scontrol='echo "slurm_load_partitions: Unable to contact slurm controller (connect failure)" >&2; exit 1')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    config = load_launcher_config(None, ["kind=slurm", "resources.cpus_per_task=1000"])
    with caplog.at_level("DEBUG", logger="emae.launch"):
        precheck(config, "pretrain")  # does not raise, does not block
    assert "Unable to contact slurm controller" in caplog.text


def test_sbatch_failure_is_a_clean_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No controller: the pre-check cannot ask (skipped), sbatch fails; the launch says so in one
    line (it was a FailedJobError traceback)."""
    bin_dir = tmp_path / "bin"
    down = 'echo "Unable to contact slurm controller (connect failure)" >&2; exit 1'
    _fake_slurm(bin_dir, squeue=down, sacct=down, scontrol=down,
                sbatch='echo "sbatch: error: Batch job submission failed: Unable to contact slurm controller" >&2; exit 1')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    config = load_launcher_config(None, ["kind=slurm", f"folder={tmp_path}/logs/%j"])
    with pytest.raises(LaunchError, match=r"^submitting stage 't' failed: sbatch: error: Batch job submission "
                       r"failed: Unable to contact slurm controller$"):
        launch(["echo", "x"], stage="t", config=config, entry=SELFTEST)
