"""The ``onnxruntime`` flavour: the semantic graphs translated for onnxruntime's CPU provider.

The flavour starts from each program's semantic graph (every ``quota::`` operator one node,
:mod:`quota_compile.export.semantic`), not from the portable graph:
:func:`~quota_compile.export.semantic.join_readers` joins the operators whose onnxruntime form
spans their direct reader, then :func:`rules` translates each operator. What differs from the portable graph (everything else is the same operations):

- a W4A4 Linear (``quota.w4a4_linear``; a Linear with 8-bit activations is its quantizer, the
  INT4 weight's dequantizer and a ``MatMul``, joined into ``quota.quantized_matmul``) becomes
  its per-token activation fake-quant (below) and one ``com.microsoft.MatMulNBits(x, B,
  scales)`` with the weight's codes (``B uint8 [N, K/g, g/2]``, code + 8 in each nibble, even k
  in the low nibble; ``scales float32 [N, K/g]``; the default zero point 8), so the weights stay
  4-bit in memory and the kernel dequantizes block by block; a weight-only Linear
  (``dequantize_int4`` read by a ``MatMul``) becomes MatMulNBits of its float input;
- MatMulNBits' ``accuracy_level`` (``export.onnxruntime.accuracy_level``) says how the kernel
  computes: ``0`` in float32 (the deployed W4A4 arithmetic, up to float summation order),
  ``4`` with the activations requantized to int8 per block of ``g`` along K, symmetric, and
  int8 x int4 dot products. The activations are already on the per-token INT4 grid, so level 4
  changes the arithmetic only where a block's INT4 values do not land on the int8 grid of that
  block (``x / scale_b`` with ``scale_b = max|x_b| / 127``): a relative error of at most 1/254
  per activation. The verification measures what that does (``verify.json``, flavour
  ``onnxruntime``);
- an INT4 token-embedding table (``quantization.embeddings.bits: 4``: ``dequantize_int4_rows``
  read by a ``Gather`` on axis 0, joined into ``quota.int4_gather``) becomes
  ``com.microsoft.GatherBlockQuantized`` over the packed table (code + 8 per nibble, the
  default zero point 8): only the gathered rows are dequantized, where onnxruntime would
  otherwise dequantize the whole table on every call;
- every per-token activation fake-quant becomes ``Mul(Clip(Round(Div(x, s)), qmin, qmax), s)``
  instead of a blocked ``QuantizeLinear`` / ``DequantizeLinear`` pair: the same float
  operations (ONNX Round is half to even, like QuantizeLinear), but onnxruntime's blocked Q/DQ
  kernels are generic loops (measured on builtin:bench-llava: 84 ms of a 640 ms prefill) while
  these are vectorised element-wise kernels;
- with per-channel weights (``quantization.weights.granularity: per_channel``), in the graphs
  of ``export.onnxruntime.integer_graphs``, a W4A4 (or W4A8) Linear is exact integer
  arithmetic instead: the input's per-token codes as uint8 (code + 2^(bits-1)) from one
  per-row ``QuantizeLinear`` (zero point 2^(bits-1), then a uint8 ``Clip`` to the INT4 range),
  and ``com.microsoft.MatMulIntegerToFloat`` of those codes with the INT4 weight codes cast to
  int8, scaled by the token and weight scales;

- with an INT4 ``per_channel`` KV cache (``export.onnxruntime.group_query_attention``, on by
  default), each decode layer's ``quota.decode_attention`` over the cache, joined with the
  past's dequantizers and the new entries' quantizers (``quota.kv_decode_attention_static``),
  becomes one ``com.microsoft.GroupQueryAttention`` with ``kv_cache_bit_width=4`` and the
  static per-channel scales (:func:`group_query_attention`): the cache's codes are already
  that op's layout, and it replaces the in-graph unpacking, dequantization, ``Expand``,
  ``Concat``, products and softmax. Its ``present.*`` outputs are the whole updated cache,
  which the graph's metadata records for the runtime. The prefill keeps the graph's attention:
  GroupQueryAttention's prefill with a quantized cache measured 3-5.5x slower than fp32
  (onnxruntime 1.32, CPU provider). See docs/speed.md for the measurements.

Every node a rule writes keeps the provenance stamps of the semantic node it replaces (the
traced program's FX node), which is how the verification finds the flavour's activation codes.
``export.passes`` edit the portable graphs only; they do not reach this flavour.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import torch
from onnxscript import opset21 as op

from quota_compile.bundle.schema import KV_REPLACE, KV_UPDATE_KEY, PAST, PRESENT
from quota_compile.export import onnx_translation as portable
from quota_compile.quant import ops
from quota_compile.export.onnx import SemanticGraph
from quota_compile.export.semantic import JOINED_RULES, PORTABLE_RULES, constant, constant_data, custom_op, join_readers

MS_DOMAIN = "com.microsoft"  # onnxruntime's own operators

ORT_ARITHMETIC = {
    0: "MatMulNBits accuracy_level 0: float32 activations x dequantized INT4 weights (the deployed W4A4 up to summation order)",
    4: "MatMulNBits accuracy_level 4: the per-token INT4 activations requantized to int8 per block of group_size along K, int8 x int4 dot products",
}


def describe_arithmetic(cfg) -> dict[str, str]:
    """How each graph of the flavour multiplies its W4A4 Linears, and how the decode graph
    attends over the cache (for verify.json / manifest / report)."""
    options = cfg.export.onnxruntime
    per_channel_weights = cfg.quantization.weights.granularity == "per_channel"
    out = {}
    for g in ("vision", "prefill", "decode"):
        if per_channel_weights and g in options.integer_graphs:
            out[g] = "MatMulIntegerToFloat: exact integer products of the per-token activation codes (uint8, zero point 2^(bits-1)) and the INT4 weight codes (int8), rescaled by the token and weight scales in float32"
        else:
            out[g] = ORT_ARITHMETIC[options.accuracy_level]
    if uses_group_query_attention(cfg):
        out["decode_attention"] = (
            "com.microsoft.GroupQueryAttention over the INT4 per_channel cache: it quantizes the new key/value with the "
            "static scales, dequantizes the cache and attends in float32 (present.* return the whole updated cache)"
        )
    else:
        out["decode_attention"] = "the portable graph's: the cache dequantized by element-wise ops, then MatMul / Softmax / MatMul in float32"
    return out


class OrtLoweringError(RuntimeError):
    """A graph this flavour cannot translate (an INT4 block size its operators do not take), or a
    decode graph whose attention is not over the cache in the form GroupQueryAttention replaces."""


def matmulnbits_weights(codes: np.ndarray, scale: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """``(B uint8 [N, K/g, g/2], scales float32 [N, K/g])`` from codes ``[K, N]`` (int8, -8..7)
    and scales ``[K/g, N]``."""
    k, n = codes.shape
    u = (codes.astype(np.int16) + 8).astype(np.uint8).T.reshape(n, k // block, block)  # [N, K/g, g]
    b = (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)
    return np.ascontiguousarray(b), np.ascontiguousarray(scale.astype(np.float32).T)


def _array(value, what: str) -> np.ndarray:
    return constant_data(value, what, OrtLoweringError)


def _codes(packed, shape: tuple[int, int]) -> np.ndarray:
    """Signed INT4 codes ``shape`` (int8) of a packed weight (two codes per byte, low nibble first:
    the bytes of the INT4 initializer the portable graph stores)."""
    raw = _array(packed, "the packed INT4 weight").reshape(-1).view(np.uint8)
    return ops.unpack_int4(torch.from_numpy(raw.copy()), shape).numpy()


_A = onnx.defs.OpSchema.AttrType
MATMUL_NBITS = custom_op(MS_DOMAIN, "MatMulNBits", ["A", "B", "scales"],
                         attributes=[("K", _A.INT), ("N", _A.INT), ("bits", _A.INT), ("block_size", _A.INT), ("accuracy_level", _A.INT)])
MATMUL_INTEGER_TO_FLOAT = custom_op(MS_DOMAIN, "MatMulIntegerToFloat", ["A", "B", "a_scale", "b_scale", "a_zero_point"])
GATHER_BLOCK_QUANTIZED = custom_op(MS_DOMAIN, "GatherBlockQuantized", ["data", "indices", "scales"],
                                   attributes=[("bits", _A.INT), ("block_size", _A.INT), ("gather_axis", _A.INT), ("quantize_axis", _A.INT)])


def qdq_per_token(x, bits: int, clip_ratio: float):
    """The per-token fake-quant as ``Mul(Clip(Round(Div(x, s)), qmin, qmax), s)``: the same
    float operations as the portable QuantizeLinear/DequantizeLinear pair (ONNX Round is half
    to even, like QuantizeLinear) with vectorised element-wise kernels."""
    scale = portable.token_scale(x, bits, clip_ratio)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    codes = op.Clip(op.Round(op.Div(x, scale)), op.Constant(value_float=float(lo)), op.Constant(value_float=float(hi)))
    return op.Mul(codes, scale)


def _token_codes_u8(x, scale, bits: int, k: int):
    """The per-token codes plus 2^(bits-1), uint8, in one per-row QuantizeLinear (zero point
    2^(bits-1)) over the tokens and then the INT4 range: the integers of
    ``Clip(Round(Div(x, s))) + 2^(bits-1)`` in one vectorised kernel instead of five
    element-wise passes (docs/speed.md)."""
    off = 2 ** (bits - 1)
    rows = op.Reshape(x, op.Constant(value_ints=[-1, k]))
    flat = op.Reshape(scale, op.Constant(value_ints=[-1]))
    zero_point = op.Expand(constant(np.array(off, np.uint8)), op.Shape(flat))
    q = op.QuantizeLinear(rows, flat, zero_point, axis=0)
    if bits == 4:
        q = op.Clip(q, constant(np.array(0, np.uint8)), constant(np.array(15, np.uint8)))
    return op.Reshape(q, op.Shape(x))


def _matmul_nbits(a, packed, scale, k: int, n: int, group_size: int, accuracy_level: int):
    """``MatMulNBits(a, B, scales)`` with the INT4 weight's own codes (B ``uint8 [N, K/g, g/2]``,
    code + 8 per nibble); per-channel scales are repeated over blocks of 128/64/32/16."""
    w_scale = _array(scale, "the INT4 weight's scale")
    block = group_size
    if block == k:
        block = next((b for b in (128, 64, 32, 16) if k % b == 0), 0)
        w_scale = np.repeat(w_scale, k // block, axis=0) if block else w_scale
    if block < 16 or block & (block - 1):
        raise OrtLoweringError(f"{packed.name}: INT4 weight with block {block} has no MatMulNBits form (block must be a power of two >= 16)")
    b, scales = matmulnbits_weights(_codes(packed, (k, n)), w_scale, block)
    return MATMUL_NBITS(a, constant(b), constant(scales), K=k, N=n, bits=4, block_size=block, accuracy_level=accuracy_level)


def rules(accuracy_level: int, integer: bool) -> dict:
    """The onnxruntime flavour's rules (:func:`quota_compile.export.semantic.expand`) for one
    graph: ``accuracy_level`` of its MatMulNBits, ``integer`` products for its per-channel W4A4
    Linears. The operators without a rule here (the KV quantizers, the top-k selection) keep
    their portable form."""

    def quantized_matmul(x, packed, scale, bits: int, clip_ratio: float, k: int, n: int, group_size: int):
        if integer and group_size == k:
            # Per-channel weights: exact integer W4A4, y = (sum_k qx * qw) * s_x[m] * s_w[n], with
            # uint8 activation codes (onnxruntime's fast u8 x s8 kernels) and the INT4 codes cast
            # to int8 (the Cast of an initializer is folded when the session loads).
            # MatMulIntegerToFloat applies both scales in the kernel's output loop. onnxruntime's
            # optimizer fuses MatMulInteger -> Cast -> Mul into it in our graphs anyway (same
            # logits, bit for bit, on bench-llava), but not in every graph (an isolated
            # MatMulInteger -> Cast -> Mul -> Mul measured 3x slower), so the flavour says it.
            s_x = portable.token_scale(x, bits, clip_ratio)
            w8 = op.Cast(portable.int4_codes(packed, k, n), to=ir.DataType.INT8)
            w_scale = _array(scale, "the INT4 weight's scale").reshape(n).astype(np.float32)
            return MATMUL_INTEGER_TO_FLOAT(_token_codes_u8(x, s_x, bits, k), w8, s_x, constant(w_scale),
                                           constant(np.array(2 ** (bits - 1), np.uint8)))
        return _matmul_nbits(qdq_per_token(x, bits, clip_ratio), packed, scale, k, n, group_size, accuracy_level)

    def w4a4_linear(x, packed, scale, k: int, n: int, group_size: int, clip_ratio: float):
        return quantized_matmul(x, packed, scale, 4, clip_ratio, k, n, group_size)

    def int4_matmul(x, packed, scale, k: int, n: int, group_size: int):
        return _matmul_nbits(x, packed, scale, k, n, group_size, accuracy_level)

    def int4_gather(packed, indices, scale, v: int, d: int, group_size: int):
        # only the gathered rows are dequantized, where onnxruntime would otherwise dequantize
        # the whole table on every call
        if group_size < 16 or group_size & (group_size - 1):
            raise OrtLoweringError(f"{packed.name}: INT4 embedding block {group_size} has no GatherBlockQuantized form (a power of two >= 16)")
        u = (_codes(packed, (v, d)).astype(np.int16) + 8).astype(np.uint8)
        table = u[:, 0::2] | (u[:, 1::2] << 4)
        scales = _array(scale, "the INT4 embedding's scale").astype(np.float32)
        return GATHER_BLOCK_QUANTIZED(constant(table), indices, constant(scales), bits=4, block_size=group_size, gather_axis=0, quantize_axis=1)

    return {**PORTABLE_RULES, **JOINED_RULES, "qdq_per_token": qdq_per_token, "w4a4_linear": w4a4_linear,
            "quantized_matmul": quantized_matmul, "int4_matmul": int4_matmul, "int4_gather": int4_gather,
            "kv_decode_attention_static": group_query_attention}


# The joins (:func:`quota_compile.export.semantic.join_readers`) this flavour translates.
ORT_JOINS = ("quantized_matmul", "int4_matmul", "int4_gather")


def lower_graph(semantic: SemanticGraph, accuracy_level: int, integer: bool, group_query: bool = False) -> onnx.ModelProto:
    """The onnxruntime flavour of one graph from its semantic graph: the joins of
    :data:`ORT_JOINS` (with ``group_query``, also each decode attention over the cache with
    its quantizers, :func:`group_query_attention`), then the flavour's :func:`rules` (the
    portable ones for the operators it does not change)."""
    joins = ORT_JOINS + (("kv_decode_attention",) if group_query else ())
    model = semantic.expand(rules(accuracy_level, integer), standard_only=False, prepare=lambda m: join_readers(m, joins))
    if group_query:
        _whole_cache_outputs(model)
    return model


def uses_group_query_attention(cfg, quantized_kv: bool = True) -> bool:
    """Whether the flavour's decode graph runs GroupQueryAttention: asked for
    (``export.onnxruntime.group_query_attention``) and the cache is INT4 ``per_channel``
    (``quantized_kv=False``: a variant with a float cache, e.g. the bench's baselines)."""
    kv = cfg.quantization.kv_cache
    return quantized_kv and cfg.export.onnxruntime.group_query_attention and kv.granularity == "per_channel" and kv.bits == 4


def lower_flavour(semantic: dict[str, SemanticGraph], options, group_query: bool = False) -> dict[str, onnx.ModelProto]:
    """The onnxruntime flavour of each graph (``vision``, ``prefill``, ``decode``) from its
    semantic graph under the ``export.onnxruntime`` options: their accuracy level, and integer
    products in the graphs of ``integer_graphs``; with ``group_query``, the decode attention as
    GroupQueryAttention (:func:`group_query_attention`)."""
    return {g: lower_graph(m, options.accuracy_level, g in options.integer_graphs, group_query and g == "decode")
            for g, m in semantic.items()}


def ort_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Nodes of the kinds this rewrite produces or removes (for reports and tests)."""
    kinds = ("MatMulNBits", "MatMulIntegerToFloat", "GatherBlockQuantized", "GroupQueryAttention", "QuantizeLinear", "DequantizeLinear", "MatMul")
    return {k: sum(1 for n in model.graph.node if n.op_type == k) for k in kinds}


# --------------------------------------------------------------------------------------------
# Decode attention as com.microsoft.GroupQueryAttention over the quantized cache.

GROUP_QUERY_ATTENTION = custom_op(
    MS_DOMAIN, "GroupQueryAttention",
    ["query", "key", "value", "past_key", "past_value", "seqlens_k", "total_sequence_length", "cos_cache", "sin_cache",
     "position_ids", "attention_bias", "head_sink", "k_scale", "v_scale"], outputs=3,
    attributes=[("num_heads", _A.INT), ("kv_num_heads", _A.INT), ("scale", _A.FLOAT), ("kv_cache_bit_width", _A.INT),
                ("k_quant_type", _A.STRING), ("v_quant_type", _A.STRING)])


def group_query_attention(q, k, v, bias, past_key, past_value, key_scale, value_scale, bits: int, sm_scale: float):
    """One decode layer's attention over the ``per_channel`` INT4 cache (the joined
    ``quota.kv_decode_attention_static``) as one ``com.microsoft.GroupQueryAttention`` with
    ``kv_cache_bit_width=4`` and the static scales. The op takes over:

    - quantizing the new key and value with the static per-channel scales (nibble = q + 8,
      even channel low: the layout the cache already has);
    - dequantizing the past, appending the new entries, the grouped-query score products, the
      mask bias, the float32 softmax and the product with the values.

    Query, key and value go in as ``[B, 1, heads * D]``; the attention comes back as
    ``[B, heads, 1, D]`` like the semantic node's. ``seqlens_k`` is every row's cache length
    (a row's padding is masked by the bias, as in the portable graph) and
    ``total_sequence_length`` the bias's last axis, so each layer's own (pruned) length comes
    from its own bias. The ``present`` outputs are therefore the whole updated cache, not the
    new entries (:func:`lower_graph` says so in the graph)."""
    if bits != 4:
        raise OrtLoweringError(f"GroupQueryAttention takes an INT4 cache only, not INT{bits}")
    heads = portable.static_dim([q], 1, "GroupQueryAttention: the query heads", OrtLoweringError)
    head_dim = portable.static_dim([q], 3, "GroupQueryAttention: the head size", OrtLoweringError)
    kv_heads = portable.static_dim([past_key], 1, "GroupQueryAttention: the KV heads", OrtLoweringError)
    flat = op.Constant(value_ints=[0, 0, -1])

    def merged(x):  # [B, heads, 1, D] -> [B, 1, heads * D]
        return op.Reshape(op.Transpose(x, perm=[0, 2, 1, 3]), flat)

    total = op.Cast(op.Shape(bias, start=3, end=4), to=ir.DataType.INT32)
    seqlens = op.Expand(op.Sub(total, constant(np.array([1], np.int32))), op.Shape(q, start=0, end=1))
    scales = [constant(_array(s, "the cache's static scale").astype(np.float32).reshape(1, kv_heads, 1, head_dim)) for s in (key_scale, value_scale)]
    out, present_key, present_value = GROUP_QUERY_ATTENTION(
        merged(q), merged(k), merged(v), past_key, past_value, seqlens, op.Squeeze(total), None, None, None, bias, None, *scales,
        num_heads=heads, kv_num_heads=kv_heads, scale=sm_scale, kv_cache_bit_width=4, k_quant_type="PER_CHANNEL",
        v_quant_type="PER_CHANNEL")
    attention = op.Transpose(op.Reshape(out, op.Constant(value_ints=[0, 0, heads, head_dim])), perm=[0, 2, 1, 3])
    return attention, present_key, present_value


def _whole_cache_outputs(model: onnx.ModelProto) -> None:
    """A decode graph whose layers all attend through GroupQueryAttention returns the whole
    updated cache in ``present.*`` (length ``total``); its metadata says so for the runtime
    (:data:`KV_UPDATE_KEY` = :data:`KV_REPLACE`: :class:`quota_compile.runtime.ort.OrtBackend`
    replaces its cache instead of appending). Fails where a layer's attention is not
    GroupQueryAttention (its cache would be appended to)."""
    layers = [i.name for i in model.graph.input if i.name.startswith(PAST) and i.name.endswith(".key")]
    done = sum(1 for n in model.graph.node if n.op_type == "GroupQueryAttention" and n.domain == MS_DOMAIN)
    if not layers or done != len(layers):
        raise OrtLoweringError(f"GroupQueryAttention: {done} of {len(layers)} decode layers attend over the per_channel INT4 cache "
                               "in the form it replaces (dequantized past, quantized new entries)")
    for o in model.graph.output:
        if o.name.startswith(PRESENT):
            o.type.tensor_type.shape.dim[2].Clear()
            o.type.tensor_type.shape.dim[2].dim_param = "total"
    entry = model.metadata_props.add()
    entry.key, entry.value = KV_UPDATE_KEY, KV_REPLACE
