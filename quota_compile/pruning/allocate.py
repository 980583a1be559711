"""QUOTA allocation: how many visual tokens each decoder layer keeps.

A budget ``keep_ratio`` is the average, over ALL ``L`` decoder layers, of the fraction of the
``V`` visual tokens a layer processes (the FLOP-equivalent meaning SparseVLM and PyramidDrop
use). Every schedule built here realises it exactly in tokens: ``sum(keep)`` equals
``round(keep_ratio * L * V)``, so QUOTA and the baselines are compared at the same cost.

- :func:`retained_mass_curves` turns calibration scores into per-layer curves "fraction of
  score mass kept by the top-k tokens".
- :func:`allocate` is the QUOTA allocator: a dynamic programme over discretised keep levels
  maximising the sensitivity-weighted retained mass, then a token-level refinement.
- :func:`fastv_schedule` (one cut; also the schedule of random pruning with the cut at the
  first pruned layer) and :func:`pdrop_schedule` (geometric stages) are the baselines.

A schedule is non-increasing (a token dropped at layer l is gone for every later layer) and
layer l's KV cache holds ``text_len + keep[l]`` entries.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from quota_compile.errors import UserError

_BISECTION_STEPS = 100


@dataclass(frozen=True)
class KeepSchedule:
    """Visual tokens processed by each decoder layer: ``keep[l]`` of ``num_visual``.

    ``keep`` is non-increasing and each entry lies in ``[1, num_visual]`` (a layer may keep all
    tokens). Any integer sequence is accepted and stored as a tuple of Python ints.

    The value the schedule functions of this module return, checked on construction. It is not
    a second decision type: a decision is a :class:`quota_compile.pruning.recipe.PruningRecipe`,
    which records ``keep`` as a list (the methods of :mod:`quota_compile.pruning.methods` hand
    it over as one). It stays a type because it holds the schedule's invariants in one place
    for the allocators and their tests, with the derived quantities (pruning layers, realised
    budget, KV lengths).
    """

    keep: tuple[int, ...]
    num_visual: int

    def __post_init__(self) -> None:
        keep = tuple(self.keep)
        if not all(_is_int(k) for k in keep):
            raise ValueError(f"keep counts must be integers, got {keep!r}")
        keep = tuple(int(k) for k in keep)
        object.__setattr__(self, "keep", keep)
        if not _is_int(self.num_visual):
            raise ValueError(f"num_visual must be an integer, got {self.num_visual!r}")
        object.__setattr__(self, "num_visual", int(self.num_visual))
        if self.num_visual < 1:
            raise ValueError(f"num_visual must be >= 1, got {self.num_visual}")
        if not keep:
            raise ValueError("a keep schedule needs at least one layer")
        if any(not 1 <= k <= self.num_visual for k in keep):
            raise ValueError(f"keep counts must lie in [1, {self.num_visual}], got {list(keep)}")
        if any(b > a for a, b in zip(keep, keep[1:])):
            raise ValueError(f"keep counts must be non-increasing, got {list(keep)}")

    @property
    def num_layers(self) -> int:
        return len(self.keep)

    @property
    def pruning_layers(self) -> tuple[int, ...]:
        """Layers whose input is shortened: ``keep[l]`` below the previous layer's (or ``V``)."""
        previous = (self.num_visual, *self.keep[:-1])
        return tuple(l for l, (p, k) in enumerate(zip(previous, self.keep)) if k < p)

    @property
    def average_fraction(self) -> float:
        """The realised budget: mean over layers of ``keep[l] / V``."""
        return sum(self.keep) / (self.num_layers * self.num_visual)

    def kv_lengths(self, text_len: int) -> list[int]:
        """Per-layer KV-cache length after prefill: text tokens are always kept."""
        return [text_len + k for k in self.keep]

    def to_list(self) -> list[int]:
        return list(self.keep)


def retained_mass_curves(scores: np.ndarray) -> np.ndarray:
    """Per-layer retained-mass curves ``[L, V+1]`` from calibration scores ``[N, L, V]``.

    ``curve[l, k]`` is the fraction of layer ``l``'s visual score mass held by its top-``k``
    tokens, averaged over the ``N`` samples: it is what :func:`allocate` maximises. Each
    (sample, layer) row is shifted so its minimum is 0 (scores may be negative, e.g. after the
    risk term); a row whose scores are all equal carries no ranking and counts as uniform
    (``k / V``). Curves start at 0, are non-decreasing and end at exactly 1.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 3 or 0 in scores.shape:
        raise ValueError(f"scores must have shape [N, L, V] with no empty axis, got {scores.shape}")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores must be finite")
    v = scores.shape[2]
    shifted = scores - scores.min(axis=2, keepdims=True)
    cumulative = np.cumsum(np.sort(shifted, axis=2)[..., ::-1], axis=2)
    total = cumulative[..., -1:]
    uniform = np.arange(1, v + 1, dtype=np.float64) / v
    flat = total == 0.0
    fraction = np.where(flat, uniform, cumulative / np.where(flat, 1.0, total))
    curves = np.concatenate([np.zeros(scores.shape[:2] + (1,)), fraction], axis=2)
    return curves.mean(axis=0)


def allocate(
    mass: np.ndarray,
    sensitivity: np.ndarray,
    keep_ratio: float,
    first_full: int = 2,
    levels: int = 32,
) -> KeepSchedule:
    """The QUOTA schedule: maximise ``sum_l sensitivity[l] * mass[l, k_l]`` at the budget.

    ``mass`` ``[L, V+1]`` comes from :func:`retained_mass_curves`; ``sensitivity`` ``[L]``
    (>= 0) says how much each layer's output depends on its visual tokens. The schedule is
    non-increasing, layers ``< first_full`` keep all ``V`` tokens and ``sum(k) ==
    round(keep_ratio * L * V)`` exactly.

    Method, in two deterministic steps:

    1. Dynamic programme over layers. Candidate keeps are ``max(1, round(j * V / levels))``
       for ``j = 0..levels`` (deduplicated; ``j = levels`` is ``V``), each costing
       ``round(k * levels / V)`` budget units. State: (layer, its candidate, units used);
       a layer may take any candidate not above the previous layer's; units used stay
       within ``round(target * levels / V)`` (raised to the cheapest feasible total when
       coarse units overshoot it). Ties: the lower previous keep while tracing back; at the
       end the best value, then the most units used, then the lower last keep.
    2. Token-level refinement to the exact target: while below it, add one token to the layer
       with the largest marginal gain ``sensitivity[l] * (mass[l, k+1] - mass[l, k])`` among
       those that can grow without exceeding the previous layer (ties: shallower layer);
       while above it, remove one token from the layer with the smallest marginal loss among
       those that can shrink without dropping below the next layer or 1 (ties: deeper layer).

    Time and memory grow as ``L**2 * levels**2``: milliseconds for ``L = 32`` at the default
    32 levels. ``keep_ratio == 1`` gives all ``V``. Users' errors (``pruning.keep_ratio`` outside
    ``(0, 1]`` or below what ``first_full`` full layers allow, ``pruning.first_full_layers``
    outside ``[0, L)``) raise :class:`UserError`; malformed arrays raise ``ValueError``.
    """
    mass = np.asarray(mass, dtype=np.float64)
    sensitivity = np.asarray(sensitivity, dtype=np.float64)
    if mass.ndim != 2 or mass.shape[0] < 1 or mass.shape[1] < 2:
        raise ValueError(f"mass must have shape [L, V+1] with L >= 1 and V >= 1, got {mass.shape}")
    num_layers, num_visual = mass.shape[0], mass.shape[1] - 1
    if sensitivity.shape != (num_layers,):
        raise ValueError(f"sensitivity must have shape [{num_layers}], got {sensitivity.shape}")
    if not (np.all(np.isfinite(mass)) and np.all(np.isfinite(sensitivity))):
        raise ValueError("mass and sensitivity must be finite")
    if np.any(sensitivity < 0):
        raise ValueError("sensitivity must be >= 0")
    if not _is_int(levels) or levels < 1:
        raise ValueError(f"levels must be a positive integer, got {levels!r}")
    _check_keep_ratio(keep_ratio)
    _check_first_full(first_full, num_layers)
    check_reachable(keep_ratio, num_layers, num_visual, first_full, f"{first_full} full layers")
    target = _target(keep_ratio, num_layers, num_visual)
    if target == num_layers * num_visual:
        return KeepSchedule((num_visual,) * num_layers, num_visual)

    coarse = _coarse_schedule(mass, sensitivity, target, first_full, levels)

    def gain(layer: int, k: int) -> float:
        return float(sensitivity[layer] * (mass[layer, k + 1] - mass[layer, k]))

    return KeepSchedule(tuple(_meet_budget(coarse, target, first_full, num_visual, gain)), num_visual)


def fastv_schedule(num_layers: int, num_visual: int, keep_ratio: float, cut_layer: int) -> KeepSchedule:
    """FastV-style single cut: layers ``< cut_layer`` keep ``V``, the rest one constant ``k``.

    ``k`` is chosen so the budget is met exactly; when the pruned layers' share does not
    divide evenly, the earlier pruned layers keep ``k + 1`` and the last ones ``k`` (so the
    schedule stays non-increasing). Random pruning uses this schedule with ``cut_layer`` at
    its first pruned layer. Errors name ``pruning.keep_ratio`` or ``pruning.fastv_layer``.
    """
    _check_dimensions(num_layers, num_visual)
    _check_keep_ratio(keep_ratio)
    if not _is_int(cut_layer) or not 0 <= cut_layer < num_layers:
        raise UserError(
            f"pruning.fastv_layer must be in [0, {num_layers}) for a {num_layers}-layer decoder, "
            f"got {cut_layer!r}."
        )
    check_reachable(keep_ratio, num_layers, num_visual, cut_layer, f"pruning.fastv_layer {cut_layer}")
    target = _target(keep_ratio, num_layers, num_visual)
    pruned_share = (target - cut_layer * num_visual) / (num_layers - cut_layer)
    shape = [float(num_visual)] * cut_layer + [pruned_share] * (num_layers - cut_layer)
    return KeepSchedule(tuple(_integerise(shape, target, cut_layer, num_visual)), num_visual)


def pdrop_schedule(
    num_layers: int,
    num_visual: int,
    keep_ratio: float,
    stages: int = 4,
    first_full: int = 2,
) -> KeepSchedule:
    """PyramidDrop-style geometric stages at the budget.

    Layers ``< first_full`` keep ``V``. The remaining ``L - first_full`` layers are split into
    ``stages`` consecutive groups as equal as possible (the earlier groups take the extra
    layers, as ``numpy.array_split`` does); every layer of group ``s = 1..stages`` aims at
    ``x_s = max(1, V * lam**s)`` tokens. ``lam`` in ``[0, 1]`` is found by bisection so that
    ``sum_l x_l`` equals the token target ``round(keep_ratio * L * V)``. The real-valued
    ``x_l`` are then rounded to the nearest integer and the exact-budget refinement moves
    single tokens towards the ``x_l`` (add where ``x_l - k_l`` is largest, ties to the
    shallower layer; remove where it is smallest, ties to the deeper layer) while keeping the
    schedule non-increasing: each group ends up within one token of ``x_s``. Errors name
    ``pruning.keep_ratio``, ``pruning.first_full_layers`` or ``pruning.stages``.
    """
    _check_dimensions(num_layers, num_visual)
    _check_keep_ratio(keep_ratio)
    _check_first_full(first_full, num_layers)
    prunable = num_layers - first_full
    if not _is_int(stages) or not 1 <= stages <= prunable:
        raise UserError(
            f"pruning.stages must be in [1, {prunable}] (the layers after {first_full} full ones), "
            f"got {stages!r}."
        )
    check_reachable(keep_ratio, num_layers, num_visual, first_full, f"{first_full} full layers")
    target = _target(keep_ratio, num_layers, num_visual)
    exponents = np.concatenate(
        [np.full(len(group), s + 1.0) for s, group in enumerate(np.array_split(np.arange(prunable), stages))]
    )

    def shape(lam: float) -> np.ndarray:
        pruned = np.maximum(1.0, num_visual * lam**exponents)
        return np.concatenate([np.full(first_full, float(num_visual)), pruned])

    low, high = 0.0, 1.0
    for _ in range(_BISECTION_STEPS):
        middle = 0.5 * (low + high)
        if shape(middle).sum() < target:
            low = middle
        else:
            high = middle
    return KeepSchedule(tuple(_integerise(shape(high).tolist(), target, first_full, num_visual)), num_visual)


def _coarse_schedule(
    mass: np.ndarray, sensitivity: np.ndarray, target: int, first_full: int, levels: int
) -> list[int]:
    """Step 1 of :func:`allocate`: the DP over discretised keep levels (see its docstring)."""
    num_layers, num_visual = mass.shape[0], mass.shape[1] - 1
    candidates = np.unique(
        np.maximum(1, np.rint(np.arange(levels + 1) * num_visual / levels)).astype(np.int64)
    )
    cost = np.rint(candidates * levels / num_visual).astype(np.int64)
    n = len(candidates)
    full = n - 1  # candidates are sorted, so the last one is V
    cheapest = first_full * int(cost[full]) + (num_layers - first_full) * int(cost[0])
    units = max(int(round(target * levels / num_visual)), cheapest)

    # value[i, b]: best objective of the layers so far, the last one at candidate i, b units
    # spent. Before layer 0 the sequence "keeps V" at no cost, so layer 0 may take any keep.
    value = np.full((n, units + 1), -np.inf)
    value[full, 0] = 0.0
    back = np.zeros((num_layers, n, units + 1), dtype=np.int32)
    for layer in range(num_layers):
        allowed = [full] if layer < first_full else range(n)
        gain = sensitivity[layer] * mass[layer, candidates]
        best_before, arg_before = _suffix_max(value)
        value = np.full((n, units + 1), -np.inf)
        for i in allowed:
            c = int(cost[i])
            if c > units:
                continue
            value[i, c:] = best_before[i, : units + 1 - c] + gain[i]
            back[layer, i, c:] = arg_before[i, : units + 1 - c]

    best = value.max()
    i, spent = min(
        ((int(i), int(b)) for i, b in np.argwhere(value == best)), key=lambda ib: (-ib[1], ib[0])
    )
    keep = [0] * num_layers
    for layer in range(num_layers - 1, -1, -1):
        keep[layer] = int(candidates[i])
        i, spent = int(back[layer, i, spent]), spent - int(cost[i])
    return keep


def _suffix_max(value: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``best[i, b] = max_{i' >= i} value[i', b]`` and its argument (ties to the lower ``i'``).

    Row ``i`` of the result is what a layer taking candidate ``i`` can follow: any previous
    candidate at least as large (the schedule is non-increasing).
    """
    best, arg = value.copy(), np.empty(value.shape, dtype=np.int32)
    arg[-1] = value.shape[0] - 1
    for i in range(value.shape[0] - 2, -1, -1):
        own = value[i] >= best[i + 1]
        best[i] = np.where(own, value[i], best[i + 1])
        arg[i] = np.where(own, i, arg[i + 1])
    return best, arg


def _integerise(shape: Sequence[float], target: int, first_full: int, num_visual: int) -> list[int]:
    """Integer schedule closest to a real-valued non-increasing ``shape`` with ``sum == target``.

    Rounds to nearest, then refines with the squared-deviation gain
    ``(x - k)**2 - (x - k - 1)**2 = 2 * (x - k) - 1`` of moving ``k`` to ``k + 1``.
    """
    keep = [min(num_visual, max(1, int(np.rint(x)))) for x in shape]
    return _meet_budget(keep, target, first_full, num_visual, lambda l, k: 2.0 * (shape[l] - k) - 1.0)


def _meet_budget(
    keep: list[int], target: int, first_full: int, num_visual: int, gain: Callable[[int, int], float]
) -> list[int]:
    """Move single tokens until ``sum(keep) == target``, keeping the schedule valid.

    ``gain(l, k)`` is the objective change when layer ``l`` goes from ``k`` to ``k + 1``
    tokens. Below the target, the layer with the largest gain that can grow (stays within the
    previous layer's count, or ``V`` for layer 0) gets a token, ties to the shallower layer;
    above it, the layer with the smallest loss ``gain(l, k - 1)`` that can shrink (stays at
    least the next layer's count, and 1) loses one, ties to the deeper layer. Layers
    ``< first_full`` never move. Requires ``first_full * V + (L - first_full) <= target <=
    L * V``, under which a movable layer always exists.
    """
    keep = list(keep)
    num_layers, total = len(keep), sum(keep)
    while total < target:
        grow, best = -1, -math.inf
        for l in range(first_full, num_layers):
            ceiling = keep[l - 1] if l > 0 else num_visual
            if keep[l] < ceiling and gain(l, keep[l]) > best:
                grow, best = l, gain(l, keep[l])
        keep[grow] += 1
        total += 1
    while total > target:
        shrink, least = -1, math.inf
        for l in range(first_full, num_layers):
            floor = keep[l + 1] if l + 1 < num_layers else 1
            if keep[l] > floor and gain(l, keep[l] - 1) <= least:
                shrink, least = l, gain(l, keep[l] - 1)
        keep[shrink] -= 1
        total -= 1
    return keep


def _target(keep_ratio: float, num_layers: int, num_visual: int) -> int:
    """The budget in tokens summed over layers."""
    return int(round(keep_ratio * num_layers * num_visual))


def _check_dimensions(num_layers: int, num_visual: int) -> None:
    if num_layers < 1 or num_visual < 1:
        raise ValueError(f"need at least one layer and one visual token, got L={num_layers}, V={num_visual}")


def _check_keep_ratio(keep_ratio: float) -> None:
    if not _is_real(keep_ratio) or not 0 < keep_ratio <= 1:
        raise UserError(f"pruning.keep_ratio must be in (0, 1], got {keep_ratio!r}.")


def _check_first_full(first_full: int, num_layers: int) -> None:
    if not _is_int(first_full) or not 0 <= first_full < num_layers:
        raise UserError(
            f"pruning.first_full_layers must be in [0, {num_layers}) for a {num_layers}-layer decoder, "
            f"got {first_full!r}."
        )


def check_reachable(keep_ratio: float, num_layers: int, num_visual: int, full_layers: int, why: str) -> None:
    """Refuse budgets below ``full_layers`` layers at ``V`` and every other layer at 1 token."""
    minimum = full_layers * num_visual + (num_layers - full_layers)
    if keep_ratio * num_layers * num_visual < minimum * (1 - 1e-12):
        shown = math.ceil(minimum / (num_layers * num_visual) * 1e4) / 1e4
        raise UserError(
            f"pruning.keep_ratio {keep_ratio:g} is below the minimum {shown:g} possible with {why}."
        )


def _is_int(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)
