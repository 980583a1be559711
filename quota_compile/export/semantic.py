"""The semantic ONNX graph: every ``quota::`` operator of a traced program as one node.

The exporter (:func:`quota_compile.export.onnx.export_onnx`) does not write the ``quota::``
operators as their ONNX arithmetic directly. It first translates each into a single node of
the :data:`SEMANTIC_DOMAIN` domain that carries the operator's inputs and attributes (a W4A4
Linear is one ``quota.w4a4_linear(x, packed, scale)`` node with ``k``, ``n``, ``group_size``
and ``clip_ratio``). That graph is the one every ONNX flavour starts from; a flavour is a set of
*rules*, one per operator, that :func:`expand` applies node by node: a rule receives the node's
inputs and attributes and returns the values that replace its outputs, built with the
ONNX-Script opsets as a translation would (``op.MatMul(a, b)``).

The portable rules are the translations of :mod:`quota_compile.export.onnx_translation`
(:data:`PORTABLE_RULES`). Applied to the semantic graph they give the graph the exporter
would have written with those translations inline, node for node: the rule's nodes take the
semantic node's place and metadata, its outputs take the semantic outputs' names, types and
shapes, and each output's producer is named after it as the exporter names a translation's
(``node_<output>``). Only the generated names of the rule's internal nodes and values differ
(``node_Abs_96`` for ``node_Abs_95``): the IR numbers them in the order they are created.

A rule returns as many values as the operator has outputs, each made by a node of the rule's
(not one of its inputs: the output takes over the value's name).
"""

from __future__ import annotations

import contextvars
import inspect
import typing
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir
import onnxscript
from onnxscript import evaluator

from quota_compile.export import onnx_translation as portable
from quota_compile.export.onnx_translation import op as onnx_translation_op

SEMANTIC_DOMAIN = "quota"
SEMANTIC_VERSION = 1

# operator -> number of outputs (the others write one)
_OUTPUTS = {"quantize_kv": 3}
_TENSORS = [f"tensor({t})" for t in ("float", "float16", "bfloat16", "uint8", "int8", "int32", "int64")]


# the default-domain opset of the model :func:`expand` is translating (for a rule that exports)
_MODEL_OPSET: contextvars.ContextVar[int] = contextvars.ContextVar("quota_model_opset", default=21)


def model_opset() -> int:
    """The standard-domain opset of the model whose semantic nodes are being translated (a rule
    that has something exported writes it at that opset)."""
    return _MODEL_OPSET.get()


class SemanticError(RuntimeError):
    """A semantic node without a rule, or a rule that broke the operator's contract (a bug)."""


def _parameters(fn: Callable) -> list[tuple[inspect.Parameter, type | None]]:
    """A portable translation's parameters, each with its attribute type (``int`` / ``float``
    annotations) or None for an input."""
    hints = typing.get_type_hints(fn)
    return [(p, hints.get(p.name) if hints.get(p.name) in (int, float) else None) for p in inspect.signature(fn).parameters.values()]


def _schema(name: str, fn: Callable) -> onnx.defs.OpSchema:
    """The ``quota.<name>`` schema from a portable translation's signature (:func:`_parameters`)."""
    inputs, attributes = [], []
    kinds = {int: onnx.defs.OpSchema.AttrType.INT, float: onnx.defs.OpSchema.AttrType.FLOAT}
    for p, kind in _parameters(fn):
        if kind is None:
            inputs.append(onnx.defs.OpSchema.FormalParameter(p.name, f"T{len(inputs)}"))
        else:
            attributes.append(onnx.defs.OpSchema.Attribute(p.name, kinds[kind], p.name))
    outputs = [onnx.defs.OpSchema.FormalParameter(f"out{i}", f"U{i}") for i in range(_OUTPUTS.get(name, 1))]
    constraints = [(t, _TENSORS, "any tensor") for t in [p.type_str for p in inputs + outputs]]
    return onnx.defs.OpSchema(name, SEMANTIC_DOMAIN, SEMANTIC_VERSION, inputs=inputs, outputs=outputs, attributes=attributes,
                              type_constraints=constraints)


def custom_op(domain: str, name: str, inputs: Sequence[str], outputs: int = 1,
              attributes: Sequence[tuple[str, onnx.defs.OpSchema.AttrType]] = ()) -> onnxscript.values.Op:
    """An ONNX-Script operator of another domain (e.g. a runtime's own, ``com.microsoft``) for
    a rule to call like a standard one; its attributes are written in the order given."""
    schema = onnx.defs.OpSchema(
        name, domain, 1,
        inputs=[onnx.defs.OpSchema.FormalParameter(p, f"T{i}") for i, p in enumerate(inputs)],
        outputs=[onnx.defs.OpSchema.FormalParameter(f"out{i}", f"U{i}") for i in range(outputs)],
        attributes=[onnx.defs.OpSchema.Attribute(a, kind, a) for a, kind in attributes],
        type_constraints=[(f"T{i}", _TENSORS, "any tensor") for i in range(len(inputs))]
        + [(f"U{i}", _TENSORS, "any tensor") for i in range(outputs)],
    )
    return onnxscript.values.Op(onnxscript.values.Opset(domain, 1), name, schema)


def constant(array: np.ndarray):
    """A rule's constant (an initializer once the graph is simplified: the simplification lifts
    Constants into initializers), of exactly ``array``'s shape (a scalar stays a scalar)."""
    return onnx_translation_op.Constant(value=ir.tensor(np.array(array, order="C")))


def constant_data(value: ir.Value | None, what: str, error: type[Exception] = SemanticError) -> np.ndarray:
    """The data of a semantic node's constant input (a packed weight, its scales), or ``error``
    naming ``what`` where the input is not a constant of the graph."""
    if value is None or value.const_value is None:
        raise error(f"{what} {getattr(value, 'name', None)!r} is not a constant of the graph")
    return value.const_value.numpy()


# The portable translation of each quota:: operator, by the operator's name.
PORTABLE_RULES: dict[str, Callable] = {
    "select_topk": portable.select_topk,
    "qdq_per_token": portable.qdq_per_token,
    "w4a4_linear": portable.w4a4_linear,
    "dequantize_int4": portable.dequantize_int4,
    "dequantize_int4_rows": portable.dequantize_int4_rows,
    "quantize_kv": portable.quantize_kv,
    "dequantize_kv": portable.dequantize_kv,
    "quantize_kv_static": portable.quantize_kv_static,
    "dequantize_kv_static": portable.dequantize_kv_static,
    "decode_attention": portable.decode_attention,
}

_opset = onnxscript.values.Opset(SEMANTIC_DOMAIN, SEMANTIC_VERSION)
_SEMANTIC_OPS = {name: onnxscript.values.Op(_opset, name, _schema(name, fn)) for name, fn in PORTABLE_RULES.items()}


def _semantic_translation(name: str, fn: Callable) -> Callable:
    """An exporter translation with ``fn``'s signature that writes one ``quota.<name>`` node."""
    params = _parameters(fn)
    signature = inspect.Signature([p for p, _ in params])
    op = _SEMANTIC_OPS[name]

    def translation(*args, **kwargs):
        bound = signature.bind(*args, **kwargs).arguments
        return op(*[bound[p.name] for p, kind in params if kind is None],
                  **{p.name: bound[p.name] for p, kind in params if kind is not None})

    translation.__name__ = f"semantic_{name}"
    translation.__signature__ = signature  # the exporter reads inputs / attributes from it
    translation.__annotations__ = {p.name: kind for p, kind in params if kind is not None}
    return translation


def translation_table() -> dict:
    """``torch.onnx.export``'s ``custom_translation_table``: each ``quota::`` operator as its
    semantic node."""
    import torch

    from quota_compile.kernels import ops as kernel_ops  # noqa: F401  (registers torch.ops.quota.w4a4_linear)
    from quota_compile.pruning import score  # noqa: F401  (registers torch.ops.quota.select_topk)
    from quota_compile.quant import attention  # noqa: F401  (registers torch.ops.quota.decode_attention)
    from quota_compile.quant import ops  # noqa: F401  (registers the torch.ops.quota namespace)

    return {getattr(torch.ops.quota, name).default: _semantic_translation(name, fn) for name, fn in PORTABLE_RULES.items()}


class _Recorder:
    """An ONNX-Script evaluator that records each operator call as an ``ir.Node`` (in call
    order) instead of running it; what a rule builds."""

    def __init__(self):
        self.nodes: list[ir.Node] = []

    def eval(self, schema: onnx.defs.OpSchema, args: Sequence, kwargs: Mapping):
        # in the schema's attribute order, as the exporter writes a translation's nodes
        order = {name: i for i, name in enumerate(schema.attributes)}
        attributes = dict(sorted(((k, v) for k, v in kwargs.items() if v is not None), key=lambda kv: order.get(kv[0], len(order))))
        outputs = len(schema.outputs)
        if schema.outputs and schema.outputs[-1].option == onnx.defs.OpSchema.FormalParameterOption.Variadic:
            if "num_outputs" not in attributes:
                raise SemanticError(f"{schema.name}: a variadic output count needs num_outputs")
            outputs = int(attributes["num_outputs"])
        inputs = list(args)
        while inputs and inputs[-1] is None:
            inputs.pop()
        node = ir.Node(schema.domain, schema.name, inputs, ir.convenience.convert_attributes(attributes), num_outputs=outputs)
        self.nodes.append(node)
        return node.outputs[0] if outputs == 1 else tuple(node.outputs)


def semantic_nodes(graph: ir.Graph) -> list[ir.Node]:
    return [n for n in graph if n.domain == SEMANTIC_DOMAIN]


def expand(model: ir.Model, rules: Mapping[str, Callable]) -> int:
    """Replace every semantic node of ``model`` (in place) by what its rule builds; returns the
    number of nodes replaced. Domains the rules use are imported at version 1 where the model
    does not import them yet; the semantic domain's import goes."""
    token = _MODEL_OPSET.set(model.opset_imports.get("", _MODEL_OPSET.get()))
    try:
        replaced = _expand(model, rules)
    finally:
        _MODEL_OPSET.reset(token)
    if not semantic_nodes(model.graph):
        model.opset_imports.pop(SEMANTIC_DOMAIN, None)
    return replaced


def _expand(model: ir.Model, rules: Mapping[str, Callable]) -> int:
    graph = model.graph
    replaced = 0
    for node in semantic_nodes(graph):
        rule = rules.get(node.op_type)
        if rule is None:
            raise SemanticError(f"no rule for {SEMANTIC_DOMAIN}.{node.op_type} ({node.name})")
        recorder = _Recorder()
        attrs = {name: attr.value for name, attr in node.attributes.items()}
        with evaluator.default_as(recorder):
            result = rule(*node.inputs, **attrs)
        values = list(result) if isinstance(result, (tuple, list)) else [result]
        if len(values) != len(node.outputs):
            raise SemanticError(f"the rule for {node.op_type} returned {len(values)} values for {len(node.outputs)} outputs")
        for new in recorder.nodes:
            new.metadata_props.update(node.metadata_props)
            for key, value in node.meta.items():
                new.meta.setdefault(key, value)
        made = set(map(id, recorder.nodes))
        if any(v.producer() is None or id(v.producer()) not in made for v in values):
            raise SemanticError(f"the rule for {node.op_type} returned a value it did not make ({node.name})")
        ir.convenience.replace_nodes_and_values(graph, node, [node], recorder.nodes, list(node.outputs), values)
        for v in values:  # the exporter's naming of a translation's outputs
            v.producer().name = f"node_{v.name}"
        for new in recorder.nodes:
            if new.domain and new.domain not in model.opset_imports:
                model.opset_imports[new.domain] = 1
        replaced += 1
    return replaced


# --------------------------------------------------------------------------------------------
# Joins: a semantic node and its direct reader as one node, for a flavour whose form spans both.


def _attrs(node: ir.Node) -> dict:
    return {name: attr.value for name, attr in node.attributes.items()}


def _semantic_producer(value, op_type: str) -> ir.Node | None:
    p = value.producer() if value is not None else None
    return p if p is not None and p.domain == SEMANTIC_DOMAIN and p.op_type == op_type else None


def _constant_vector(value, n: int) -> bool:
    return value is not None and value.const_value is not None and tuple(value.const_value.shape) == (n,)


def join_readers(model: ir.Model, kinds: Sequence[str]) -> int:
    """Join semantic nodes with their direct reader where a flavour translates the two as one
    (in place), for the joins named in ``kinds``:

    - ``quantized_matmul``: ``MatMul(qdq_per_token(x), dequantize_int4(...))``, a Linear with
      8-bit activations (``fuse_w4a4_linear`` leaves those in pieces), inputs ``(x, packed,
      scale)``, attributes ``bits``, ``clip_ratio``, ``k``, ``n``, ``group_size``;
    - ``int4_matmul``: ``MatMul(x, dequantize_int4(...))``, a weight-only Linear;
    - ``int4_gather``: ``Gather(dequantize_int4_rows(...), ids, axis=0)``, an INT4 embedding
      lookup, inputs ``(packed, ids, scale)``;
    - ``linear_bias``: ``Add(w4a4_linear(...), bias)`` with a constant bias ``[n]`` that is the
      Linear's only reader (and the Linear's output no graph output) becomes
      ``w4a4_linear_bias``, inputs ``(x, packed, scale, bias)``; the same after a
      ``quantized_matmul`` join, ``quantized_matmul_bias``.

    - ``kv_decode_attention``: ``decode_attention`` over a quantized cache: its past keys and
      values each ``dequantize_kv`` of stored codes, its new key and value each the
      ``dequantize_kv`` of a ``quantize_kv`` whose outputs nothing else reads (the graph's
      ``present`` outputs aside). It becomes ``kv_decode_attention``, inputs ``(q, k, v, bias,
      past_key, past_key_scale, past_key_zero_point, past_value, past_value_scale,
      past_value_zero_point)``, outputs ``(attention, key, key_scale, key_zero_point, value,
      value_scale, value_zero_point)``; with the static quantizers (``per_channel``; the past's
      and the new entries' scales equal), ``kv_decode_attention_static``, inputs ``(q, k, v,
      bias, past_key, past_value, key_scale, value_scale)``, outputs ``(attention, key,
      value)``. Attributes ``bits``, ``sm_scale``. ``k`` / ``v`` are the new token's float key
      and value, the outputs the new cache entries.

    A producer that nothing reads any more goes. The joined node carries the activation
    quantizer's provenance stamps where it joins one (its codes are what the verification
    observes), else the reader's. :data:`JOINED_RULES` are the joins' portable forms. Returns
    the number of joins."""
    graph = model.graph
    outputs = set(map(id, graph.outputs))
    joined = 0
    for node in list(graph):
        new, sources, stamps = None, [], node
        if node.domain in ("", "ai.onnx") and node.op_type == "MatMul" and (deq := _semantic_producer(node.inputs[1], "dequantize_int4")) is not None:
            qdq = _semantic_producer(node.inputs[0], "qdq_per_token")
            if qdq is not None and "quantized_matmul" in kinds:
                act = _attrs(qdq)
                new = ir.Node(SEMANTIC_DOMAIN, "quantized_matmul", [qdq.inputs[0], *deq.inputs],
                              ir.convenience.convert_attributes({"bits": act["bits"], "clip_ratio": act["clip_ratio"], **_attrs(deq)}))
                sources, stamps = [deq, qdq], qdq
            elif qdq is None and "int4_matmul" in kinds:
                new = ir.Node(SEMANTIC_DOMAIN, "int4_matmul", [node.inputs[0], *deq.inputs], ir.convenience.convert_attributes(_attrs(deq)))
                sources = [deq]
        elif (node.domain in ("", "ai.onnx") and node.op_type == "Gather" and "int4_gather" in kinds and _attrs(node).get("axis", 0) == 0
              and (deq := _semantic_producer(node.inputs[0], "dequantize_int4_rows")) is not None):
            new = ir.Node(SEMANTIC_DOMAIN, "int4_gather", [deq.inputs[0], node.inputs[1], deq.inputs[1]], ir.convenience.convert_attributes(_attrs(deq)))
            sources = [deq]
        elif node.domain in ("", "ai.onnx") and node.op_type == "Add" and "linear_bias" in kinds:
            for i, value in enumerate(node.inputs[:2]):
                linear = _semantic_producer(value, "w4a4_linear") or _semantic_producer(value, "quantized_matmul")
                bias = node.inputs[1 - i]
                if (linear is not None and len(value.uses()) == 1 and id(value) not in outputs
                        and _constant_vector(bias, _attrs(linear)["n"])):
                    new = ir.Node(SEMANTIC_DOMAIN, f"{linear.op_type}_bias", [*linear.inputs, bias], ir.convenience.convert_attributes(_attrs(linear)))
                    sources, stamps = [linear], linear
                    break
        elif node.domain == SEMANTIC_DOMAIN and node.op_type == "decode_attention" and "kv_decode_attention" in kinds:
            if _join_cache_attention(graph, node):
                joined += 1
            continue
        if new is None:
            continue
        new.metadata_props.update(stamps.metadata_props)
        ir.convenience.replace_nodes_and_values(graph, node, [node], [new], list(node.outputs), list(new.outputs))
        for source in sources:
            if source.graph is graph and all(not out.uses() for out in source.outputs):
                graph.remove(source, safe=True)
        joined += 1
    return joined


_CACHE_OPS = {"dequantize_kv": "quantize_kv", "dequantize_kv_static": "quantize_kv_static"}


def _only_reader(value, reader: ir.Node) -> bool:
    return not value.is_graph_output() and all(user is reader for user, _ in value.uses())


def _same_constant(a, b) -> bool:
    if a is b:
        return True
    if a is None or b is None or a.const_value is None or b.const_value is None:
        return False
    x, y = a.const_value.numpy(), b.const_value.numpy()
    return x.dtype == y.dtype and x.shape == y.shape and bool(np.array_equal(x, y))


def _join_cache_attention(graph: ir.Graph, attention: ir.Node) -> bool:
    """The ``kv_decode_attention`` join of :func:`join_readers` for one ``decode_attention``
    node; False (nothing changed) where its inputs are not the quantized cache's form."""
    q, k_past, k_read, v_past, v_read, bias = attention.inputs
    readers = [p.producer() if p is not None else None for p in (k_past, k_read, v_past, v_read)]
    if any(r is None or r.domain != SEMANTIC_DOMAIN or r.op_type not in _CACHE_OPS for r in readers):
        return False
    if len({r.op_type for r in readers}) != 1 or any(not _only_reader(r.outputs[0], attention) for r in readers):
        return False
    dequantize = readers[0].op_type
    static = dequantize == "dequantize_kv_static"
    stored = 1 if static else 3  # codes (, scale, zero point)
    bits = _attrs(readers[0]).get("bits")
    quantizers = []
    for r in (readers[1], readers[3]):
        qz = r.inputs[0].producer() if r.inputs[0] is not None else None
        if (qz is None or qz.domain != SEMANTIC_DOMAIN or qz.op_type != _CACHE_OPS[dequantize]
                or list(r.inputs[:stored]) != list(qz.outputs) or any(u is not r for o in qz.outputs for u, _ in o.uses())):
            return False
        if static and not _same_constant(r.inputs[1], qz.inputs[1]):
            return False
        quantizers.append(qz)
    if any(_attrs(n).get("bits") != bits for n in (*readers, *quantizers)):
        return False
    k_quant, v_quant = quantizers
    if static:
        if not (_same_constant(readers[0].inputs[1], k_quant.inputs[1]) and _same_constant(readers[2].inputs[1], v_quant.inputs[1])):
            return False
        inputs = [q, k_quant.inputs[0], v_quant.inputs[0], bias, readers[0].inputs[0], readers[2].inputs[0], k_quant.inputs[1], v_quant.inputs[1]]
        op_type = "kv_decode_attention_static"
    else:
        inputs = [q, k_quant.inputs[0], v_quant.inputs[0], bias, *readers[0].inputs[:3], *readers[2].inputs[:3]]
        op_type = "kv_decode_attention"
    old_values = [attention.outputs[0], *k_quant.outputs, *v_quant.outputs]
    new = ir.Node(SEMANTIC_DOMAIN, op_type, inputs, ir.convenience.convert_attributes({"bits": bits, **_attrs(attention)}),
                  num_outputs=len(old_values))
    new.metadata_props.update(attention.metadata_props)
    ir.convenience.replace_nodes_and_values(graph, attention, [attention], [new], old_values, list(new.outputs))
    graph.remove(readers, safe=True)
    graph.remove(quantizers, safe=True)
    return True


def _shaped_like(codes, x, bits: int):
    """``codes`` (a rule's new value) with the shape of the cache entries of ``x``: the last axis
    halved for INT4 (the portable dequantizers read the static size of that axis)."""
    if x.shape is not None and isinstance(x.shape[-1], int):
        codes.shape = ir.Shape([*x.shape[:-1], x.shape[-1] // 2 if bits == 4 else x.shape[-1]])
    return codes


def _dequantized(value, past_or_new, x):
    """A dequantized cache value of the joined forms below, given the float type and shape
    :func:`~quota_compile.export.onnx_translation.decode_attention` reads: ``past_or_new``'s
    shape (the stored codes, or the new entry) with ``x``'s last axis (the head size)."""
    value.type = x.type
    if past_or_new.shape is not None and x.shape is not None:
        value.shape = ir.Shape([*past_or_new.shape[:-1], x.shape[-1]])
    return value


def _kv_decode_attention(q, k, v, bias, past_key, past_key_scale, past_key_zero_point, past_value, past_value_scale,
                         past_value_zero_point, bits: int, sm_scale: float):
    kc, ks, kz = portable.quantize_kv(k, bits)
    vc, vs, vz = portable.quantize_kv(v, bits)
    kc, vc = _shaped_like(kc, k, bits), _shaped_like(vc, v, bits)
    out = portable.decode_attention(q, _dequantized(portable.dequantize_kv(past_key, past_key_scale, past_key_zero_point, bits), past_key, k),
                                    _dequantized(portable.dequantize_kv(kc, ks, kz, bits), k, k),
                                    _dequantized(portable.dequantize_kv(past_value, past_value_scale, past_value_zero_point, bits), past_value, v),
                                    _dequantized(portable.dequantize_kv(vc, vs, vz, bits), v, v), bias, sm_scale)
    return out, kc, ks, kz, vc, vs, vz


def _kv_decode_attention_static(q, k, v, bias, past_key, past_value, key_scale, value_scale, bits: int, sm_scale: float):
    kc, vc = _shaped_like(portable.quantize_kv_static(k, key_scale, bits), k, bits), _shaped_like(portable.quantize_kv_static(v, value_scale, bits), v, bits)
    out = portable.decode_attention(q, _dequantized(portable.dequantize_kv_static(past_key, key_scale, bits), past_key, k),
                                    _dequantized(portable.dequantize_kv_static(kc, key_scale, bits), k, k),
                                    _dequantized(portable.dequantize_kv_static(past_value, value_scale, bits), past_value, v),
                                    _dequantized(portable.dequantize_kv_static(vc, value_scale, bits), v, v), bias, sm_scale)
    return out, kc, vc


def _quantized_matmul(x, packed, scale, bits: int, clip_ratio: float, k: int, n: int, group_size: int):
    return portable.op.MatMul(portable.qdq_per_token(x, bits, clip_ratio), portable.dequantize_int4(packed, scale, k, n, group_size))


def _int4_matmul(x, packed, scale, k: int, n: int, group_size: int):
    return portable.op.MatMul(x, portable.dequantize_int4(packed, scale, k, n, group_size))


def _int4_gather(packed, indices, scale, v: int, d: int, group_size: int):
    return portable.op.Gather(portable.dequantize_int4_rows(packed, scale, v, d, group_size), indices, axis=0)


def _w4a4_linear_bias(x, packed, scale, bias, k: int, n: int, group_size: int, clip_ratio: float):
    return portable.op.Add(portable.w4a4_linear(x, packed, scale, k, n, group_size, clip_ratio), bias)


def _quantized_matmul_bias(x, packed, scale, bias, bits: int, clip_ratio: float, k: int, n: int, group_size: int):
    return portable.op.Add(_quantized_matmul(x, packed, scale, bits, clip_ratio, k, n, group_size), bias)


# The portable form of each join of :func:`join_readers` (what the two nodes were).
JOINED_RULES: dict[str, Callable] = {
    "quantized_matmul": _quantized_matmul,
    "int4_matmul": _int4_matmul,
    "int4_gather": _int4_gather,
    "w4a4_linear_bias": _w4a4_linear_bias,
    "quantized_matmul_bias": _quantized_matmul_bias,
    "kv_decode_attention": _kv_decode_attention,
    "kv_decode_attention_static": _kv_decode_attention_static,
}
