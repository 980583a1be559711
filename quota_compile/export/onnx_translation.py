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
