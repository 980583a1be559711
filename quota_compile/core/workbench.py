"""The workbench: one loaded and quantized model, and the one path from a pruning decision to
ONNX graphs that ``compile``, ``eval`` and ``bench`` all take.

A command loads the model, settles the quantization and quantizes (each command checks its own
things in between), then builds on a :class:`Workbench`:

- :meth:`Workbench.decide`: the pruning decision of the config, or of one deployment variant
  (:class:`quota_compile.core.variants.Variant`), given as a recipe, calibrated, or by the
  method's own rule;
- :meth:`Workbench.build`: decide → the eager programs → ``torch.export`` with the passes →
  torch.onnx export → ``export.passes`` → the derived flavours' lowering; the graphs stay in
  memory (``compile`` verifies them before it writes anything);
- :meth:`Workbench.build_into`: the same, with one flavour's graphs saved in a folder, ready
  for onnxruntime (``eval``, ``bench``).

Nothing here prints unless given a progress reporter (``compile`` gives its stage lines).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import onnx

from quota_compile.capture.trace import build_programs, trace_programs
from quota_compile.core.decisions import decide_pruning
from quota_compile.core.variants import Variant, flavour_of
from quota_compile.export.onnx import SemanticGraph, expand_to_onnx, export_semantic, save_graphs
from quota_compile.export.semantic import PORTABLE_RULES
from quota_compile.export.user_passes import OnnxPass, apply_passes
from quota_compile.flavours.base import Flavour
from quota_compile.flavours.registry import get_flavour
from quota_compile.pruning.methods import pruning_method
from quota_compile.pruning.recipe import Recipe

# The progress texts of the stages a build runs through (compile prints them).
TRACE_WHAT = "torch.export of vision, prefill, decode + passes"


class Progress(Protocol):
    """What a build reports to: a stage (``calibrate``, ``trace``, ``lower``) around its work,
    and a line inside a long stage."""

    def stage(self, name: str, what: str) -> contextlib.AbstractContextManager: ...

    def note(self, what: str) -> None: ...


class Quiet:
    """A progress reporter that says nothing (``eval`` and ``bench`` print per variant)."""

    @contextlib.contextmanager
    def stage(self, name: str, what: str) -> Iterator[None]:
        yield

    def note(self, what: str) -> None:
        pass


@dataclass
class Decision:
    """The pruning decision of one build: the recipe, the calibration it came from (or the
    given recipe's), and the spec the programs are built with (None: no pruning)."""

    pruning: Any  # pruning.recipe.PruningRecipe
    provenance: Any  # pruning.recipe.CalibrationProvenance
    spec: Any  # capture.programs.PruneSpec | None

    @property
    def keep(self) -> list[int]:
        return list(self.pruning.keep)


@dataclass
class Built:
    """What one build made: the decision, the eager programs (the reference of the same
    variant), the traced programs, the portable graphs (after ``export.passes``) and each
    derived flavour's graphs."""

    variant: Variant | None  # None: the config's own (the bundle of a compile)
    decision: Decision
    programs: Any  # capture.trace.Programs
    traced: dict  # graph name -> capture.trace.TracedProgram
    models: dict[str, onnx.ModelProto]
    lowered: dict[str, dict[str, onnx.ModelProto]] = field(default_factory=dict)
    seconds_calibrate: float = 0.0
    seconds_build: float = 0.0  # trace, export and lowering (and saving, by build_into)
    folder: Path | None = None  # where build_into saved the graphs
    semantic: dict[str, SemanticGraph] = field(default_factory=dict)  # kept only when build(keep_semantic=True)

    @property
    def keep(self) -> list[int]:
        return self.decision.keep

    @property
    def recipe(self) -> dict | None:
        """The pruning recipe as JSON (None for a variant that does not prune)."""
        method = self.variant.method if self.variant is not None else self.decision.pruning.method
        return self.decision.pruning.model_dump(mode="json") if method != "none" else None

    def graphs(self, flavour: str = "portable") -> dict[str, onnx.ModelProto]:
        """A flavour's graphs: the portable ones, or a derived flavour's lowering."""
        return self.lowered[flavour] if get_flavour(flavour).derived else self.models

    def save(self, folder: Path, flavour: str = "portable") -> None:
        """A flavour's graphs as ``{vision,prefill,decode}.onnx`` in ``folder`` (which exists),
        their weights in one shared ``weights.bin`` (:func:`~quota_compile.export.onnx.save_graphs`)."""
        save_graphs(self.graphs(flavour), folder)


class Workbench:
    """The model loaded (``vlm``), its quantization settled (``cfg``) and simulated (``qm``),
    the visual tokens' span: what every build starts from."""

    def __init__(self, cfg, vlm, qm, span: tuple[int, int]):
        self.cfg = cfg
        self.vlm = vlm
        self.qm = qm
        self.span = span

    def config_of(self, variant: Variant | None):
        """The config a variant is decided from: the config with the variant's method, its
        signals and its budget (None: the config as it is)."""
        if variant is None:
            return self.cfg
        signals = pruning_method(variant.method).signals
        update = {"method": variant.method, "signals": signals} | ({"keep_ratio": variant.keep_ratio} if variant.keep_ratio is not None else {})
        return self.cfg.model_copy(update={"pruning": self.cfg.pruning.model_copy(update=update)})

    def decide(self, variant: Variant | None = None, given: Recipe | None = None, note=None) -> Decision:
        """The pruning decision of ``variant`` (None: of the config), as a compile takes it:
        from ``given`` (a checked ``--recipe``), by calibration where the method calibrates,
        otherwise by the method's own rule (``note``: its progress lines)."""
        pruning, provenance, spec = decide_pruning(self.config_of(variant), self.vlm, self.qm, self.span, given, note)
        return Decision(pruning, provenance, spec)

    def describe(self, variant: Variant | None = None) -> str:
        """The calibrate stage's progress text of a decision taken from the config."""
        p = self.config_of(variant).pruning
        if p.method == "none":
            return "no token pruning"
        method = pruning_method(p.method)
        how = f"{method.calibration_signals(p)} signals" if method.calibrated else "its own schedule rule"
        return f"{p.method}, keep_ratio {p.keep_ratio}, {how}"

    def build(
        self,
        variant: Variant | None = None,
        flavours: Sequence[Flavour] = (),
        *,
        given: Recipe | None = None,
        passes: Sequence[tuple[str, OnnxPass]] = (),
        progress: Progress | None = None,
        calibrate_what: str | None = None,
        onnx: bool = True,
        keep_semantic: bool = False,
    ) -> Built:
        """Decide, build the programs, trace them, export their semantic graphs, expand those
        to the portable graphs, apply ``passes`` to them and lower each derived flavour of
        ``flavours`` (from the semantic graphs where the flavour translates them with its own
        rules, else from the portable graphs).

        ``variant`` None builds the config's own (quantized) graphs, with ``given`` as the
        decision if set; a variant builds its own: full precision, weight-only or quantized,
        pruned by its method at its budget. ``progress`` sees the ``calibrate``, ``trace`` and
        ``lower`` stages (``calibrate_what``: the calibrate stage's text, default
        :meth:`describe`). ``onnx=False``: decide and trace only (no ONNX graphs, for the
        PyTorch path's programs). ``keep_semantic``: :attr:`Built.semantic` holds the
        semantic graphs (for a benchmark that lowers them itself)."""
        progress = progress or Quiet()
        cfg, vlm, qm = self.cfg, self.vlm, self.qm
        quantized = variant.quantized if variant is not None else True
        weight_only = variant.weight_only if variant is not None else False
        t0 = time.perf_counter()
        with progress.stage("calibrate", calibrate_what or self.describe(variant)):
            decision = self.decide(variant, given, progress.note)
        t_cal = time.perf_counter() - t0
        with progress.stage("trace", TRACE_WHAT):
            programs = build_programs(vlm, qm, decision.spec)
            traced = trace_programs(vlm, qm, programs, quantized=quantized, weight_only=weight_only)
        if not onnx:
            return Built(variant, decision, programs, traced, {}, {}, t_cal, time.perf_counter() - t0 - t_cal)
        with progress.stage("lower", f"ONNX opset {cfg.export.opset} ({' + '.join(cfg.export.targets)})"):
            models, semantic = {}, {}
            keep_semantic = keep_semantic or any(f.derived and f.reads_semantic for f in flavours)
            opset = cfg.export.opset
            for g, t in traced.items():
                progress.note(f"{g}: torch.onnx export ...")
                exported = export_semantic(t.module, t.args, t.input_names, t.output_names, t.dynamic_shapes, opset)
                if keep_semantic:
                    semantic[g] = SemanticGraph.of(exported, opset, t.axis_names)
                models[g] = expand_to_onnx(exported, PORTABLE_RULES, opset, t.axis_names)
            if passes:
                progress.note(f"export.passes: {', '.join(spec for spec, _ in passes)} ...")
                models = apply_passes(list(passes), models)
            lowered = {}
            for flavour in flavours:
                if flavour.derived:
                    progress.note(f"the {flavour.name} flavour ...")
                    given = {"semantic": semantic} if flavour.reads_semantic else {}  # (a flavour of the portable graphs need not take it)
                    lowered[flavour.name] = flavour.lower(cfg, models, quantized_kv=quantized and not weight_only, **given)
        built = Built(variant, decision, programs, traced, models, lowered, t_cal, time.perf_counter() - t0 - t_cal)
        if keep_semantic:
            built.semantic = semantic
        return built

    def build_into(self, variant: Variant, work: Path, flavour: str | None = None) -> Built:
        """:meth:`build` of one variant in one flavour (default: the one the config's bundle
        runs), its graphs saved in a folder of its own under ``work`` (``Built.folder``)."""
        flavour = flavour or flavour_of(self.cfg)
        built = self.build(variant, [get_flavour(flavour)])
        t0 = time.perf_counter()
        built.folder = work / variant.name.replace("@", "_")
        built.folder.mkdir(parents=True, exist_ok=True)
        built.save(built.folder, flavour)
        built.seconds_build += time.perf_counter() - t0
        return built
