# Shared by all rules: config validation, the pipeline description, and how a job is run.
# Every job runs `emae stage NAME [--variant V --seed S] ...`, which builds the stage's command line
# (emae/workflow/stages.py, the same description dvc.yaml is generated from) and runs it through
# `emae launch` (local, or SLURM with the profile). Nothing else happens in the rules.

import os
import shlex
import sys

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from emae.errors import EmaeError
from emae.workflow.plan import snakemake_plan
from emae.workflow.stages import PATTERN, RUN_STAGES, Pipeline, Run, flatten

validate(config, "../schemas/config.schema.yaml")
if isinstance(config["overrides"], str):
    # `overrides='[a=1 b=[0]]'`: YAML cannot read a bracketed value inside a flow list, so Snakemake
    # passes the text through; no override starts with "[", so the brackets are the list's own
    text = config["overrides"].strip()
    config["overrides"] = (text[1:-1] if text.startswith("[") and text.endswith("]") else text).split()

# The whole params tree (every section, every variant) is validated here, before any job runs.
try:
    PIPELINE = Pipeline(config["params"], config["preset"], config["overrides"])
    # the cost before the cost (emae plan); a stage that cannot fit its launcher's GPU stops here
    PLAN = snakemake_plan(PIPELINE, config)
except EmaeError as err:
    raise WorkflowError(f"emae: {err}") from None


onstart:
    print(PLAN.summary(), file=sys.stderr)

if (not PIPELINE.stage_enabled("prepare") and PIPELINE.config.data.kind == "imagefolder"
        and not os.path.exists(PIPELINE.data_root)):
    print(f"emae: warning: data.root={PIPELINE.data_root!r} does not exist here "
          "(pipeline.stages.prepare is false: set data.root to your data set)", file=sys.stderr)

# Jobs run the emae of this checkout with this interpreter, wherever the working directory is.
EMAE = f"{shlex.quote(sys.executable)} -m emae.cli"
os.environ["PYTHONPATH"] = os.pathsep.join(
    [workflow.basedir, *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]])

_launcher = config["launcher"]
LOCAL = ((_launcher if isinstance(_launcher, str) else (_launcher or {}).get("kind"))
         or PIPELINE.config.section("launcher").kind) == "local"
# Local jobs: two at a time by default, each with its share of the cores (small models and the
# jobs' start-up use two cores better as two jobs than as one); torch takes the count from
# OMP_NUM_THREADS. SLURM jobs get their CPUs from the launcher's resources instead.
THREADS = config["threads"] or (max(1, workflow.cores // 2) if LOCAL else workflow.cores)
THREAD_ENV = "OMP_NUM_THREADS={threads} " if LOCAL else ""


# Pre-training first, the longest (the plan's FLOPs) first: evaluations then fill both job slots to
# the end, where in Snakemake's own order the study could end on one long pre-training and an idle core.
_PRETRAIN_FLOPS = {job.run: job.flops or 0.0 for job in PLAN.jobs if job.stage == "pretrain"}
_PRETRAIN_ORDER = {run: rank for rank, run in enumerate(sorted(_PRETRAIN_FLOPS, key=_PRETRAIN_FLOPS.get), 1)}


def pretrain_priority(wildcards):
    return _PRETRAIN_ORDER.get(f"{wildcards.variant}/seed{wildcards.seed}", 1)


def launcher_args(stage):
    """`config["launcher"]` as `emae stage --launcher key=value` arguments (this stage's part)."""
    launcher = config["launcher"]
    if isinstance(launcher, str):
        launcher = {"kind": launcher}
    args = ["--launcher-params", config["launcher_params"]] if config["launcher_params"] else []
    for item in flatten(launcher or {}):
        if not item.startswith("stages.") or item.startswith(f"stages.{stage}."):
            args += ["--launcher", item]
    return args


def _run(wildcards):
    return Run(wildcards.variant, int(wildcards.seed)) if "variant" in wildcards.keys() else None


def job_of(stage, wildcards):
    return PIPELINE.job(stage, _run(wildcards))


def stage_inputs(stage):
    return lambda wildcards: job_of(stage, wildcards).deps


def stage_outputs(stage):
    """The rule's outputs (persistent resume state is left undeclared: Snakemake would delete it)."""
    return [directory(o.path) if o.directory else o.path for o in PIPELINE.pattern(stage).snakemake_outs]


def stage_params(stage):
    """The resolved values of the params keys the stage reads: Snakemake reruns when they change."""
    return lambda wildcards: PIPELINE.param_values(job_of(stage, wildcards))


def stage_code(stage):
    """A digest of the package code the job runs (the import closure of its entry modules, the
    files dvc.yaml lists as its deps): a changed digest is a params change, so Snakemake reruns it."""
    return lambda wildcards: PIPELINE.code_digest(job_of(stage, wildcards).code)


def job_overrides(stage):
    """The user's overrides on a job's command line. Switching another stage on or off
    (`pipeline.stages.S=...`) changes which jobs exist, not what this one computes, so those
    toggles stay off its command line: Snakemake reruns a job whose command line changed. Kept:
    the job's own toggle, `prepare` (it decides where the data comes from) and, for the report
    (it collects every stage's results), all of them."""
    keep = {f"pipeline.stages.{stage}", "pipeline.stages.prepare"}
    return [o for o in PIPELINE.overrides
            if stage == "report" or not o.startswith("pipeline.stages.") or o.split("=", 1)[0] in keep]


def stage_args(stage):
    """The arguments of `emae stage` for one job; its log names the full command line."""
    def args(wildcards):
        run = _run(wildcards)
        argv = [stage, *(["--variant", run.variant, "--seed", str(run.seed)] if run else []),
                "-p", PIPELINE.params, *(["--preset", PIPELINE.preset] if PIPELINE.preset else []),
                *launcher_args(stage), *job_overrides(stage)]
        return shlex.join(argv)
    return args


def log_path(stage):
    return f"logs/{stage}/{{variant}}/seed{{seed}}.log" if stage in RUN_STAGES else f"logs/{stage}.log"


wildcard_constraints:
    variant=r"[A-Za-z][A-Za-z0-9_]*",
    seed=r"\d+",
