"""`emae launch`: run an emae command locally or as a SLURM job (submitit).

    emae launch --stage NAME [--launcher-params FILE] [key=value ...] -- COMMAND [ARGS...]

COMMAND ARGS is an emae command line (``pretrain --params params --out runs/emae``). The launcher
settings come from FILE (its ``launcher:`` section, or the whole mapping), by default
``params/launcher.yaml`` when it exists, else the defaults (``kind: local``); ``key=value`` overrides
use dotted keys: ``kind=slurm resources.partition=gpu stages.pretrain.gpus_per_node=2``.

On SLURM, a request that no node of its partition can run is refused before submitting (unless
--no-precheck), and a job that SLURM keeps pending for a reason that cannot resolve
(PartitionConfig, ...) is cancelled; see docs/slurm.md.

Exit status: 0 when the command succeeded; its own exit code, or 1, when it failed, the job died or
could never start; 2 for bad settings or a request the partition cannot run; 128+N when interrupted
by signal N (the SLURM job is cancelled first).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from emae.errors import ConfigError
from emae.launch.job import DEFAULT_ENTRY

DEFAULT_PARAMS = Path("params") / "launcher.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.usage = ("emae launch --stage NAME [--launcher-params FILE] [--no-precheck] [--dry-run] "
                    "[key=value ...] -- COMMAND [ARGS...]")
    parser.description = __doc__.split("\n\n")[0]
    parser.epilog = "\n\n".join(__doc__.split("\n\n")[2:])
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--stage", required=True,
                        help="stage name: picks `stages.NAME` resource overrides, names the job and its log folder")
    parser.add_argument("--launcher-params", metavar="FILE", default=None,
                        help=f"YAML launcher settings (default: {DEFAULT_PARAMS} when it exists, else run locally)")
    parser.add_argument("--entry", default=DEFAULT_ENTRY, metavar="MODULE[:FUNCTION]",
                        help="what runs the command line: a module run as `python -m MODULE` (default: "
                        "%(default)s) or a function; emae.launch.selftest:main checks a cluster set-up")
    parser.add_argument("--no-precheck", action="store_true",
                        help="submit without first checking the request against the partition's nodes "
                        "(same as precheck=false; a job SLURM can never start is still cancelled)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved settings and resources of the stage, and exit")
    parser.add_argument("rest", nargs=argparse.REMAINDER, metavar="[key=value ...] -- COMMAND ...",
                        help=argparse.SUPPRESS)


def split_rest(rest: list[str]) -> tuple[list[str], list[str]]:
    """``[overrides..., "--", argv...]`` -> (overrides, argv)."""
    if "--" not in rest:
        raise ConfigError(
            "expected `--` before the command to launch, e.g. "
            "`emae launch --stage pretrain -- pretrain --params params --out runs/emae`"
        )
    i = rest.index("--")
    overrides, argv = rest[:i], rest[i + 1:]
    options = [o for o in overrides if o.startswith("-")]
    if options:
        raise ConfigError(f"options must come before the key=value overrides: {' '.join(options)}")
    return overrides, argv


def launch_stage(stage: str, argv: Sequence[str], launcher_params: str | Path | None = None,
                 overrides: Sequence[str] = (), entry: str = DEFAULT_ENTRY, dry_run: bool = False) -> int:
    """`emae launch --stage STAGE [--launcher-params FILE] [overrides] -- ARGV` (also `emae stage`'s)."""
    from emae.launch.config import load_launcher_config

    if launcher_params is None and DEFAULT_PARAMS.is_file():
        launcher_params = DEFAULT_PARAMS
    config = load_launcher_config(launcher_params, overrides)
    if dry_run:
        from emae.config import dump_yaml

        sys.stdout.write(dump_yaml({"launcher": config.model_dump(exclude={"resources", "stages"}),
                                    "stage": stage, "resources": config.for_stage(stage).model_dump(),
                                    "command": list(argv), "entry": entry}))
        return 0
    if not argv:
        raise ConfigError("no command after `--` (e.g. `-- pretrain --params params --out runs/emae`)")
    from emae.launch.runner import launch

    return launch(argv, stage=stage, config=config, entry=entry)


def run(args: argparse.Namespace) -> int:
    overrides, argv = split_rest(list(args.rest))
    return launch_stage(args.stage, argv, args.launcher_params,
                        [*overrides, *(["precheck=false"] if args.no_precheck else [])], args.entry, args.dry_run)
