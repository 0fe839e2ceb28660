"""`emae stage NAME [--variant V --seed S]`: run one job of the pipeline through `emae launch`.

Both DAGs (the Snakefile and dvc.yaml) run their jobs with this command. It loads and validates the
params tree as it is now (so `dvc exp run -S ...` and edited variants take effect), builds the job's
command line from `emae.workflow.stages`, prints it, and runs `emae launch --stage NAME -- <command>`
(locally, or as a SLURM job when the launcher settings say so).
"""

from __future__ import annotations

import argparse
import shlex
import sys

from emae.workflow.stages import STAGES, add_pipeline_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("stage", choices=STAGES, help="the stage to run")
    parser.add_argument("--variant", default=None, help="variant (pipeline.variants) of a per-run stage")
    parser.add_argument("--seed", type=int, default=None, help="seed (pipeline.seeds) of a per-run stage")
    add_pipeline_arguments(parser, "for `emae launch` (default: its own)")
    parser.add_argument("--print", action="store_true", dest="print_only",
                        help="print the command line and exit")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="params overrides for every stage (win over the variant)")
    # the stage name and the overrides are both positional, with options between them
    parser.parse_args = parser.parse_intermixed_args  # type: ignore[method-assign]


def run(args: argparse.Namespace) -> int:
    from emae.workflow.stages import RUN_STAGES, Pipeline

    pipeline = Pipeline(args.params, args.preset, args.overrides)
    run_ = pipeline.find_run(args.variant, args.seed) if args.stage in RUN_STAGES else None
    if run_ is None and (args.variant is not None or args.seed is not None):
        pipeline.job(args.stage, run=pipeline.runs[0])  # raises: the stage takes no variant
    job = pipeline.job(args.stage, run_)
    argv = job.launch_argv(args.launcher_params, args.launcher)
    batch = _batch_line(pipeline, args.stage, run_, args.launcher)
    if batch:
        print(batch, file=sys.stderr, flush=True)
    print("emae " + shlex.join(argv), file=sys.stderr if not args.print_only else sys.stdout, flush=True)
    if args.print_only:
        return 0
    from emae.launch.cli import launch_stage

    return launch_stage(job.stage, job.argv, args.launcher_params, args.launcher)


def _batch_line(pipeline, stage: str, run, launcher_overrides: list[str]) -> str | None:
    """What a training job will step with, from the launcher's process count for it: the effective
    batch, how it is made up, and the learning rate it gives."""
    from emae.config import effective_batch
    from emae.launch.config import load_launcher_config
    from emae.workflow.stages import DENSE_STAGES, TRAINING_STAGES

    if stage not in TRAINING_STAGES:
        return None
    config = pipeline.run_configs[run]
    cfg = config.pretrain if stage == "pretrain" else config.section(stage)
    res = load_launcher_config(config.extra.get("launcher", {}), launcher_overrides).for_stage(stage)
    world = res.nodes * res.tasks_per_node
    accum, effective = effective_batch(cfg, stage, world)
    lr = cfg.lr if stage in DENSE_STAGES else cfg.blr * effective / 256  # dense: an absolute lr
    return (f"{stage} {run.name}: effective batch {effective} = batch_size {cfg.batch_size} x {world} "
            f"process(es) x accum_iter {accum}; lr {lr:.4g}")
