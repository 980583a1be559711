"""``recipe.yaml``: what was decided for one model, saved next to every bundle.

Model identity and hash, the quantization spec, the pruning decision (method, score weights,
per-layer keep counts, pruning layers, the weight search), calibration provenance and the tool
version. A recipe round-trips exactly (``Recipe.load(r.dump(path)) == r``) and can be given
back to ``quota-compile CONFIG --recipe recipe.yaml`` to export without recalibrating.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from quota_compile.config import PruningMethodName, QuantizationSection, read_yaml, validation_message
from quota_compile.errors import UserError

RECIPE_VERSION = 1


class ModelIdentity(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str
    family: Literal["llava"] = "llava"
    sha256: str = Field(description="hash of the state dict (names, dtypes, shapes, bytes)")
    num_layers: int
    visual_tokens: int


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Weights(_Frozen):
    att: float
    mag: float
    risk: float


class SearchPoint(_Frozen):
    """One candidate of the ``weights: auto`` search: its schedule, its held-out KL and, with
    ``calibration.objective: answer_nll``, its held-out answer negative log-likelihood."""

    weights: Weights
    keep: list[int]
    kl: float
    answer_nll: float | None = None


class PruningRecipe(_Frozen):
    """The pruning decision of a compile, whichever way it was taken (calibration, a method's
    own rule from the config, or a ``--recipe`` file): the one type that describes it. The
    prefill's in-graph selection (:class:`quota_compile.capture.programs.PruneSpec`) is derived
    from it by :func:`quota_compile.capture.programs.prune_spec_from_recipe`. ``method`` is a
    registered method's name (:mod:`quota_compile.pruning.methods`)."""

    method: PruningMethodName
    signals: Literal["lowbit", "fp"] = "lowbit"
    keep_ratio: float = 1.0
    query_tokens: int = 32
    weights: Weights | None = None
    keep: list[int] = Field(description="visual tokens processed by each decoder layer")
    pruning_layers: list[int] = Field(default_factory=list)
    random_seed: int | None = None
    pivots: int | None = Field(None, description="`dart`: pivot tokens of the duplication score")
    weight_search: list[SearchPoint] = Field(default_factory=list)


class CalibrationProvenance(_Frozen):
    dataset: str
    num_samples: int
    seed: int
    holdout: float
    objective: str = Field("kl", description="what the score-weight search minimised: kl or answer_nll")
    sha256: str | None = Field(None, description="hash of the calibration inputs; null when none were run")


class Recipe(_Frozen):
    version: Literal[1] = RECIPE_VERSION
    tool_version: str
    model: ModelIdentity
    quantization: QuantizationSection
    pruning: PruningRecipe
    calibration: CalibrationProvenance

    def dump(self, path: Path) -> Path:
        path.write_text(yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: Path) -> Recipe:
        """Read a recipe; a file that is not one is a :class:`UserError` naming the file and,
        for a schema error, the first bad key (as model.yaml's errors do)."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: no such recipe file.")
        data = read_yaml(path)
        if not isinstance(data, dict):
            raise UserError(f"{path}: not a valid quota-compile recipe: expected a mapping of keys at the top level, got {type(data).__name__}.")
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise UserError(f"{path}: not a valid quota-compile recipe: {validation_message(e)}.") from None
