"""The search space: every swept key an Optuna distribution, and the one constraint on (K, r).

K disjoint visible sets of `int(L * (1 - r))` patches fit only when `K * int(L * (1 - r)) <= L`
(`emae.patches.allowed_num_parts`): for a fixed r the allowed K are a prefix, for a fixed K the
allowed r a suffix. So TPE/random draw one of the two first and the other from a range whose
bound is moved to its last allowed value (Optuna lets int/float ranges change between trials,
not categorical choices); the grid enqueues only the valid cells. No trial is drawn outside.
"""

from __future__ import annotations

import itertools
import math
import random
from typing import Any

from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from emae.config import Config, source_of
from emae.errors import ConfigError
from emae.patches import allowed_num_parts, num_visible
from emae.sweep.config import Dimension, SweepConfig

RATIO, PARTS = "model.mask_ratio", "model.num_parts"
_DECIMALS = 12  # drawn floats are rounded so that `low + i * step` is exact enough for int(L * (1 - r))


def _suggest(trial: Any, name: str, dist: BaseDistribution) -> Any:
    """`trial.suggest_*` for a distribution (an enqueued or retried trial gets its fixed value)."""
    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(name, list(dist.choices))
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
    value = trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)
    return round(value, _DECIMALS) if dist.step else value


def choices(dist: BaseDistribution) -> tuple[Any, ...] | None:
    """The values of a discrete distribution; None for a continuous range."""
    if isinstance(dist, CategoricalDistribution):
        return tuple(dist.choices)
    if isinstance(dist, IntDistribution):
        return tuple(range(dist.low, dist.high + 1, dist.step))
    n = None if dist.step is None else round((dist.high - dist.low) / dist.step)
    return None if n is None else tuple(round(dist.low + i * dist.step, _DECIMALS) for i in range(n + 1))


def _from_values(values: list[Any], is_int: bool) -> BaseDistribution:
    """Evenly spaced numbers are a range (movable by TPE/random); other lists are categorical."""
    values = sorted(values)
    step = round(values[1] - values[0], _DECIMALS) if len(values) > 1 else 1
    if not all(math.isclose(b - a, step, rel_tol=1e-9) for a, b in zip(values, values[1:])):
        return CategoricalDistribution(values)
    return IntDistribution(values[0], values[-1], step=int(step)) if is_int else FloatDistribution(
        values[0], values[-1], step=step)


class SearchSpace:
    """The validated space of one study: `suggest(trial)` draws a valid point, `grid()` lists all."""

    def __init__(self, sweep: SweepConfig, config: Config) -> None:
        self.sweep, self.origin, self.num_patches = sweep, config.origin, config.num_patches
        self.base = config.to_dict()
        self.dists = {key: self._distribution(key, dim) for key, dim in sweep.dimensions().items()}
        names = [self.name(k) for k in self.dists]
        if not names:
            raise self._error("sweep.space is empty: give at least one dimension, e.g. "
                              "model.num_parts: {low: 1, high: 4}")
        if len(set(names)) != len(names):
            raise self._error(f"sweep.space keys must differ after their section (Optuna names them {names})")
        self._check_constraint()
        loose = [k for k, d in self.dists.items() if choices(d) is None]
        if sweep.sampler == "grid" and loose:
            raise self._error(f"sampler 'grid' needs discrete dimensions; {', '.join(loose)} is a continuous "
                              "range (give `values` or a `step`)", "sweep.sampler")
        pair = [self.dists.get(RATIO), self.dists.get(PARTS)]
        if sweep.sampler != "grid" and all(isinstance(d, CategoricalDistribution) for d in pair):
            raise self._error(
                f"sweep.space: with sampler {sweep.sampler!r}, model.mask_ratio or model.num_parts must be a range "
                "(low/high, or evenly spaced values) so that it can be drawn within what the other allows; both are "
                f"uneven lists ({list(pair[0].choices)}, {list(pair[1].choices)}). Use sampler: grid, or give one "
                "of them as a range")

    @staticmethod
    def name(key: str) -> str:
        """The Optuna parameter name: the key without its section."""
        return key.rsplit(".", 1)[1]

    def _error(self, message: str, key: str = "sweep.space") -> ConfigError:
        return ConfigError(f"{source_of(key, self.origin)}: {message}")

    def _distribution(self, key: str, dim: Dimension) -> BaseDistribution:
        where = f"{source_of(f'sweep.space.{key}', self.origin)}: sweep.space.{key}"
        section, _, name = key.partition(".")
        if "." in name or name not in self.base.get(section, {}):
            raise ConfigError(f"{where}: {key} is not a params key (section {section!r} has: "
                              f"{', '.join(self.base.get(section, {})) or 'nothing'})")
        base = self.base[section][name]
        is_int = isinstance(base, int) and not isinstance(base, bool)
        numeric = is_int or isinstance(base, float)
        if dim.values is not None:
            kinds = (int,) if is_int else (int, float) if numeric else None
            if kinds and not all(isinstance(v, kinds) and not isinstance(v, bool) for v in dim.values):
                raise ConfigError(f"{where}.values = {dim.values}: {key} takes {'integers' if is_int else 'numbers'}")
            return _from_values([v if is_int else float(v) for v in dim.values], is_int) if numeric else \
                CategoricalDistribution(dim.values)
        if not numeric:
            raise ConfigError(f"{where}: {key} = {base!r} is not a number: give `values`, not a range")
        if not is_int:
            return FloatDistribution(dim.low, dim.high, step=dim.step, log=dim.log)
        for field in ("low", "high", "step"):
            if getattr(dim, field) not in (None, int(getattr(dim, field) or 0)):
                raise ConfigError(f"{where}.{field} = {getattr(dim, field)}: {key} takes integers")
        return IntDistribution(int(dim.low), int(dim.high), step=int(dim.step or 1), log=dim.log)

    def axis_values(self, key: str) -> tuple[Any, ...]:
        """The values of K or r: swept, or the base params' one."""
        return choices(self.dists[key]) if key in self.dists else (self.base["model"][self.name(key)],)

    def _check_constraint(self) -> None:
        L = self.num_patches
        if RATIO in self.dists and choices(self.dists[RATIO]) is None:
            raise self._error(f"sweep.space.{RATIO}: the mask ratio must be discrete (`values`, or low/high with a "
                              f"`step`): only int(L * (1 - r)) matters (L = {L})", f"sweep.space.{RATIO}")
        ratios, parts = self.axis_values(RATIO), self.axis_values(PARTS)
        for r in ratios:
            allowed = allowed_num_parts(L, r)
            if not allowed:
                raise self._error(f"sweep.space.{RATIO}: {r} leaves no visible patch of L = {L}")
            if not any(k in allowed for k in parts):
                raise self._error(f"sweep.space: mask_ratio {r} allows K in {allowed.start}..{allowed.stop - 1} (L = "
                                  f"{L}, {num_visible(L, r)} visible patches per part) but the space has K in "
                                  f"{list(parts)}; drop that ratio or widen model.num_parts")
        for k in parts:
            if not any(k in allowed_num_parts(L, r) for r in ratios):
                raise self._error(f"sweep.space: K = {k} needs K * int(L * (1 - r)) <= L = {L}, which no mask ratio "
                                  f"of the space ({list(ratios)}) allows; drop it or add larger ratios")

    def valid(self, point: dict[str, Any]) -> bool:
        """Whether a point (dotted keys; unswept ones take the base value) satisfies the constraint."""
        model = self.base["model"]
        return point.get(PARTS, model["num_parts"]) in allowed_num_parts(self.num_patches,
                                                                         point.get(RATIO, model["mask_ratio"]))

    def grid(self) -> list[dict[str, Any]]:
        """Every valid cell (dotted keys), shuffled by the sweep seed (partial grids spread out)."""
        cells = [dict(zip(self.dists, combo)) for combo in itertools.product(*map(choices, self.dists.values()))]
        cells = [c for c in cells if self.valid(c)]
        random.Random(self.sweep.seed).shuffle(cells)
        return cells

    def suggest(self, trial: Any) -> dict[str, Any]:
        """Draw (or, for an enqueued grid cell / a retry, read) the trial's point, dotted keys."""
        point: dict[str, Any] = {}
        first = [PARTS, RATIO] if isinstance(self.dists.get(PARTS), CategoricalDistribution) else [RATIO, PARTS]
        for key in [k for k in first if k in self.dists] + [k for k in self.dists if k not in first]:
            point[key] = _suggest(trial, self.name(key), self._bounded(key, point))
        if not self.valid(point):  # unreachable by construction (the tests sample it heavily)
            raise AssertionError(f"drew an invalid point {point} (L = {self.num_patches})")
        return point

    def _bounded(self, key: str, drawn: dict[str, Any]) -> BaseDistribution:
        """The distribution of `key` cut to what the K or r drawn before it allows (TPE/random)."""
        dist, L = self.dists[key], self.num_patches
        if self.sweep.sampler == "grid":  # an enqueued cell: one of all the values
            return CategoricalDistribution(choices(dist))
        if key == PARTS and RATIO in drawn and isinstance(dist, IntDistribution):
            kmax = min(dist.high, allowed_num_parts(L, drawn[RATIO]).stop - 1)
            return IntDistribution(dist.low, dist.low + dist.step * ((kmax - dist.low) // dist.step),
                                   step=dist.step, log=dist.log)
        if key == RATIO and PARTS in drawn and isinstance(dist, FloatDistribution):
            usable = [r for r in choices(dist) if drawn[PARTS] in allowed_num_parts(L, r)]  # a suffix
            return FloatDistribution(usable[0], dist.high, step=dist.step)
        return dist

    def overlay(self, point: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """Dotted point -> params overlay ({"model": {"num_parts": 4}}), as best.yaml holds it."""
        tree: dict[str, dict[str, Any]] = {}
        for key, value in point.items():
            tree.setdefault(key.split(".")[0], {})[self.name(key)] = value
        return tree

    def from_optuna(self, params: dict[str, Any]) -> dict[str, Any]:
        """Optuna's short names -> dotted keys."""
        return {key: params[self.name(key)] for key in self.dists if self.name(key) in params}

    def describe(self) -> str:
        return "; ".join(f"{key} in {list(values)}" if (values := choices(d)) is not None and (
                         len(values) <= 12 or isinstance(d, CategoricalDistribution))
                         else f"{key} in [{d.low:g}, {d.high:g}]{' (log)' if getattr(d, 'log', False) else ''}"
                         for key, d in self.dists.items())
