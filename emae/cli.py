"""`emae <command>`: a thin dispatcher. Each command lives in its own module, imported lazily
(so `emae launch` or `emae --help` do not pay for importing torch).

A command module defines `add_arguments(parser)` and `run(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Keep sorted by pipeline order.
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("emae.data.prepare", "write the embedded data set as an ImageFolder tree"),
    "check": ("emae.data.check", "scan the data set: files and classes per split, every unreadable image"),
    "pretrain": ("emae.train.pretrain", "pre-train EMAE / MAE (resumes automatically)"),
    "knn": ("emae.eval.knn", "kNN top-1/top-5 of a pre-trained encoder (frozen features)"),
    "linprobe": ("emae.eval.linprobe", "linear probe of a frozen pre-trained encoder (MAE protocol)"),
    "finetune": ("emae.eval.finetune", "fine-tune a pre-trained encoder (MAE recipe; resumes)"),
    "consistency": ("emae.eval.consistency", "spread of a model's predictions over random masks"),
    "visualize": ("emae.eval.visualize", "PNG grids of reconstructions (each of the K parts)"),
    "prepare-dense": ("emae.dense.generate", "write the generated detection/segmentation set (COCO, ADE20K layouts)"),
    "detect": ("emae.dense.detect", "Mask R-CNN (ViTDet-style) on a pre-trained encoder: COCO box/mask AP (resumes)"),
    "segment": ("emae.dense.segment", "UperNet-style semantic segmentation on a pre-trained encoder: mIoU (resumes)"),
    "plan": ("emae.workflow.plan", "what the pipeline will cost: FLOPs, GPU-hours, memory per GPU, requeues"),
    "stage": ("emae.workflow.run_stage", "run one pipeline job (variant x seed) through `emae launch`"),
    "report": ("emae.report.cli", "summary table (CSV, Markdown) and plots of all pipeline runs"),
    "dvc-yaml": ("emae.workflow.dvc", "write dvc.yaml from the pipeline description (or --check it)"),
    "install-profile": ("emae.workflow.profile", "install the Snakemake SLURM profile with your partition/account"),
    "sweep": ("emae.sweep.cli", "Optuna sweep over K and the mask ratio (grid / TPE; resumable)"),
    "launch": ("emae.launch.cli", "run an emae command locally or as a SLURM job (submitit)"),
}


def build_parser() -> argparse.ArgumentParser:
    from emae import __version__

    parser = argparse.ArgumentParser(prog="emae", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"emae {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        build_parser().parse_args(argv)  # prints usage / version / the error, and exits
        return 2
    name, rest = argv[0], argv[1:]
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"emae {name}", description=COMMANDS[name][1])
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    from emae.errors import run_reporting_errors

    return run_reporting_errors(module.run, args)


if __name__ == "__main__":
    sys.exit(main())
