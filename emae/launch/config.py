"""Typed launcher settings: where a stage runs (locally, or as a SLURM job through submitit) and with
which resources.

Loadable from a plain dict, from a YAML file (either the bare mapping or a top-level ``launcher:``
section, as in ``params/launcher.yaml``) and from ``key=value`` command-line overrides with dotted keys
(``kind=slurm``, ``resources.partition=gpu``, ``stages.pretrain.gpus_per_node=4``). Invalid input raises
:class:`emae.errors.ConfigError` naming the file, the key, the value and what is allowed.

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
from typing import Any, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    PrivateAttr,
    ValidationError,
)

from emae.errors import ConfigError

SbatchValue = Union[bool, int, float, str]


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
    additional_parameters: dict[str, SbatchValue] = Field(
        default_factory=dict,
        description="extra sbatch options, e.g. {constraint: a100, exclusive: true, mail-type: END}",
    )
    setup: list[str] = Field(
        default_factory=list,
        description="shell lines run in the batch script before the job (module load ..., source venv)",
    )


class ResourceOverrides(BaseModel):
    """Per-stage changes to :class:`Resources`: unset fields inherit. ``additional_parameters`` is
    merged key by key (the stage wins); ``setup`` lines are appended to the common ones."""

    model_config = ConfigDict(extra="forbid")

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time_min: PositiveInt | None = None
    nodes: PositiveInt | None = None
    gpus_per_node: NonNegativeInt | None = None
    tasks_per_node: PositiveInt | None = None
    cpus_per_task: PositiveInt | None = None
    mem_gb: PositiveFloat | None = None
    additional_parameters: dict[str, SbatchValue] | None = None
    setup: list[str] | None = None


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
    stages: dict[str, ResourceOverrides] = Field(default_factory=dict)
    # Where each setting came from, for messages: "launcher.<dotted key>" -> file or override (the
    # keys of emae.config's origin map); keys not in it come from `_source`. Set by the loader.
    _origin: dict[str, str] = PrivateAttr(default_factory=dict)
    _source: str = PrivateAttr("launcher defaults")

    def set_origin(self, source: str, origin: Mapping[str, str] | None = None) -> "LauncherConfig":
        self._source, self._origin = source, dict(origin or {})
        return self

    def origin_of(self, key: str) -> str:
        """The file or override that set `key` (``launcher.stages.pretrain.cpus_per_task``), or a
        mapping above it (an override ``stages.pretrain={cpus_per_task: 10}``)."""
        while key:
            if key in self._origin:
                return self._origin[key]
            key = key.rpartition(".")[0]
        return self._source

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


# ------------------------------------------------------------------------------------------ loading


def _format_errors(err: ValidationError, source: str, prefix: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join([prefix, *map(str, e["loc"])]) if prefix else ".".join(map(str, e["loc"]))
        value = e.get("input")
        if e["type"] == "extra_forbidden":
            lines.append(f"{source}: {key}: unknown key (value {value!r})")
        elif e["type"] == "missing":
            lines.append(f"{source}: {key}: missing")
        else:
            lines.append(f"{source}: {key}: {e['msg']} (got {value!r})")
    return "invalid launcher settings:\n  " + "\n  ".join(lines)


def parse_overrides(overrides: Sequence[str]) -> list[tuple[list[str], Any]]:
    """``["kind=slurm", "stages.pretrain.gpus_per_node=2"]`` -> ``[(["kind"], "slurm"), ...]``.
    Values are read as params files read them (emae.config: ``2`` is an int, ``null`` is None,
    ``{a: 1}`` a mapping); a leading ``launcher.`` is allowed and dropped."""
    from emae.config import split_override

    parsed = []
    for item in overrides:
        path, value = split_override(item, example="kind=slurm, resources.partition=gpu")
        if path[0] == "launcher" and len(path) > 1:
            path = path[1:]
        parsed.append((path, value))
    return parsed


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A deep copy of `data` with the dotted ``key=value`` overrides set."""
    import copy

    from emae.config import set_dotted

    out: dict[str, Any] = copy.deepcopy(dict(data))
    for item, (path, value) in zip(overrides, parse_overrides(overrides)):
        set_dotted(out, path, value, item)
    return out


def load_launcher_config(
    source: str | Path | Mapping[str, Any] | None = None,
    overrides: Sequence[str] = (),
    *,
    name: str | None = None,
) -> LauncherConfig:
    """Build a :class:`LauncherConfig`.

    `source`: a YAML file path (its ``launcher:`` section when it has one, else the whole mapping), a
    mapping (a plain dict, e.g. ``params["launcher"]``), or None for the defaults (``kind: local``).
    `overrides`: dotted ``key=value`` strings applied on top. `name`: how to call the source in error
    messages (defaults to the file path, or ``launcher``).
    """
    import yaml

    from emae.config import load_yaml

    data: Any
    if source is None:
        data, where = {}, name or "launcher defaults"
    elif isinstance(source, Mapping):
        data, where = dict(source), name or "launcher"
    else:
        path = Path(source)
        where = name or str(path)
        try:
            text = path.read_text()
        except OSError as err:
            raise ConfigError(f"{where}: cannot read the launcher settings: {err.strerror or err}") from None
        try:
            data = load_yaml(text, where)
        except yaml.YAMLError as err:
            raise ConfigError(f"{where}: not valid YAML: {err}") from None
        if data is None:
            data = {}
        if isinstance(data, Mapping) and isinstance(data.get("launcher"), Mapping):
            data = dict(data["launcher"])
            where = f"{where}: launcher"
        elif isinstance(data, Mapping) and "launcher" in data and data["launcher"] is None:
            data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping of launcher settings, got {type(data).__name__} {data!r}")
    source = where
    if overrides:
        data = apply_overrides(data, overrides)
        where = f"{where} (with overrides {' '.join(overrides)})"
    try:
        config = LauncherConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, where, "")) from None
    origin = {"launcher." + ".".join(path): f"override {item!r}"
              for item, (path, _) in zip(overrides, parse_overrides(overrides))}
    return config.set_origin(source.removesuffix(": launcher"), origin)
