"""`emae install-profile`: install the Snakemake SLURM profile (workflow/profiles/slurm) where
`snakemake --profile slurm` finds it, with your partition and account.

Snakemake looks up `--profile NAME` only in ./NAME, ~/.config/snakemake/NAME and
/etc/xdg/snakemake/NAME, so a profile inside the repository is not found by name; this command
copies the template to ~/.config/snakemake/slurm (or --dest). `snakemake --profile
workflow/profiles/slurm` uses the template in place (cluster default partition, no account).
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import yaml

from emae.errors import ConfigError

TEMPLATE = Path(__file__).resolve().parents[2] / "workflow" / "profiles" / "slurm"
CONFIG = "emae-slurm.yaml"


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


def install(dest: Path, partition: str | None, account: str | None, qos: str | None = None,
            template: Path = TEMPLATE, force: bool = False) -> Path:
    """Copy the profile template to `dest` with the SLURM settings filled in; returns `dest`."""
    if not (template / "config.yaml").is_file():
        raise ConfigError(f"{template}: no profile template (config.yaml) here")
    if dest.exists() and any(dest.iterdir()) and not force:
        raise ConfigError(f"{dest}: a profile is already there; pass --force to overwrite it")
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template / "config.yaml", dest / "config.yaml")
    settings = yaml.safe_load((template / CONFIG).read_text())
    resources = settings["launcher"]["resources"]
    for key, value in (("partition", partition), ("account", account), ("qos", qos)):
        if value is not None:
            resources[key] = value
    header = (f"# Installed by `emae install-profile` from {template / CONFIG};\n"
              f"# `launcher:` is passed to `emae launch` (see emae/launch/config.py).\n")
    from emae.io import atomic_write_text

    atomic_write_text(dest / CONFIG, header + yaml.safe_dump(settings, sort_keys=False))
    return dest


def run(args: argparse.Namespace) -> None:
    dest = install(args.dest or default_dest(), args.partition, args.account, args.qos,
                   args.template, args.force)
    name = dest.name if dest.resolve() == default_dest().resolve() else str(dest)
    print(f"installed the SLURM profile in {dest}\nrun: snakemake --profile {name}")
