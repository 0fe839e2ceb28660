"""Typed launcher settings: where a stage runs (locally, or as a SLURM job through submitit) and with
which resources. The `launcher:` section of the params tree (params/launcher.yaml), read by
emae.config's one loader; ``key=value`` overrides may leave out the ``launcher.`` prefix
(``kind=slurm``, ``resources.partition=gpu``, ``stages.pretrain.gpus_per_node=4``).

Example (``params/launcher.yaml``)::

    launcher:
      kind: slurm                 # local | slurm | submitit-local
      folder: logs/submitit/{stage}/%j
      resources:                  # every stage
        partition: gpu
        account: myproject
        time_min: 60
      stages:                     # per-stage overrides of `resources`
        pretrain: {gpus_per_node: 4, tasks_per_node: 4, cpus_per_task: 8, mem_gb: 64, time_min: 1440}
        report: {time_min: 10}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    PrivateAttr,
    create_model,
)

from emae.config import merge_overrides, merge_tree, read_yaml, source_of, validate_section

SbatchValue = Union[bool, int, float, str]
DEFAULTS = "launcher defaults"  # where a setting nobody set comes from, in messages


class Resources(BaseModel):
    """What one job asks for. Only ``kind: slurm`` uses all of them; locally ``tasks_per_node`` > 1
    means a torchrun-style DDP run with that many processes, and ``time_min`` is the local time limit
    under ``submitit-local``."""

    model_config = ConfigDict(extra="forbid")

    partition: str | None = Field(None, description="sbatch --partition")
    account: str | None = Field(None, description="sbatch --account")
    qos: str | None = Field(None, description="sbatch --qos")
    time_min: PositiveInt = Field(60, description="time limit, minutes (sbatch --time)")
    nodes: PositiveInt = Field(1, description="sbatch --nodes")
    gpus_per_node: NonNegativeInt = Field(0, description="sbatch --gpus-per-node (0: none asked)")
    tasks_per_node: PositiveInt = Field(1, description="processes per node (one per GPU for DDP)")
    cpus_per_task: PositiveInt = Field(1, description="sbatch --cpus-per-task")
    mem_gb: PositiveFloat | None = Field(None, description="sbatch --mem (per node); unset: cluster default")
    gpu_type: str | None = Field(
        None, description="the GPU model of the nodes (H100, A100-80GB, ...: emae.workflow.plan.GPUS): `emae plan` "
        "sizes throughput and memory by it and the pipeline refuses a stage that cannot fit it; not passed to "
        "sbatch (ask for the model with additional_parameters, e.g. {constraint: h100} or {gres: 'gpu:h100:1'})")
    additional_parameters: dict[str, SbatchValue] = Field(
        default_factory=dict,
        description="extra sbatch options, e.g. {constraint: a100, exclusive: true, mail-type: END}",
    )
    setup: list[str] = Field(
        default_factory=list,
        description="shell lines run in the batch script before the job (module load ..., source venv)",
    )


# Per-stage changes to Resources: the same keys and checks, every one optional (unset: inherited).
# `additional_parameters` is merged key by key (the stage wins); `setup` lines are appended.
ResourceOverrides = create_model(
    "ResourceOverrides", __config__=ConfigDict(extra="forbid"),
    **{name: ((Annotated[field.annotation, *field.metadata] if field.metadata else field.annotation) | None, None)
       for name, field in Resources.model_fields.items()})


class LauncherConfig(BaseModel):
    """How ``emae launch`` runs a stage."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["local", "slurm", "submitit-local"] = Field(
        "local",
        description="local: a subprocess here; slurm: an sbatch job through submitit; "
        "submitit-local: submitit's local executor (the SLURM code path without SLURM)",
    )
    folder: str = Field(
        "logs/submitit/{stage}/%j",
        description="submitit folder (batch scripts, pickles, job logs); {stage} and %j are filled in",
    )
    max_num_timeout: NonNegativeInt = Field(
        3, description="requeues allowed after a time-out (preemptions always requeue)"
    )
    signal_delay_s: PositiveInt = Field(
        90, description="the job gets SIGUSR2 this long before its time limit: checkpoint and requeue"
    )
    poll_interval_s: PositiveFloat = Field(2.0, description="seconds between polls of the job's logs and result")
    state_interval_s: PositiveFloat = Field(
        10.0, description="seconds between scheduler queries (squeue, then sacct) while the job runs"
    )
    result_grace_s: NonNegativeFloat = Field(
        30.0, description="a finished job's result file may lag (shared filesystems): wait this long"
    )
    unknown_state_timeout_s: PositiveFloat = Field(
        300.0,
        description="a job that neither sacct nor squeue knows (or that they cannot be asked about) "
        "for this long is reported failed: the launcher never waits forever",
    )
    precheck: bool = Field(
        True, description="before submitting, check the request against the partition's largest node "
        "and MaxTime (sinfo/scontrol); skipped when SLURM cannot be asked"
    )
    cancel_unschedulable: bool = Field(
        True, description="cancel a job that SLURM keeps pending for a reason that cannot resolve "
        "(PartitionConfig, PartitionNodeLimit, PartitionTimeLimit, BadConstraints, ...)"
    )
    resources: Resources = Field(default_factory=Resources)
    stages: dict[str, ResourceOverrides] = Field(default_factory=dict)  # type: ignore[valid-type]
    # "launcher.<dotted key>" -> the file or override that set it (emae.config's origin map)
    _origin: dict[str, str] = PrivateAttr(default_factory=dict)

    def origin_of(self, key: str) -> str:
        """The file or override that set `key` (``launcher.stages.pretrain.cpus_per_task``)."""
        return source_of(key, self._origin, DEFAULTS)

    def key_of(self, stage: str | None, name: str) -> str:
        """The dotted key that decides resource `name` of `stage`: its stage override, when set,
        else the common ``resources`` one (``launcher.stages.pretrain.cpus_per_task``)."""
        over = self.stages.get(stage) if stage else None
        if over is not None and getattr(over, name, None) is not None:
            return f"launcher.stages.{stage}.{name}"
        return f"launcher.resources.{name}"

    def for_stage(self, stage: str | None) -> Resources:
        """The resources of `stage`: `resources` with the stage's overrides applied."""
        base = self.resources
        over = self.stages.get(stage) if stage else None
        if over is None:
            return base.model_copy(deep=True)
        changes = over.model_dump(exclude_unset=True, exclude_none=True)
        if "additional_parameters" in changes:
            changes["additional_parameters"] = {**base.additional_parameters, **changes["additional_parameters"]}
        if "setup" in changes:
            changes["setup"] = [*base.setup, *changes["setup"]]
        return Resources.model_validate({**base.model_dump(), **changes})


def load_launcher_config(source: str | Path | Mapping[str, Any] | None = None, overrides: Sequence[str] = (),
                         *, name: str = "params: launcher") -> LauncherConfig:
    """The launcher settings of `source` with `overrides` on top, validated by emae.config.

    `source`: a YAML file (its ``launcher:`` section when it has one, else the whole mapping), a
    mapping (``config.extra["launcher"]``, called `name` in messages), or None for the defaults.
    """
    tree: dict[str, Any] = {}
    origin: dict[str, str] = {}
    if isinstance(source, Mapping):
        merge_tree(tree, {"launcher": dict(source)}, origin, name)
    elif source is not None:
        data = read_yaml(Path(source))
        merge_tree(tree, {"launcher": data.get("launcher", data)}, origin, str(source))
    tree["launcher"] = tree.get("launcher") or {}  # `launcher:` with nothing under it
    merge_overrides(tree, origin, overrides, section="launcher")
    config = validate_section(LauncherConfig, tree, "launcher", origin)
    config._origin = origin
    return config
