"""The registry of pruning methods (quota_compile.pruning.methods): the built-in methods'
schedules and budget checks, and a toy method registered from outside, which the config, the
recipe, the pruning decision and the prefill program then take like a built-in one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from quota_compile.capture.trace import build_programs
from quota_compile.cli import main
from quota_compile.config import PruningSection, parse_config
from quota_compile.core.decisions import decide_pruning
from quota_compile.data.samples import synthetic_images
from quota_compile.errors import UserError
from quota_compile.pruning.methods import PruningMethod, pruning_method, register_method, registered_methods, unregister_method
from quota_compile.pruning.recipe import PruningRecipe
from quota_compile.runtime.ort import make_batch

from .conftest import write_config


class KeepFront(PruningMethod):
    """Toy: layers below ``first_full_layers`` keep every token, each later layer half of the
    previous one's (at least 1), whatever the budget; the graph keeps the first tokens (fixed
    scores decreasing with the token index)."""

    name = "front"
    weights = None

    def keep_schedule(self, options, num_layers, num_visual, keep_ratio):
        keep = [num_visual] * options.first_full_layers
        while len(keep) < num_layers:
            keep.append(max(1, keep[-1] // 2))
        return keep

    def fixed_scores(self, recipe):
        return tuple(float(recipe.keep[0] - i) for i in range(recipe.keep[0]))


@pytest.fixture
def front():
    """The toy method, registered for one test and removed afterwards."""
    method = register_method(KeepFront())
    try:
        yield method
    finally:
        unregister_method(method.name)


def _doc(source: str, **pruning) -> dict:
    return {"version": 1, "model": {"source": source}, "quantization": {"weights": {"group_size": 16}}, "pruning": pruning}


# ------------------------------------------------------------------ built-in methods


def test_the_builtin_methods_are_registered_in_order():
    assert [m.name for m in registered_methods()][:7] == ["none", "quota", "quota-fp", "fastv", "pdrop", "random", "dart"]
    assert pruning_method("quota").calibrated and pruning_method("quota").signals == "lowbit"
    assert pruning_method("quota-fp").calibrated
    assert [pruning_method(n).signals for n in ("quota-fp", "fastv", "pdrop", "random")] == ["fp"] * 4
    assert not pruning_method("none").prunes
    with pytest.raises(UserError, match="unknown pruning method 'magic'"):
        pruning_method("magic")


# 8 layers x 64 visual tokens at keep_ratio 0.5: 256 tokens summed over the layers.
# fastv, cut at 2: 128 tokens over layers 2..7 -> 21.33 each; the earlier two take the extra.
# random, cut at first_full_layers 3: 64 tokens over layers 3..7 -> 12.8 each; 13 x 4 + 12.
# pdrop, 2 stages after 2 full layers: 3 layers at 64·λ and 3 at 64·λ² with λ + λ² = 2/3, so
# λ = 0.4574: aims 29.28 and 13.39, rounded 29 and 13 (126 tokens); the two missing tokens go
# to the layers furthest below their aim that may grow: layer 5, then layer 6.
EXPECTED = {
    "fastv": [64, 64, 22, 22, 21, 21, 21, 21],
    "random": [64, 64, 64, 13, 13, 13, 13, 12],
    "pdrop": [64, 64, 29, 29, 29, 14, 14, 13],
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_builtin_schedules_match_hand_computed_ones(name):
    options = PruningSection(method=name, keep_ratio=0.5, fastv_layer=2, first_full_layers=3 if name == "random" else 2, stages=2)
    keep = pruning_method(name).keep_schedule(options, 8, 64, 0.5)
    assert keep == EXPECTED[name] and sum(keep) == 256
    recipe = pruning_method(name).recipe(options, 8, 64)
    assert recipe.method == name and recipe.keep == EXPECTED[name]
    assert recipe.pruning_layers == [layer for layer in range(1, 8) if keep[layer] < keep[layer - 1]]
    assert recipe.random_seed == (0 if name == "random" else None)


def test_builtin_schedules_are_those_of_the_schedule_functions():
    from quota_compile.pruning.allocate import fastv_schedule, pdrop_schedule

    assert list(fastv_schedule(8, 64, 0.5, 2).keep) == EXPECTED["fastv"]
    assert list(fastv_schedule(8, 64, 0.5, 3).keep) == EXPECTED["random"]
    assert list(pdrop_schedule(8, 64, 0.5, stages=2, first_full=2).keep) == EXPECTED["pdrop"]


def test_budget_checks():
    options = PruningSection(first_full_layers=2, fastv_layer=2)
    for name in ("quota", "fastv", "pdrop", "random"):
        pruning_method(name).check_budget(options, 8, 64, 0.3)  # reachable: no error
        with pytest.raises(UserError, match=r"pruning\.keep_ratio 0\.2 is below the minimum 0\.2618"):
            pruning_method(name).check_budget(options, 8, 64, 0.2)
    pruning_method("none").check_budget(options, 8, 64, None)


# ------------------------------------------------------------------ a registered toy method


def test_a_registered_method_passes_validation(front, tmp_path):
    cfg = parse_config(_doc("builtin:tiny-llava", method="front") | {"eval": {"methods": ["front", "quota"]}}, tmp_path / "t.yaml")
    assert cfg.pruning.method == "front" and cfg.eval.methods == ["front", "quota"]
    recipe = PruningRecipe(method="front", keep=[64, 64, 32])
    assert recipe.method == "front"


def test_a_method_is_refused_once_unregistered(tmp_path):
    method = register_method(KeepFront())
    with pytest.raises(ValueError, match="already registered"):
        register_method(KeepFront())
    unregister_method(method.name)
    with pytest.raises(UserError, match=r"key 'pruning\.method' must be one of 'none', 'quota', 'quota-fp', 'fastv', 'pdrop', 'random' or 'dart', got 'front'"):
        parse_config(_doc("builtin:tiny-llava", method="front"), tmp_path / "t.yaml")
    with pytest.raises(ValueError, match="built-in"):
        unregister_method("fastv")


def test_decide_pruning_takes_the_registered_method(front, tiny):
    vlm, qm = tiny
    cfg = parse_config(_doc("builtin:tiny-llava", method="front", keep_ratio=0.5), Path("t.yaml"))
    span = vlm.visual_span()
    recipe, provenance, spec = decide_pruning(cfg, vlm, qm, span)
    assert recipe.method == "front" and recipe.keep == [64, 64, 32, 16, 8, 4, 2, 1]
    assert recipe.pruning_layers == [2, 3, 4, 5, 6, 7] and recipe.weights is None
    assert provenance.sha256 is None  # no calibration data was read
    assert spec.keep == (64, 64, 32, 16, 8, 4, 2, 1) and spec.random_scores == tuple(float(64 - i) for i in range(64))
    # the prefill keeps the first tokens at every pruning layer
    programs = build_programs(vlm, qm, spec)
    batch = make_batch(vlm.processor, vlm.prompt_template, synthetic_images(1, 32, seed=3), ["What is it?"], (programs.prefill.visual_start, 64), vlm.image_token_id)
    with torch.no_grad():
        out = programs.prefill(torch.from_numpy(batch.input_ids), torch.from_numpy(batch.attention_mask), programs.vision(torch.from_numpy(batch.pixel_values)))
    kept = out[-len(recipe.pruning_layers):]
    assert [k[0].tolist() for k in kept] == [list(range(recipe.keep[layer])) for layer in recipe.pruning_layers]


def test_an_unknown_method_still_exits_2_naming_the_key(front, tmp_path, capsys, tiny_folder):
    cfg = write_config(tmp_path / "bad.yaml", str(tiny_folder), tmp_path / "out", pruning={"method": "magic"})
    assert main([str(cfg)]) == 2
    err = capsys.readouterr().err
    assert str(cfg) in err and "key 'pruning.method'" in err and "'magic'" in err
    assert "'front'" in err  # the registered names are the ones offered
    assert not (tmp_path / "out").exists()
