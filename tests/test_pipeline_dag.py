"""The pipeline's DAGs without running the stages: Snakemake dry-runs of every preset, config
validation before anything runs, the generated dvc.yaml is current and agrees with the Snakefile job
for job, each stage's code deps (its computed import closure: `dvc status` on fake outputs after a
code change), `emae stage`, and the SLURM profile as users install and name it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import PARAMS, REPO, cli_env, run_cli

pytestmark = pytest.mark.skipif(shutil.which("snakemake") is None, reason="snakemake not installed")

PRESETS = sorted(p.stem for p in (PARAMS / "presets").glob("*.yaml"))
# What a DVC repository of the project needs (the copies below run their own emae)
DVC_CHECKOUT = ("emae", "params", ".dvc", ".dvcignore", ".gitignore", "pyproject.toml")
# Environment of a tool run in a copy: its own emae (no PYTHONPATH), no analytics, a git identity
COPY_ENV = {"DVC_NO_ANALYTICS": "1", "OMP_NUM_THREADS": "2", "GIT_AUTHOR_NAME": "t",
            "GIT_AUTHOR_EMAIL": "t@e", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@e"}
STAGE_CMD = re.compile(r"emae\.cli stage (\w+)(?: --variant (\w+) --seed (\d+))?")


def copy_checkout(dest: Path, names: tuple[str, ...] = DVC_CHECKOUT) -> Path:
    """A copy of the repository's `names` (no caches, no bytecode) at `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, dest / name, ignore=shutil.ignore_patterns(
                "__pycache__", "tmp", "cache", "config.local"))
        else:
            shutil.copy(source, dest / name)
    return dest


def copy_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | COPY_ENV


def run_in(cwd: Path, *cmd: str) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=copy_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(cmd)}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


def snakemake(workdir: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The real snakemake on the repository's Snakefile, with `workdir` as working directory."""
    return subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir), *args],
        cwd=workdir, env=env or cli_env(), capture_output=True, text=True, timeout=300)


def dry_run_jobs(output: str) -> dict[tuple, dict[str, set[str]]]:
    """(stage, variant, seed) -> {"outs", "deps"} of every job a dry-run with -p prints."""
    jobs: dict[tuple, dict[str, set[str]]] = {}
    for block in re.findall(r"^(?:local)?rule \w+:\n(.*?)^Shell command: ([^\n]*)", output, re.M | re.S):
        if block[1] == "None":  # rule all
            continue
        fields = dict(re.findall(r"^    (input|output): (.*)$", block[0], re.M))
        key = STAGE_CMD.search(block[1]).groups()
        assert key not in jobs, key
        jobs[key] = {k: {p.strip() for p in fields.get(f, "").split(",") if p.strip()}
                     for k, f in (("outs", "output"), ("deps", "input"))}
    return jobs


def job_counts(output: str) -> dict[str, int]:
    """The 'Job stats' table of a dry-run: rule -> number of jobs."""
    table = output.split("Job stats:")[1].split("total")[0]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", table, re.M)}


@pytest.mark.parametrize("preset", [None, *PRESETS])
def test_dry_run_of_every_preset(tmp_path: Path, preset: str | None) -> None:
    from emae.workflow.stages import Pipeline

    assert {"cifar10", "imagenet_vit_b16", "imagenet_vit_l16"} <= set(PRESETS)
    config = [f"params={PARAMS}", *([f"preset={preset}"] if preset else [])]
    result = snakemake(tmp_path, "-n", "-p", "--cores", "2", "--config", *config)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout + result.stderr
    pipeline = Pipeline(PARAMS, preset)
    counts = job_counts(out)
    runs = len(pipeline.settings.variants) * len(pipeline.settings.seeds)
    for stage in pipeline.stages:
        baselines = sum(stage in pipeline.baseline_stages(run) for run in pipeline.baseline_runs)
        expected = runs + baselines if stage not in ("prepare", "report") else 1
        assert counts.get(stage) == expected, (stage, counts)
    assert ("prepare" in counts) == pipeline.settings.stages.prepare
    # every job's command goes through `emae stage` (-> `emae launch`), with the preset
    commands = [line for line in out.splitlines() if "-m emae.cli stage" in line]
    assert len(commands) == sum(counts.values()) - counts["all"]
    if preset:
        assert all(f"--preset {preset}" in c for c in commands)
        assert f"--preset {preset}" in run_cli("stage", "pretrain", "--variant", "emae", "--seed",
                                               str(pipeline.settings.seeds[0]), "--preset", preset,
                                               "--print").stdout
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("overrides", ["pipeline.seeds=[1] pretrain.epochs=2", "[pipeline.seeds=[1]]"])
def test_overrides_given_as_text_or_list(tmp_path: Path, overrides: str) -> None:
    """The forms the docs give: whitespace-separated text, and a list (YAML cannot read `[[1]]`-like
    values in a flow list, so Snakemake hands that one over as text)."""
    result = snakemake(tmp_path, "-n", "-p", "--cores", "2", "--config", f"params={PARAMS}",
                       f"overrides={overrides}")
    assert result.returncode == 0, result.stderr[-3000:]
    runs = {m.group(1) for m in re.finditer(r"--variant \w+ --seed (\d+)", result.stdout + result.stderr)}
    assert runs == {"1"}, runs


def test_pretraining_starts_first_and_longest_first(tmp_path: Path) -> None:
    """Two job slots should not end on one long pre-training and an idle core: pre-training jobs
    have priority over the evaluations, more by their planned FLOPs (EMAE at equal epochs first)."""
    result = snakemake(tmp_path, "-n", "--cores", "2", "--config", f"params={PARAMS}")
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = re.findall(r"^rule (\w+):\n(?:    .*\n)*?    wildcards: variant=(\w+), seed=(\d+)\n"
                      r"(?:    priority: (\d+)\n)?", result.stdout + result.stderr, re.M)
    priority = {(rule, variant): int(p or 0) for rule, variant, _, p in jobs}
    assert min(p for (rule, _), p in priority.items() if rule == "pretrain") > 0
    assert all(p == 0 for (rule, _), p in priority.items() if rule != "pretrain")
    assert priority["pretrain", "emae"] > priority["pretrain", "mae"] > priority["pretrain", "emae_eqflops"]


def test_imagenet_presets_follow_the_mae_recipe() -> None:
    from emae.config import load_config

    for preset, width, depth, heads in (("imagenet_vit_b16", 768, 12, 12), ("imagenet_vit_l16", 1024, 24, 16)):
        cfg = load_config([PARAMS], [], preset)
        m, p, d = cfg.model, cfg.pretrain, cfg.data
        assert (m.embed_dim, m.depth, m.num_heads) == (width, depth, heads)
        assert (m.decoder_embed_dim, m.decoder_depth, m.decoder_num_heads, m.patch_size) == (512, 8, 16, 16)
        assert (d.image_size, d.num_classes, d.crop_scale_min, d.hflip) == (224, 1000, 0.2, True)
        assert d.mean == (0.485, 0.456, 0.406) and d.std == (0.229, 0.224, 0.225)
        assert (m.mask_ratio, m.num_parts, p.blr, p.warmup_epochs, p.epochs) == (0.75, 4, 1.5e-4, 40, 800)
        assert p.effective_batch_size == 4096 and p.accum_iter is None  # derived: tests/test_batches.py


def test_digits_long_is_the_default_study_with_four_times_the_pre_training() -> None:
    """The preset changes the epochs: the compared variants get 200, the equal-FLOPs one is
    refitted to MAE's 200 epochs, the kNN monitor runs every 10 epochs instead of 5; and keeps the
    cosine its figures were measured with; every other setting of every run is the default's."""
    from emae.workflow.stages import Pipeline

    default, long = Pipeline(PARAMS), Pipeline(PARAMS, "digits_long")
    assert long.runs == default.runs
    for run, config in long.run_configs.items():
        tree, base = config.to_dict(), default.run_configs[run].to_dict()
        epochs, default_epochs = tree["pretrain"]["epochs"], base["pretrain"]["epochs"]
        if run.variant in long.budgets:  # MAE's FLOPs, fitted in whole epochs
            assert abs(epochs - 4 * default_epochs) <= 4, (run, epochs, default_epochs)
        elif run.variant in long.settings.variants:
            assert epochs == 200 == 4 * default_epochs, run
        assert (tree["pretrain"]["knn_every_epochs"], base["pretrain"]["knn_every_epochs"]) == (10, 5)
        assert (tree["pretrain"]["schedule"], base["pretrain"]["schedule"]) == ("cosine", "constant")
        for t in (tree, base):
            t.pop("pipeline", None)
            for key in ("epochs", "warmup_epochs", "knn_every_epochs", "schedule"):
                t["pretrain"].pop(key)
        assert tree == base, run


def test_bad_variant_stops_before_anything_runs(tmp_path: Path) -> None:
    params = tmp_path / "params"
    shutil.copytree(PARAMS, params)
    pipeline_yaml = params / "pipeline.yaml"
    tree = yaml.safe_load(pipeline_yaml.read_text())
    tree["pipeline"]["variants"]["emae"]["model"]["num_parts"] = 9
    pipeline_yaml.write_text(yaml.safe_dump(tree))
    result = snakemake(tmp_path, "--cores", "1", "--config", f"params={params}")
    assert result.returncode != 0
    err = result.stdout + result.stderr
    assert f"{pipeline_yaml}: pipeline.variants.emae" in err and "model.num_parts=9" in err
    assert "K must be in 1..4" in err
    assert not any((tmp_path / d).exists() for d in ("data", "runs", "results", "logs"))


def test_bad_snakemake_config_key_is_rejected(tmp_path: Path) -> None:
    result = snakemake(tmp_path, "-n", "--cores", "1", "--config", f"params={PARAMS}", "presett=cifar10")
    assert result.returncode != 0
    out = result.stdout + result.stderr
    assert "presett" in out and "Additional properties" in out


def test_unknown_preset_names_the_available_ones(tmp_path: Path) -> None:
    result = snakemake(tmp_path, "-n", "--cores", "1", "--config", f"params={PARAMS}", "preset=imagenet")
    assert result.returncode != 0
    out = result.stdout + result.stderr
    assert "preset 'imagenet' not found" in out and "imagenet_vit_b16" in out


def test_committed_dvc_yaml_is_current() -> None:
    result = run_cli("dvc-yaml", "--check", check=False)
    assert result.returncode == 0, result.stderr


def test_dvc_yaml_check_detects_drift(tmp_path: Path) -> None:
    stale = tmp_path / "dvc.yaml"
    stale.write_text((REPO / "dvc.yaml").read_text().replace("pretrain-emae-seed0", "pretrain-old"))
    result = run_cli("dvc-yaml", "--check", "-o", str(stale), check=False)
    assert result.returncode == 2 and "out of date" in result.stderr and "emae dvc-yaml" in result.stderr


def test_snakemake_and_dvc_agree_job_for_job(tmp_path: Path) -> None:
    """Same jobs (names), same commands, same inputs and outputs in the Snakefile's DAG (a dry-run
    of the real snakemake) and in the committed dvc.yaml; DVC params keys exist in their files."""
    _assert_dags_agree(PARAMS, REPO / "dvc.yaml", tmp_path)


def test_dags_agree_with_the_dense_stages_on(tmp_path: Path) -> None:
    params = tmp_path / "params"
    shutil.copytree(PARAMS, params)
    pipeline_yaml = params / "pipeline.yaml"
    text = pipeline_yaml.read_text()
    for stage in ("prepare_dense", "detect", "segment"):
        text = re.sub(rf"^(    {stage}:) false", r"\1 true", text, flags=re.M)
    pipeline_yaml.write_text(text)
    dvc_file = tmp_path / "dvc.yaml"
    run_cli("dvc-yaml", "-p", str(params), "-o", str(dvc_file))
    stages = yaml.safe_load(dvc_file.read_text())["stages"]
    assert {"prepare_dense", "detect-emae-seed0", "segment-mae-seed0"} <= set(stages)
    # the random-init baseline: the reference's architecture (mae) at its initial weights, its seed
    from emae.workflow.stages import Pipeline, Run

    for stage in ("detect", "segment"):
        assert "runs/mae/seed1/encoder.safetensors" in stages[f"{stage}-random_init-seed1"]["deps"]
        argv = " ".join(Pipeline(params).job(stage, Run("random_init", 1)).argv)
        assert "--checkpoint runs/mae/seed1/encoder.safetensors --random-init" in argv and f"{stage}.seed=1" in argv
    work = tmp_path / "work"
    work.mkdir()
    _assert_dags_agree(params, dvc_file, work)


def _assert_dags_agree(params: Path, dvc_file: Path, tmp_path: Path) -> None:
    from emae.workflow.stages import Pipeline

    result = snakemake(tmp_path, "-n", "-p", "--cores", "1", "--config", f"params={params}")
    assert result.returncode == 0, result.stderr[-3000:]
    snake = dry_run_jobs(result.stdout)

    dvc = yaml.safe_load(dvc_file.read_text())["stages"]
    pipeline = Pipeline(params)
    assert len(dvc) == len(snake) == len(pipeline.jobs())
    for name, stage in dvc.items():
        key = STAGE_CMD.search(stage["cmd"]).groups()
        assert key in snake, (name, key)
        job = next(j for j in pipeline.jobs() if j.name == name)
        assert (job.stage, job.run.variant if job.run else None,
                str(job.run.seed) if job.run else None) == key
        outs = {}
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind, []):
                path, flags = next(iter(entry.items())) if isinstance(entry, dict) else (entry, {})
                outs[path] = flags
        # Snakemake declares every output DVC keeps except the persistent resume state
        assert snake[key]["outs"] == {p for p, f in outs.items() if not f.get("persist")}, name
        if job.stage == "pretrain":
            assert {p for p, f in outs.items() if f.get("persist")} >= {f"{job.run.run_dir}/checkpoints"}
        data_deps = {d for d in stage.get("deps", []) if not d.startswith("emae/")}
        assert snake[key]["deps"] == data_deps, name
        for entry in stage.get("params", []):
            (file, keys), = entry.items()
            tree = yaml.safe_load((REPO / file).read_text())
            for dotted in keys:
                node = tree
                for part in dotted.split("."):
                    node = node[part]  # KeyError: DVC would report the param missing
        assert sorted(k for e in stage.get("params", []) for k in next(iter(e.values()))) == sorted(job.params)


def test_import_closure_follows_every_kind_of_import(tmp_path: Path) -> None:
    """Module and function level, `import a.b`, `from a import submodule`, relative imports, parent
    packages; other packages and unreached modules are left out; the digest follows the contents."""
    from emae.workflow.closure import ImportGraph

    files = {
        "__init__.py": "",
        "a.py": "import os\nfrom emae.b import thing\n\n\ndef f():\n    import emae.c.d\n",
        "b/__init__.py": "from . import e\nthing = 1\n",
        "b/e.py": "from ..g import x\n",
        "g.py": "import torch\nx = 1\n",
        "c/__init__.py": "", "c/d.py": "",
        "unused.py": "import emae.a\n",
    }
    for name, text in files.items():
        (tmp_path / "emae" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "emae" / name).write_text(text)
    graph = ImportGraph(tmp_path / "emae")
    closure = graph.closure(["emae.a"])
    assert closure == [f"emae/{n}" for n in ("__init__.py", "a.py", "b/__init__.py", "b/e.py",
                                              "c/__init__.py", "c/d.py", "g.py")]
    digest = graph.digest(closure)
    (tmp_path / "emae" / "unused.py").write_text("# edited\n")
    assert ImportGraph(tmp_path / "emae").digest(closure) == digest
    (tmp_path / "emae" / "c" / "d.py").write_text("# edited\n")
    assert ImportGraph(tmp_path / "emae").digest(closure) != digest
    with pytest.raises(ValueError, match="emae.nope"):
        graph.closure(["emae.nope"])


def test_each_stage_depends_on_the_code_it_runs() -> None:
    """The modules the old hand-written lists missed are in each stage's code deps; the report's
    do not hold the training code, and no other stage's hold the report's."""
    from emae.workflow.stages import Pipeline

    pipeline = Pipeline(PARAMS)
    code = {job.name: set(job.code) for job in pipeline.jobs()}
    shared = {"emae/cli.py", "emae/config.py", "emae/io.py", "emae/workflow/run_stage.py",
              "emae/launch/cli.py", "emae/__main__.py"}  # what the launcher runs: `python -m emae`
    for name, files in code.items():
        assert shared <= files, (name, shared - files)
    training = {"emae/losses.py", "emae/masking.py", "emae/seeding.py", "emae/train/pretrain.py",
                "emae/models/emae.py", "emae/data/datasets.py"}
    assert training <= code["pretrain-emae-seed0"]
    for stage in ("knn", "linprobe", "finetune", "consistency", "visualize"):
        assert {"emae/losses.py", "emae/masking.py", "emae/models/emae.py",
                f"emae/eval/{stage}.py"} <= code[f"{stage}-emae-seed0"], stage
    assert "emae/losses.py" not in code["report"] and "emae/losses.py" not in code["prepare"]
    assert [n for n, files in code.items() if "emae/report/plots.py" in files] == ["report"]


@pytest.mark.skipif(shutil.which("dvc") is None or shutil.which("git") is None, reason="needs dvc and git")
def test_dvc_status_after_a_code_change(tmp_path: Path) -> None:
    """A copy of the repository with (fake) outputs committed as up to date (`dvc commit`): one
    changed line in emae/losses.py puts pre-training and every evaluation out of date (the report
    follows their new outputs), one under emae/report/ only the report. Nothing is trained."""
    from emae.workflow.stages import Pipeline

    repo = copy_checkout(tmp_path / "repo")
    pipeline_yaml = repo / "params" / "pipeline.yaml"  # one seed: every kind of job, fewer of them
    pipeline_yaml.write_text(re.sub(r"^  seeds: .*$", "  seeds: [0]", pipeline_yaml.read_text(), flags=re.M))
    run_in(repo, sys.executable, "-m", "emae.cli", "dvc-yaml")
    for job in Pipeline(repo / "params").jobs():
        for out in job.outs:
            path = repo / out.path
            if out.directory:
                path.mkdir(parents=True, exist_ok=True)
                path = path / "fake"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("{}" if path.suffix == ".json" else job.name)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "init"],
                ["dvc", "commit", "-f", "-q"]):
        run_in(repo, *cmd)

    def out_of_date_after(edited: str) -> dict[str, list]:
        path = repo / edited
        original = path.read_text()
        path.write_text(original + "# a changed line\n")
        try:
            return json.loads(run_in(repo, "dvc", "status", "--json").stdout)
        finally:
            path.write_text(original)

    stale = out_of_date_after("emae/losses.py")
    assert set(stale) == {f"{stage}-{variant}-seed0" for variant in ("mae", "emae", "emae_eqflops") for stage in
                          ("pretrain", "knn", "linprobe", "finetune", "consistency", "visualize")} | {
        "knn-pixels-seed0", "linprobe-pixels-seed0",  # the evaluation code imports the model package
        "knn-random_init-seed0", "linprobe-random_init-seed0", "finetune-random_init-seed0"}
    assert stale["pretrain-emae-seed0"] == [{"changed deps": {"emae/losses.py": "modified"}}]
    assert set(out_of_date_after("emae/report/plots.py")) == {"report"}


def test_stage_print_builds_the_run_command() -> None:
    out = run_cli("stage", "pretrain", "--variant", "mae", "--seed", "0", "--print",
                  "pretrain.epochs=3", "--launcher", "kind=local").stdout
    assert out.startswith("emae launch --stage pretrain kind=local -- pretrain -p params -o runs/mae/seed0 ")
    overrides = out.split(" -o runs/mae/seed0 ")[1].split()
    # the variant's params, then its seed, then the user's (last wins)
    assert overrides.index("model.num_parts=1") < overrides.index("pretrain.seed=0") < overrides.index("pretrain.epochs=3")
    assert "model.consistency_weight=0.0" in overrides
    bad = run_cli("stage", "pretrain", "--variant", "nope", "--seed", "0", "--print", check=False)
    assert bad.returncode == 2 and "no run nope/seed0" in bad.stderr and "mae/seed0" in bad.stderr


def test_install_profile_and_run_by_name(tmp_path: Path) -> None:
    """`emae install-profile` puts the profile where `--profile slurm` finds it; the jobs then go
    to SLURM through the launcher with the partition/account, also next to --config preset=..."""
    xdg = tmp_path / "xdg"
    env = cli_env() | {"XDG_CONFIG_HOME": str(xdg)}
    subprocess.run([sys.executable, "-m", "emae.cli", "install-profile", "--partition", "gpu-p",
                    "--account", "acct1"], env=env, check=True, capture_output=True)
    installed = xdg / "snakemake" / "slurm"
    settings = yaml.safe_load((installed / "emae-slurm.yaml").read_text())
    assert settings["launcher"]["resources"]["partition"] == "gpu-p"
    again = subprocess.run([sys.executable, "-m", "emae.cli", "install-profile", "--partition", "x"],
                           env=env, capture_output=True, text=True)
    assert again.returncode == 2 and "--force" in again.stderr

    work = tmp_path / "work"
    work.mkdir()
    result = snakemake(work, "-n", "-p", "--profile", "slurm", "--config", f"params={PARAMS}",
                       "preset=cifar10", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    pretrain = [line for line in result.stdout.splitlines() if "emae.cli stage pretrain" in line]
    assert pretrain and all(s in pretrain[0] for s in (
        "--launcher kind=slurm", "--launcher resources.partition=gpu-p", "--launcher resources.account=acct1",
        "--launcher stages.pretrain.gpus_per_node=1", "--preset cifar10"))
    assert "stages.knn." not in pretrain[0]  # only the stage's own resources
    # the template in place (path form)
    result = snakemake(work, "-n", "-p", "--profile", str(REPO / "workflow/profiles/slurm"),
                       "--config", f"params={PARAMS}")
    assert result.returncode == 0 and "--launcher kind=slurm" in result.stdout


def test_variant_errors_name_their_source() -> None:
    """A bad variant value set by an override is reported as the override's, not the file's."""
    result = run_cli("stage", "pretrain", "--variant", "emae", "--seed", "0", "--print",
                     "pipeline.variants.emae.model.num_parts=9", check=False)
    assert result.returncode == 2
    assert "override 'pipeline.variants.emae.model.num_parts=9': pipeline.variants.emae: model.num_parts=9" \
        in result.stderr
    seeds = run_cli("stage", "report", "--print", "pipeline.seeds=[1, 1]", check=False)
    assert seeds.returncode == 2 and "pipeline.seeds" in seeds.stderr and "distinct" in seeds.stderr
