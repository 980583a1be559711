"""ONNX lowerings of the ``quota::`` custom ops (portable flavour: standard ONNX ops only).

The semantic operator ``w4a4_linear`` (one W4A4 Linear, :mod:`passes.fuse_w4a4_linear`) is
written as its pieces: the per-token activation Q/DQ, the INT4 weight's dequantization and a
``MatMul``.

Each function mirrors its PyTorch definition in :mod:`quota_compile.quant.ops` operation for
operation, so the integers agree bit for bit. They are the portable rules of the semantic graph
(:data:`quota_compile.export.semantic.PORTABLE_RULES`): the exporter writes each ``quota::``
operator as one semantic node, and each function replaces such a node by its arithmetic.

INT4 weights are the one thing a translation cannot express directly: the packed ``uint8``
buffer must become an ``INT4`` initializer (the same bytes, reinterpreted). The translation
emits a marker node ``quota_compile.lowering::Int4Weight`` that
:func:`quota_compile.export.onnx.materialize_int4_weights` replaces by that initializer right after
export; no marker survives into a written graph.
"""

from __future__ import annotations

import contextlib
import functools
import io
import warnings

import onnx
import onnxscript
from onnxscript import ir
from onnxscript import opset21 as op

from quota_compile.quant.ops import SCALE_EPS

MARKER_DOMAIN = "quota_compile.lowering"
_marker = onnxscript.values.Opset(MARKER_DOMAIN, 1)
_int4_weight = onnxscript.values.Op(
    _marker,
    "Int4Weight",
    onnx.defs.OpSchema(
        "Int4Weight",
        MARKER_DOMAIN,
        1,
        inputs=[onnx.defs.OpSchema.FormalParameter("packed", "tensor(uint8)")],
        outputs=[onnx.defs.OpSchema.FormalParameter("codes", "tensor(int4)")],
        attributes=[onnx.defs.OpSchema.Attribute("shape", onnx.defs.OpSchema.AttrType.INTS, "codes shape")],
    ),
)


def _last_dim(x) -> int:
    dim = x.shape[-1] if x.shape is not None else None
    if not isinstance(dim, int):
        raise ValueError("the quantized axis must have a static size in the traced graph")
    return dim


def token_scale(x, bits: int, clip_ratio: float):
    """The per-token scale of :func:`qdq_per_token`: ``max(clip_ratio * max|x| / qmax, eps)``
    over the last axis (kept)."""
    qmax = float(2 ** (bits - 1) - 1)
    amax = op.ReduceMax(op.Abs(x), op.Constant(value_ints=[-1]), keepdims=1)
    if clip_ratio != 1.0:
        amax = op.Mul(amax, op.Constant(value_float=clip_ratio))
    return op.Max(op.Div(amax, op.Constant(value_float=qmax)), op.Constant(value_float=SCALE_EPS))


def qdq_per_token(x, bits: int, clip_ratio: float):
    k = _last_dim(x)
    scale = token_scale(x, bits, clip_ratio)
    qtype = ir.DataType.INT4 if bits == 4 else ir.DataType.INT8
    q = op.QuantizeLinear(x, scale, axis=-1, block_size=k, output_dtype=qtype)
    return op.DequantizeLinear(q, scale, axis=-1, block_size=k)


def int4_codes(packed, k: int, n: int):
    """The INT4 codes ``[k, n]`` of a packed weight: a marker that becomes an INT4 initializer of
    the same bytes after export."""
    return _int4_weight(packed, shape=[k, n])


def dequantize_int4(packed, scale, k: int, n: int, group_size: int):
    codes = int4_codes(packed, k, n)
    return op.DequantizeLinear(codes, scale, axis=0, block_size=group_size)


def dequantize_int4_rows(packed, scale, v: int, d: int, group_size: int):
    codes = _int4_weight(packed, shape=[v, d])
    return op.DequantizeLinear(codes, scale, axis=1, block_size=group_size)


def w4a4_linear(x, packed, scale, k: int, n: int, group_size: int, clip_ratio: float):
    # The portable form of the semantic operator: the per-token INT4 Q/DQ pair, the INT4
    # weight's DequantizeLinear and a float MatMul. Linears that read the same input (Q/K/V,
    # gate/up) write the same Q/DQ pair; the exporter's common-subexpression pass keeps one.
    return op.MatMul(qdq_per_token(x, 4, clip_ratio), dequantize_int4(packed, scale, k, n, group_size))


def _pack_nibbles(q, d: int):
    """uint8 codes ``[B, H, T, D]`` -> ``[B, H, T, D/2]``, even channel in the low nibble."""
    pairs = op.Reshape(q, op.Constant(value_ints=[0, 0, 0, d // 2, 2]))
    low, high = op.Split(pairs, axis=-1, num_outputs=2)
    high = op.BitShift(high, op.Constant(value=ir.tensor([4], dtype=ir.DataType.UINT8)), direction="LEFT")
    return op.Squeeze(op.BitwiseOr(low, high), op.Constant(value_ints=[-1]))


def _unpack_nibbles(codes):
    """Inverse of :func:`_pack_nibbles`: ``[B, H, T, D/2]`` -> uint8 codes ``[B, H, T, D]``."""
    packed_d = _last_dim(codes)
    low = op.BitwiseAnd(codes, op.Constant(value=ir.tensor([15], dtype=ir.DataType.UINT8)))
    high = op.BitShift(codes, op.Constant(value=ir.tensor([4], dtype=ir.DataType.UINT8)), direction="RIGHT")
    last = op.Constant(value_ints=[-1])
    pairs = op.Concat(op.Unsqueeze(low, last), op.Unsqueeze(high, last), axis=-1)
    return op.Reshape(pairs, op.Constant(value_ints=[0, 0, 0, packed_d * 2]))


def quantize_kv(x, bits: int):
    d = _last_dim(x)
    qmax = float(2**bits - 1)
    axis = op.Constant(value_ints=[-1])
    zero = op.Constant(value_float=0.0)
    lo = op.Min(op.ReduceMin(x, axis, keepdims=1), zero)
    hi = op.Max(op.ReduceMax(x, axis, keepdims=1), zero)
    scale = op.Max(op.Div(op.Sub(hi, lo), op.Constant(value_float=qmax)), op.Constant(value_float=SCALE_EPS))
    qtype = ir.DataType.UINT4 if bits == 4 else ir.DataType.UINT8
    # round(-lo / scale) saturated to [0, qmax]: exactly a QuantizeLinear with zero point 0.
    zero_point = op.QuantizeLinear(op.Neg(lo), scale, axis=-1, block_size=1, output_dtype=qtype)
    q = op.QuantizeLinear(x, scale, zero_point, axis=-1, block_size=d)
    if bits == 4:
        q = op.Cast(q, to=ir.DataType.UINT8)
        zero_point = op.Cast(zero_point, to=ir.DataType.UINT8)
        q = _pack_nibbles(q, d)
    return q, scale, zero_point


def dequantize_kv(codes, scale, zero_point, bits: int):
    d = _last_dim(codes) * (2 if bits == 4 else 1)
    if bits == 4:
        codes = _unpack_nibbles(codes)
    return op.DequantizeLinear(codes, scale, zero_point, axis=-1, block_size=d)


def quantize_kv_static(x, scale, bits: int):
    d = _last_dim(x)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    q = op.Clip(op.Round(op.Div(x, scale)), op.Constant(value_float=float(qmin)), op.Constant(value_float=float(qmax)))
    codes = op.Cast(op.Sub(q, op.Constant(value_float=float(qmin))), to=ir.DataType.UINT8)
    return _pack_nibbles(codes, d) if bits == 4 else codes


def dequantize_kv_static(codes, scale, bits: int):
    qmin = -(2 ** (bits - 1))
    if bits == 4:
        codes = _unpack_nibbles(codes)
    return op.Mul(op.Add(op.Cast(codes, to=ir.DataType.FLOAT), op.Constant(value_float=float(qmin))), scale)


def select_topk(score, k: int):
    # TopK returns the k largest, the lower index first among equal values (ONNX spec);
    # a second TopK (smallest first) puts the kept indices in ascending order.
    kk = op.Constant(value_ints=[k])
    _, keep = op.TopK(score, kk, axis=-1, largest=1, sorted=1)
    ordered, _ = op.TopK(keep, kk, axis=-1, largest=0, sorted=1)
    return ordered


# --------------------------------------------------------------------------------------------
# quota::decode_attention: the exporter's translation of its PyTorch definition, replayed.

_TORCH_DTYPES = {ir.DataType.FLOAT: "float32", ir.DataType.FLOAT16: "float16", ir.DataType.BFLOAT16: "bfloat16"}


def static_dim(values, axis: int, what: str, error: type[Exception] = ValueError) -> int:
    """The static size of ``axis`` of the first of ``values`` (4-D tensors of a semantic node)
    whose shape says it, or ``error`` naming ``what`` (a rule that needs head counts or the head
    size as attributes)."""
    for value in values:
        dim = value.shape[axis] if value.shape is not None and len(value.shape) == 4 else None
        if isinstance(dim, int):
            return dim
    raise error(f"{what} (axis {axis} of {[v.name for v in values]}) has no static size in the graph")


def _dtype(value) -> str:
    dtype = value.type.dtype if value.type is not None else None
    if dtype not in _TORCH_DTYPES:
        raise ValueError(f"decode_attention: {value.name!r} has dtype {dtype}, not a float type")
    return _TORCH_DTYPES[dtype]


@functools.lru_cache(maxsize=None)
def reference_graph(heads: int, kv_heads: int, head_dim: int, sm_scale: float, dtypes: tuple[str, ...],
                    bias_batch: int | None, opset: int) -> ir.Graph:
    """The ONNX graph ``torch.onnx.export`` writes for
    :func:`~quota_compile.quant.attention.decode_attention_reference` with these head counts,
    head size, scale and input dtypes (``q, k_past, k_new, v_past, v_new, bias``), the batch
    and the past length dynamic (``bias_batch``: the bias's static batch, or None: the
    batch); the graph's inputs are its six tensors. Exported once per distinct signature per
    process (read it, do not edit it)."""
    import torch
    from torch.export import Dim

    from quota_compile.quant.attention import decode_attention_reference

    class Reference(torch.nn.Module):
        def forward(self, q, k_past, k_new, v_past, v_new, bias):
            return decode_attention_reference(q, k_past, k_new, v_past, v_new, bias, sm_scale)

    batch, past = 2, 3
    q_t, kp_t, kn_t, vp_t, vn_t, bias_t = (getattr(torch, d) for d in dtypes)
    args = (torch.zeros(batch, heads, 1, head_dim, dtype=q_t), torch.zeros(batch, kv_heads, past, head_dim, dtype=kp_t),
            torch.zeros(batch, kv_heads, 1, head_dim, dtype=kn_t), torch.zeros(batch, kv_heads, past, head_dim, dtype=vp_t),
            torch.zeros(batch, kv_heads, 1, head_dim, dtype=vn_t),
            torch.zeros(bias_batch or batch, 1, 1, past + 1, dtype=bias_t))
    b, s = Dim("batch", min=1), Dim("past", min=1)
    dynamic = ({0: b}, {0: b, 2: s}, {0: b}, {0: b, 2: s}, {0: b}, {3: s + 1} if bias_batch else {0: b, 3: s + 1})
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(Reference(), args, dynamo=True, dynamic_shapes=dynamic, opset_version=opset,
                                    input_names=["q", "k_past", "k_new", "v_past", "v_new", "bias"], output_names=["out"],
                                    optimize=False, verbose=False)
    graph = program.model.graph
    if graph.initializers or any(n.domain not in ("", "ai.onnx") for n in graph):
        raise RuntimeError("decode_attention: the exported reference is not plain standard ONNX nodes")
    return graph


def _replay(graph: ir.Graph, inputs, opset: int) -> list:
    """Write ``graph``'s nodes again through the current evaluator (a rule's recorder), on
    ``inputs`` instead of the graph's inputs; the values of its outputs. Attributes are passed
    as they are; the caller's dimensions replace the exported graph's symbolic ones
    (``batch``, ``past``) in the copied value types and shapes."""
    values = {id(g): v for g, v in zip(graph.inputs, inputs)}
    symbols: dict[str, object] = {}
    for g, v in zip(graph.inputs, inputs):
        for gd, vd in zip(g.shape or (), v.shape or ()):
            if isinstance(gd, ir.SymbolicDim) and gd.value is not None:
                symbols.setdefault(gd.value, vd)

    def shape_of(g):
        if g.shape is None:
            return None
        dims = []
        for d in g.shape:
            if isinstance(d, ir.SymbolicDim):
                mapped = symbols.get(d.value)
                dims.append(mapped if mapped is not None else None)
            else:
                dims.append(d)
        return ir.Shape(dims)

    ops = onnxscript.values.Opset("", opset)
    for node in graph:
        schema = onnx.defs.get_schema(node.op_type, opset, "")
        result = onnxscript.values.Op(ops, node.op_type, schema)(*[values[id(i)] if i is not None else None for i in node.inputs],
                                                                   **{name: ir.Attr(name, a.type, a.value) for name, a in node.attributes.items()})
        made = [result] if len(node.outputs) == 1 else list(result)
        for g, v in zip(node.outputs, made):
            values[id(g)] = v
            v.type = g.type
            v.shape = shape_of(g)
    return [values[id(o)] for o in graph.outputs]


def decode_attention(q, k_past, k_new, v_past, v_new, bias, sm_scale: float):
    """``quota::decode_attention`` as the exporter's own translation of its PyTorch definition
    (:func:`reference_graph`), replayed on the node's inputs: the attention's arithmetic is
    written once, in :mod:`quota_compile.quant.attention`."""
    from quota_compile.export.semantic import model_opset

    inputs = (q, k_past, k_new, v_past, v_new, bias)
    bias_batch = bias.shape[0] if bias.shape is not None and bias.shape[0] == 1 else None
    opset = model_opset()
    graph = reference_graph(static_dim([q], 1, "decode_attention: the query heads"),
                            static_dim([k_past, k_new, v_past, v_new], 1, "decode_attention: the KV heads"),
                            static_dim([q], 3, "decode_attention: the head size"),
                            float(sm_scale), tuple(_dtype(v) for v in inputs), bias_batch, opset)
    return _replay(graph, inputs, opset)[0]
