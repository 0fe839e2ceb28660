"""The stages of the pipeline, described once.

`Pipeline(params, preset, overrides)` loads and validates the whole params tree (every section,
and every variant merged over it) and lists the concrete jobs of the DAG:

    prepare                      (optional: the embedded data set at data.root)
    pretrain   per variant x seed -> runs/<variant>/seed<seed>/
    knn, linprobe, finetune, consistency, visualize
               per variant x seed -> results/<variant>/seed<seed>/<stage>/
    baselines  per seed: results/pixels/seed<seed>/{knn,linprobe}/ (raw pixels) and
               results/random_init/seed<seed>/{knn,linprobe,finetune,detect,segment}/ (the reference variant's
               architecture at its initial weights; fine-tuning it is training from scratch)
    report                       -> results/report/

Each job carries its `emae` command line, its inputs, its outputs (with DVC's flags), the params
keys it reads and the source it runs. The Snakefile and `emae dvc-yaml` both build their DAG from
here, and both run a job as `emae stage NAME [--variant V --seed S]`, which resolves the command
again from the current params and hands it to `emae launch` (local or SLURM).
"""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from emae.config import (Config, config_from_tree, effective_batch, load_raw, merge_overrides, merge_tree,
                         param_files, parse_value, validate_all)
from emae.errors import ConfigError
from emae.workflow.closure import ImportGraph, entry_modules
from emae.workflow.config import PipelineConfig

RUNS_DIR = "runs"
RESULTS_DIR = "results"
REPORT_DIR = f"{RESULTS_DIR}/report"

EVAL_STAGES = ("knn", "linprobe", "finetune")  # read the exported encoder
MODEL_STAGES = ("consistency", "visualize")  # read the full checkpoint (decoder included)
DENSE_STAGES = ("detect", "segment")  # dense transfer on the exported encoder (emae.dense)
RUN_STAGES = ("pretrain", *EVAL_STAGES, *MODEL_STAGES, *DENSE_STAGES)
TRAINING_STAGES = ("pretrain", "linprobe", "finetune", *DENSE_STAGES)  # step with an effective batch
STAGES = ("prepare", "prepare_dense", *RUN_STAGES, "report", "sweep")
# baseline "runs" (no pre-training) -> the evaluation stages each one has
BASELINE_STAGES = {"pixels": ("knn", "linprobe"), "random_init": (*EVAL_STAGES, *DENSE_STAGES)}
SWEEP_DIR = f"{RESULTS_DIR}/sweeps"
SWEEP_STUDY = "k_mask_ratio"  # the study the pipeline runs when pipeline.stages.sweep is true

# Report outputs (the report command writes exactly these; `emae.report` imports the names).
SUMMARY_CSV = "summary.csv"
SUMMARY_MD = "summary.md"
TIME_TO_TARGET_CSV = "time_to_target.csv"
RUNS_CSV = "runs.csv"
PLOTS = {
    "loss_curves": "loss_curves.png",
    "accuracy_vs_time": "accuracy_vs_time.png",
    "accuracy_vs_flops": "accuracy_vs_flops.png",
    "accuracy_vs_epochs": "accuracy_vs_epochs.png",
}
CURVES_DIR = "curves"  # one CSV per run (epoch, seconds, losses, kNN): DVC plots read these
RECONSTRUCTIONS_DIR = "reconstructions"


def add_pipeline_arguments(parser: argparse.ArgumentParser, launcher_help: str | None = None) -> None:
    """--params and --preset of the commands that read the whole pipeline; with `launcher_help`
    (what the launcher settings are for) also --launcher-params and --launcher."""
    parser.add_argument("--params", "-p", default="params", metavar="PATH",
                        help="params directory or file (default: %(default)s)")
    parser.add_argument("--preset", default=None, help="overlay params/presets/<PRESET>.yaml")
    if launcher_help is not None:
        parser.add_argument("--launcher-params", default=None, metavar="FILE",
                            help=f"launcher settings file {launcher_help}")
        parser.add_argument("--launcher", action="append", default=[], metavar="KEY=VALUE",
                            help="launcher override, e.g. kind=slurm, stages.pretrain.gpus_per_node=8 "
                                 "(repeatable)")


@dataclass(frozen=True, order=True)
class Run:
    """One pre-training run: a variant with a seed."""

    variant: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.variant}/seed{self.seed}"

    @property
    def id(self) -> str:  # for DVC stage names (no '/')
        return f"{self.variant}-seed{self.seed}"

    @property
    def run_dir(self) -> str:
        return f"{RUNS_DIR}/{self.name}"

    def result_dir(self, stage: str) -> str:
        return f"{RESULTS_DIR}/{self.name}/{stage}"


# A run whose paths are Snakemake wildcard patterns: `Pipeline.pattern(stage)` gives a rule's outputs.
PATTERN = Run("{variant}", "{seed}")  # type: ignore[arg-type]


@dataclass(frozen=True)
class Out:
    """An output of a job, with the flags DVC needs.

    persist: DVC must not delete it before rerunning the stage (resume state: checkpoints and the
    logs that go with them). Snakemake deletes a job's declared outputs before running it, so
    persistent outputs are not declared to Snakemake at all (`StageJob.snakemake_outs`).

    Every output goes to DVC's cache: runs/ and results/ are git-ignored, so experiments
    (`dvc exp show`) and remotes (`dvc push`) reach metrics and checkpoints through it.
    """

    path: str
    kind: Literal["out", "metrics", "plots"] = "out"
    persist: bool = False
    directory: bool = False


@dataclass
class StageJob:
    """One concrete job of the DAG."""

    stage: str
    run: Run | None
    argv: list[str]  # the emae command line (without the launcher)
    deps: list[str]
    outs: list[Out]
    params: list[str]  # dotted keys of the params tree this job reads
    code: list[str] = field(default_factory=list)  # package source it runs (Pipeline.code)

    @property
    def name(self) -> str:
        return self.stage if self.run is None else f"{self.stage}-{self.run.id}"

    @property
    def snakemake_outs(self) -> list[Out]:
        return [o for o in self.outs if not o.persist]

    def launch_argv(self, launcher_params: str | None = None,
                    launcher_overrides: list[str] = ()) -> list[str]:
        """`emae launch --stage NAME [...] -- <argv>`: every compute job goes through the launcher."""
        argv = ["launch", "--stage", self.stage]
        if launcher_params:
            argv += ["--launcher-params", launcher_params]
        return argv + list(launcher_overrides) + ["--", *self.argv]


def format_value(value: Any) -> str:
    """A params value as `key=value` text that `emae.config.parse_override` reads back unchanged."""
    if isinstance(value, str) and parse_value(value, "value") == value:
        return value
    return json.dumps(value)  # JSON is YAML: 1, 0.5, true, null, [0.5, 0.5], "1.0"


def flatten(tree: dict[str, Any], prefix: str = "") -> list[str]:
    """{model: {num_parts: 1}} -> ["model.num_parts=1"] (lists stay whole values)."""
    items: list[str] = []
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            items += flatten(value, f"{prefix}{key}.")
        else:
            items.append(f"{prefix}{key}={format_value(value)}")
    return items


class Pipeline:
    """The validated pipeline of a params tree: its runs, stages and jobs.

    `params`: a params directory (or file); `preset`: params/presets/<preset>.yaml on top;
    `overrides`: `section.key=value` applied last, to every stage (they win over the variants).
    """

    def __init__(self, params: str | Path = "params", preset: str | None = None,
                 overrides: list[str] = ()) -> None:
        self.params = str(params)
        self.preset = preset or None
        self.overrides = list(overrides)
        self.files = param_files([self.params], self.preset)
        self.config: Config = self._load()
        if "pipeline" not in self.config.extra:
            raise ConfigError(f"{self.params}: no `pipeline:` section (variants, seeds, stages); "
                              "see params/pipeline.yaml in the emae repository")
        self.settings: PipelineConfig = self.config.section("pipeline")
        clash = sorted(set(self.settings.variants) & set(BASELINE_STAGES))
        if clash:
            raise ConfigError(f"pipeline.variants: {', '.join(clash)} names a baseline; rename the variant")
        self.runs = [Run(v, s) for v in self.settings.variants for s in self.settings.seeds]
        self.budgets: dict[str, dict[str, Any]] = {}  # variant -> pretrain epochs (pipeline.compute_of)
        self.run_configs = {run: self._load(run) for run in self.runs}  # validates every variant
        if self.settings.compute_of:
            self.budgets = self._compute_budgets()
            self.run_configs |= {run: self._load(run) for run in self.runs if run.variant in self.budgets}
        self.baseline_runs = [Run(b, s) for b in BASELINE_STAGES if getattr(self.settings.baselines, b)
                              for s in self.settings.seeds]
        reference = {run.seed: self.run_configs[run] for run in self.runs
                     if run.variant == self.settings.reference}
        self.run_configs |= {run: reference[run.seed] for run in self.baseline_runs}
        self._check_data_root()
        self.batches = self._check_batches()

    # ------------------------------------------------------------------------------ params

    def _load(self, run: Run | None = None) -> Config:
        """The validated config of the whole tree, or of one run (pipeline.overrides, the variant
        and its seed merged in, then the user's overrides)."""
        tree, origin = load_raw([self.params], (), self.preset)
        if run is not None:  # self.settings: the pipeline section, the user's overrides included
            self._merge_labelled(tree, origin, self.settings.overrides, "pipeline.overrides")
            self._merge_labelled(tree, origin, self.settings.variants[run.variant],
                                 f"pipeline.variants.{run.variant}")
            self._merge_labelled(tree, origin, {"pretrain": {"seed": run.seed}}, "pipeline.seeds")
        merge_overrides(tree, origin, self.overrides)
        if run is not None and run.variant in self.budgets:  # fitted to the source's epochs, overrides included
            self._merge_labelled(tree, origin, self._budget_tree(run), "pipeline.compute_of")
        config = config_from_tree(tree, origin)
        validate_all(config)
        return config

    def _merge_labelled(self, tree: dict[str, Any], origin: dict[str, str], subtree: dict[str, Any],
                        key: str) -> None:
        """Merge `subtree` (the pipeline section's `key`) into `tree`; errors about its values then
        name the file (or override) that set them and `key`."""
        merge_tree(tree, copy.deepcopy(subtree), origin, key)
        base = self.config.origin
        for leaf in flatten(subtree):
            dotted = leaf.split("=", 1)[0]
            source = base.get(f"{key}.{dotted}") or _source(base, key)
            origin[dotted] = f"{source}: {key}"

    def run_overrides(self, run: Run) -> list[str]:
        """The `key=value` arguments that make the params tree into this run's config (a baseline:
        the reference variant's, with the seed as the evaluations' seed: it draws the random init)."""
        if run == PATTERN:
            return []
        if run.variant in BASELINE_STAGES:
            # (a dense job adds its own: switching dense on leaves the other jobs' commands as they are)
            seeds = [f"{stage}.seed={run.seed}" for stage in BASELINE_STAGES[run.variant] if stage in EVAL_STAGES]
            return [*self.run_overrides(Run(self.settings.reference, run.seed)), *seeds]
        budget = flatten(self._budget_tree(run)) if run.variant in self.budgets else []
        return [*flatten(self.settings.overrides), *flatten(self.settings.variants[run.variant]),
                f"pretrain.seed={run.seed}", *self.overrides, *budget]

    def _budget_tree(self, run: Run) -> dict[str, Any]:
        return {"pretrain": self.budgets[run.variant]}

    def _compute_budgets(self) -> dict[str, dict[str, Any]]:
        """pipeline.compute_of: each variant gets its source variant's pre-training FLOPs, as the
        epochs (and warm-up) `emae.flops.fit_epochs` gives for that budget. Per image of the training
        set: both see the same images per epoch, so the set's size cancels out."""
        from emae.flops import fit_epochs, train_flops_per_image

        budgets = {}
        for variant, source in self.settings.compute_of.items():
            src, own = (self.run_configs[Run(v, self.settings.seeds[0])] for v in (source, variant))
            for name, config in ((source, src), (variant, own)):
                if config.pretrain.budget_flops is not None or config.pretrain.budget_images is not None:
                    raise ConfigError(f"pipeline.compute_of.{variant}={source}: {name} has a pretrain budget "
                                      "of its own; compute_of works with epochs")
            per_image = {v: train_flops_per_image(c.model, c.data.image_size, c.data.in_chans)
                         for v, c in ((source, src), (variant, own))}
            epochs, warmup = fit_epochs(own.pretrain.epochs, own.pretrain.warmup_epochs, 1, per_image[variant],
                                        budget_flops=src.pretrain.epochs * per_image[source])
            budgets[variant] = {"epochs": epochs, "warmup_epochs": warmup}
        return budgets

    def _check_data_root(self) -> None:
        roots = {cfg.data.root for cfg in self.run_configs.values()} | {self.config.data.root}
        if self.settings.stages.prepare and len(roots) > 1:
            raise ConfigError(f"pipeline.stages.prepare is true but the variants use different "
                              f"data.root values ({', '.join(sorted(roots))}); prepare writes one")

    def _check_batches(self) -> dict[tuple[str, Run], tuple[int, int]]:
        """(accum_iter, effective batch) of every training job with the process count the launcher
        grants its stage (nodes x tasks_per_node): numbers that disagree fail here, before any job."""
        launcher = self.config.section("launcher")
        batches = {}
        for stage in TRAINING_STAGES:
            if not self.stage_enabled(stage):
                continue
            res = launcher.for_stage(stage)
            for run, config in self.run_configs.items():
                cfg = config.pretrain if stage == "pretrain" else config.section(stage)
                try:
                    batches[stage, run] = effective_batch(cfg, stage, res.nodes * res.tasks_per_node)
                except ConfigError as err:
                    raise ConfigError(f"{run.name}: {err} (launcher: stage {stage} runs "
                                      f"{res.nodes} node(s) x {res.tasks_per_node} task(s))") from None
        return batches

    @property
    def data_root(self) -> str:
        return self.config.data.root

    # ------------------------------------------------------------------------------ jobs

    def stage_enabled(self, stage: str) -> bool:
        if stage in ("pretrain", "report"):
            return True
        return bool(getattr(self.settings.stages, stage))

    @property
    def stages(self) -> list[str]:
        return [s for s in STAGES if self.stage_enabled(s)]

    def jobs(self) -> list[StageJob]:
        """Every job of the DAG, in an order that runs (dependencies first)."""
        jobs = []
        for stage in self.stages:
            if stage == "report":
                jobs += [self.job(s, run) for run in self.baseline_runs for s in self.baseline_stages(run)]
            if stage in RUN_STAGES:
                jobs += [self.job(stage, run) for run in self.runs]
            else:
                jobs.append(self.job(stage))
        return jobs

    def baseline_stages(self, run: Run) -> list[str]:
        """The evaluations a baseline run has, among the stages switched on."""
        return [s for s in BASELINE_STAGES[run.variant] if self.stage_enabled(s)]

    def find_run(self, variant: str | None, seed: int | None) -> Run:
        for run in (*self.runs, *self.baseline_runs):
            if run.variant == variant and run.seed == seed:
                return run
        raise ConfigError(f"no run {variant}/seed{seed} in pipeline.variants x pipeline.seeds "
                          f"(runs: {', '.join(r.name for r in self.runs)})")

    def job(self, stage: str, run: Run | None = None) -> StageJob:
        if stage not in STAGES:
            raise ConfigError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
        if not self.stage_enabled(stage):
            raise ConfigError(f"stage {stage!r} is off (pipeline.stages.{stage}: false)")
        if (stage in RUN_STAGES) != (run is not None):
            raise ConfigError(f"stage {stage!r} " + ("needs --variant and --seed" if run is None
                                                      else "takes no --variant / --seed"))
        if run is not None and run.variant in BASELINE_STAGES and run != PATTERN:
            if stage not in BASELINE_STAGES[run.variant]:
                raise ConfigError(f"the {run.variant} baseline has no {stage} stage (it has "
                                  f"{', '.join(BASELINE_STAGES[run.variant])})")
        if stage in DENSE_STAGES:
            job = self._job_dense(stage, run)
        else:
            job = getattr(self, f"_job_{stage}" if stage in ("prepare", "prepare_dense", "pretrain",
                                                             "report", "sweep")
                          else "_job_eval")(stage, run)
        job.code = self.code(job.argv[0], job.params)
        return job

    def pattern(self, stage: str) -> StageJob:
        """The job of a stage with `{variant}` / `{seed}` wildcards in its paths (and no command)."""
        job = self.job(stage, PATTERN if stage in RUN_STAGES else None)
        job.argv = []
        return job

    def _common_argv(self) -> list[str]:
        return ["-p", self.params, *(["--preset", self.preset] if self.preset else [])]

    def _data_deps(self) -> list[str]:
        return [self.data_root] if self.stage_enabled("prepare") else []

    def _variant_params(self, run: Run) -> list[str]:
        return ["pipeline.overrides", f"pipeline.variants.{run.variant}"]

    def _job_prepare(self, stage: str, run: None) -> StageJob:
        return StageJob(
            stage, None, ["prepare", *self._common_argv(), "-o", self.data_root, *self.overrides],
            deps=[], outs=[Out(self.data_root, directory=True)],
            params=["data.image_size", "prepare"])

    def _job_prepare_dense(self, stage: str, run: None) -> StageJob:
        root = self.config.extra["dense_data"]["root"]
        return StageJob(
            stage, None, ["prepare-dense", *self._common_argv(), "-o", root, *self.overrides],
            deps=[], outs=[Out(root, directory=True)],
            params=["dense_data", "prepare.val_fraction", "prepare.seed"])

    def _job_dense(self, stage: str, run: Run) -> StageJob:
        """Detection / segmentation on the exported encoder (resume state persists, as pretrain's);
        the random_init baseline: on the reference variant's architecture at its initial weights."""
        random_init = run.variant in BASELINE_STAGES
        source = Run(self.settings.reference, run.seed) if random_init else run
        out = run.result_dir(stage)
        outs = [Out(f"{out}/metrics.json", kind="metrics"), Out(f"{out}/config.yaml"),
                *([Out(f"{out}/coco_eval.txt")] if stage == "detect" else []),
                Out(f"{out}/checkpoints", persist=True, directory=True),
                Out(f"{out}/log.jsonl", persist=True)]
        deps = [f"{source.run_dir}/encoder.safetensors"]
        if self.stage_enabled("prepare_dense"):
            deps.append(self.config.extra["dense_data"]["root"])
        baseline = ["--random-init"] if random_init else []
        seed = [f"{stage}.seed={run.seed}"] if random_init else []
        return StageJob(
            stage, run, [stage, "--checkpoint", deps[0], *baseline, *self._common_argv(), "-o", out,
                         *self.run_overrides(run), *seed],
            deps=deps, outs=outs, params=["data.mean", "data.std", stage, *self._variant_params(source)])

    def _job_pretrain(self, stage: str, run: Run) -> StageJob:
        d = run.run_dir
        return StageJob(
            stage, run, ["pretrain", *self._common_argv(), "-o", d, *self.run_overrides(run)],
            deps=self._data_deps(),
            outs=[Out(f"{d}/encoder.safetensors"),
                  Out(f"{d}/metrics.json", kind="metrics"),
                  Out(f"{d}/config.yaml"),
                  # resume state: kept across reruns (pretrain truncates the logs to the checkpoint)
                  Out(f"{d}/checkpoints", persist=True, directory=True),
                  Out(f"{d}/log.jsonl", persist=True),
                  Out(f"{d}/steps.jsonl", persist=True),
                  Out(f"{d}/tb", persist=True, directory=True)],
            params=["data", "model", "pretrain", *self._variant_params(run)])

    def _job_eval(self, stage: str, run: Run) -> StageJob:
        if run.variant in BASELINE_STAGES:
            return self._job_baseline(stage, run)
        checkpoint = (f"{run.run_dir}/encoder.safetensors" if stage in EVAL_STAGES
                      else f"{run.run_dir}/checkpoints/last.pt")
        out = run.result_dir(stage)
        outs = ([Out(out, directory=True)] if stage == "visualize"
                else [Out(f"{out}/metrics.json", kind="metrics")])
        params = ["data", *([stage] if stage in self.config.extra else []), *self._variant_params(run)]
        return StageJob(
            stage, run, [stage, "--checkpoint", checkpoint, *self._common_argv(), "-o", out,
                         *self.run_overrides(run)],
            # last.pt is not a declared output (see Out.persist); the encoder export is written
            # from the same final state, after it, so it stands for both.
            deps=[f"{run.run_dir}/encoder.safetensors", *self._data_deps()],
            outs=outs, params=params)

    def _job_baseline(self, stage: str, run: Run) -> StageJob:
        """An evaluation without pre-training: of the raw pixels, or of the reference variant's
        encoder architecture at its initial weights (its export gives the architecture only)."""
        reference = Run(self.settings.reference, run.seed)
        encoder = f"{reference.run_dir}/encoder.safetensors"
        source = ["--checkpoint", "pixels"] if run.variant == "pixels" else ["--checkpoint", encoder,
                                                                             "--random-init"]
        out = run.result_dir(stage)
        return StageJob(
            stage, run, [stage, *source, *self._common_argv(), "-o", out, *self.run_overrides(run)],
            deps=([] if run.variant == "pixels" else [encoder]) + self._data_deps(),
            outs=[Out(f"{out}/metrics.json", kind="metrics")],
            params=["data", stage, *self._variant_params(reference)])

    def _job_report(self, stage: str, run: None) -> StageJob:
        deps = [f"{r.result_dir(s)}/metrics.json" for r in self.baseline_runs for s in self.baseline_stages(r)]
        for r in self.runs:
            deps.append(f"{r.run_dir}/metrics.json")
            for s in (*EVAL_STAGES, *MODEL_STAGES, *DENSE_STAGES):
                if self.stage_enabled(s):
                    deps.append(r.result_dir(s) if s == "visualize" else f"{r.result_dir(s)}/metrics.json")
        d = REPORT_DIR
        outs = [Out(f"{d}/{SUMMARY_CSV}"), Out(f"{d}/{SUMMARY_MD}"),
                Out(f"{d}/{RUNS_CSV}"), Out(f"{d}/{TIME_TO_TARGET_CSV}"),
                *[Out(f"{d}/{name}", kind="plots") for name in PLOTS.values()],
                Out(f"{d}/{CURVES_DIR}", directory=True)]
        if self.stage_enabled("visualize"):
            outs.append(Out(f"{d}/{RECONSTRUCTIONS_DIR}", directory=True))
        return StageJob(stage, None, ["report", *self._common_argv(), "-o", d, *self.overrides],
                        deps=deps, outs=outs, params=["pipeline.report"])

    def _job_sweep(self, stage: str, run: None) -> StageJob:
        """The Optuna sweep of params/sweep.yaml (optional). Its study journal and trial folders
        are resume state: not declared, so neither tool deletes them (rerunning continues)."""
        d = f"{SWEEP_DIR}/{SWEEP_STUDY}"
        outs = [Out(f"{d}/trials.csv"), Out(f"{d}/best.yaml"), Out(f"{d}/metrics.json", kind="metrics"),
                Out(f"{d}/plots/heatmap.png", kind="plots"), Out(f"{d}/plots/history.png", kind="plots")]
        return StageJob(stage, None, ["sweep", *self._common_argv(), "-o", d, *self.overrides],
                        deps=self._data_deps(), outs=outs,
                        params=["sweep", "data", "model", "pretrain", "knn", "linprobe"])

    # ------------------------------------------------------------------------------ code

    @cached_property
    def _imports(self) -> ImportGraph:
        return ImportGraph()

    def code(self, command: str, keys: Iterable[str] = ()) -> list[str]:
        """The package source files a job running `emae COMMAND` and reading the params `keys`
        executes (computed from the imports: emae.workflow.closure)."""
        sections = dict.fromkeys(key.split(".")[0] for key in keys)
        return self._imports.closure(entry_modules(command, sections))

    def code_digest(self, files: Iterable[str]) -> str:
        """A hash of the files' contents: a job's Snakemake `params` (reruns when its code changes)."""
        return self._imports.digest(files)

    # ------------------------------------------------------------------------------ DVC params

    def params_by_file(self, keys: list[str]) -> list[dict[str, list[str]] | str]:
        """DVC `params:` entries: each key under the file(s) of params/ that set it (presets and
        overrides are not params files; a preset file is a plain dependency instead)."""
        _, origin = load_raw([self.params])
        by_file: dict[str, list[str]] = {}
        for key in keys:
            files = sorted({src for leaf, src in origin.items() if leaf == key or leaf.startswith(key + ".")})
            for f in files:
                by_file.setdefault(f, []).append(key)
        return [{f: ks} for f, ks in sorted(by_file.items())]

    def param_values(self, job: StageJob) -> str:
        """The resolved values of the job's params keys, as one JSON string (Snakemake reruns a
        job when its `params:` change, as DVC does for its params keys)."""
        config = self.run_configs[job.run] if job.run else self.config
        tree = config.to_dict() | {"pipeline": self.config.extra["pipeline"]}
        values = {}
        for key in job.params:
            node: Any = tree
            for part in key.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            values[key] = node
        return json.dumps(values, sort_keys=True)

    @property
    def preset_file(self) -> str | None:
        return str(self.files[-1]) if self.preset else None


def _source(origin: dict[str, str], key: str) -> str:
    for leaf, src in origin.items():
        if leaf == key or leaf.startswith(key + "."):
            return src
    return "params"
