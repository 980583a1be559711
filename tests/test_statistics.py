"""The error bars of ``eval``: bootstrap intervals and McNemar's exact test (core/statistics.py),
and how ``eval`` attaches them to its rows (commands/evaluate.add_statistics)."""

from __future__ import annotations

from fractions import Fraction
from math import comb, sqrt

import numpy as np
import pytest

from quota_compile.commands.evaluate import add_statistics
from quota_compile.core.statistics import bootstrap_interval, bootstrap_ratio_interval, mcnemar


def test_mcnemar_matches_the_binomial_tail_by_hand():
    # 6 questions only a gets right, 1 only b: n = 7, p = 2 * (C(7,0) + C(7,1)) / 2^7 = 16/128
    a = [True] * 6 + [False] * 1 + [True] * 10 + [False] * 5
    b = [False] * 6 + [True] * 1 + [True] * 10 + [False] * 5
    m = mcnemar(a, b)
    assert (m.only_a, m.only_b) == (6, 1)
    assert m.p_value == pytest.approx(0.125, abs=1e-15)
    # symmetric in its p-value, the counts swap
    r = mcnemar(b, a)
    assert (r.only_a, r.only_b, r.p_value) == (1, 6, m.p_value)


def test_mcnemar_exact_values_and_edges():
    # 20 discordant questions split 5 / 15: 2 * sum_{i<=5} C(20, i) / 2^20, computed in fractions
    a = [True] * 5 + [False] * 15
    b = [False] * 5 + [True] * 15
    want = Fraction(2 * sum(comb(20, i) for i in range(6)), 2**20)
    assert mcnemar(a, b).p_value == pytest.approx(float(want), rel=1e-12)
    assert float(want) == pytest.approx(0.04139, abs=5e-6)  # R: binom.test(5, 20)$p.value
    # the same answers: no evidence either way
    assert mcnemar([True, False, True], [True, False, True]).p_value == 1.0
    # an even split caps at 1
    assert mcnemar([True, False], [False, True]).p_value == 1.0
    with pytest.raises(ValueError, match="different questions"):
        mcnemar([True], [True, False])


def test_bootstrap_interval_brackets_the_accuracy_and_has_the_binomial_width():
    rng = np.random.default_rng(7)
    correct = rng.random(1000) < 0.7
    p = correct.mean()
    lo, hi = bootstrap_interval(correct, resamples=2000, seed=0)
    assert lo < p < hi
    # the normal approximation's 95 % width, 2 * 1.96 * sqrt(p (1 - p) / n), within 15 %
    normal = 2 * 1.96 * sqrt(p * (1 - p) / correct.size)
    assert hi - lo == pytest.approx(normal, rel=0.15)
    # seeded: the same interval again, another seed moves it
    assert bootstrap_interval(correct, resamples=2000, seed=0) == (lo, hi)
    assert bootstrap_interval(correct, resamples=2000, seed=1) != (lo, hi)


def test_bootstrap_interval_of_a_constant_is_a_point():
    assert bootstrap_interval([True] * 50) == (1.0, 1.0)
    assert bootstrap_interval([False] * 50) == (0.0, 0.0)
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_interval([])


def test_ratio_interval_of_identical_answers_is_one_and_noise_widens_it():
    rng = np.random.default_rng(3)
    ref = rng.random(500) < 0.8
    assert bootstrap_ratio_interval(ref, ref) == (1.0, 1.0)
    # a variant that loses 10 % of the reference's right answers at random: retention near 0.9,
    # its interval contains the observed ratio
    worse = ref & (rng.random(500) > 0.1)
    ratio = worse.mean() / ref.mean()
    lo, hi = bootstrap_ratio_interval(worse, ref, seed=0)
    assert lo < ratio < hi <= 1.0
    # paired: the ratio's interval is narrower than the variant's accuracy interval over the mean
    a_lo, a_hi = bootstrap_interval(worse, seed=0)
    assert hi - lo < (a_hi - a_lo) / ref.mean()
    # a reference that is wrong everywhere on some resample: undefined
    assert bootstrap_ratio_interval([True, False], [True, False], resamples=500) is None


def _row(name, method, keep_ratio, answers, gold):
    right = [a == g for a, g in zip(answers, gold)]
    acc = sum(right) / len(right)
    return {"name": name, "method": method, "keep_ratio": keep_ratio, "answers": answers,
            "accuracy": acc, "per_family": {"all": acc}}


def test_eval_rows_get_intervals_and_a_paired_test_against_quota_at_the_same_budget():
    gold = ["red", "two", "left", "square"] * 25
    rng = np.random.default_rng(0)

    def answers(p_right):
        return [g if rng.random() < p_right else "wrong" for g in gold]

    rows = [
        _row("fp", "none", None, answers(0.95), gold),
        _row("w4a4kv4", "none", None, answers(0.9), gold),
        _row("fastv@0.3", "fastv", 0.3, answers(0.6), gold),
        _row("quota@0.3", "quota", 0.3, answers(0.8), gold),
        _row("random@0.5", "random", 0.5, answers(0.5), gold),
    ]
    add_statistics(rows, gold, seed=0, resamples=500)
    for r in rows:
        lo, hi = r["accuracy_ci95"]
        assert lo <= r["accuracy"] <= hi
        assert r["retention"] == pytest.approx(r["accuracy"] / rows[0]["accuracy"])
        rlo, rhi = r["retention_ci95"]
        assert rlo <= r["retention"] <= rhi
    assert rows[0]["retention_ci95"] == [1.0, 1.0]
    # fastv against quota at 0.3: the counts recomputed here from the answers
    vs = rows[2]["versus_quota"]
    fastv = [a == g for a, g in zip(rows[2]["answers"], gold)]
    quota = [a == g for a, g in zip(rows[3]["answers"], gold)]
    assert vs["variant"] == "quota@0.3"
    assert vs["only_this"] == sum(f and not q for f, q in zip(fastv, quota))
    assert vs["only_other"] == sum(q and not f for f, q in zip(fastv, quota))
    assert vs["p_value"] < 0.05  # 60 % against 80 % on 100 questions
    # no quota at 0.5, and quota and the unpruned rows are not compared
    assert rows[4]["versus_quota"] is None
    assert all(rows[i]["versus_quota"] is None for i in (0, 1, 3))
