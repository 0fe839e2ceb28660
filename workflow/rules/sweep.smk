# Optuna sweeps over K and the mask ratio (params/sweep.yaml; docs/sweeps.md). Part of `all` only
# when pipeline.stages.sweep is true (dvc.yaml then has the stage `sweep` too):
#
#   snakemake sweep --cores all                                   # results/sweeps/k_mask_ratio/
#   snakemake results/sweeps/<study>/best.yaml --cores all        # another study (folder) name
#   snakemake sweep --cores all --config overrides="sweep.sampler=tpe sweep.n_trials=20"
#
# The job is `emae launch --stage sweep -- sweep -o results/sweeps/<study> ...` (the coordinator
# runs here or as a SLURM job, per the launcher settings); its workers are local processes or a
# SLURM job array (sweep.backend). The study (study.journal) and the trial folders are resume
# state and not declared as outputs, so Snakemake never deletes them: rerunning the rule continues
# the study, and a study reopened with another search space is refused with a clear error.
import json

from emae.workflow.stages import SWEEP_DIR, SWEEP_STUDY as SWEEP_DEFAULT_STUDY
SWEEP_SECTIONS = ("sweep", "data", "model", "pretrain", "knn", "linprobe")


def sweep_launcher_args():
    """`launcher_args("sweep")` (for `emae stage`) as `emae launch` takes them: key=value positionals."""
    args, items = [], iter(launcher_args("sweep"))
    for flag in items:
        value = next(items)
        args += [flag, value] if flag == "--launcher-params" else [value]
    return args


def sweep_args(wildcards):
    argv = ["launch", "--stage", "sweep", *sweep_launcher_args(), "--",
            "sweep", "-p", PIPELINE.params, *(["--preset", PIPELINE.preset] if PIPELINE.preset else []),
            "-o", f"{SWEEP_DIR}/{wildcards.study}", *job_overrides("sweep")]
    return shlex.join(argv)


def sweep_values():
    """What the sweep's results depend on: Snakemake reruns the rule when it changes."""
    tree = PIPELINE.config.to_dict()
    return json.dumps({k: tree.get(k) for k in SWEEP_SECTIONS}, sort_keys=True)


def sweep_code():
    """A digest of the package code the sweep runs (as `stage_code`): it reruns when that changes."""
    return PIPELINE.code_digest(PIPELINE.code("sweep", SWEEP_SECTIONS))


if "sweep" in PIPELINE.config.extra:

    localrules: sweep


    rule sweep:
        input: f"{SWEEP_DIR}/{SWEEP_DEFAULT_STUDY}/best.yaml"


    rule sweep_study:
        input: [PIPELINE.data_root] if PIPELINE.stage_enabled("prepare") else []
        output:
            table=f"{SWEEP_DIR}/{{study}}/trials.csv",
            best=f"{SWEEP_DIR}/{{study}}/best.yaml",
            metrics=f"{SWEEP_DIR}/{{study}}/metrics.json",
            heatmap=report(f"{SWEEP_DIR}/{{study}}/plots/heatmap.png", category="4. Sweeps"),
            history=f"{SWEEP_DIR}/{{study}}/plots/history.png",
        params: values=sweep_values(), code=sweep_code(), args=sweep_args
        log: "logs/sweep/{study}.log"
        threads: config["threads"] or workflow.cores  # its workers share them (sweep.threads_per_worker)
        wildcard_constraints:
            study=r"[A-Za-z0-9_.-]+",
        shell: "{EMAE} {params.args} > {log} 2>&1"
