"""`emae sweep` with its workers as a submitit job array: on a real SLURM cluster
(tools/local-slurm.sh; marked `slurm`, skipped when none is up) and with submitit's local executor
(the same code path without SLURM)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from optuna.trial import TrialState

from conftest_slurm import slurm_is_up
from test_sweep import grid, load_study, overrides, small_digits, sweep_here  # noqa: F401 - fixture

UP, WHY = slurm_is_up()
FAST = ["launcher.poll_interval_s=0.3", "launcher.state_interval_s=0.5", "launcher.result_grace_s=5",
        "launcher.unknown_state_timeout_s=60"]


@pytest.mark.parametrize("backend", [
    pytest.param("submitit-local", marks=pytest.mark.slow),
    pytest.param("slurm", marks=[pytest.mark.slurm, pytest.mark.skipif(not UP, reason=WHY)]),
])
@pytest.mark.timeout(300)
def test_two_worker_array_sweep(backend: str, small_digits: Path, tmp_path: Path,  # noqa: F811
                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "array"
    args = ["sweep", "-o", str(out), *overrides(
        small_digits, *grid([0.75], [1, 2, 3]), f"sweep.backend={backend}", "sweep.workers=2",
        "sweep.budget.epochs=1", *FAST,
        # GPU requests of the workers come from the launcher params (a fake gres on the local cluster)
        "launcher.stages.sweep_worker.gpus_per_node=1", "launcher.resources.time_min=10",
        "launcher.resources.cpus_per_task=1")]
    printed = sweep_here(args, capsys)
    jobs = re.search(r"submitted 2 worker job\(s\): (\S+), (\S+)", printed)
    assert jobs, printed
    study = load_study(out)
    assert len(study.trials) == 3 and all(t.state == TrialState.COMPLETE for t in study.trials)
    assert sorted(t.params["num_parts"] for t in study.trials) == [1, 2, 3]
    logs = {p.name: p.read_text(errors="replace") for p in (out / "workers").glob("array*.log")}
    assert len(logs) == 2 and all("no more trials to run" in text for text in logs.values())
    if backend == "slurm":
        # one array (<id>_0, <id>_1), each task a worker, asking for the GPU of launcher.stages
        assert {j.split("_")[0] for j in jobs.groups()} == {jobs.group(1).split("_")[0]}
        assert all("CUDA_VISIBLE_DEVICES='0'" in text for text in logs.values())
        owners = {t.user_attrs["owner"]["slurm_job"] for t in study.trials}
        assert owners <= set(jobs.groups())
    assert (out / "plots" / "heatmap.png").exists() and (out / "best.yaml").exists()
