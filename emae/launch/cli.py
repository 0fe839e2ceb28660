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
    parser.add_argument("--entry", default=DEFAULT_ENTRY, metavar="MODULE:FUNCTION",
                        help="function run with the command line (default: %(default)s; "
                        "emae.launch.selftest:main checks a cluster set-up)")
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


def run(args: argparse.Namespace) -> int:
    from emae.launch.config import load_launcher_config

    overrides, argv = split_rest(list(args.rest))
    if args.no_precheck:
        overrides.append("precheck=false")
    source = args.launcher_params
    if source is None and DEFAULT_PARAMS.is_file():
        source = DEFAULT_PARAMS
    config = load_launcher_config(source, overrides)
    if args.dry_run:
        import yaml

        resolved = {
            "launcher": config.model_dump(exclude={"resources", "stages"}),
            "stage": args.stage,
            "resources": config.for_stage(args.stage).model_dump(),
            "command": argv,
            "entry": args.entry,
        }
        yaml.safe_dump(resolved, sys.stdout, sort_keys=False)
        return 0
    if not argv:
        raise ConfigError("no command after `--` (e.g. `-- pretrain --params params --out runs/emae`)")
    from emae.launch.runner import launch

    return launch(argv, stage=args.stage, config=config, entry=args.entry)
