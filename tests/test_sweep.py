"""`emae sweep`: the constrained space, bad input, dead-worker recovery, and real sweeps (local
workers on one journal, SIGKILL + resume). The SLURM array sweep is in test_sweep_slurm.py."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml
from optuna.trial import TrialState

from conftest import PARAMS, REPO, TINY_OVERRIDES, cli_env
from emae.config import load_config
from emae.errors import ConfigError, EmaeError
from emae.sweep import liveness
from emae.sweep.space import SearchSpace
from emae.sweep.study import StudyMismatchError, Sweep, retried_as

optuna.logging.set_verbosity(optuna.logging.WARNING)

# trials of a few seconds: 8 train / 4 val images per class, 5 steps per epoch
SMALL = [o for o in TINY_OVERRIDES if not o.startswith(("pretrain.batch_size", "pretrain.checkpoint_every"))] + [
    "pretrain.batch_size=16", "pretrain.checkpoint_every_steps=2", "sweep.pruner=none",
    "sweep.poll_seconds=0.3", "sweep.heartbeat_seconds=1", "sweep.stale_after_seconds=30",
    "sweep.budget.warmup_epochs=0.5", "sweep.prune_every_epochs=1",  # budgets of 1-3 epochs
    "sweep.budget.compute=epochs",  # every trial its budget's epochs (compute=flops: tested on its own)
]


@pytest.fixture(scope="module")
def small_digits(digits_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 120-image subset of the embedded set (16x16), so that a trial takes seconds on a CPU."""
    root = tmp_path_factory.mktemp("digits-small")
    for split, per_class in (("train", 8), ("val", 4)):
        for class_dir in sorted((digits_root / split).iterdir()):
            (root / split / class_dir.name).mkdir(parents=True)
            for image in sorted(class_dir.iterdir())[:per_class]:
                shutil.copy(image, root / split / class_dir.name / image.name)
    return root


def overrides(data: Path, *extra: str) -> list[str]:
    return [*SMALL, f"data.root={data}", *extra]


def grid(ratios: list[float], parts: list[int]) -> list[str]:
    return [f"sweep.space.model.mask_ratio={{values: {ratios}}}",
            f"sweep.space.model.num_parts={{values: {parts}}}"]


def config_64(*extra: str):
    """Params of the default 32x32 model with patch 4 (L = 64 patches: more (K, r) cells than the
    default's 16); the space tests need no data."""
    return load_config([PARAMS], ["model.patch_size=4", *extra])


def space_of(*extra: str) -> SearchSpace:
    config = config_64(*extra)
    return SearchSpace(config.section("sweep"), config)


def is_valid(num_patches: int, k: int, r: float) -> bool:
    """The constraint written out independently of emae.masking."""
    n_keep = int(num_patches * (1 - r))
    return n_keep >= 1 and k * n_keep <= num_patches


# ------------------------------------------------------------------------------------- space


def test_grid_is_exactly_the_valid_cells() -> None:
    space = space_of(*grid([0.5, 0.625, 0.75, 0.875, 0.9], [1, 2, 3, 4, 6, 8, 10]),
                     "sweep.space.model.consistency_weight={values: [0.0, 1.0]}")
    cells = space.grid()
    got = [(c["model.num_parts"], c["model.mask_ratio"], c["model.consistency_weight"]) for c in cells]
    want = {(k, r, w) for k in (1, 2, 3, 4, 6, 8, 10) for r in (0.5, 0.625, 0.75, 0.875, 0.9)
            for w in (0.0, 1.0) if is_valid(64, k, r)}
    assert len(got) == len(set(got)) and set(got) == want
    assert (10, 0.9, 1.0) in want and (3, 0.625, 0.0) not in want  # both sides of the boundary occur


SAMPLED_SPACES = {
    # uneven ratio list -> ratio first, then K in [1, min(8, L // n_keep)]
    "ratio-first": ["sweep.space.model.mask_ratio={values: [0.5, 0.75, 0.875]}",
                    "sweep.space.model.num_parts={low: 1, high: 8}"],
    # uneven K list -> K first, then the ratio from the smallest one allowing K
    "parts-first": ["sweep.space.model.mask_ratio={low: 0.5, high: 0.9, step: 0.05}",
                    "sweep.space.model.num_parts={values: [1, 2, 4, 8]}"],
    "log-parts": ["sweep.space.model.mask_ratio={values: [0.5, 0.8, 0.9]}",
                  "sweep.space.model.num_parts={low: 1, high: 10, log: true}",
                  "sweep.space.pretrain.blr={low: 1.0e-4, high: 1.0e-2, log: true}"],
}


@pytest.mark.parametrize("sampler", ["random", "tpe"])
@pytest.mark.parametrize("name", sorted(SAMPLED_SPACES))
def test_sampled_points_are_always_valid(name: str, sampler: str) -> None:
    space = space_of(*SAMPLED_SPACES[name], f"sweep.sampler={sampler}", "sweep.n_trials=10",
                     "sweep.tpe.n_startup_trials=10")
    study = optuna.create_study(direction="maximize", sampler=(
        optuna.samplers.TPESampler(seed=1, n_startup_trials=10) if sampler == "tpe"
        else optuna.samplers.RandomSampler(seed=1)))
    seen: set[tuple[int, float]] = set()
    for _ in range(150 if sampler == "random" else 60):
        trial = study.ask()
        point = space.suggest(trial)
        k, r = point["model.num_parts"], point["model.mask_ratio"]
        assert is_valid(64, k, r), (name, point)
        seen.add((k, r))
        study.tell(trial, float(k) + r)  # TPE drifts to the largest valid K: the boundary is hit
    assert len(study.get_trials(states=(TrialState.FAIL,))) == 0
    if sampler == "random":  # not over-constrained: the largest K of the largest ratio is drawn
        r_max = max(r for _, r in seen)
        k_max = max(k for k, r in seen if r == r_max)
        space_k = max(space.axis_values("model.num_parts"))
        assert k_max == min(space_k, 64 // int(64 * (1 - r_max)))


BAD_SPACES = [
    (["sweep.space.model.mask_ratio=null", "sweep.space.model.num_parts=null"], "sweep.space is empty"),
    (grid([0.5, 0.75], [3, 4]), "mask_ratio 0.5 allows K in 1..2"),
    (grid([0.5, 0.75], [1, 8]), "K = 8 needs"),
    (["sweep.space.model.mask_ratio={values: [0.999]}", "sweep.space.model.num_parts=null"], "leaves no visible patch"),
    (["sweep.space.model.mask_ratio={low: 0.5, high: 0.8}"], "must be discrete"),
    (["sweep.space.pretrain.blr={low: 1.0e-4, high: 1.0e-2}"], "sampler 'grid' needs discrete"),
    (["sweep.sampler=tpe", "sweep.n_trials=4", *grid([0.5, 0.75, 0.875], [1, 2, 4])], "must be a range"),
    (["sweep.space.model.no_such_key={values: [1]}"], "is not a params key"),
    (["sweep.space.model.num_parts={values: [1, 2.5]}"], "takes integers"),
    (["sweep.space.model.num_parts={values: [1, 2], low: 1}"], "sweep.space.model.num_parts: give either"),
    (["sweep.sampler=tpe"], "sweep: n_trials is required"),
]


@pytest.mark.parametrize(("extra", "message"), BAD_SPACES, ids=[m for _, m in BAD_SPACES])
def test_bad_search_space_is_a_clear_error(extra: list[str], message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")) as info:
        Sweep(config_64("data.root=/nonexistent", *extra), tmp_path / "out")
    assert "sweep" in str(info.value)
    assert not (tmp_path / "out").exists()  # nothing written


def test_bad_point_and_missing_data_fail_before_any_trial(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"decoder_depth.*greater than 0"):
        Sweep(config_64("sweep.space.model.decoder_depth={values: [0, 1]}"), tmp_path)
    with pytest.raises(EmaeError, match="data split not found"):
        Sweep(config_64(f"data.root={tmp_path / 'none'}"), tmp_path)


# ------------------------------------------------------------------------------ storage


def test_storage_that_cannot_be_opened(small_digits: Path, tmp_path: Path) -> None:
    for url, message in [("nosuchdb://x", "cannot open this Optuna storage"),
                         (f"sqlite:///{tmp_path}/missing/dir/x.db", "cannot open this Optuna storage")]:
        sweep = Sweep(load_config([PARAMS], overrides(small_digits, f"sweep.storage={url}")), tmp_path / "s")
        with pytest.raises(EmaeError, match=message):
            sweep.open_storage()
    sweep = Sweep(load_config([PARAMS], overrides(small_digits, "sweep.storage=sqlite:///x.db",
                                                  "sweep.workers=2")), tmp_path / "s")
    with pytest.raises(EmaeError, match="SQLite cannot serve 2 concurrent workers"):
        sweep.open_storage()


def test_rdb_storage_by_url(small_digits: Path, tmp_path: Path) -> None:
    """Any Optuna RDB URL (SQLite here, PostgreSQL alike): the same study, reopened and continued."""
    url = f"sqlite:///{tmp_path}/optuna.db"
    sweep = Sweep(load_config([PARAMS], overrides(small_digits, f"sweep.storage={url}",
                                                  *grid([0.5, 0.75], [1, 2]))), tmp_path / "out")
    study, new = sweep.create_study(sweep.open_storage())
    trial = sweep.next_trial(study, "here")
    study.tell(trial, float(sweep.space.suggest(trial)["model.num_parts"]))
    again, new_again = sweep.create_study(sweep.open_storage())
    assert new and not new_again and (tmp_path / "optuna.db").exists()
    assert [t.state for t in again.trials].count(TrialState.COMPLETE) == 1 and sweep.remaining(again) == 3
    assert not (tmp_path / "out" / "study.journal").exists()


def test_existing_study_with_another_space_is_refused(small_digits: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "study"
    first = Sweep(load_config([PARAMS], overrides(small_digits, *grid([0.5, 0.75], [1, 2]))), out)
    study, new = first.create_study(first.open_storage())
    assert new and len(study.get_trials(states=(TrialState.WAITING,))) == 4
    journal = (out / "study.journal").read_bytes()
    again, new = first.create_study(first.open_storage())  # same params: continued, not re-enqueued
    assert not new and len(again.trials) == 4
    other = Sweep(load_config([PARAMS], overrides(small_digits, *grid([0.5, 0.75], [1, 2, 4]))), out)
    with pytest.raises(StudyMismatchError, match=r"another search space(.|\n)*space\.model\.num_parts"):
        other.create_study(other.open_storage())
    assert (out / "study.journal").read_bytes() == journal
    # through the CLI: one clear line, no traceback, nothing written
    from emae.cli import main

    assert main(["sweep", "-o", str(out), *overrides(small_digits, *grid([0.5, 0.75], [1, 2, 4]))]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("emae: error: study 'study' exists with another search space")
    assert (out / "study.journal").read_bytes() == journal and not (out / "params.yaml").exists()


# ----------------------------------------------------------------------------- liveness


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_trials_of_dead_owners_are_failed_and_retried(small_digits: Path, tmp_path: Path) -> None:
    sweep = Sweep(load_config([PARAMS], overrides(small_digits, *grid([0.5, 0.75], [1, 2]),
                                                  "sweep.max_retries=1")), tmp_path)
    study, _ = sweep.create_study(sweep.open_storage())
    trials = [sweep.next_trial(study, "w") for _ in range(4)]
    for trial in trials:
        trial.set_user_attr("run_dir", f"trials/{trial.number}")
    dead, alive_here, stale_remote, fresh_remote = trials
    dead.set_user_attr("owner", {**dead.user_attrs["owner"], "pid": _dead_pid()})
    for trial, age in ((stale_remote, 120.0), (fresh_remote, 0.0)):
        trial.set_user_attr("owner", {**trial.user_attrs["owner"], "host": "another-node"})
        beat = liveness.heartbeat_path(tmp_path, trial.number)
        beat.parent.mkdir(parents=True, exist_ok=True)
        beat.touch()
        os.utime(beat, (time.time() - age, time.time() - age))
    assert sweep.remaining(study) == 0  # all four cells are taken
    found = sweep.recover(study)
    assert sorted(found) == sorted([dead.number, stale_remote.number])
    by_number = {t.number: t for t in study.get_trials()}
    assert by_number[alive_here.number].state == TrialState.RUNNING
    assert by_number[fresh_remote.number].state == TrialState.RUNNING
    waiting = study.get_trials(states=(TrialState.WAITING,))
    links = retried_as(study.get_trials())  # Optuna's retry_history: failed -> retry
    assert sorted(links) == sorted([dead.number, stale_remote.number]) and sorted(links.values()) == sorted(
        t.number for t in waiting)
    for retry in waiting:
        original = by_number[retry.system_attrs["retry_history"][-1]]
        assert original.state == TrialState.FAIL and "died" in original.user_attrs["failure"]
        assert retry.system_attrs["fixed_params"] == original.system_attrs["fixed_params"]
        assert retry.system_attrs["retry_history"] == [original.number]  # its first retry
        # the retry pre-trains in the dead attempt's folder: its run_dir is where that work is
        assert retry.user_attrs["run_dir"] == original.user_attrs["run_dir"] == f"trials/{original.number}"
    assert sweep.remaining(study) == 2
    # the retries die too: max_retries=1 is spent, they fail for good and keep their slots
    retries = [sweep.next_trial(study, "w") for _ in range(2)]
    assert {t.number for t in retries} == {t.number for t in waiting} and all(
        t.user_attrs["failure"] is None for t in retries)  # the copied failure of the attempt is cleared
    for retry in retries:
        retry.set_user_attr("owner", {**retry.user_attrs["owner"], "pid": _dead_pid()})
    assert len(sweep.recover(study)) == 2 and sweep.remaining(study) == 0
    assert not set(retried_as(study.get_trials())) & {t.number for t in retries}
    # a worker stopped by a signal (Ctrl-C, scancel) queues its retry without using up max_retries
    stopped = study.get_trials(states=(TrialState.RUNNING,))[0]
    sweep.fail(study, stopped, "worker stopped by SIGTERM", stopped=True)
    again = sweep.next_trial(study, "w")
    assert study.trials[again.number].system_attrs["retry_history"][-1] == stopped.number
    assert again.user_attrs["stops"] == 1
    sweep.fail(study, study.trials[again.number], "worker stopped by SIGTERM", stopped=True)
    assert retried_as(study.get_trials())[again.number] == again.number + 1  # 2 stops, still retried
    # metrics.json counts every FAIL row of trials.csv, and says how many of them were retried
    from emae.sweep.results import write_results

    summary = write_results(sweep, study)
    table = pd.read_csv(tmp_path / "trials.csv").set_index("number")
    assert summary["failed"] == (table["state"] == "FAIL").sum() == 6 and summary["retried"] == 4
    assert json.loads((tmp_path / "metrics.json").read_text())["failed"] == 6
    assert table.loc[dead.number, "retried_as"] == links[dead.number]
    assert table.loc[links[dead.number], "retry_of"] == dead.number


def _take_trials(out: str, seen: "multiprocessing.Queue", start: "multiprocessing.Barrier") -> None:
    sweep = Sweep.from_snapshot(Path(out))
    study = sweep.load_study(sweep.open_storage(), str(os.getpid()))
    start.wait(60)  # all take trials at once: none finishes the study before the others have begun
    while (trial := sweep.next_trial(study, str(os.getpid()))) is not None:
        point = sweep.space.suggest(trial)
        time.sleep(0.02)  # a trial takes time, so the processes interleave
        study.tell(trial, float(point["model.num_parts"]))
        seen.put(trial.number)


def test_concurrent_processes_respect_the_global_trial_cap(small_digits: Path, tmp_path: Path) -> None:
    """Four processes ask for trials on one journal file: exactly n_trials, none twice."""
    from emae.config import save_config

    config = load_config([PARAMS], overrides(small_digits, "sweep.sampler=random", "sweep.n_trials=24",
                                             "sweep.space.model.num_parts={low: 1, high: 4}"))
    sweep = Sweep(config, tmp_path)
    sweep.create_study(sweep.open_storage())
    save_config(config, tmp_path / "params.yaml")
    ctx = multiprocessing.get_context("fork")
    seen, start = ctx.Queue(), ctx.Barrier(4)
    procs = [ctx.Process(target=_take_trials, args=(str(tmp_path), seen, start)) for _ in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(120)
        assert proc.exitcode == 0
    numbers = [seen.get(timeout=5) for _ in range(24)]
    assert seen.empty() and sorted(numbers) == list(range(24))
    study = sweep.load_study(sweep.open_storage(), "check")
    assert len(study.trials) == 24 and all(t.state == TrialState.COMPLETE for t in study.trials)
    assert len({t.user_attrs["owner"]["pid"] for t in study.trials}) > 1  # really concurrent


# ---------------------------------------------------------------------------- real sweeps


def sweep_here(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """`emae sweep` in this process (torch is imported already: seconds saved per call)."""
    from emae.cli import main

    code = main(args)
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    return captured.out


def load_study(out: Path) -> optuna.Study:
    sweep = Sweep.from_snapshot(out)
    return sweep.load_study(sweep.open_storage(), "test")


def test_grid_sweep_end_to_end_with_two_local_workers(small_digits: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "grid"
    args = ["sweep", "-o", str(out), *overrides(small_digits, *grid([0.5, 0.75], [1, 2, 4]),
                                                 "sweep.workers=2", "sweep.budget.epochs=1")]
    assert "(new)" in sweep_here(args, capsys)
    table = pd.read_csv(out / "trials.csv")
    # L = 16: r = 0.5 keeps 8 patches (K <= 2), r = 0.75 keeps 4 (K <= 4): 5 valid cells of 6
    cells = sorted(zip(table["params_num_parts"], table["params_mask_ratio"]))
    assert cells == sorted([(1, 0.5), (2, 0.5), (1, 0.75), (2, 0.75), (4, 0.75)])
    assert (table["state"] == "COMPLETE").all() and table["value_knn_top1"].between(0, 100).all()
    assert table["worker"].nunique() == 2  # both workers took trials from the one journal
    for name in ("heatmap", "history"):
        assert (out / "plots" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["complete"] == 5 and metrics["best_values"][0] == table["value_knn_top1"].max()
    # best.yaml is a params overlay that `emae pretrain -p params -p best.yaml` accepts
    best = table.loc[table["value_knn_top1"].idxmax()]
    config = load_config([PARAMS, out / "best.yaml"], [f"data.root={small_digits}", *TINY_OVERRIDES[:2]])
    assert (config.model.num_parts, config.model.mask_ratio) == (best["params_num_parts"], best["params_mask_ratio"])
    assert set(yaml.safe_load((out / "best.yaml").read_text())) == {"model"}
    for trial_dir in (out / "trials").iterdir():  # each trial pre-trained in its own folder
        assert (trial_dir / "encoder.safetensors").exists()
    # rerun: the study is complete, nothing runs again
    assert "(continued)" in sweep_here(args, capsys) and len(load_study(out).trials) == 5


def test_the_sweep_waits_for_a_running_trial_until_its_owner_is_found_dead(
        small_digits: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A trial RUNNING on another host when `emae sweep` starts (its heartbeat fresh, then silent: an
    RDB's grace period is the same wait) is waited for, failed once stale, and its retry run."""
    out = tmp_path / "wait"
    args = ["sweep", "-o", str(out), *overrides(small_digits, *grid([0.75], [2]), "sweep.budget.epochs=1",
                                                 "sweep.heartbeat_seconds=1", "sweep.stale_after_seconds=2")]
    sweep = Sweep(load_config([PARAMS], args[3:]), out)
    study, _ = sweep.create_study(sweep.open_storage())
    trial = sweep.next_trial(study, "remote")
    trial.set_user_attr("owner", {**trial.user_attrs["owner"], "host": "another-node"})
    liveness.touch(out, trial.number)
    started = time.monotonic()
    printed = sweep_here(args, capsys)
    assert "0 running elsewhere" in printed and time.monotonic() - started >= 2
    dead, retry = load_study(out).trials
    assert dead.state == TrialState.FAIL and "worker remote" in dead.user_attrs["failure"]
    assert retry.state == TrialState.COMPLETE and retry.system_attrs["retry_history"] == [0]


def test_sigkill_mid_trial_then_rerun_keeps_completed_and_retries_the_killed(
        small_digits: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "tpe"
    args = ["sweep", "-o", str(out), *overrides(
        small_digits, "sweep.sampler=tpe", "sweep.n_trials=2", "sweep.tpe.n_startup_trials=1",
        "sweep.space.model.mask_ratio={values: [0.5, 0.75]}", "sweep.space.model.num_parts={low: 1, high: 4}",
        "sweep.budget.epochs=2")]
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "emae.cli", *args], cwd=REPO, env=cli_env(),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def mid_second_trial() -> bool:  # trial 0 done; trial 1 saved its checkpoint after epoch 1
        second = out / "trials" / "1"
        log_path, ckpt = second / "log.jsonl", second / "checkpoints" / "last.pt"
        try:
            return ((out / "trials" / "0" / "metrics.json").exists() and not (second / "metrics.json").exists()
                    and len(log_path.read_text().splitlines()) == 1
                    and ckpt.stat().st_mtime >= log_path.stat().st_mtime)
        except FileNotFoundError:
            return False

    try:
        deadline = time.monotonic() + 150
        while not mid_second_trial():
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the sweep never reached the middle of trial 1"
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)  # the coordinator and its worker, no chance to clean up
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = {t.number: t for t in load_study(out).trials}
    assert before[0].state == TrialState.COMPLETE and before[1].state == TrialState.RUNNING
    first_epoch = (out / "trials" / "1" / "log.jsonl").read_text().splitlines()[0]

    sweep_here(args, capsys)
    after = {t.number: t for t in load_study(out).trials}
    assert after[0].state == TrialState.COMPLETE and after[0].values == before[0].values  # kept
    assert after[1].state == TrialState.FAIL and "died" in after[1].user_attrs["failure"]
    retry = next(t for t in after.values() if t.system_attrs.get("retry_history") == [1])
    assert retry.state == TrialState.COMPLETE and retry.params == before[1].params
    # the retry resumed the killed attempt's folder: its first epoch is the one logged before the kill
    assert retry.user_attrs["run_dir"] == after[1].user_attrs["run_dir"] == "trials/1"
    resumed = out / "trials" / "1"
    assert sorted(p.name for p in (out / "trials").iterdir()) == ["0", "1"]
    assert resumed.joinpath("log.jsonl").read_text().splitlines()[0] == first_epoch
    assert len(resumed.joinpath("log.jsonl").read_text().splitlines()) == 2
    worker_logs = "".join(p.read_text(errors="replace") for p in (out / "workers").glob("*.log"))
    assert f"resuming from {resumed}/checkpoints/last.pt" in worker_logs
    complete = [t for t in after.values() if t.state == TrialState.COMPLETE]
    assert len(complete) == 2 and len(after) == 3  # the cap: 2 slots, the failed one handed over
    table = pd.read_csv(out / "trials.csv").set_index("number")
    assert len(table) == 3 and table.loc[1, "retried_as"] == retry.number and table.loc[retry.number, "retry_of"] == 1
    assert (out / "plots" / "heatmap.png").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["failed"], metrics["retried"], metrics["complete"]) == (1, 1, 2)


# ------------------------------------------------------------------- objective and results


def _sweep_here(small_digits: Path, out: Path, *extra: str) -> tuple[Sweep, optuna.Study]:
    sweep = Sweep(load_config([PARAMS], overrides(small_digits, *extra)), out)
    study, _ = sweep.create_study(sweep.open_storage())
    return sweep, study


def test_pruned_after_the_first_reported_epoch(small_digits: Path, tmp_path: Path) -> None:
    from emae.sweep.objective import run_trial

    sweep, study = _sweep_here(small_digits, tmp_path, "sweep.pruner=median", "sweep.median_pruner.n_startup_trials=1",
                               "sweep.median_pruner.n_warmup_steps=0", "sweep.budget.epochs=3")
    # an earlier trial far better at every epoch: the median pruner stops ours after epoch 1
    study.add_trial(optuna.trial.create_trial(
        params={"mask_ratio": 0.75, "num_parts": 1}, value=100.0, intermediate_values={1: 100.0, 2: 100.0},
        distributions={"mask_ratio": optuna.distributions.CategoricalDistribution([0.5, 0.75]),
                       "num_parts": optuna.distributions.CategoricalDistribution([1, 2, 4])}))
    trial = sweep.next_trial(study, "here")
    with pytest.raises(optuna.TrialPruned):
        run_trial(trial, tmp_path, sweep.base, sweep.settings, sweep.space)
    folder = tmp_path / "trials" / str(trial.number)
    assert len((folder / "log.jsonl").read_text().splitlines()) == 1  # stopped after epoch 1 of 3
    assert (folder / "checkpoints" / "last.pt").exists() and not (folder / "metrics.json").exists()
    pruned = study.trials[trial.number]
    assert pruned.user_attrs["pruned_at_epoch"] == 1
    # the heatmap's cell of a pruned point shows the score it was pruned with
    from emae.sweep.results import pruned_labels, trials_table

    study.tell(trial, state=optuna.trial.TrialState.PRUNED)  # as the worker does
    cell = (pruned.params["num_parts"], pruned.params["mask_ratio"])
    assert pruned_labels(sweep, trials_table(study)) == {cell: f"pruned\n{pruned.intermediate_values[1]:.1f} @ ep 1"}


def test_time_budget_stops_at_the_first_knn_epoch_past_it(small_digits: Path, tmp_path: Path) -> None:
    from emae.sweep.objective import run_trial

    sweep, study = _sweep_here(small_digits, tmp_path, "sweep.budget.epochs=3", "sweep.budget.seconds=0.01",
                               "sweep.prune_every_epochs=2")
    trial = sweep.next_trial(study, "here")
    value = run_trial(trial, tmp_path, sweep.base, sweep.settings, sweep.space)
    attrs = study.trials[trial.number].user_attrs
    assert attrs["budget_stopped"] is True and attrs["epochs"] == 2  # epoch 1 had no kNN value
    assert value == attrs["knn_top1"] and 0 <= value <= 100


def test_multi_objective_results_keep_the_pareto_front(small_digits: Path, tmp_path: Path) -> None:
    """Results of a two-objective study (values told by hand: no pre-training needed here)."""
    from emae.sweep.results import write_results

    sweep, study = _sweep_here(small_digits, tmp_path, "sweep.multi_objective=true", "sweep.sampler=random",
                               "sweep.n_trials=6", *grid([0.5, 0.75], [1, 2]))
    told = {}
    for accuracy, seconds in [(50.0, 10.0), (60.0, 20.0), (55.0, 30.0), (40.0, 5.0), (60.0, 25.0), (30.0, 50.0)]:
        trial = sweep.next_trial(study, "here")
        sweep.space.suggest(trial)
        study.tell(trial, (accuracy, seconds))
        told[trial.number] = (accuracy, seconds)
    summary = write_results(sweep, study)
    front = {n for n, (a, s) in told.items()
             if not any(a2 >= a and s2 <= s and (a2, s2) != (a, s) for a2, s2 in told.values())}
    table = pd.read_csv(tmp_path / "trials.csv")
    assert set(table.loc[table["pareto"], "number"]) == front == {0, 1, 3}
    assert summary["best_trial"] == 1 and summary["best_values"] == [60.0, 20.0]  # most accurate on the front
    best = study.trials[1].params
    assert yaml.safe_load((tmp_path / "best.yaml").read_text()) == {
        "model": {"mask_ratio": best["mask_ratio"], "num_parts": best["num_parts"]}}
    for name in ("heatmap", "history", "pareto"):
        assert (tmp_path / "plots" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("snakemake") is None, reason="snakemake is not installed")
def test_snakemake_sweep_target_runs_the_study_and_a_rerun_is_a_no_op(small_digits: Path, tmp_path: Path) -> None:
    """`snakemake sweep`: one job, `emae launch --stage sweep -- sweep -o ...`, that leaves the
    table, best params and plots; a second `snakemake sweep` has nothing to do."""
    extra = " ".join(overrides(small_digits, *[g.replace(" ", "") for g in grid([0.75], [1, 2])],
                               "sweep.budget.epochs=1", "pipeline.stages.prepare=false"))

    def snakemake() -> str:
        result = subprocess.run(
            ["snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path), "--cores", "1", "-p",
             "sweep", "--config", f"params={PARAMS}", f"overrides={extra}"],
            capture_output=True, text=True, env=cli_env(), timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result.stdout + result.stderr

    text = snakemake()
    assert "rule sweep_study:" in text and "wildcards: study=k_mask_ratio" in text
    assert "emae.cli launch --stage sweep -- sweep -p" in text
    assert "-o results/sweeps/k_mask_ratio" in text
    assert "pretrain" not in [line.split()[0] for line in text.splitlines() if line.startswith("rule ")]
    out = tmp_path / "results" / "sweeps" / "k_mask_ratio"
    table = pd.read_csv(out / "trials.csv")
    assert sorted(table["params_num_parts"]) == [1, 2] and (table["state"] == "COMPLETE").all()
    assert yaml.safe_load((out / "best.yaml").read_text())["model"]["mask_ratio"] == 0.75
    assert (out / "plots" / "heatmap.png").read_bytes()[:4] == b"\x89PNG"
    assert "Nothing to be done" in snakemake()


def test_an_equal_flops_budget_gives_each_k_its_share_of_maes_epochs() -> None:
    """budget.compute=flops: every trial gets the FLOPs of `epochs` MAE epochs (K=1 at the base
    params' model); its epochs and warm-up are fitted to its own K and mask ratio."""
    from emae.flops import train_flops_per_image
    from emae.sweep.objective import trial_config

    config = load_config([PARAMS], ["sweep.budget.compute=flops", "sweep.budget.epochs=40",
                                    "sweep.budget.warmup_epochs=4"])
    base, sweep = config.to_dict(), config.section("sweep")
    trials = {(k, r): trial_config(base, sweep, {"model.num_parts": k, "model.mask_ratio": r}).pretrain
              for k, r in ((1, 0.75), (2, 0.75), (4, 0.75), (2, 0.5))}
    assert trials[1, 0.75].epochs == 40 and trials[1, 0.75].warmup_epochs == 4
    mae = train_flops_per_image(config.model.model_copy(update={"num_parts": 1}), 32, 3)
    for (k, r), cfg in trials.items():
        trial = train_flops_per_image(config.model.model_copy(update={"num_parts": k, "mask_ratio": r}), 32, 3)
        assert cfg.epochs == round(40 * mae / trial) and cfg.warmup_epochs == pytest.approx(4 * cfg.epochs / 40)
    assert trials[4, 0.75].epochs == 10 and trials[2, 0.75].epochs == 20 and trials[2, 0.5].epochs < 20
    assert "equal FLOPs per trial: those of 40 MAE epochs" in sweep.budget.describe()
