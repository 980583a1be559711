"""``recipe.yaml``: what was decided for one model, saved next to every bundle.

This version records the model identity and the quantization spec (token pruning is added by
the QUOTA release). A recipe round-trips exactly: ``Recipe.load(r.dump(path)) == r``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from .config import CalibrationSection, PruningSection, QuantizationSection

RECIPE_VERSION = 1


class ModelIdentity(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str
    family: Literal["llava"] = "llava"
    sha256: str = Field(description="hash of the state dict (names, dtypes, shapes, bytes)")
    num_layers: int
    visual_tokens: int


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1] = RECIPE_VERSION
    tool_version: str
    model: ModelIdentity
    quantization: QuantizationSection
    pruning: PruningSection
    calibration: CalibrationSection

    def dump(self, path: Path) -> Path:
        path.write_text(yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: Path) -> Recipe:
        return cls.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")))
