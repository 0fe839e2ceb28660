"""What SLURM says about a job and a partition: a job's state (squeue first), whether a request fits
its partition, and which pending reasons never resolve.

submitit learns a job's state from ``sacct`` only; on a cluster without accounting that never
answers, and a job that died without writing its result would be waited on forever.
:func:`job_state` asks ``squeue`` first (real time, no accounting needed, keeps finished jobs for
MinJobAge; it also gives a pending job's reason), then submitit's sacct watcher once squeue forgot
the job.

SLURM accepts a job that no node of its partition can ever run (more CPUs per node than any node
has, more nodes than the partition has) and keeps it pending forever (``PD (PartitionConfig)``).
The launcher asks first (:func:`query_partition`: ``scontrol show -o partition`` for the limits,
``sinfo -N -p P`` for the nodes), refuses such a request with what the partition offers
(:func:`request_problems`), and cancels a job that slipped through when squeue gives a reason that
cannot resolve (:func:`never_resolves`). ``emae install-profile`` caps the shipped resources to the
partition with :func:`fit_resources`. When SLURM cannot be asked, nothing is checked (a debug log
says why): the checks never block a submission.
"""

from __future__ import annotations

import logging
import math
import re
import subprocess
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from emae.launch.config import LauncherConfig, Resources

log = logging.getLogger("emae.launch")

QUERY_TIMEOUT_S = 10.0  # the pre-check must not hold a submission up for long
# SLURM job states (squeue %T / sacct State) after which nothing runs any more.
FINAL_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                          "BOOT_FAIL", "DEADLINE", "REVOKED"})
GONE = "GONE"  # neither squeue nor sacct knows the job (any more)
# state | reason | what it asks for: partition, nodes, CPUs, memory, gres per node, time limit
SQUEUE_FORMAT = "%T|%r|%P|%D|%C|%m|%b|%l"

# Pending reasons (squeue %r) that no amount of waiting changes: what each means for the job.
NEVER_RESOLVING_REASONS = {
    "PartitionConfig": "no node of its partition has the CPUs, memory or GPUs per node it asks for",
    "PartitionNodeLimit": "it asks for more nodes than its partition has or allows",
    "PartitionTimeLimit": "its time limit is above its partition's MaxTime",
    "BadConstraints": "no node of its partition has the features or generic resources (gres) it asks for",
    "DependencyNeverSatisfied": "it depends on a job that can no longer succeed",
    "InvalidAccount": "its account is not valid",
    "InvalidQOS": "its QOS is not valid",
}
# Per-job QOS/association limits (QOSMaxCpuPerJobLimit, AssocMaxNodesPerJobLimit, QOSMinGRES, ...):
# the job itself is over them. Per-user/group limits (QOSMaxCpuPerUserLimit) lift as jobs end.
_PER_JOB_LIMIT = re.compile(r"^(QOS|Assoc)\w*PerJob\w*$|^QOSMin\w+$")


def slurm_query(cmd: list[str], timeout: float = 30.0) -> subprocess.CompletedProcess[str] | None:
    """Run a SLURM client command; None when it is missing or does not answer in `timeout`."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None


@dataclass(frozen=True)
class JobState:
    """`state`: squeue's or sacct's name (PENDING, RUNNING, COMPLETED, ...), :data:`GONE`, or None
    when SLURM could not be asked; `reason`: squeue's pending reason; `request`: what the job
    asked for, in squeue's words (``partition debug, nodes 1, CPUs 10, ...``)."""

    state: str | None
    reason: str = ""
    request: str = ""


def job_state(job_id: str) -> JobState:
    """SLURM job `job_id` as squeue sees it, else as sacct does (through submitit's watcher)."""
    found = _squeue(job_id)
    if found.state in (None, GONE):
        from submitit import SlurmJob

        accounted = SlurmJob.watcher.get_state(job_id, mode="force").split()[0].upper()  # "CANCELLED by 0"
        if accounted != "UNKNOWN":
            return JobState(accounted)
    return found


def _squeue(job_id: str) -> JobState:
    proc = slurm_query(["squeue", "-h", "-j", job_id, "--states=all", "-o", SQUEUE_FORMAT])
    if proc is None or proc.returncode != 0:
        forgot = proc is not None and "invalid job id" in (proc.stderr or "").lower()
        return JobState(GONE if forgot else None)
    lines = [line.strip() for line in proc.stdout.splitlines() if line.strip()]
    if not lines:
        return JobState(GONE)
    state, *rest = lines[0].split("|")
    names = ("partition ", "nodes ", "CPUs ", "memory ", "", "time limit ")
    request = ", ".join(f"{n}{v}" for n, v in zip(names, rest[1:]) if v and v != "N/A")
    return JobState(state.split()[0].upper(), rest[0].strip() if rest else "", request)


def never_resolves(reason: str) -> str | None:
    """Why a job pending for `reason` can never start, or None when it may (Resources, Priority,
    BeginTime, JobHeldUser, ReqNodeNotAvail naming nodes that may come back, ...)."""
    reason = reason.strip()
    name = reason.split(",")[0].strip()
    if name in NEVER_RESOLVING_REASONS:
        return NEVER_RESOLVING_REASONS[name]
    if _PER_JOB_LIMIT.match(name):
        return "it asks for more than a per-job limit of its QOS or account allows"
    _, listed, nodes = reason.partition("UnavailableNodes:")
    if name == "ReqNodeNotAvail" and listed and not nodes.strip():
        return "the nodes it needs are not available and SLURM names none that could come back"
    return None


# ------------------------------------------------------------------------------------------ partition


@dataclass(frozen=True)
class Node:
    name: str
    cpus: int
    mem_mb: int
    gpus: int


@dataclass(frozen=True)
class Partition:
    """A partition's nodes and per-job limits (None: unlimited)."""

    name: str
    nodes: tuple[Node, ...]
    max_time_min: float | None = None
    max_nodes: int | None = None
    max_cpus_per_node: int | None = None
    max_mem_per_node_mb: int | None = None

    def cpus(self, node: Node) -> int:
        return min(node.cpus, self.max_cpus_per_node or node.cpus)

    def mem_mb(self, node: Node) -> int:
        return min(node.mem_mb, self.max_mem_per_node_mb or node.mem_mb)

    def largest(self) -> tuple[int, int, int]:
        """(CPUs, memory MB, GPUs) of its largest node, each the largest of any node."""
        return (max(self.cpus(n) for n in self.nodes), max(self.mem_mb(n) for n in self.nodes),
                max(n.gpus for n in self.nodes))

    def describe(self) -> str:
        cpus, mem, gpus = self.largest()
        limits = f"MaxTime {format_minutes(self.max_time_min)}"
        if self.max_nodes is not None:
            limits += f", MaxNodes {self.max_nodes}"
        return (f"partition {self.name!r} ({len(self.nodes)} node{'s' * (len(self.nodes) != 1)}; largest: "
                f"{cpus} CPUs, {format_gb(mem)} GB memory, {_gpus(gpus)}; {limits})")


class PartitionNotFound(LookupError):
    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(name)
        self.name, self.known = name, known


def parse_slurm_minutes(text: str) -> float | None:
    """A SLURM time (``30``, ``30:00``, ``2:00:00``, ``1-00:00:00``, ``2-12``) in minutes; None
    for UNLIMITED / INFINITE / NONE; raises ValueError on anything else."""
    text = text.strip()
    if text.upper() in ("UNLIMITED", "INFINITE", "NONE", "N/A", ""):
        return None
    days, _, rest = text.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:
        hours, minutes, seconds = (parts + [0, 0])[:3]
        return int(days) * 1440 + hours * 60 + minutes + seconds / 60
    if len(parts) == 3:
        return parts[0] * 60 + parts[1] + parts[2] / 60
    if len(parts) == 2:
        return parts[0] + parts[1] / 60
    return float(parts[0])


def format_minutes(minutes: float | None) -> str:
    if minutes is None:
        return "UNLIMITED"
    days, rest = divmod(int(math.ceil(minutes)), 1440)
    return (f"{days}-" if days else "") + f"{rest // 60:02d}:{rest % 60:02d}:00"


def format_gb(mem_mb: float) -> str:
    return f"{mem_mb / 1024:.1f}".removesuffix(".0")


def gres_gpus(gres: str) -> int:
    """GPUs in a gres string: ``gpu:4``, ``gpu:a100:2(S:0-1),gpu:v100:2``, ``(null)`` -> 4, 4, 0."""
    total = 0
    for item in re.split(r",(?![^(]*\))", gres or ""):
        parts = re.sub(r"\(.*?\)", "", item).strip().split(":")
        if parts[0].removeprefix("gres/").removeprefix("gres:") != "gpu":
            continue
        total += int(parts[-1]) if len(parts) > 1 and parts[-1].isdigit() else 1
    return total


def _limit(value: str | None) -> int | None:
    if value is None or not value.isdigit():
        return None  # UNLIMITED
    return int(value)


def parse_partitions(scontrol_output: str) -> dict[str, dict[str, str]]:
    """``scontrol show -o partition`` (one partition a line, Key=Value words) -> name -> fields."""
    partitions = {}
    for line in scontrol_output.splitlines():
        fields = dict(word.split("=", 1) for word in line.split() if "=" in word)
        if "PartitionName" in fields:
            partitions[fields["PartitionName"]] = fields
    return partitions


def parse_nodes(sinfo_output: str) -> tuple[Node, ...]:
    """``sinfo -h -N -o '%N|%c|%m|%G'`` -> nodes (each once)."""
    nodes: dict[str, Node] = {}
    for line in sinfo_output.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 4:
            continue
        name, cpus, mem, gres = parts
        digits = [re.match(r"\d+", v) for v in (cpus, mem)]
        if not all(digits):
            continue
        nodes.setdefault(name, Node(name, int(digits[0].group()), int(digits[1].group()), gres_gpus(gres)))
    return tuple(nodes.values())


def query_partition(name: str | None) -> Partition | None:
    """The partition `name` (None: the cluster's default one) as SLURM describes it, or None when
    SLURM cannot be asked (no client, no controller, no answer) or there is no default partition.
    Raises :class:`PartitionNotFound` when SLURM answers and has no such partition."""
    proc = slurm_query(["scontrol", "-a", "show", "-o", "partition"], timeout=QUERY_TIMEOUT_S)
    if proc is None or proc.returncode != 0:
        why = ("scontrol is missing or did not answer" if proc is None
               else proc.stderr.strip() or f"exit {proc.returncode}")
        log.debug("not checking the request against the partition: %s", why)
        return None
    partitions = parse_partitions(proc.stdout)
    if name is None:
        defaults = [p for p, fields in partitions.items() if fields.get("Default") == "YES"]
        if not defaults:
            log.debug("not checking the request: no partition asked for and the cluster has no default one")
            return None
        name = defaults[0]
    if name not in partitions:
        raise PartitionNotFound(name, sorted(partitions))
    fields = partitions[name]
    proc = slurm_query(["sinfo", "-h", "-N", "-p", name, "-o", "%N|%c|%m|%G"], timeout=QUERY_TIMEOUT_S)
    if proc is None or proc.returncode != 0:
        log.debug("not checking the request: sinfo failed: %s", proc.stderr.strip() if proc else "no answer")
        return None
    nodes = parse_nodes(proc.stdout)
    if not nodes:
        log.debug("not checking the request: sinfo lists no node in partition %r", name)
        return None
    try:
        max_time = parse_slurm_minutes(fields.get("MaxTime", "UNLIMITED"))
    except ValueError:
        max_time = None
    return Partition(name, nodes, max_time, _limit(fields.get("MaxNodes")),
                     _limit(fields.get("MaxCPUsPerNode")), _limit(fields.get("MaxMemPerNode")))


# ---------------------------------------------------------------------------------------- the request


@dataclass(frozen=True)
class Request:
    """What one job asks of each of its nodes, and of the partition."""

    cpus: int  # cpus_per_task x tasks_per_node
    mem_mb: int | None  # None: the cluster's default
    gpus: int
    nodes: int
    time_min: int

    @classmethod
    def of(cls, res: "Resources") -> "Request":
        gres = res.additional_parameters.get("gres")
        gpus = max(res.gpus_per_node, gres_gpus(gres) if isinstance(gres, str) else 0)
        mem = None if res.mem_gb is None else int(res.mem_gb * 1024)
        return cls(res.cpus_per_task * res.tasks_per_node, mem, gpus, res.nodes, res.time_min)

    def fits(self, part: Partition, node: Node) -> bool:
        return (self.cpus <= part.cpus(node) and self.gpus <= node.gpus
                and (self.mem_mb is None or self.mem_mb <= part.mem_mb(node)))


def _gpus(n: int) -> str:
    return f"{n} GPU{'s' * (n != 1)}"


def request_problems(config: "LauncherConfig", stage: str, part: Partition) -> list[str]:
    """Each way the request of `stage` cannot fit `part`, one sentence each naming the request,
    what the partition offers and the setting (key / file or override) that asked for it."""
    res = config.for_stage(stage)
    req = Request.of(res)
    cpus, mem, gpus = part.largest()
    where = f"partition {part.name!r}"

    def keys(*names: str) -> str:
        found = [(config.key_of(stage, n), n) for n in names]
        return "; ".join(f"{key} / {config.origin_of(key)}" for key, _ in found)

    problems = []
    if req.cpus > cpus:
        asked = f"{req.cpus} CPUs per node"
        if res.tasks_per_node > 1:
            asked += f" ({res.tasks_per_node} tasks x {res.cpus_per_task} CPUs)"
        capped = part.max_cpus_per_node is not None and part.max_cpus_per_node < max(n.cpus for n in part.nodes)
        limit = " (MaxCPUsPerNode)" if capped else ""
        problems.append(f"stage {stage} asks for {asked} but the largest node of {where} has {cpus}{limit} "
                        f"({keys('cpus_per_task', *(['tasks_per_node'] if res.tasks_per_node > 1 else []))})")
    if req.mem_mb is not None and req.mem_mb > mem:
        problems.append(f"stage {stage} asks for {res.mem_gb:g} GB of memory per node but the largest node of "
                        f"{where} has {format_gb(mem)} GB ({keys('mem_gb')})")
    if req.gpus > gpus:
        key = keys("gpus_per_node" if res.gpus_per_node >= req.gpus else "additional_parameters")
        problems.append(f"stage {stage} asks for {_gpus(req.gpus)} per node but the largest node of {where} "
                        f"has {gpus if gpus else 'none'} ({key})")
    fitting = [n for n in part.nodes if req.fits(part, n)]
    if not problems and not fitting:
        mem_text = f", {res.mem_gb:g} GB" if req.mem_mb is not None else ""
        shapes = sorted({(part.cpus(n), part.mem_mb(n), n.gpus) for n in part.nodes}, reverse=True)[:4]
        offered = "; ".join(f"{c} CPUs, {format_gb(m)} GB, {_gpus(g)}" for c, m, g in shapes)
        problems.append(f"stage {stage} asks for {req.cpus} CPUs{mem_text} and {_gpus(req.gpus)} per node but no "
                        f"node of {where} has them all (its nodes: {offered}) "
                        f"({keys('cpus_per_task', 'mem_gb', 'gpus_per_node')})")
    if part.max_nodes is not None and req.nodes > part.max_nodes:
        problems.append(f"stage {stage} asks for {req.nodes} nodes but {where} allows {part.max_nodes} per job "
                        f"(MaxNodes) ({keys('nodes')})")
    elif req.nodes > len(part.nodes) or (fitting and req.nodes > len(fitting)):
        count = len(part.nodes) if req.nodes > len(part.nodes) else len(fitting)
        of = "" if count == len(part.nodes) else " that can give it what it asks per node"
        problems.append(f"stage {stage} asks for {req.nodes} nodes but {where} has {count}{of} ({keys('nodes')})")
    if part.max_time_min is not None and req.time_min > part.max_time_min:
        problems.append(f"stage {stage} asks for {req.time_min} minutes but {where} allows at most "
                        f"{math.floor(part.max_time_min)} (MaxTime {format_minutes(part.max_time_min)}) "
                        f"({keys('time_min')})")
    return problems


# -------------------------------------------------------------------------------------------- fitting


def _capped_mem_gb(mem_gb: float, node_mem_mb: int) -> float:
    if mem_gb * 1024 <= node_mem_mb:
        return mem_gb
    whole = node_mem_mb // 1024
    return float(whole) if whole >= 1 else math.floor(node_mem_mb / 1024 * 100) / 100


def fit_resources(res: "Resources", part: Partition) -> "Resources":
    """`res` with CPUs, tasks, memory, GPUs, nodes and time lowered to what one node of `part` (the
    one that keeps the most of the request) and its limits give; what already fits is unchanged."""
    gpus = min(res.gpus_per_node, part.largest()[2])
    candidates = [n for n in part.nodes if n.gpus >= gpus]
    req = Request.of(res)

    def kept(node: Node) -> float:
        score = min(req.cpus, part.cpus(node)) / req.cpus
        return score + (min(req.mem_mb, part.mem_mb(node)) / req.mem_mb if req.mem_mb else 0.0)

    node = max(candidates, key=kept)
    node_cpus = part.cpus(node)
    tasks = min(res.tasks_per_node, node_cpus)
    cpus_per_task = max(1, min(res.cpus_per_task, node_cpus // tasks))
    changes: dict[str, object] = {"gpus_per_node": gpus, "tasks_per_node": tasks, "cpus_per_task": cpus_per_task}
    if res.mem_gb is not None:
        changes["mem_gb"] = _capped_mem_gb(res.mem_gb, part.mem_mb(node))
    fitted = res.model_copy(update=changes)
    same_shape = sum(1 for n in part.nodes if Request.of(fitted).fits(part, n))
    changes["nodes"] = max(1, min(res.nodes, same_shape, part.max_nodes or res.nodes))
    if part.max_time_min is not None:
        changes["time_min"] = max(1, min(res.time_min, math.floor(part.max_time_min)))
    return res.model_copy(update=changes)
