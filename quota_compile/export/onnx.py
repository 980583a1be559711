"""Lower a traced, pass-processed program to ONNX (portable flavour).

``torch.onnx.export`` (the dynamo exporter) translates the graph into its semantic form: each
``quota::`` operator one ``quota.<op>`` node (:mod:`quota_compile.export.semantic`). The portable rules then write each as standard ONNX
(:mod:`quota_compile.export.onnx_translation`); INT4 weight markers become INT4 initializers,
the graph is checked with ``onnx.checker`` (full check) and it must use standard ONNX ops only.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import warnings
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx_ir as ir
import torch
from onnx import TensorProto, numpy_helper

from quota_compile.bundle.schema import WEIGHTS
from quota_compile.export.onnx_translation import MARKER_DOMAIN
from quota_compile.export.semantic import PORTABLE_RULES, expand, translation_table

OPSET = 21
# Every graph's initializers of at least this size are written to the folder's one weights
# file (``weights.bin``, :func:`save_graphs`); smaller ones stay in the graph.
EXTERNAL_MIN_BYTES = 1024
# Offsets in the weights file: tensors over ALIGN_THRESHOLD start on a LARGE_ALIGNMENT boundary,
# which lets onnxruntime map them from the file instead of copying them (it needs offsets that
# are multiples of the allocation granularity: 4 KiB on Linux, 64 KiB on Windows; see
# onnxruntime's include/onnxruntime/core/graph/model_saving_options.h); the others start on a
# SMALL_ALIGNMENT boundary.
ALIGN_THRESHOLD = 1 << 20
LARGE_ALIGNMENT = 1 << 16
SMALL_ALIGNMENT = 64


class LoweringError(RuntimeError):
    """The graph could not be lowered to a valid portable ONNX model (a bug, not bad input)."""


def _calls(module: torch.nn.Module, op) -> bool:
    graph = getattr(module, "graph", None)
    return graph is not None and any(n.op == "call_function" and n.target == op for n in graph.nodes)


def export_semantic(
    module: torch.nn.Module,
    args: tuple,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_shapes: tuple,
    opset: int = OPSET,
) -> ir.Model:
    """The semantic graph of ``module`` (a ``torch.fx.GraphModule`` after the passes): the
    exporter's ONNX IR with every ``quota::`` operator as one ``quota.<op>`` node
    (:mod:`quota_compile.export.semantic`), nothing simplified yet."""
    # The programs were traced in eval mode; the unlifted module refuses .eval(), so set the flag.
    for m in module.modules():
        m.training = False
    # The exporter prints its progress and advisory warnings (axis renaming, deprecations);
    # the CLI reports progress itself. Errors still raise.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        common = dict(dynamo=True, opset_version=opset, input_names=list(input_names), output_names=list(output_names),
                      custom_translation_table=translation_table(), optimize=False, verbose=False)
        if _calls(module, torch.ops.quota.decode_attention.default):
            # Exported by torch.export first, whose guards (the shape checks of the operator's
            # fake implementation) tie each layer's past length to the attention mask's, so the
            # graph's inputs say how they relate ("past_5 + 63"); the ONNX exporter's own
            # export defers such checks to runtime and would leave every length unrelated.
            module = torch.export.export(module, args, dynamic_shapes=dynamic_shapes, strict=False)
        program = torch.onnx.export(module, args, dynamic_shapes=dynamic_shapes, **common)
    return program.model


def export_onnx(
    module: torch.nn.Module,
    args: tuple,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_shapes: tuple,
    opset: int = OPSET,
    axis_names: Mapping[str, Mapping[int, str]] | None = None,
) -> onnx.ModelProto:
    """Export ``module`` (a ``torch.fx.GraphModule`` after the passes) to a checked portable
    ONNX model: its semantic graph (:func:`export_semantic`) with the portable rules applied
    (:data:`~quota_compile.export.semantic.PORTABLE_RULES`), simplified.

    ``axis_names`` (I/O name -> axis -> name) renames the exporter's symbolic dimensions
    (``s15``) everywhere in the graph, so that e.g. every past KV tensor says ``past``; axes
    the exporter derived from another (``s15 + 44``) follow that one's name.
    """
    semantic = export_semantic(module, args, input_names, output_names, dynamic_shapes, opset)
    return expand_to_onnx(semantic, PORTABLE_RULES, opset, axis_names)


def expand_to_onnx(semantic: ir.Model, rules: Mapping, opset: int = OPSET,
                   axis_names: Mapping[str, Mapping[int, str]] | None = None, standard_only: bool = True) -> onnx.ModelProto:
    """The checked ONNX model of a semantic graph (:func:`export_semantic`) under ``rules``
    (:func:`~quota_compile.export.semantic.expand`, in place), simplified, its dimensions
    renamed (``axis_names``, as :func:`export_onnx` says), its INT4 weight markers made
    initializers; standard ONNX ops only unless ``standard_only`` is False (a flavour whose
    rules write a runtime's own operators)."""
    expand(semantic, rules)
    simplify(semantic)
    model = ir.serde.serialize_model(semantic)
    if axis_names:
        rename_dims(model, axis_names)
    materialize_int4_weights(model)
    finalize(model, opset, standard_only)
    return model


@dataclass
class SemanticGraph:
    """One program's semantic graph as the export made it (before any rule), kept for the
    flavours that translate it with rules of their own (:attr:`Flavour.reads_semantic
    <quota_compile.flavours.base.Flavour.reads_semantic>`). Each :meth:`expand` works on a
    fresh copy, so the same graph serves every flavour."""

    model: onnx.ModelProto  # the serialized semantic graph, weights included
    opset: int
    axis_names: Mapping[str, Mapping[int, str]] | None = None

    @classmethod
    def of(cls, semantic: ir.Model, opset: int, axis_names=None) -> SemanticGraph:
        return cls(ir.serde.serialize_model(semantic), opset, axis_names)

    def copy(self) -> ir.Model:
        """A fresh IR copy of the graph, for a flavour to edit."""
        return ir.serde.deserialize_model(self.model)

    def expand(self, rules: Mapping, standard_only: bool = True, prepare=None) -> onnx.ModelProto:
        """:func:`expand_to_onnx` of a copy under ``rules``; ``prepare(model)`` edits the copy
        first (e.g. a flavour's fusions of a semantic node with its direct readers)."""
        model = self.copy()
        if prepare is not None:
            prepare(model)
        return expand_to_onnx(model, rules, self.opset, self.axis_names, standard_only)


def simplify(model) -> None:
    """Constant folding, dead-node removal, initializer de-duplication and common
    subexpressions: the exporter's default optimisation less its pattern rewriter, which
    costs a third of the export time and finds nothing to fuse in these graphs."""
    from onnx_ir.passes import common
    from onnxscript import optimizer

    common.InlinePass()(model)
    optimizer.fold_constants(model)
    for p in (
        common.RemoveUnusedNodesPass(),
        common.RemoveUnusedFunctionsPass(),
        common.RemoveUnusedOpsetsPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(),
        common.RemoveUnusedNodesPass(),
        common.NameFixPass(),
    ):
        p(model)


def rename_dims(model: onnx.ModelProto, axis_names: Mapping[str, Mapping[int, str]]) -> None:
    graph = model.graph
    mapping: dict[str, str] = {}
    for v in list(graph.input) + list(graph.output):
        dims = v.type.tensor_type.shape.dim
        for axis, name in axis_names.get(v.name, {}).items():
            old = dims[axis].dim_param
            # An axis the exporter expressed through another one (``s15 + 44``) is renamed
            # through that symbol.
            if re.fullmatch(r"[A-Za-z_]\w*", old or ""):
                mapping.setdefault(old, name)
    symbol = re.compile(r"\b[A-Za-z_]\w*\b")
    for v in list(graph.input) + list(graph.output) + list(graph.value_info):
        for d in v.type.tensor_type.shape.dim:
            if d.dim_param:
                d.dim_param = symbol.sub(lambda m: mapping.get(m.group(0), m.group(0)), d.dim_param)


def materialize_int4_weights(model: onnx.ModelProto) -> int:
    """Replace each ``Int4Weight(packed)`` marker by an INT4 initializer of the same bytes."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    kept, replaced = [], 0
    for node in graph.node:
        if node.domain != MARKER_DOMAIN:
            kept.append(node)
            continue
        if node.op_type != "Int4Weight" or node.input[0] not in inits:
            raise LoweringError(f"marker {node.op_type} on {node.input[0]!r} has no constant input")
        packed = numpy_helper.to_array(inits[node.input[0]])
        shape = list(next(a.ints for a in node.attribute if a.name == "shape"))
        tensor = onnx.helper.make_tensor(node.output[0], TensorProto.INT4, shape, packed.tobytes(), raw=True)
        graph.initializer.append(tensor)
        if consumers[node.input[0]] == 1:
            graph.initializer.remove(inits.pop(node.input[0]))
        replaced += 1
    del graph.node[:]
    graph.node.extend(kept)
    opsets = [o for o in model.opset_import if o.domain != MARKER_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(opsets)
    # Value infos recorded for marker outputs would now shadow initializers.
    names = {t.name for t in graph.initializer}
    infos = [v for v in graph.value_info if v.name not in names]
    del graph.value_info[:]
    graph.value_info.extend(infos)
    return replaced


STACK_TRACE_KEY = "pkg.torch.onnx.stack_trace"


def _all_nodes(graph: onnx.GraphProto):
    """The nodes of ``graph`` and of every subgraph inside it."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _all_nodes(sub)


def finalize(model: onnx.ModelProto, opset: int, standard_only: bool = True) -> None:
    """Full ONNX check; refuse anything outside the standard domain (``standard_only``: the
    portable flavour)."""
    domains = {n.domain for n in model.graph.node} - {"", "ai.onnx"}
    if domains and standard_only:
        raise LoweringError(f"portable graph uses non-standard op domains {sorted(domains)}")
    if not any(o.domain in ("", "ai.onnx") and o.version >= opset for o in model.opset_import):
        raise LoweringError(f"graph opset is below {opset}")
    # Drop exporter metadata that names source files or machine state: the bytes must only
    # depend on the model, the config and the seed. The exporter stamps every node with the
    # Python stack that made it (absolute paths of the installed packages, line numbers of
    # this project's source); the other node stamps (the FX node, the module scopes) stay.
    del model.metadata_props[:]
    for node in _all_nodes(model.graph):
        kept = [p for p in node.metadata_props if p.key != STACK_TRACE_KEY]
        if len(kept) != len(node.metadata_props):
            del node.metadata_props[:]
            node.metadata_props.extend(kept)
    model.producer_name = "quota-compile"
    from quota_compile import __version__

    model.producer_version = __version__
    onnx.checker.check_model(model, full_check=True)


def _aligned(offset: int, size: int) -> int:
    """Where a tensor of ``size`` bytes starts at or after ``offset``: tensors over
    :data:`ALIGN_THRESHOLD` on a :data:`LARGE_ALIGNMENT` boundary (so that a runtime can map
    them from the file), the others on :data:`SMALL_ALIGNMENT`."""
    step = LARGE_ALIGNMENT if size > ALIGN_THRESHOLD else SMALL_ALIGNMENT
    return -(-offset // step) * step


def save_graphs(models: Mapping[str, onnx.ModelProto], folder: Path) -> list[Path]:
    """Write each graph as ``folder/<name>.onnx`` with its initializers of at least
    :data:`EXTERNAL_MIN_BYTES` in one shared ``folder/weights.bin``.

    A tensor held by several graphs (the same data type, shape and bytes; e.g. every decoder
    weight, which the prefill and the decode graph both read) is written once, and each graph
    that holds it points at the same offset and length under its own initializer name. The
    file's layout follows the graphs' order and their initializers' order, so the same graphs
    give the same bytes. The models passed in keep their data. Returns the files written."""
    data_path = folder / WEIGHTS
    stored: dict[bytes, tuple[int, int]] = {}  # tensor key -> (offset, length)
    copies: dict[str, onnx.ModelProto] = {}
    end = 0
    with open(data_path, "wb") as data:
        for name, model in models.items():
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            for t in copy.graph.initializer:
                if t.data_location == TensorProto.EXTERNAL or len(t.raw_data) < EXTERNAL_MIN_BYTES:
                    continue
                key = hashlib.sha256(f"{t.data_type}:{list(t.dims)}:".encode() + t.raw_data).digest()
                if key not in stored:
                    offset = _aligned(end, len(t.raw_data))
                    data.write(b"\0" * (offset - end))
                    data.write(t.raw_data)
                    end = offset + len(t.raw_data)
                    stored[key] = (offset, len(t.raw_data))
                offset, length = stored[key]
                t.ClearField("raw_data")
                t.data_location = TensorProto.EXTERNAL
                del t.external_data[:]
                for k, v in (("location", WEIGHTS), ("offset", str(offset)), ("length", str(length))):
                    entry = t.external_data.add()
                    entry.key, entry.value = k, v
            copies[name] = copy
    written = []
    for name, copy in copies.items():
        path = folder / f"{name}.onnx"
        path.write_bytes(copy.SerializeToString())
        written.append(path)
    if stored:
        if written:  # readable by whoever can read the graphs
            data_path.chmod(written[0].stat().st_mode & 0o777)
        written.append(data_path)
    else:
        data_path.unlink()
    return written


def load_structure(folder: Path, names) -> dict[str, onnx.ModelProto]:
    """The graphs :func:`save_graphs` wrote to ``folder``, loaded without the tensors it put in
    the weights file (those stay references to it): their nodes, inputs, outputs and small
    constants, for whatever reads the graphs' structure once they are on disk."""
    return {name: onnx.load(str(folder / f"{name}.onnx"), load_external_data=False) for name in names}
