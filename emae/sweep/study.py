"""A sweep as the coordinator and its workers see it: validated params and space, the storage,
and which trial runs next.

Storage: `journal` is `<out>/study.journal` (NFS-safe file lock, no server). An RDB URL uses
Optuna's heartbeat: `fail_stale_trials` fails a RUNNING trial silent for `grace_period` and the
storage's `RetryHeartbeatStaleTrialCallback` queues it again; on the journal, which has no
heartbeat, `emae.sweep.liveness` finds the dead owners and the same retry follows.
The global cap: under `study_lock` a worker fails dead owners' trials, then asks for a trial only
if one is queued (a grid cell, a retry) or, for TPE/random, fewer than `n_trials` slots are taken
(complete, pruned, running, queued, or failed for good: a retried failure hands its slot on).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import warnings
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Iterator

import optuna
from optuna.storages import BaseStorage, JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
from optuna.trial import FrozenTrial, TrialState

from emae.config import Config, DataConfig, PretrainConfig, load_config
from emae.errors import ConfigError, EmaeError
from emae.sweep import liveness
from emae.sweep.config import SweepConfig
from emae.sweep.objective import trial_config
from emae.sweep.space import PARTS, RATIO, SearchSpace, choices

log = logging.getLogger("emae.sweep")
# the heartbeat, its retry and metric names are Optuna "experimental" features, used on purpose
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

PARAMS_SNAPSHOT, JOURNAL, LOCK, SIGNATURE_ATTR = "params.yaml", "study.journal", "study", "emae_signature"
_SCORING_SECTIONS = {"knn": ("knn",), "linprobe": ("knn", "linprobe")}


class StudyMismatchError(EmaeError):
    pass


def metric_names(objective: str, multi_objective: bool) -> list[str]:
    return [f"{objective}_top1", *(["pretrain_seconds"] if multi_objective else [])]


def retried_as(trials: list[FrozenTrial]) -> dict[int, int]:
    """Failed trial -> its retry (the last entry of the retry's Optuna `retry_history`)."""
    return {t.system_attrs["retry_history"][-1]: t.number for t in trials if t.system_attrs.get("retry_history")}


def retry(study: optuna.Study, trial: FrozenTrial, max_retries: int) -> None:
    """Optuna's retry of a failed trial (same params, attrs and so folder; WAITING) while it has
    retries left; stops by a signal (`stops`) use up none."""
    RetryHeartbeatStaleTrialCallback(max_retry=max_retries + trial.user_attrs.get("stops", 0))(study, trial)


@dataclass
class Progress:
    complete: int
    pruned: int
    running: int
    waiting: int
    failed: int  # every FAIL trial (the FAIL rows of trials.csv)
    retried: int  # of those, the ones handed to a retry

    @property
    def finished(self) -> int:
        return self.complete + self.pruned + self.failed - self.retried

    @property
    def slots(self) -> int:
        return self.finished + self.running + self.waiting


def progress(trials: list[FrozenTrial]) -> Progress:
    n = Counter(t.state for t in trials)
    return Progress(n[TrialState.COMPLETE], n[TrialState.PRUNED], n[TrialState.RUNNING], n[TrialState.WAITING],
                    n[TrialState.FAIL], len(retried_as(trials)))


@contextlib.contextmanager
def study_lock(out: Path) -> Iterator[None]:
    """A cross-process (NFS-safe) lock beside the results; a dead holder's lock expires in 30 s."""
    out.mkdir(parents=True, exist_ok=True)
    lock = JournalFileOpenLock(str(out / LOCK))
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict) or not tree:
        return {prefix.rstrip("."): tree}
    return {k: v for key, value in tree.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}


class Sweep:
    """Validated settings of one study in `out` (nothing is written until `create_study`)."""

    def __init__(self, config: Config, out: Path) -> None:
        self.config, self.out = config, out
        self.settings: SweepConfig = config.section("sweep")
        self.space = SearchSpace(self.settings, config)
        self.base = config.to_dict()
        self.name = self.settings.study_name or out.resolve().name
        self.rdb = self.settings.storage != "journal"
        s = self.settings
        for section in _SCORING_SECTIONS[s.objective]:
            config.section(section)
        points = self.space.grid() if s.sampler == "grid" else self._corners()
        for point in points:  # every point's params are valid before any trial runs
            try:
                trial_config(self.base, s, point)
            except ConfigError as err:
                raise ConfigError(f"sweep.space point {point} gives invalid params:\n{err}") from None
        if s.sampler == "grid" and not points:
            raise ConfigError("sweep.space: the grid has no valid (K, mask ratio) combination")
        for split in ("train", "val") if config.data.kind == "imagefolder" else ():
            if not (Path(config.data.root) / split).is_dir():
                raise EmaeError(f"{Path(config.data.root) / split}: data split not found (data.root="
                                f"{config.data.root!r}; for the embedded set run `emae prepare`)")

    @classmethod
    def from_snapshot(cls, out: Path) -> "Sweep":
        """What a worker uses: the params the coordinator resolved and wrote into `out`."""
        if not (out / PARAMS_SNAPSHOT).is_file():
            raise EmaeError(f"{out / PARAMS_SNAPSHOT}: not found; workers are started by `emae sweep -o {out}`")
        return cls(load_config([out / PARAMS_SNAPSHOT]), out)

    def _corners(self) -> list[dict[str, Any]]:
        """Valid points that reach every dimension's ends (TPE/random); K's largest with r's largest."""
        points = []
        for key, dist in self.space.dists.items():
            values = choices(dist) or (dist.low, dist.high)
            for value in (values[0], values[-1]):
                point = {key: value}
                if key == PARTS and RATIO in self.space.dists and not self.space.valid(point):
                    point[RATIO] = choices(self.space.dists[RATIO])[-1]
                points += [point] if self.space.valid(point) else []
        return points

    def signature(self) -> dict[str, Any]:
        """What defines the study's results: a rerun must match it (n_trials, workers may change)."""
        # keys a resumed run may change (emae.config.RESUMABLE) may also differ between reruns
        free = {"data": DataConfig.resumable_keys(), "pretrain": PretrainConfig.resumable_keys()}
        base = {section: {k: v for k, v in self.base[section].items() if k not in free.get(section, ())}
                for section in ("data", "model", "pretrain", *_SCORING_SECTIONS[self.settings.objective])
                if section in self.base}
        return json.loads(json.dumps({**self.settings.signature(), "base": base}, sort_keys=True))

    @property
    def target(self) -> int:
        """Trials the study should end with (grid: its enqueued cells)."""
        cells = len(self.space.grid()) if self.settings.sampler == "grid" else None
        return self.settings.n_trials if cells is None else min(cells, self.settings.n_trials or cells)

    def open_storage(self) -> BaseStorage:
        """The journal, or the RDB with Optuna's heartbeat; errors name what could not be opened."""
        s, url = self.settings, self.settings.storage
        if not self.rdb:
            path = str(self.out / JOURNAL)
            try:
                self.out.mkdir(parents=True, exist_ok=True)
                return JournalStorage(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)))
            except OSError as err:
                raise EmaeError(f"sweep.storage: cannot open the journal {path}: {err}") from None
        if url.startswith("sqlite") and s.workers > 1:
            raise EmaeError(f"sweep.storage = {url!r}: SQLite cannot serve {s.workers} concurrent workers "
                            "(Optuna); use 'journal' or a MySQL/PostgreSQL server")
        try:
            return RDBStorage(url, engine_kwargs=None if url.startswith("sqlite") else {"pool_pre_ping": True},
                              heartbeat_interval=math.ceil(s.heartbeat_seconds),
                              grace_period=math.ceil(s.stale_after_seconds),
                              heartbeat_stale_trial_callback=partial(retry, max_retries=s.max_retries))
        except Exception as err:  # noqa: BLE001 - sqlalchemy raises many kinds (ArgumentError, OperationalError, ...)
            message = (str(err).strip() or type(err).__name__).splitlines()[0]
            raise EmaeError(f"sweep.storage = {url!r}: cannot open this Optuna storage ({type(err).__name__}: "
                            f"{message}); use 'journal' or a URL such as mysql+pymysql://user:pw@host/db") from None

    def sampler(self, worker: str) -> optuna.samplers.BaseSampler:
        """TPE/random seeded per worker (one seed everywhere would make workers draw alike)."""
        from emae.seeding import derive_seed

        seed = derive_seed(self.settings.seed, "sampler", worker) % (2**32)
        if self.settings.sampler == "tpe":
            return optuna.samplers.TPESampler(seed=seed, n_startup_trials=self.settings.tpe.n_startup_trials)
        return optuna.samplers.RandomSampler(seed=seed)  # grid cells are enqueued: it never draws them

    def pruner(self) -> optuna.pruners.BasePruner:
        s = self.settings
        if s.pruner == "none" or s.multi_objective or s.prune_every_epochs == 0:
            return optuna.pruners.NopPruner()
        return optuna.pruners.MedianPruner(n_startup_trials=s.median_pruner.n_startup_trials,
                                           n_warmup_steps=s.median_pruner.n_warmup_steps)

    def create_study(self, storage: BaseStorage) -> tuple[optuna.Study, bool]:
        """Create the study (grid: enqueue its cells) or reopen it (signature checked). (study, new)"""
        s = self.settings
        with study_lock(self.out):
            if self.name in {x.study_name for x in optuna.get_all_study_summaries(storage, include_best_trial=False)}:
                return self.load_study(storage, "coordinator"), False
            study = optuna.create_study(study_name=self.name, storage=storage, sampler=self.sampler("coordinator"),
                                        pruner=self.pruner(),
                                        directions=["maximize", "minimize"][:1 + s.multi_objective])
            study.set_metric_names(metric_names(s.objective, s.multi_objective))
            study.set_user_attr(SIGNATURE_ATTR, self.signature())
            for cell in self.space.grid()[: self.target] if s.sampler == "grid" else ():
                study.enqueue_trial({self.space.name(k): v for k, v in cell.items()})
        return study, True

    def load_study(self, storage: BaseStorage, worker: str, check: bool = True) -> optuna.Study:
        try:
            study = optuna.load_study(study_name=self.name, storage=storage, sampler=self.sampler(worker),
                                      pruner=self.pruner())
        except KeyError:
            raise EmaeError(f"study {self.name!r} not found in its storage (run `emae sweep` first)") from None
        if check:
            self.check_signature(study)
        return study

    def check_signature(self, study: optuna.Study) -> None:
        """Refuse to continue a study with another space / objective / base params (names the keys)."""
        if (stored := study.user_attrs.get(SIGNATURE_ATTR)) is None:
            raise StudyMismatchError(f"study {study.study_name!r} exists but was not created by `emae sweep` "
                                     "(no recorded search space); use another study name")
        old, new = _flatten(stored), _flatten(self.signature())
        changed = [f"{k}: {old.get(k, '(absent)')!r} -> {new.get(k, '(absent)')!r}"
                   for k in sorted(old.keys() | new.keys()) if old.get(k, KeyError) != new.get(k, KeyError)]
        if changed:
            what = "another search space" if any(c.startswith("space") for c in changed) else "other settings"
            raise StudyMismatchError(
                f"study {study.study_name!r} exists with {what}; nothing was changed. Differences (stored -> now):\n  "
                + "\n  ".join(changed[:20]) + ("\n  ..." if len(changed) > 20 else "")
                + "\nRestore those params, or use another output folder / sweep.study_name for a new study.")

    def remaining(self, study: optuna.Study) -> int:
        """Trials that still have to be started (queued ones and free slots)."""
        p = progress(study.get_trials(deepcopy=False))
        return p.waiting + (0 if self.settings.sampler == "grid" else max(self.target - p.slots, 0))

    def recover(self, study: optuna.Study) -> list[int]:
        """Fail (and retry) the RUNNING trials whose owner died; returns their numbers. Under `study_lock`."""
        if not self.rdb:
            dead = liveness.dead_trials(study, self.out, self.settings.stale_after_seconds)
            for trial, reason in dead:
                self.fail(study, trial, reason)
            return [t.number for t, _ in dead]
        running = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
        optuna.storages.fail_stale_trials(study)  # Optuna's heartbeat; the storage's callback retries
        failed = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
        for number in (dead := [n for n in running if n in failed]):
            log.warning("trial %d: no heartbeat for %g s: failed", number, self.settings.stale_after_seconds)
        return dead

    def fail(self, study: optuna.Study, trial: FrozenTrial, reason: str, stopped: bool = False) -> None:
        """Fail a RUNNING trial of any owner with `reason` and queue its retry. Under `study_lock`."""
        storage, tid = study._storage, trial._trial_id  # noqa: SLF001 - a trial this process may not own
        try:
            storage.set_trial_user_attr(tid, "failure", reason)
            if stopped:
                storage.set_trial_user_attr(tid, "stops", trial.user_attrs.get("stops", 0) + 1)
            study.tell(trial.number, state=TrialState.FAIL)
        except (ValueError, RuntimeError):
            return  # finished meanwhile (its owner was alive after all): nothing to recover
        log.warning("trial %d: %s", trial.number, reason)
        retry(study, copy.deepcopy(storage.get_trial(tid)), self.settings.max_retries)  # as Optuna does

    def next_trial(self, study: optuna.Study, worker: str) -> optuna.Trial | None:
        """The next trial for `worker` (owner recorded, first heartbeat), or None when none is needed."""
        with study_lock(self.out):
            self.recover(study)
            if self.remaining(study) == 0:
                return None
            with warnings.catch_warnings():  # an RDB heartbeat outside study.optimize: the worker beats
                warnings.simplefilter("ignore", UserWarning)
                trial = study.ask()
            trial.set_user_attr("owner", liveness.owner_record(worker))
            if trial.user_attrs.get("failure"):  # a retry: the attrs it copied from the attempt it retries
                trial.set_user_attr("failure", None)
            self.beat(trial)
        return trial

    def beat(self, trial: optuna.Trial) -> None:
        """One heartbeat of a running trial: Optuna's (RDB) or the journal's heartbeat file."""
        if self.rdb:
            trial.storage.record_heartbeat(trial._trial_id)  # noqa: SLF001
        else:
            liveness.touch(self.out, trial.number)
