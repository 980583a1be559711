"""How sure an accuracy figure is: percentile-bootstrap intervals and McNemar's exact test.

``eval`` answers the same questions with every variant, so each variant's result is a vector
of right/wrong per question, aligned with the others'. Two things are reported from those
vectors (docs/eval.md):

- :func:`bootstrap_interval`: a percentile-bootstrap interval of a variant's accuracy (the
  questions resampled with replacement), and :func:`bootstrap_ratio_interval` the same for a
  retention (a variant's accuracy over the reference's, both computed on each resample of the
  same questions, so the reference's own noise counts too);
- :func:`mcnemar`: the exact (binomial) McNemar test of two variants on the same questions:
  only the questions exactly one of them answers right carry information; under "the two are
  equally accurate" each of those is equally likely to go either way.

Every function is deterministic: the resamples come from a seeded NumPy generator, and the
same seed gives the same resamples for every variant (a paired design).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from math import comb

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95


def _as_array(correct: Sequence[bool], what: str) -> np.ndarray:
    a = np.asarray(correct, dtype=bool)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"{what}: a non-empty sequence of right/wrong values is needed")
    return a


def _resample_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _percentiles(values: np.ndarray, level: float) -> tuple[float, float]:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be between 0 and 1, got {level}")
    tail = 100.0 * (1.0 - level) / 2.0
    lo, hi = np.percentile(values, [tail, 100.0 - tail])
    return float(lo), float(hi)


def bootstrap_interval(correct: Sequence[bool], resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0) -> tuple[float, float]:
    """The ``level`` percentile-bootstrap interval of the share of True in ``correct``."""
    a = _as_array(correct, "correct")
    idx = _resample_indices(a.size, resamples, seed)
    return _percentiles(a[idx].mean(axis=1), level)


def bootstrap_ratio_interval(
    correct: Sequence[bool], reference: Sequence[bool], resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0
) -> tuple[float, float] | None:
    """The ``level`` percentile-bootstrap interval of ``mean(correct) / mean(reference)``, the
    two resampled together (the same questions). ``None`` when the reference's accuracy is 0 on
    some resample (the ratio is undefined there)."""
    a = _as_array(correct, "correct")
    r = _as_array(reference, "reference")
    if a.size != r.size:
        raise ValueError(f"correct and reference answer different questions ({a.size} vs {r.size})")
    idx = _resample_indices(a.size, resamples, seed)
    den = r[idx].mean(axis=1)
    if (den == 0).any():
        return None
    return _percentiles(a[idx].mean(axis=1) / den, level)


@dataclass(frozen=True)
class McNemar:
    """McNemar's exact test of ``a`` against ``b`` on the same questions."""

    only_a: int  # questions a answers right and b wrong
    only_b: int  # questions b answers right and a wrong
    p_value: float  # two-sided, exact: 2 · P(Binomial(only_a + only_b, ½) ≤ min), at most 1

    def as_dict(self) -> dict:
        return {"only_this": self.only_a, "only_other": self.only_b, "p_value": self.p_value}


def mcnemar(a: Sequence[bool], b: Sequence[bool]) -> McNemar:
    """McNemar's exact two-sided test: is ``a`` right where ``b`` is wrong as often as the
    reverse? The p-value is computed in exact integer arithmetic."""
    x = _as_array(a, "a")
    y = _as_array(b, "b")
    if x.size != y.size:
        raise ValueError(f"a and b answer different questions ({x.size} vs {y.size})")
    only_a = int((x & ~y).sum())
    only_b = int((~x & y).sum())
    n = only_a + only_b
    if n == 0:
        return McNemar(0, 0, 1.0)
    tail = sum(comb(n, i) for i in range(min(only_a, only_b) + 1))
    return McNemar(only_a, only_b, min(1.0, 2 * tail / 2**n))
