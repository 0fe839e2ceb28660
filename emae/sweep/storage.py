"""Where a study lives: a journal file beside the results (default), or any Optuna RDB URL.

The journal (`<out>/study.journal`, `JournalFileOpenLock`) needs no server and is safe on NFS;
PostgreSQL/MySQL URLs suit many workers. SQLite is refused for more than one worker (Optuna's docs:
it is not made for concurrent writers).

A study records what defines its results (the search space, sampler, objective, budget, base
params) in its user attrs; reopening it with anything else is an error, so a rerun continues the
same study and never mixes two.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from pathlib import Path
from typing import Any, Iterator

import optuna
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

from emae.errors import EmaeError

log = logging.getLogger("emae.sweep")

JOURNAL = "study.journal"
LOCK = "study"  # <out>/study.lock: held while counting and creating trials (the global cap)
SIGNATURE_ATTR = "emae_signature"


class StudyMismatchError(EmaeError):
    pass


def open_storage(url: str, out: Path, workers: int = 1) -> BaseStorage:
    """`journal` -> `<out>/study.journal`; otherwise an RDB URL. Errors say what could not be opened."""
    if url == "journal":
        out.mkdir(parents=True, exist_ok=True)
        path = str(out / JOURNAL)
        try:
            return JournalStorage(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)))
        except OSError as err:
            raise EmaeError(f"sweep.storage: cannot open the journal {path}: {err}") from None
    if url.startswith("sqlite") and workers > 1:
        raise EmaeError(f"sweep.storage = {url!r}: SQLite cannot serve {workers} concurrent workers "
                        "(Optuna); use 'journal' or a PostgreSQL URL")
    try:
        # no heartbeat here: liveness is emae's own (works for every storage, see emae.sweep.liveness)
        return RDBStorage(url, engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite") else None)
    except Exception as err:  # noqa: BLE001 - sqlalchemy raises many kinds (ArgumentError, OperationalError, ImportError)
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise EmaeError(f"sweep.storage = {url!r}: cannot open this Optuna storage ({type(err).__name__}: "
                        f"{message}); use 'journal' or a URL such as postgresql://user:pw@host/db") from None


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


def _directions(multi_objective: bool) -> list[str]:
    return ["maximize", "minimize"] if multi_objective else ["maximize"]


def metric_names(objective: str, multi_objective: bool) -> list[str]:
    names = [f"{objective}_top1"]
    return names + ["pretrain_seconds"] if multi_objective else names


def create_or_load(storage: BaseStorage, name: str, signature: dict[str, Any], multi_objective: bool,
                   objective: str, sampler: optuna.samplers.BaseSampler | None = None,
                   pruner: optuna.pruners.BasePruner | None = None) -> tuple[optuna.Study, bool]:
    """The study `name` (new: signature recorded; existing: signature checked). Returns (study, new)."""
    existing = {s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}
    if name in existing:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
        check_signature(study, signature)
        return study, False
    study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner,
                                directions=_directions(multi_objective))
    study.set_user_attr(SIGNATURE_ATTR, _jsonable(signature))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(metric_names(objective, multi_objective))
    return study, True


def load(storage: BaseStorage, name: str, sampler: optuna.samplers.BaseSampler | None = None,
         pruner: optuna.pruners.BasePruner | None = None) -> optuna.Study:
    try:
        return optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
    except KeyError:
        raise EmaeError(f"study {name!r} not found in its storage (run `emae sweep` first)") from None


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True))


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            flat |= _flatten(value, f"{prefix}{key}.")
        return flat or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): tree}


def check_signature(study: optuna.Study, signature: dict[str, Any]) -> None:
    """Refuse to continue a study with another space / objective / base params (names the keys)."""
    stored = study.user_attrs.get(SIGNATURE_ATTR)
    if stored is None:
        raise StudyMismatchError(f"study {study.study_name!r} exists but was not created by `emae sweep` "
                                 "(no recorded search space); use another study name")
    now = _jsonable(signature)
    if stored == now:
        return
    old, new = _flatten(stored), _flatten(now)
    changed = [f"{k}: {old.get(k, '(absent)')!r} -> {new.get(k, '(absent)')!r}"
               for k in sorted(set(old) | set(new)) if old.get(k, KeyError) != new.get(k, KeyError)]
    what = "another search space" if any(c.startswith("space") for c in changed) else "other settings"
    raise StudyMismatchError(
        f"study {study.study_name!r} exists with {what}; nothing was changed. Differences (stored -> now):\n  "
        + "\n  ".join(changed[:20]) + ("\n  ..." if len(changed) > 20 else "")
        + "\nRestore those params, or use another output folder / sweep.study_name for a new study.")
