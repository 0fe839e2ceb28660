"""Multi-node DDP through submitit on a real 2-node SLURM cluster (`tools/local-slurm.sh up --nodes 2`:
each slurmd in its own network namespace, hostname and address, gloo over a bridge).

`stages.pretrain.nodes=2, tasks_per_node=1`: one job step across both nodes whose process group
forms from SLURM's variables (rendezvous at the first node of the job's node list); the encoder
equals the local 2-process run bit for bit, also after a time-limit requeue; a task killed on one
node fails the whole job in bounded time, and the launcher says so.

    tools/local-slurm.sh up --nodes 2 && pytest tests/test_multinode.py
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import TINY_OVERRIDES
from conftest_slurm import MULTINODE_CONF, pid_alive, slurm_has_accounting, slurm_is_up, wait_until
from test_local_slurm import job_field
from test_slurm_training import assert_same_weights, launch_pretrain, requeue_at_the_time_limit, slurm

UP, WHY = slurm_is_up(MULTINODE_CONF, nodes=2)
pytestmark = [pytest.mark.slurm, pytest.mark.timeout(240), pytest.mark.skipif(not UP, reason=WHY)]

TWO_NODES = ("stages.pretrain.nodes=2", "stages.pretrain.tasks_per_node=1")
# 2 x 22 steps of 32 images a rank: long enough to interrupt after the first checkpoint (step 5)
SHORT = ["pretrain.epochs=2", "pretrain.batch_size=32", "pretrain.checkpoint_every_steps=5"]
TASK_LINE = re.compile(r"\[task (\d)\] \[emae\.launch\] job \d+ task \d/2 on (\S+), rendezvous ([^:\s]+):(\d+)")


@pytest.fixture(scope="module", autouse=True)
def multinode_cluster() -> Iterator[None]:
    """Every SLURM client these tests start (the launcher, sacct, scontrol) talks to the 2-node cluster;
    one thread a rank: the 2 ranks share this machine's cores (more would oversubscribe them, slowly)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SLURM_CONF", str(MULTINODE_CONF))
        patch.setenv("OMP_NUM_THREADS", "1")
        yield


@pytest.fixture(scope="module")
def overrides(digits_root: Path) -> list[str]:
    return [*TINY_OVERRIDES, f"data.root={digits_root}", *SHORT]


@pytest.fixture(scope="module")
def local_two_process_run(tmp_path_factory: pytest.TempPathFactory, overrides: list[str]) -> Path:
    """The reference: the same pre-training as 2 local processes (torchrun), uninterrupted."""
    tmp = tmp_path_factory.mktemp("local")
    run = launch_pretrain(tmp, tmp / "out", overrides, ["kind=local", "stages.pretrain.tasks_per_node=2"])
    assert run.wait(180) == 0, run.describe()
    return tmp / "out"


def hostnames(nodelist: str) -> list[str]:
    return subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                          check=True).stdout.split()


def resolve_in_namespace(node: str, name: str) -> str:
    """`name`'s address as the processes of `node` (its network namespace) resolve it."""
    proc = subprocess.run(["ip", "netns", "exec", node, "getent", "ahostsv4", name], capture_output=True, text=True)
    assert proc.returncode == 0, f"{name} does not resolve in namespace {node}: {proc.stderr}"
    return proc.stdout.split()[0]


def task_pids(job_id: str) -> dict[int, int]:
    """{global rank: pid} of the job's submitit task processes, found in /proc by their SLURM variables."""
    pids = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            environ = dict(v.split("=", 1) for v in (entry / "environ").read_bytes().decode(errors="replace")
                           .split("\0") if "=" in v)
        except OSError:
            continue
        if b"submitit.core._submit" in cmdline and environ.get("SLURM_JOB_ID") == job_id and "SLURM_STEP_ID" in environ:
            pids[int(environ["SLURM_PROCID"])] = int(entry.name)
    return pids


def test_two_node_job_forms_its_process_group_from_slurm_and_matches_the_local_run(
        tmp_path: Path, overrides: list[str], local_two_process_run: Path) -> None:
    out = tmp_path / "out"
    run = launch_pretrain(tmp_path, out, overrides, slurm(tmp_path, *TWO_NODES))
    job_id = run.job_id()
    assert run.wait(180) == 0, run.describe()

    # one allocation of both nodes, one step of 2 tasks across them
    nodelist = job_field(job_id, "NodeList")
    nodes = hostnames(nodelist)
    assert len(nodes) == 2 and job_field(job_id, "NumNodes") == "2", (nodelist, nodes)
    if slurm_has_accounting():
        steps = subprocess.run(["sacct", "-n", "-P", "-j", job_id, "-o", "JobID,NodeList,NNodes,NTasks"],
                               capture_output=True, text=True, check=True).stdout.split()
        assert f"{job_id}.0|{nodelist}|2|2" in steps, steps  # (its final state may reach sacct later)
    # each rank on its own node, both meeting at the first node of the node list (not localhost),
    # an address of the bridge that the other node's namespace reaches
    tasks = {int(k): (host, addr) for k, host, addr, _ in TASK_LINE.findall(run.output)}
    assert tasks == {0: (nodes[0], nodes[0]), 1: (nodes[1], nodes[0])}, run.describe()
    address = resolve_in_namespace(nodes[1], nodes[0])
    assert not address.startswith("127."), address
    provenance = json.loads((out / "metrics.json").read_text())["provenance"]
    assert provenance["world_size"] == 2 and provenance["hosts"] == [nodelist], provenance

    assert_same_weights(local_two_process_run, out)


def test_two_node_job_requeued_at_its_time_limit_ends_with_the_uninterrupted_weights(
        tmp_path: Path, overrides: list[str], local_two_process_run: Path) -> None:
    """SIGUSR2 to both nodes' tasks, as SLURM sends it before the time limit: rank 0 checkpoints and
    requeues, the job runs again on both nodes and resumes from checkpoints/last.pt."""
    out = tmp_path / "out"
    run = launch_pretrain(tmp_path, out, overrides, slurm(tmp_path, *TWO_NODES))
    job_id = requeue_at_the_time_limit(run, out, tmp_path, 180)
    assert job_field(job_id, "NumNodes") == "2"
    assert_same_weights(local_two_process_run, out)


def test_killing_one_nodes_task_fails_the_whole_job_in_bounded_time(tmp_path: Path, overrides: list[str]) -> None:
    """SIGKILL to rank 1 (on the second node) mid-training: srun's --kill-on-bad-exit ends rank 0 on
    the first node, the job FAILs (no requeue: the node is fine) and `emae launch` exits non-zero
    saying so, within seconds rather than the process group's timeout."""
    out = tmp_path / "out"
    run = launch_pretrain(tmp_path, out, [*overrides, "pretrain.epochs=30"], slurm(tmp_path, *TWO_NODES))
    job_id = run.job_id()
    wait_until(lambda: (out / "checkpoints" / "last.pt").exists(), 120, "the first checkpoint")
    pids = wait_until(lambda: (found := task_pids(job_id)) and len(found) == 2 and found, 30, "both task pids")
    os.kill(pids[1], signal.SIGKILL)
    killed = time.monotonic()
    code = run.wait(120)
    took = time.monotonic() - killed
    assert code != 0, run.describe()
    assert took < 45, f"the launcher took {took:.0f}s to report the dead task:\n{run.describe()}"
    error = run.stderr[run.stderr.index("emae launch: error:"):]
    assert error.startswith(f"emae launch: error: stage 'pretrain': job {job_id} (stage 'pretrain') ended in "
                            "state FAILED"), error
    first, second = hostnames(job_field(job_id, "NodeList"))
    # which task died: srun names the killed task, unless rank 0 saw the reset connection and
    # exited first (then srun reports rank 0's exit and rank 0's own log the dead peer, in gloo's
    # words: the connection was reset or closed by the peer)
    assert (f"\nsrun: {second}: task 1: Killed" in error
            or (f"\nsrun: {first}: task 0: Exited with exit code 1" in error
                and ("Connection reset by peer" in error or "Connection closed by peer" in error))), error
    assert job_field(job_id, "JobState") == "FAILED" and job_field(job_id, "Restarts") == "0"
    assert not pid_alive(pids[0]), "rank 0 outlived the job"
    assert not (out / "encoder.safetensors").exists()
