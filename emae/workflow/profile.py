"""`emae install-profile`: install the Snakemake SLURM profile (workflow/profiles/slurm) where
`snakemake --profile slurm` finds it, with your partition and account, and resources that fit it.

Snakemake looks up `--profile NAME` only in ./NAME, ~/.config/snakemake/NAME and
/etc/xdg/snakemake/NAME, so a profile inside the repository is not found by name; this command
copies the template to ~/.config/snakemake/slurm (or --dest). `snakemake --profile
workflow/profiles/slurm` uses the template in place (cluster default partition, no account).

When SLURM answers here, the shipped CPUs, memory, GPUs, nodes and time of every stage are capped
to what the partition's largest node and limits give (SLURM would keep a bigger job pending
forever), and the changes are printed; the resources written are always printed.
"""

from __future__ import annotations

import argparse
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emae.config import dump_yaml, read_yaml
from emae.errors import ConfigError

TEMPLATE = Path(__file__).resolve().parents[2] / "workflow" / "profiles" / "slurm"
CONFIG = "emae-slurm.yaml"
FITTED = ("nodes", "tasks_per_node", "cpus_per_task", "mem_gb", "gpus_per_node", "time_min")


def default_dest() -> Path:
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "snakemake" / "slurm"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--partition", default=None, help="SLURM partition (default: the cluster's)")
    parser.add_argument("--account", default=None, help="SLURM account")
    parser.add_argument("--qos", default=None, help="SLURM QOS")
    parser.add_argument("--dest", type=Path, default=None,
                        help="profile folder to write (default: ~/.config/snakemake/slurm)")
    parser.add_argument("--template", type=Path, default=TEMPLATE, help=argparse.SUPPRESS)
    parser.add_argument("--force", action="store_true", help="overwrite an existing profile")


@dataclass
class Installed:
    """What :func:`install` wrote, and what it changed to fit the partition."""

    dest: Path
    launcher: dict[str, Any]  # the `launcher:` section written
    partition: str = ""  # what the resources were fitted to (describe()); empty when not fitted
    changes: list[tuple[str, Any, Any]] = field(default_factory=list)  # (key, shipped, written)
    not_fitted: str = ""  # why the resources were written as shipped


def fit_to_partition(launcher: dict[str, Any], part: Any) -> list[tuple[str, Any, Any]]:
    """Cap the `launcher` section's resources (common and per stage) in place to what `part`
    (an :class:`emae.launch.slurm.Partition`) gives; returns the changes."""
    from emae.launch.config import LauncherConfig
    from emae.launch.slurm import fit_resources

    changes: list[tuple[str, Any, Any]] = []

    def plain(value: Any) -> Any:  # 21.0 -> 21 (as the YAML ships it)
        return int(value) if isinstance(value, float) and value.is_integer() else value

    def apply(target: dict[str, Any], prefix: str, before: Any, after: Any) -> None:
        for name in FITTED:
            old, new = getattr(before, name), getattr(after, name)
            if old != new:
                target[name] = plain(new)
                changes.append((f"{prefix}.{name}", plain(old), target[name]))

    base = LauncherConfig.model_validate(launcher).resources
    apply(launcher.setdefault("resources", {}), "resources", base, fit_resources(base, part))
    config = LauncherConfig.model_validate(launcher)  # the stages inherit the fitted common values
    for stage in launcher.get("stages") or {}:
        wanted = config.for_stage(stage)
        apply(launcher["stages"][stage], f"stages.{stage}", wanted, fit_resources(wanted, part))
    return changes


def install(dest: Path, partition: str | None, account: str | None, qos: str | None = None,
            template: Path = TEMPLATE, force: bool = False, fit: bool = True) -> Installed:
    """Copy the profile template to `dest` with the SLURM settings filled in and, when SLURM can be
    asked here (and `fit`), the resources capped to the partition."""
    if not (template / "config.yaml").is_file():
        raise ConfigError(f"{template}: no profile template (config.yaml) here")
    if dest.exists() and any(dest.iterdir()) and not force:
        raise ConfigError(f"{dest}: a profile is already there; pass --force to overwrite it")
    settings = read_yaml(template / CONFIG)
    launcher = settings["launcher"]
    resources = launcher.setdefault("resources", {})
    for key, value in (("partition", partition), ("account", account), ("qos", qos)):
        if value is not None:
            resources[key] = value
    result = Installed(dest, launcher)
    if fit:
        _fit(result, partition)
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template / "config.yaml", dest / "config.yaml")
    header = (f"# Installed by `emae install-profile` from {template / CONFIG};\n"
              f"# `launcher:` is passed to `emae launch` (see emae/launch/config.py).\n")
    if result.changes:
        header += f"# Resources capped to fit {result.partition}.\n"
    from emae.io import atomic_write_text

    atomic_write_text(dest / CONFIG, header + dump_yaml(settings))
    return result


def _fit(result: Installed, partition: str | None) -> None:
    from emae.launch.slurm import PartitionNotFound, query_partition

    try:
        part = query_partition(partition)
    except PartitionNotFound as missing:
        result.not_fitted = (f"SLURM here has no partition {missing.name!r} (partitions: "
                             f"{', '.join(missing.known) or 'none'})")
        return
    if part is None:
        result.not_fitted = "SLURM could not be asked about the partition here (no sinfo/scontrol, or no answer)"
        return
    result.partition = part.describe()
    result.changes = fit_to_partition(result.launcher, part)


def resource_table(launcher: dict[str, Any]) -> list[str]:
    """What each stage asks for, one line per stage (the common resources first)."""
    from emae.launch.config import LauncherConfig

    config = LauncherConfig.model_validate(launcher)
    rows = [("(every stage)", config.resources)]
    rows += [(stage, config.for_stage(stage)) for stage in config.stages]
    width = max(len(name) for name, _ in rows)
    lines = [f"  {'stage':<{width}}  nodes  tasks/node  CPUs/task  mem_gb  GPUs/node  time_min"]
    for name, res in rows:
        mem = "default" if res.mem_gb is None else f"{res.mem_gb:g}"
        lines.append(f"  {name:<{width}}  {res.nodes:>5}  {res.tasks_per_node:>10}  {res.cpus_per_task:>9}  "
                     f"{mem:>6}  {res.gpus_per_node:>9}  {res.time_min:>8}")
    return lines


def run(args: argparse.Namespace) -> None:
    result = install(args.dest or default_dest(), args.partition, args.account, args.qos,
                     args.template, args.force)
    dest = result.dest
    res = result.launcher["resources"]
    print(f"installed the SLURM profile in {dest} (config.yaml, {CONFIG})")
    print(f"partition: {res.get('partition') or '(the cluster default)'}, account: {res.get('account') or '-'}, "
          f"qos: {res.get('qos') or '-'}")
    if result.changes:
        print(f"capped the shipped resources to fit {result.partition}:")
        print("\n".join(f"  {key}: {old} -> {new}" for key, old, new in result.changes))
    elif result.partition:
        print(f"the shipped resources fit {result.partition}")
    else:
        print(f"resources written as shipped: {result.not_fitted}; check them against your nodes "
              f"(sinfo -N -o '%N %c %m %G') in {dest / CONFIG}")
    print(f"what each stage asks for (launcher: in {dest / CONFIG}):")
    print("\n".join(resource_table(result.launcher)))
    name = dest.name if dest.resolve() == default_dest().resolve() else str(dest)
    print(f"run: snakemake --profile {name}")
