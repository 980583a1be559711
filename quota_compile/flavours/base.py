"""The flavour interface: one target of ``export.targets``, from its config checks to its
manifest entry.

A compile exports each program's semantic graph once (every ``quota::`` operator one node,
:mod:`quota_compile.export.semantic`) and expands it into the portable graph (standard ONNX
ops); every other flavour is translated from the semantic graphs by rules of its own
(:attr:`Flavour.reads_semantic`) or derived from the portable graphs. For each flavour in
``export.targets`` the compile calls, in this order:

1. :meth:`Flavour.check_config` in the config stage (before anything is loaded);
2. :meth:`Flavour.check_settled` once the model is loaded and the quantization settled;
3. :meth:`Flavour.lower` in the lower stage (derived flavours): the semantic or the portable
   graphs in, this flavour's graphs out, saved under :attr:`Flavour.folder` of the bundle;
4. :meth:`Flavour.verify` in the verify stage: verify.json's ``flavours.<name>`` (the portable
   flavour's result is the report itself);
5. :meth:`Flavour.finish` in the bundle stage, after verification (e.g. engine builds); it may
   record more into ``build.report`` (never write verify.json: the compile writes it once,
   after every flavour's ``finish``);
6. :meth:`Flavour.manifest_entry`: manifest.json's ``flavours.<name>``.

The documents' models are :mod:`quota_compile.bundle.schema`'s (:class:`~quota_compile.bundle.schema.FlavourEntry`,
:class:`~quota_compile.bundle.schema.FlavourVerification`).

``eval`` and ``bench`` call :meth:`Flavour.lower` alone. ``quota-compile run`` reads the
manifest, not this code: it runs the flavour whose entry says ``used_by_runtime``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from quota_compile.bundle.format import graph_bytes
from quota_compile.bundle.schema import FlavourEntry
from quota_compile.export.onnx import SemanticGraph


@dataclass
class FlavourBuild:
    """What the flavours see of one compile; filled in as the stages run."""

    cfg: Any  # CompileConfig, quantization settled
    vlm: Any
    span: tuple[int, int]  # (first visual token, visual tokens)
    models: dict[str, onnx.ModelProto]  # the portable graphs, after export.passes (once written: without the weights file's tensors)
    folder: Path | None = None  # the bundle's work folder, once it exists
    lowered: dict[str, dict[str, onnx.ModelProto]] = field(default_factory=dict)  # per flavour name
    programs: Any = None  # the traced programs' eager modules (capture.trace.Programs)
    traced: Any = None  # graph name -> capture.trace.TracedProgram (after the passes), for flavours that read them
    reference: Any = None  # the PyTorch simulation backend (verify stage)
    samples: list = field(default_factory=list)  # held-out samples (verify stage)
    report: dict | None = None  # verify.json (after the verify stage)
    results: dict[str, Any] = field(default_factory=dict)  # what finish() leaves for manifest_entry()
    note: Callable[[str], None] = print  # a progress line inside a long stage
    say: Callable[[str], None] = print  # a message the user should read (not a progress line)


class Flavour:
    """One export target. Subclass it, set :attr:`name` (and :attr:`folder` for a derived
    flavour), override what the flavour needs, and register an instance with
    :func:`quota_compile.flavours.registry.register_flavour`."""

    name: str = ""
    folder: str = "."  # where its graphs go inside the bundle
    derived: bool = True  # has graphs of its own (lowered from the semantic or the portable graphs)
    # ``eval``/``bench`` and the default runtime pick, among a config's targets, the flavour of
    # highest rank; None: never picked (e.g. graphs the onnxruntime runner cannot run as such).
    runtime_rank: int | None = None
    # True: once its graphs are written, the compile replaces them in ``FlavourBuild.lowered`` by
    # their structure (loaded without the weights file), so that verification does not hold the
    # weights in protobufs beside the sessions that run them; the flavour's verification then
    # opens the graphs from its folder (e.g. ``CodeProbe(..., folder=...)``). False (the
    # default): they stay in memory as lowered. The portable graphs (``FlavourBuild.models``)
    # are always replaced by their structure.
    verifies_from_folder: bool = False
    # Its verification reads ``FlavourBuild.traced`` (the compile drops the traced programs
    # after lowering otherwise).
    reads_traced_programs: bool = False
    # :meth:`lower` translates the semantic graphs (``semantic``) with rules of its own instead
    # of rewriting the portable graphs; ``export.passes`` then do not reach its graphs.
    reads_semantic: bool = False

    def check_config(self, cfg) -> None:
        """Refuse (``ConfigError`` naming the key, exit 2) a config this flavour cannot compile; nothing loaded yet."""

    def check_settled(self, cfg, vlm) -> None:
        """Refuse a config once the model is loaded and the quantization settled."""

    def lower(self, cfg, models: dict[str, onnx.ModelProto], quantized_kv: bool = True,
              semantic: Mapping[str, SemanticGraph] | None = None) -> dict[str, onnx.ModelProto]:
        """This flavour's graphs: translated from ``semantic`` (each graph's semantic graph,
        given when :attr:`reads_semantic`) with the flavour's own rules, or derived from the
        portable ``models`` (after ``export.passes``). ``quantized_kv``: the graphs store a
        quantized KV cache, False for the float-cache variants ``eval``/``bench`` build."""
        return models

    def verify(self, build: FlavourBuild) -> dict:
        """verify.json's ``flavours.<name>``: at least ``flavour``, ``passed`` and ``failures``."""
        raise NotImplementedError(f"the {self.name} flavour has no verification")

    def finish(self, build: FlavourBuild) -> None:
        """After verification, in the bundle stage: anything the bundle needs beyond the graphs."""

    def manifest_entry(self, build: FlavourBuild) -> dict:
        """manifest.json's ``flavours.<name>``: a :class:`~quota_compile.bundle.schema.FlavourEntry`
        as its JSON document (a plain dict: a subclass may add its own keys to it)."""
        folder = build.folder / self.folder
        graphs = build.lowered.get(self.name, build.models)
        return FlavourEntry(
            folder=self.folder,
            graphs=sorted(graphs),
            bytes={g: graph_bytes(folder, g) for g in sorted(graphs)},
            used_by_runtime=False,
        ).model_dump(mode="json")
