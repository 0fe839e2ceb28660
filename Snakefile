# emae pipeline: prepare -> pretrain (each variant x seed) -> kNN / linear probe / fine-tune /
# consistency / reconstructions -> report.
#
#   snakemake --cores all                                   # the embedded default, locally
#   snakemake --cores all --config preset=cifar10           # a preset (params/presets/*.yaml)
#   snakemake --profile slurm --config preset=imagenet_vit_b16   # jobs as SLURM jobs (see docs/pipeline.md)
#   snakemake --cores all --report report.html              # the report, after a run
#
# What runs (variants, seeds, stages) and every number are in params/; the stages are described
# once in emae/workflow/stages.py, which also generates dvc.yaml (`emae dvc-yaml`).
import sys

sys.path.insert(0, workflow.basedir)  # the emae of this checkout

from snakemake.utils import min_version

min_version("9.0")


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"


localrules: all


rule all:
    default_target: True
    input:
        PIPELINE.job("report").deps,
        [o.path for o in PIPELINE.job("report").snakemake_outs],
        [o.path for o in PIPELINE.job("sweep").outs] if PIPELINE.stage_enabled("sweep") else [],


include: "workflow/rules/prepare.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"

# Optuna sweeps (`snakemake sweep`, or results/sweeps/<study>/best.yaml); in `all` only when
# pipeline.stages.sweep is true.
include: "workflow/rules/sweep.smk"
