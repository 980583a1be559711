"""The pruning decision of a compile: read and checked from ``--recipe``, calibrated, or none."""

from __future__ import annotations

from pathlib import Path

from quota_compile.calibration.calibrate import calibrate
from quota_compile.capture.programs import prune_spec_from_recipe
from quota_compile.capture.trace import build_programs
from quota_compile.errors import UserError
from quota_compile.pruning.methods import pruning_method
from quota_compile.pruning.recipe import Recipe


def read_recipe(path: Path) -> Recipe:
    """The file given with ``--recipe``, parsed and validated (it needs no model: checked in
    the config stage, before the model is loaded)."""
    if not path.is_file():
        raise UserError(f"{path}: no such recipe file (option --recipe).")
    return Recipe.load(path)


def check_recipe(recipe: Recipe, path: Path, cfg, vlm, span: tuple[int, int], config_file: Path) -> Recipe:
    """A parsed ``--recipe`` must describe this model and this quantization. The errors name
    the recipe file first (``path``) and the config file inside the sentence."""
    if recipe.model.num_layers != vlm.num_layers or len(recipe.pruning.keep) != vlm.num_layers:
        raise UserError(
            f"{path}: key 'pruning.keep': the recipe is for {len(recipe.pruning.keep)} decoder layers, "
            f"the model in {config_file} has {vlm.num_layers}."
        )
    if recipe.model.visual_tokens != span[1] or max(recipe.pruning.keep) > span[1]:
        raise UserError(
            f"{path}: key 'model.visual_tokens': the recipe is for {recipe.model.visual_tokens} visual tokens, "
            f"the model in {config_file} gives {span[1]}."
        )
    if recipe.quantization != cfg.quantization:
        raise UserError(f"{path}: key 'quantization' differs from the quantization section of {config_file}.")
    return recipe


def decide_pruning(cfg, vlm, qm, span, given: Recipe | None = None, note=None):
    """``(PruningRecipe, CalibrationProvenance, PruneSpec | None)`` from a given recipe, or
    decided for ``pruning.method`` (by calibration where the method calibrates, otherwise by
    its own rule); the spec is derived from the recipe. ``note``: calibration's progress lines."""
    if given is not None:
        recipe, provenance = given.pruning, given.calibration
    else:
        vision = build_programs(vlm, qm).vision if pruning_method(cfg.pruning.method).calibrated else None
        recipe, provenance = calibrate(vlm, qm, vision, span, cfg.pruning, cfg.calibration, note)
    return recipe, provenance, prune_spec_from_recipe(recipe, qm.spec.activations)
