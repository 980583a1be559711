"""QUOTA allocation and the baseline schedules: budget, shape, optimality, errors."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest

from quota_compile.pruning.allocate import (
    KeepSchedule,
    allocate,
    fastv_schedule,
    pdrop_schedule,
    retained_mass_curves,
)
from quota_compile.errors import UserError

RATIOS = (0.1, 0.2, 0.3, 0.5, 0.77, 1.0)
LAYERS = (2, 3, 8, 32)
VISUAL = (7, 64, 576)


def _signals(num_layers: int, num_visual: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Concave mass curves of varying steepness and random sensitivities."""
    rng = np.random.default_rng(seed)
    shape = rng.uniform(0.2, 3.0, size=(1, num_layers, 1))
    scores = rng.gamma(shape, size=(4, num_layers, num_visual)) ** 2
    return retained_mass_curves(scores), rng.uniform(0.1, 1.0, size=num_layers)


def _minimum(num_layers: int, num_visual: int, full: int) -> int:
    return full * num_visual + (num_layers - full)


def _assert_valid(
    schedule: KeepSchedule, num_layers: int, num_visual: int, keep_ratio: float, full: int
) -> None:
    keep = schedule.keep
    assert len(keep) == num_layers and schedule.num_visual == num_visual
    assert sum(keep) == round(keep_ratio * num_layers * num_visual)
    assert all(a >= b for a, b in zip(keep, keep[1:]))
    assert all(1 <= k <= num_visual for k in keep)
    assert keep[:full] == (num_visual,) * full


# ---------------------------------------------------------------------------- allocate


@pytest.mark.parametrize("num_visual", VISUAL)
@pytest.mark.parametrize("num_layers", LAYERS)
def test_allocate_meets_budget_exactly_or_refuses(num_layers: int, num_visual: int) -> None:
    mass, sensitivity = _signals(num_layers, num_visual, seed=num_layers * 1000 + num_visual)
    full = min(2, num_layers - 1)
    for ratio in RATIOS:
        if ratio * num_layers * num_visual < _minimum(num_layers, num_visual, full):
            with pytest.raises(UserError, match=r"pruning\.keep_ratio .* below the minimum"):
                allocate(mass, sensitivity, ratio, first_full=full)
            continue
        schedule = allocate(mass, sensitivity, ratio, first_full=full)
        _assert_valid(schedule, num_layers, num_visual, ratio, full)
        assert schedule.average_fraction == pytest.approx(ratio, abs=0.5 / (num_layers * num_visual))


def test_allocate_full_budget_keeps_everything() -> None:
    mass, sensitivity = _signals(8, 64, seed=1)
    assert allocate(mass, sensitivity, 1.0).keep == (64,) * 8


def test_allocate_first_full_zero_may_prune_layer_zero() -> None:
    mass, sensitivity = _signals(4, 64, seed=2)
    schedule = allocate(mass, sensitivity, 0.25, first_full=0)
    _assert_valid(schedule, 4, 64, 0.25, 0)
    assert schedule.keep[0] < 64 and schedule.pruning_layers[0] == 0


def test_allocate_is_deterministic() -> None:
    mass, sensitivity = _signals(32, 576, seed=3)
    first = allocate(mass, sensitivity, 0.3)
    again = allocate(mass.copy(), sensitivity.copy(), 0.3)
    assert first == again
    flat = allocate(np.tile(np.linspace(0, 1, 65), (8, 1)), np.zeros(8), 0.4)
    assert flat == allocate(np.tile(np.linspace(0, 1, 65), (8, 1)), np.zeros(8), 0.4)


def test_allocate_breaks_ties_towards_lower_keeps_in_deeper_layers() -> None:
    # Linear mass and equal sensitivities: every schedule at the budget scores the same.
    mass = np.tile(np.linspace(0, 1, 9), (5, 1))
    for sensitivity in (np.zeros(5), np.ones(5)):
        for levels in (4, 32):
            assert allocate(mass, sensitivity, 0.5, first_full=1, levels=levels).keep == (8, 8, 2, 1, 1)


def _curve(num_visual: int, steep: bool) -> np.ndarray:
    """Steep: mass saturates within the first few tokens; flat: a straight line."""
    k = np.arange(num_visual + 1)
    return 1 - np.exp(-k / 3) * (1 - k / num_visual) if steep else k / num_visual


def test_allocate_gives_fewer_tokens_to_the_layer_whose_mass_saturates() -> None:
    v = 64
    # Layer 2 saturates quickly, layer 1 needs many tokens: layer 2 should be cut hard.
    mass = np.stack([_curve(v, False), _curve(v, False), _curve(v, True)])
    keep = allocate(mass, np.ones(3), 0.6, first_full=1).keep
    assert keep[2] <= 8 and keep[1] >= 40
    # Swapped, monotonicity forbids giving the deeper layer more: both end up level.
    swapped = allocate(mass[[0, 2, 1]], np.ones(3), 0.6, first_full=1).keep
    assert abs(swapped[1] - swapped[2]) <= 1


def test_allocate_follows_sensitivity() -> None:
    v = 64
    mass = np.tile(_curve(v, False) ** 0.5, (4, 1))
    low_late = allocate(mass, np.array([1.0, 1.0, 1.0, 0.01]), 0.5, first_full=1).keep
    even = allocate(mass, np.ones(4), 0.5, first_full=1).keep
    assert low_late[3] < even[3]
    # Equal layers share evenly, up to one discretisation step (V / levels = 2 tokens) ...
    assert max(even[1:]) - min(even[1:]) <= 2
    # ... and to the token when the levels are the tokens.
    fine = allocate(mass, np.ones(4), 0.5, first_full=1, levels=v).keep
    assert max(fine[1:]) - min(fine[1:]) <= 1


@pytest.mark.parametrize("ratio", (0.35, 0.5, 0.7))
@pytest.mark.parametrize("seed", range(3))
def test_allocate_is_optimal_at_token_granularity(ratio: float, seed: int) -> None:
    """With ``levels == V`` the DP covers every schedule: it must match brute force."""
    num_layers, v, full = 5, 7, 1
    mass, sensitivity = _signals(num_layers, v, seed=seed)
    target = round(ratio * num_layers * v)
    best = max(
        sum(sensitivity[l] * mass[l, k] for l, k in enumerate((v, *tail)))
        for tail in itertools.combinations_with_replacement(range(v, 0, -1), num_layers - full)
        if v + sum(tail) == target
    )
    keep = allocate(mass, sensitivity, ratio, first_full=full, levels=v).keep
    assert sum(keep) == target
    assert sum(sensitivity[l] * mass[l, k] for l, k in enumerate(keep)) == pytest.approx(best, rel=1e-12)


def test_allocate_is_fast() -> None:
    mass, sensitivity = _signals(32, 576, seed=4)
    start = time.perf_counter()
    for ratio in (0.1, 0.3, 0.5):
        allocate(mass, sensitivity, ratio)
    assert (time.perf_counter() - start) / 3 < 5.0


@pytest.mark.parametrize("ratio", (0, -0.1, 1.5, float("nan")))
def test_allocate_rejects_keep_ratio_outside_unit_interval(ratio: float) -> None:
    mass, sensitivity = _signals(8, 64, seed=5)
    with pytest.raises(UserError, match=r"pruning\.keep_ratio must be in \(0, 1\]"):
        allocate(mass, sensitivity, ratio)


def test_allocate_rejects_budget_below_full_layers() -> None:
    mass, sensitivity = _signals(32, 576, seed=6)
    expected = r"pruning\.keep_ratio 0\.05 is below the minimum 0\.0642 possible with 2 full layers"
    with pytest.raises(UserError, match=expected):
        allocate(mass, sensitivity, 0.05)
    allocate(mass, sensitivity, 0.0642)  # just above the minimum: 1182 tokens needed, 1183 given


@pytest.mark.parametrize("first_full", (-1, 8, 9))
def test_allocate_rejects_first_full_outside_layers(first_full: int) -> None:
    mass, sensitivity = _signals(8, 64, seed=7)
    with pytest.raises(UserError, match=r"pruning\.first_full_layers must be in \[0, 8\)"):
        allocate(mass, sensitivity, 0.5, first_full=first_full)


def test_allocate_rejects_malformed_signals() -> None:
    mass, sensitivity = _signals(8, 64, seed=8)
    with pytest.raises(ValueError, match="sensitivity"):
        allocate(mass, sensitivity[:-1], 0.5)
    with pytest.raises(ValueError, match="sensitivity"):
        allocate(mass, -sensitivity, 0.5)
    with pytest.raises(ValueError, match="mass"):
        allocate(mass[0], sensitivity, 0.5)


# ---------------------------------------------------------------------------- baselines


@pytest.mark.parametrize("num_visual", VISUAL)
@pytest.mark.parametrize("num_layers", LAYERS)
def test_fastv_is_constant_after_the_cut_and_meets_budget(num_layers: int, num_visual: int) -> None:
    cut = min(2, num_layers - 1)
    for ratio in RATIOS:
        if ratio * num_layers * num_visual < _minimum(num_layers, num_visual, cut):
            with pytest.raises(UserError, match=r"pruning\.fastv_layer"):
                fastv_schedule(num_layers, num_visual, ratio, cut)
            continue
        schedule = fastv_schedule(num_layers, num_visual, ratio, cut)
        _assert_valid(schedule, num_layers, num_visual, ratio, cut)
        pruned = schedule.keep[cut:]
        assert max(pruned) - min(pruned) <= 1
        assert len(schedule.pruning_layers) <= 2  # the cut, and maybe the one-token step


def test_fastv_remainder_goes_to_the_earlier_pruned_layers() -> None:
    # 8 layers x 64, cut 2: 0.5 budget = 256 tokens, 128 for layers 2..7 -> 22,22,21,21,21,21.
    assert fastv_schedule(8, 64, 0.5, 2).keep == (64, 64, 22, 22, 21, 21, 21, 21)


@pytest.mark.parametrize("cut", (-1, 8))
def test_fastv_rejects_cut_outside_layers(cut: int) -> None:
    with pytest.raises(UserError, match=r"pruning\.fastv_layer must be in \[0, 8\)"):
        fastv_schedule(8, 64, 0.5, cut)


def test_fastv_rejects_cut_too_late_for_budget() -> None:
    with pytest.raises(UserError, match=r"pruning\.keep_ratio 0\.3 .* pruning\.fastv_layer 20"):
        fastv_schedule(32, 576, 0.3, 20)


@pytest.mark.parametrize("num_visual", VISUAL)
@pytest.mark.parametrize("num_layers", (8, 32))
def test_pdrop_meets_budget_exactly_or_refuses(num_layers: int, num_visual: int) -> None:
    for ratio in RATIOS:
        if ratio * num_layers * num_visual < _minimum(num_layers, num_visual, 2):
            with pytest.raises(UserError, match=r"pruning\.keep_ratio"):
                pdrop_schedule(num_layers, num_visual, ratio, stages=3)
            continue
        schedule = pdrop_schedule(num_layers, num_visual, ratio, stages=3)
        _assert_valid(schedule, num_layers, num_visual, ratio, 2)


def test_pdrop_has_geometric_stages() -> None:
    keep = pdrop_schedule(32, 576, 0.3, stages=4, first_full=2).keep
    groups = [keep[2:10], keep[10:18], keep[18:25], keep[25:32]]  # 30 layers: 8, 8, 7, 7
    assert all(max(g) - min(g) <= 1 for g in groups)
    levels = [float(np.mean(g)) for g in groups]
    assert all(a > b for a, b in zip(levels, levels[1:]))
    lam = levels[0] / 576
    for s, level in enumerate(levels, start=1):
        assert level == pytest.approx(576 * lam**s, abs=1.0)
    assert len({k for k in keep if k < 576}) <= 2 * 4


def test_pdrop_full_budget_and_stage_errors() -> None:
    assert pdrop_schedule(8, 64, 1.0).keep == (64,) * 8
    for stages in (0, 7):
        with pytest.raises(UserError, match=r"pruning\.stages must be in \[1, 6\]"):
            pdrop_schedule(8, 64, 0.5, stages=stages)
    with pytest.raises(UserError, match=r"pruning\.keep_ratio must be in"):
        pdrop_schedule(8, 64, 0.0)
    with pytest.raises(UserError, match=r"pruning\.first_full_layers"):
        pdrop_schedule(8, 64, 0.5, first_full=8)


# ---------------------------------------------------------------------------- retained mass


def test_retained_mass_curves_are_monotone_from_zero_to_one() -> None:
    rng = np.random.default_rng(9)
    scores = rng.normal(size=(6, 5, 40)) * 3 - 1  # negative scores are shifted, not clipped
    mass = retained_mass_curves(scores)
    assert mass.shape == (5, 41)
    assert np.all(mass[:, 0] == 0.0) and np.all(mass[:, -1] == 1.0)
    assert np.all(np.diff(mass, axis=1) >= 0)
    # Top-k of sorted scores: concave, and above the uniform line.
    assert np.all(np.diff(mass, n=2, axis=1) <= 1e-12)
    assert np.all(mass >= np.arange(41) / 40 - 1e-12)


def test_retained_mass_curves_of_a_single_row_match_hand_computation() -> None:
    scores = np.array([[[3.0, 1.0, 5.0, 1.0]]])  # shifted: 2, 0, 4, 0 -> sorted 4, 2, 0, 0
    np.testing.assert_allclose(retained_mass_curves(scores), [[0, 4 / 6, 1, 1, 1]])


@pytest.mark.parametrize("value", (0.0, 2.5, -7.0))
def test_retained_mass_curves_of_equal_scores_are_uniform(value: float) -> None:
    mass = retained_mass_curves(np.full((3, 2, 9), value))
    np.testing.assert_allclose(mass, np.tile(np.arange(10) / 9, (2, 1)), rtol=0, atol=1e-15)


def test_retained_mass_curves_reject_bad_shapes() -> None:
    with pytest.raises(ValueError, match="shape"):
        retained_mass_curves(np.ones((4, 5)))
    with pytest.raises(ValueError, match="finite"):
        retained_mass_curves(np.array([[[1.0, np.inf]]]))


# ---------------------------------------------------------------------------- KeepSchedule


def test_keep_schedule_properties() -> None:
    schedule = KeepSchedule((8, 8, 5, 5, 2), num_visual=8)
    assert schedule.num_layers == 5
    assert schedule.pruning_layers == (2, 4)
    assert schedule.average_fraction == pytest.approx(28 / 40)
    assert schedule.kv_lengths(10) == [18, 18, 15, 15, 12]
    assert schedule.to_list() == [8, 8, 5, 5, 2]
    assert KeepSchedule((6, 6, 3), num_visual=8).pruning_layers == (0, 2)
    assert KeepSchedule([np.int64(4), 4], num_visual=4).keep == (4, 4)  # normalised to ints


@pytest.mark.parametrize(
    ("keep", "num_visual", "message"),
    [
        ((), 8, "at least one layer"),
        ((8, 5, 6), 8, "non-increasing"),
        ((8, 0), 8, r"\[1, 8\]"),
        ((9, 8), 8, r"\[1, 8\]"),
        ((8, 2.5), 8, "integers"),
        ((1,), 0, "num_visual"),
    ],
)
def test_keep_schedule_validation(keep: tuple, num_visual: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        KeepSchedule(keep, num_visual)
