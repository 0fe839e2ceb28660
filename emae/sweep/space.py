"""The constrained search space over K (`model.num_parts`), the mask ratio and optional others.

K disjoint visible sets of `n_keep = int(L * (1 - r))` patches fit only when `K * n_keep <= L`
(`emae.masking.allowed_num_parts`). Two facts make the constraint easy to respect exactly:
for a fixed ratio the allowed K are a prefix `1..L // n_keep`, and for a fixed K the allowed ratios
are a suffix (a larger ratio keeps fewer patches). So:

- grid: the Cartesian product of every dimension's values, invalid (K, r) cells dropped, is
  enqueued once; each trial takes one cell.
- TPE / random (define-by-run): the dimension given as an arbitrary list is drawn first, the
  other one as a range whose bound is moved to the last allowed value: ratio first, then
  `K in [low, min(high, L // n_keep)]`; or K first, then `r in [smallest ratio allowing K, high]`.
  Optuna accepts the moving bound (int/float distributions may change range, categorical ones
  may not), and no trial is ever drawn outside the valid domain.

Every listed value must be usable: a ratio that leaves no K of the space (or no visible patch), or
a K that no ratio of the space allows, is an error before anything runs.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass
from typing import Any

import optuna

from emae.config import Config
from emae.errors import ConfigError
from emae.masking import allowed_num_parts, num_visible
from emae.sweep.config import Dimension, SweepConfig

RATIO = "model.mask_ratio"
PARTS = "model.num_parts"
_DECIMALS = 12  # sampled floats are rounded so that `low + i * step` is exact enough for int(L*(1-r))


@dataclass(frozen=True)
class Axis:
    """A dimension resolved against the base params: its type and, when discrete, its values."""

    key: str  # dotted, e.g. "model.num_parts"
    dim: Dimension
    is_int: bool
    choices: tuple[Any, ...] | None  # sorted values when discrete (values, int range, step range)

    @property
    def name(self) -> str:
        """The Optuna parameter name (the key without its section)."""
        return self.key.rsplit(".", 1)[1]

    @property
    def movable(self) -> bool:
        """Whether Optuna can draw it from a range whose bound moves (an int/float distribution)."""
        return self.arithmetic is not None or (self.is_int and self.dim.log)

    @property
    def arithmetic(self) -> tuple[float, float, float] | None:
        """(low, high, step) when the values are evenly spaced numbers (a range Optuna can move)."""
        if self.dim.values is None:
            if self.dim.step is not None or (self.is_int and not self.dim.log):
                return self.dim.low, self.dim.high, self.dim.step or 1
            return None
        vals = self.choices
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            return None
        if len(vals) == 1:
            return vals[0], vals[0], 1
        step = vals[1] - vals[0]
        if all(math.isclose(b - a, step, rel_tol=1e-9) for a, b in zip(vals, vals[1:])):
            return vals[0], vals[-1], step
        return None


def _expand(low: float, high: float, step: float, is_int: bool) -> tuple[Any, ...]:
    n = round((high - low) / step)
    vals = [low + i * step for i in range(n + 1)]
    return tuple(int(round(v)) for v in vals) if is_int else tuple(round(v, _DECIMALS) for v in vals)


def _get(tree: dict[str, Any], key: str) -> Any:
    section, name = key.split(".", 1)
    return tree.get(section, {}).get(name, KeyError)


def _set(tree: dict[str, Any], key: str, value: Any) -> None:
    section, name = key.split(".", 1)
    tree.setdefault(section, {})[name] = value


class SearchSpace:
    """The validated space of one study; `suggest(trial)` draws a valid point, `grid()` lists all."""

    def __init__(self, sweep: SweepConfig, config: Config) -> None:
        self.sweep = sweep
        self._origin = config.origin
        self.num_patches = config.num_patches
        self.base = config.to_dict()
        self.axes = {key: self._axis(key, dim) for key, dim in sweep.dimensions().items()}
        if not self.axes:
            raise self._error("sweep.space", "sweep.space is empty: give at least one dimension, "
                              "e.g. model.num_parts: {low: 1, high: 4}")
        names = [axis.name for axis in self.axes.values()]
        if len(set(names)) != len(names):
            raise self._error("sweep.space", f"sweep.space keys must differ after their section "
                              f"(Optuna names them {names})")
        self._check_constraint()
        if sweep.sampler == "grid":
            loose = [a.key for a in self.axes.values() if a.choices is None]
            if loose:
                raise self._error("sweep.sampler", f"sampler 'grid' needs discrete dimensions; "
                                  f"{', '.join(loose)} is a continuous range (give `values` or a `step`)")
        else:
            self._check_conditional()

    # ------------------------------------------------------------------------------ building

    def _where(self, key: str) -> str:
        """The params file that set `key` (or something under it), for error messages."""
        hits = [src for k, src in self._origin.items() if k == key or k.startswith(key + ".")]
        return sorted(set(hits))[0] if hits else "params"

    def _axis(self, key: str, dim: Dimension) -> Axis:
        where = f"{self._where(f'sweep.space.{key}')}: sweep.space.{key}"
        if key.count(".") != 1:
            raise ConfigError(f"{where}: a swept key is section.key (e.g. model.num_parts)")
        base = _get(self.base, key)
        if base is KeyError:
            raise ConfigError(f"{where}: {key} is not a params key (section {key.split('.')[0]!r} "
                              f"has: {', '.join(self.base.get(key.split('.')[0], {})) or 'nothing'})")
        is_int = isinstance(base, int) and not isinstance(base, bool)
        numeric = is_int or isinstance(base, float)
        if dim.values is not None:
            def all_of(kinds: tuple[type, ...]) -> bool:
                return all(isinstance(v, kinds) and not isinstance(v, bool) for v in dim.values)

            if is_int and not all_of((int,)):
                raise ConfigError(f"{where}.values = {dim.values}: {key} takes integers")
            if numeric and not all_of((int, float)):
                raise ConfigError(f"{where}.values = {dim.values}: {key} takes numbers")
            vals = [float(v) if isinstance(base, float) else v for v in dim.values]
            choices = tuple(sorted(vals)) if numeric else tuple(vals)
            return Axis(key, dim, is_int, choices)
        if not numeric:
            raise ConfigError(f"{where}: {key} = {base!r} is not a number: give `values`, not a range")
        if is_int:
            for name in ("low", "high", "step"):
                value = getattr(dim, name)
                if value is not None and value != int(value):
                    raise ConfigError(f"{where}.{name} = {value}: {key} takes integers")
            dim = dim.model_copy(update={k: int(getattr(dim, k)) for k in ("low", "high", "step")
                                         if getattr(dim, k) is not None})
            if dim.log:
                return Axis(key, dim, True, tuple(range(dim.low, dim.high + 1)))
            return Axis(key, dim, True, _expand(dim.low, dim.high, dim.step or 1, True))
        if dim.step is not None:
            return Axis(key, dim, False, _expand(dim.low, dim.high, dim.step, False))
        return Axis(key, dim, False, None)

    def _ratio_choices(self) -> tuple[float, ...]:
        axis = self.axes.get(RATIO)
        return axis.choices if axis else (self.base["model"]["mask_ratio"],)

    def _parts_choices(self) -> tuple[int, ...]:
        axis = self.axes.get(PARTS)
        return axis.choices if axis else (self.base["model"]["num_parts"],)

    def _error(self, key: str, message: str) -> ConfigError:
        """`<file>: sweep.space...: message` (the file that set `key`)."""
        return ConfigError(f"{self._where(key)}: {message}")

    def _check_constraint(self) -> None:
        L = self.num_patches
        if RATIO in self.axes and self.axes[RATIO].choices is None:
            raise self._error(f"sweep.space.{RATIO}", f"sweep.space.{RATIO}: the mask ratio must be "
                              "discrete (`values`, or low/high with a `step`): only int(L * (1 - r)) "
                              f"matters (L = {L})")
        ratios, parts = self._ratio_choices(), self._parts_choices()
        for r in ratios:
            if num_visible(L, r) < 1:
                raise self._error("sweep.space", f"sweep.space.{RATIO}: {r} leaves no visible patch "
                                  f"of L = {L}")
            allowed = allowed_num_parts(L, r)
            if not any(k in allowed for k in parts):
                raise self._error("sweep.space", f"sweep.space: mask_ratio {r} allows K in "
                                  f"{allowed.start}..{allowed.stop - 1} (L = {L}, {num_visible(L, r)} "
                                  f"visible patches per part) but the space has K in {list(parts)}; "
                                  "drop that ratio or widen model.num_parts")
        for k in parts:
            if not any(k in allowed_num_parts(L, r) for r in ratios):
                raise self._error("sweep.space", f"sweep.space: K = {k} needs K * int(L * (1 - r)) <= "
                                  f"L = {L}, which no mask ratio of the space ({list(ratios)}) "
                                  "allows; drop it or add larger ratios")

    def _check_conditional(self) -> None:
        """TPE/random draw one of (ratio, K) first and move the other's bound: it must be a range."""
        if RATIO in self.axes and PARTS in self.axes:
            if self.axes[RATIO].arithmetic is None and not self.axes[PARTS].movable:
                raise self._error("sweep.space", (
                    f"sweep.space: with sampler {self.sweep.sampler!r}, model.mask_ratio or "
                    "model.num_parts must be a range (low/high, or evenly spaced values) so that it "
                    "can be drawn within what the other allows; both are uneven lists "
                    f"({list(self.axes[RATIO].choices)}, {list(self.axes[PARTS].choices)}). "
                    "Use sampler: grid, or give one of them as a range"))

    # ------------------------------------------------------------------------------ queries

    def valid(self, params: dict[str, Any]) -> bool:
        """Whether a point (dotted keys; unswept ones take the base value) satisfies the constraint."""
        r = params.get(RATIO, self.base["model"]["mask_ratio"])
        k = params.get(PARTS, self.base["model"]["num_parts"])
        return k in allowed_num_parts(self.num_patches, r)

    def grid(self) -> list[dict[str, Any]]:
        """Every valid cell (dotted keys), shuffled by the sweep seed (partial grids spread out)."""
        keys = list(self.axes)
        cells = [dict(zip(keys, combo)) for combo in itertools.product(*(self.axes[k].choices for k in keys))]
        cells = [c for c in cells if self.valid(c)]
        random.Random(self.sweep.seed).shuffle(cells)
        return cells

    def overlay(self, params: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """Dotted point -> params overlay ({"model": {"num_parts": 4}}), as best.yaml holds it."""
        tree: dict[str, dict[str, Any]] = {}
        for key, value in params.items():
            _set(tree, key, value)
        return tree

    def apply(self, tree: dict[str, Any], params: dict[str, Any]) -> None:
        for key, value in params.items():
            _set(tree, key, value)

    def from_optuna(self, optuna_params: dict[str, Any]) -> dict[str, Any]:
        """Optuna's short names -> dotted keys."""
        by_name = {axis.name: key for key, axis in self.axes.items()}
        return {by_name[name]: value for name, value in optuna_params.items() if name in by_name}

    def to_optuna(self, params: dict[str, Any]) -> dict[str, Any]:
        return {self.axes[key].name: value for key, value in params.items()}

    # ----------------------------------------------------------------------------- sampling

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """Draw (or, for an enqueued grid cell / retry, read) the trial's point, dotted keys."""
        if self.sweep.sampler == "grid":
            # the cell is enqueued: every dimension is a fixed categorical over all its values
            params = {key: trial.suggest_categorical(axis.name, list(axis.choices))
                      for key, axis in self.axes.items()}
        else:
            params = {}
            for key in self._order():
                params[key] = self._suggest_one(trial, self.axes[key], params)
        if not self.valid(params):  # unreachable by construction (tests sample it heavily)
            raise AssertionError(f"sampled an invalid point {params} (L = {self.num_patches})")
        return params

    def _order(self) -> list[str]:
        """(ratio, K) in the order that keeps the second one a movable range; others after."""
        first = [RATIO, PARTS]
        if RATIO in self.axes and PARTS in self.axes and not self.axes[PARTS].movable:
            first = [PARTS, RATIO]
        return [k for k in first if k in self.axes] + [k for k in self.axes if k not in first]

    def _suggest_one(self, trial: optuna.Trial, axis: Axis, drawn: dict[str, Any]) -> Any:
        L = self.num_patches
        dim, choices = axis.dim, axis.choices
        if axis.key == PARTS and RATIO in drawn:
            kmax = allowed_num_parts(L, drawn[RATIO]).stop - 1
            if dim.log:
                return trial.suggest_int(axis.name, dim.low, min(dim.high, kmax), log=True)
            low, high, step = axis.arithmetic  # checked by _check_conditional
            low, step = int(low), int(step)
            high = low + step * ((min(int(high), kmax) - low) // step)
            return trial.suggest_int(axis.name, low, high, step=step)
        if axis.key == RATIO and PARTS in drawn:
            low, high, step = axis.arithmetic
            usable = [r for r in choices if drawn[PARTS] in allowed_num_parts(L, r)]  # a suffix
            return round(trial.suggest_float(axis.name, usable[0], high, step=step), _DECIMALS)
        arith = axis.arithmetic
        if dim.values is not None and arith is None:
            return trial.suggest_categorical(axis.name, list(choices))
        if axis.is_int:
            if dim.log:
                return trial.suggest_int(axis.name, dim.low, dim.high, log=True)
            return trial.suggest_int(axis.name, int(arith[0]), int(arith[1]), step=int(arith[2]))
        if dim.values is not None or dim.step is not None:
            value = trial.suggest_float(axis.name, arith[0], arith[1], step=arith[2])
            return round(value, _DECIMALS)
        return trial.suggest_float(axis.name, dim.low, dim.high, log=dim.log)

    def describe(self) -> str:
        parts = []
        for key, axis in self.axes.items():
            if axis.choices is not None and len(axis.choices) <= 12:
                parts.append(f"{key} in {list(axis.choices)}")
            else:
                scale = " (log)" if axis.dim.log else ""
                parts.append(f"{key} in [{axis.dim.low:g}, {axis.dim.high:g}]{scale}")
        return "; ".join(parts)
