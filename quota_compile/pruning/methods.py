"""The pruning methods, one object each, in one registry.

A method is a :class:`PruningMethod`: everything the compiler needs to know about it, in one
place, so that calibration (:func:`quota_compile.calibration.calibrate.calibrate`), ``eval``'s
budget check and variants, and the compile's figures ask the registry instead of naming the
methods:

- ``name``: what ``pruning.method``, ``eval.methods`` and a recipe's ``pruning.method`` say;
- ``calibrated``: the schedule and score weights are decided by QUOTA's calibration on data
  (only ``quota``); otherwise :meth:`PruningMethod.recipe` decides from the config alone, with
  :meth:`PruningMethod.keep_schedule`;
- ``signals``: what ``eval`` calibrates the method's variant with: ``lowbit`` (the quantized
  simulation) for ``quota``, ``fp`` for the stage-wise baselines (``quota-fp`` among them);
  :meth:`PruningMethod.calibration_signals` what a compile's calibration uses;
- ``weights``: the fixed score weights a recipe of it carries (``None``: decided by
  calibration, or not used);
- :meth:`PruningMethod.fixed_scores`: a fixed score per original visual token that replaces
  the signals in the graph (``random``: seeded random values);
- :meth:`PruningMethod.check_budget`: refuse, up front, a budget the method cannot meet;
- :meth:`PruningMethod.figure_label`: the legend of its schedule when ``schedule.png`` shows
  it beside the compiled one (``None``: not shown).

:func:`register_method` adds a method (the built-ins are registered below); config validation
then accepts its name. The decision a method takes is a
:class:`quota_compile.pruning.recipe.PruningRecipe`.
"""

from __future__ import annotations

from typing import Literal

import torch

from quota_compile.config import BUILTIN_PRUNING_METHODS, PruningSection, set_pruning_method_names
from quota_compile.errors import UserError
from quota_compile.pruning.allocate import check_reachable, fastv_schedule, pdrop_schedule
from quota_compile.pruning.recipe import PruningRecipe, Weights

ATTENTION_ONLY = Weights(att=1.0, mag=0.0, risk=0.0)


def pruning_layers(keep: list[int]) -> list[int]:
    """The layers whose input is shortened: ``keep[l]`` below ``keep[l - 1]``. Layer 0 never
    prunes (its cue would be the previous layer's attention)."""
    return [layer for layer in range(1, len(keep)) if keep[layer] < keep[layer - 1]]


class PruningMethod:
    """One pruning method. Subclass it, set ``name`` (and the other class attributes where the
    defaults do not fit) and implement :meth:`keep_schedule`; then :func:`register_method`."""

    name: str = ""
    calibrated: bool = False
    signals: Literal["lowbit", "fp"] = "fp"
    weights: Weights | None = ATTENTION_ONLY
    prunes: bool = True  # False for `none`: no selection in the graph

    def keep_schedule(self, options: PruningSection, num_layers: int, num_visual: int, keep_ratio: float) -> list[int]:
        """Visual tokens entering each decoder layer at the budget ``keep_ratio`` (the config's
        other ``pruning.*`` keys in ``options``): non-increasing, ``keep[0] == num_visual``,
        ``sum(keep) == round(keep_ratio * num_layers * num_visual)``. A budget the method
        cannot meet is a :class:`UserError` naming the key."""
        raise NotImplementedError(f"pruning method {self.name!r} has no keep schedule of its own")

    def check_budget(self, options: PruningSection, num_layers: int, num_visual: int, keep_ratio: float | None) -> None:
        """Raise :class:`UserError` when ``keep_ratio`` cannot be met on this depth."""
        self.keep_schedule(options, num_layers, num_visual, keep_ratio)

    def calibration_signals(self, options: PruningSection) -> Literal["lowbit", "fp"]:
        """What a ``calibrated`` method measures on: ``pruning.signals`` (``quota``), or the
        method's own fixed choice (``quota-fp``: always the full-precision model)."""
        return options.signals

    def random_seed(self, options: PruningSection) -> int | None:
        """What the recipe records as ``random_seed``."""
        return None

    def pivots(self, options: PruningSection) -> int | None:
        """What the recipe records as ``pivots`` (``dart``: the duplication score's pivot
        count, which then replaces the signals in the graph)."""
        return None

    def selection_text(self, recipe: PruningRecipe) -> str | None:
        """How the graph ranks the visual tokens, for report.md (``None``: not said)."""
        w = recipe.weights
        return None if w is None else f"score: {w.att:g}·att + {w.mag:g}·mag − {w.risk:g}·risk (signals normalised per sample and layer)"

    def fixed_scores(self, recipe: PruningRecipe) -> tuple[float, ...] | None:
        """A score per original visual token that the graph ranks by instead of the signals
        (``None``: the signals, with the recipe's weights)."""
        return None

    def figure_label(self, options: PruningSection) -> str | None:
        """The legend of this method's schedule drawn beside another method's (``None``: not drawn)."""
        return None

    def recipe(self, options: PruningSection, num_layers: int, num_visual: int) -> PruningRecipe:
        """The decision of a method that needs no calibration data, from the config alone."""
        keep = self.keep_schedule(options, num_layers, num_visual, options.keep_ratio)
        return PruningRecipe(
            method=self.name,
            signals=options.signals,
            keep_ratio=options.keep_ratio,
            query_tokens=options.query_tokens,
            weights=self.weights,
            keep=keep,
            pruning_layers=pruning_layers(keep),
            random_seed=self.random_seed(options),
            pivots=self.pivots(options),
        )

    def __repr__(self) -> str:
        return f"<pruning method {self.name}>"


class NoPruning(PruningMethod):
    """``none``: every layer keeps every visual token."""

    name = "none"
    weights = None
    prunes = False

    def keep_schedule(self, options, num_layers, num_visual, keep_ratio):
        return [num_visual] * num_layers

    def check_budget(self, options, num_layers, num_visual, keep_ratio):
        pass

    def recipe(self, options, num_layers, num_visual):
        return PruningRecipe(method=self.name, keep=self.keep_schedule(options, num_layers, num_visual, 1.0))


class Quota(PruningMethod):
    """``quota``: score weights and schedule calibrated under the deployed operators."""

    name = "quota"
    calibrated = True
    signals = "lowbit"
    weights = None  # decided by calibration

    def check_budget(self, options, num_layers, num_visual, keep_ratio):
        full = options.first_full_layers
        check_reachable(keep_ratio, num_layers, num_visual, full, f"{full} full layer(s) of {num_layers}")


class QuotaFP(Quota):
    """``quota-fp``: QUOTA's calibration run as a stage-wise pipeline would: signals, the
    score-weight search and the schedule all measured on the full-precision model, the result
    then deployed with the config's quantization (the paper's stage-wise baseline)."""

    name = "quota-fp"
    signals = "fp"

    def calibration_signals(self, options):
        return "fp"


class FastV(PruningMethod):
    """``fastv``: one cut at ``pruning.fastv_layer``; the attention cue ranks the tokens."""

    name = "fastv"

    def keep_schedule(self, options, num_layers, num_visual, keep_ratio):
        return list(fastv_schedule(num_layers, num_visual, keep_ratio, options.fastv_layer).keep)

    def figure_label(self, options):
        return f"fastv (cut at {options.fastv_layer})"


class PyramidDrop(PruningMethod):
    """``pdrop``: ``pruning.stages`` geometric stages after ``pruning.first_full_layers``; the
    attention cue ranks the tokens."""

    name = "pdrop"

    def keep_schedule(self, options, num_layers, num_visual, keep_ratio):
        return list(pdrop_schedule(num_layers, num_visual, keep_ratio, options.stages, options.first_full_layers).keep)

    def figure_label(self, options):
        return f"pdrop ({options.stages} stages)"


class _CutAtFirstFull(PruningMethod):
    """A method that ranks by something other than the score weights, on the ``fastv``
    schedule cut at ``pruning.first_full_layers``."""

    weights = None

    def keep_schedule(self, options, num_layers, num_visual, keep_ratio):
        return list(fastv_schedule(num_layers, num_visual, keep_ratio, options.first_full_layers).keep)


class RandomPruning(_CutAtFirstFull):
    """``random``: the ``fastv`` schedule cut at ``pruning.first_full_layers``; a fixed random
    score per original visual token (seeded by ``pruning.seed``) ranks the tokens."""

    name = "random"

    def random_seed(self, options):
        return options.seed

    def fixed_scores(self, recipe):
        gen = torch.Generator().manual_seed(recipe.random_seed)
        return tuple(torch.rand(recipe.keep[0], generator=gen).tolist())

    def selection_text(self, recipe):
        return f"selection: a fixed random score per visual token (seed {recipe.random_seed})"


class Dart(_CutAtFirstFull):
    """``dart``: duplication-aware token reduction (DART), as a static-k method: the ``fastv``
    schedule cut at ``pruning.first_full_layers``; at the cut the ``pruning.pivots`` tokens of
    largest hidden-state norm are kept and the others ranked by how little they resemble a
    pivot (:func:`quota_compile.pruning.score.duplication_score`)."""

    name = "dart"

    def pivots(self, options):
        return options.pivots

    def selection_text(self, recipe):
        return f"selection: DART, {recipe.pivots} pivot tokens (largest hidden-state norm), the others by least cosine similarity to a pivot"

    def figure_label(self, options):
        return f"dart (cut at {options.first_full_layers})"


_METHODS: dict[str, PruningMethod] = {}


def register_method(method: PruningMethod) -> PruningMethod:
    """Add ``method`` to the registry (its name must be new); returns it."""
    if not isinstance(method, PruningMethod):
        raise TypeError(f"a pruning method must be a PruningMethod, got {type(method).__name__}")
    if not isinstance(method.name, str) or not method.name or method.name != method.name.strip():
        raise ValueError(f"a pruning method needs a non-empty name without surrounding spaces, got {method.name!r}")
    if method.name in _METHODS:
        raise ValueError(f"a pruning method named {method.name!r} is already registered")
    _METHODS[method.name] = method
    return method


def unregister_method(name: str) -> None:
    """Remove a method added with :func:`register_method` (the built-in ones stay)."""
    if name in BUILTIN_PRUNING_METHODS:
        raise ValueError(f"the built-in pruning method {name!r} cannot be unregistered")
    del _METHODS[name]


def pruning_method(name: str) -> PruningMethod:
    """The registered method called ``name``."""
    try:
        return _METHODS[name]
    except KeyError:
        raise UserError(f"unknown pruning method {name!r}; registered: {', '.join(_METHODS)}.") from None


def registered_methods() -> tuple[PruningMethod, ...]:
    """Every registered method, the built-in ones first, in registration order."""
    return tuple(_METHODS.values())


for _builtin in (NoPruning(), Quota(), QuotaFP(), FastV(), PyramidDrop(), RandomPruning(), Dart()):
    register_method(_builtin)
set_pruning_method_names(lambda: tuple(_METHODS))
