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
  default), each decode layer's attention over the cache becomes one
  ``com.microsoft.GroupQueryAttention`` with ``kv_cache_bit_width=4`` and the static
  per-channel scales (:func:`group_query_attention`): the cache's codes are already that op's
  layout, and it replaces the in-graph unpacking, dequantization, ``Expand``, ``Concat``,
  products and softmax. Its ``present.*`` outputs are the whole updated cache, which the
  graph's metadata records for the runtime. The prefill keeps the graph's attention:
  GroupQueryAttention's prefill with a quantized cache measured 3-5.5x slower than fp32
  (onnxruntime 1.32, CPU provider). See docs/speed.md for the measurements. The decode
  attention is not a semantic operator yet (it reaches the ONNX graph as its PyTorch
  definition's operations), so this one is still a rewrite of the translated graph.

Every node a rule writes keeps the provenance stamps of the semantic node it replaces (the
traced program's FX node), which is how the verification finds the flavour's activation codes.
``export.passes`` edit the portable graphs only; they do not reach this flavour.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import torch
from onnx import TensorProto, helper, numpy_helper
from onnxscript import opset21 as op

from quota_compile.bundle.schema import KV_REPLACE, KV_UPDATE_KEY, ORT_FOLDER, PAST, PRESENT, kv_name  # noqa: F401  (ORT_FOLDER: also this module's)
from quota_compile.export import onnx_translation as portable
from quota_compile.quant import ops
from quota_compile.export.onnx import SemanticGraph
from quota_compile.export.semantic import JOINED_RULES, PORTABLE_RULES, constant, constant_data, custom_op, join_readers
from quota_compile.export.graph_edit import MS_DOMAIN, downstream_node, follow_chain, indexed_copy, is_cache_concat, live_nodes, toposort_nodes, write_back

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
    translated graph without the form the GroupQueryAttention rewrite expects."""


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
            "quantized_matmul": quantized_matmul, "int4_matmul": int4_matmul, "int4_gather": int4_gather}


# The joins (:func:`quota_compile.export.semantic.join_readers`) this flavour translates.
ORT_JOINS = ("quantized_matmul", "int4_matmul", "int4_gather")


def lower_graph(semantic: SemanticGraph, accuracy_level: int, integer: bool) -> onnx.ModelProto:
    """The onnxruntime flavour of one graph from its semantic graph: the joins of
    :data:`ORT_JOINS`, then the flavour's :func:`rules` (the portable ones for the operators it
    does not change)."""
    return semantic.expand(rules(accuracy_level, integer), standard_only=False, prepare=lambda m: join_readers(m, ORT_JOINS))


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
    out = {g: lower_graph(m, options.accuracy_level, g in options.integer_graphs) for g, m in semantic.items()}
    if group_query and "decode" in out:
        out["decode"] = group_query_attention(out["decode"])[0]
    return out


def ort_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Nodes of the kinds this rewrite produces or removes (for reports and tests)."""
    kinds = ("MatMulNBits", "MatMulIntegerToFloat", "GatherBlockQuantized", "GroupQueryAttention", "QuantizeLinear", "DequantizeLinear", "MatMul")
    return {k: sum(1 for n in model.graph.node if n.op_type == k) for k in kinds}


# --------------------------------------------------------------------------------------------
# Decode attention as com.microsoft.GroupQueryAttention over the quantized cache.


def group_query_attention(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy of the decode graph ``model`` with each layer's attention, the part between the
    rotated query / key, the value, the mask bias and the per-channel INT4 cache, as one
    ``com.microsoft.GroupQueryAttention``; returns it and the number of layers rewritten.

    What the op takes over, per layer (everything else, the projections, RoPE and the mask
    bias, stays the portable graph's):
    - quantizing the new key and value with the static per-channel scales (nibble = q + 8,
      even channel low: the layout the cache already has);
    - dequantizing the past, appending the new entries, the grouped-query score products, the
      mask bias, the float32 softmax and the product with the values.
    ``seqlens_k`` is every row's cache length (the row's padding is masked by the bias, as in
    the portable graph) and ``total_sequence_length`` the bias's last axis, so each layer's
    own (pruned) length comes from its own bias. Its outputs ``present.<i>.key|value`` are
    therefore the whole updated cache, not the new entries; the graph says so in its metadata
    (:data:`KV_UPDATE_KEY` = :data:`KV_REPLACE`) and :class:`quota_compile.runtime.ort.OrtBackend`
    replaces its cache instead of appending.
    """
    out, graph, inits, producers, consumers = indexed_copy(model)
    inputs = {i.name: i for i in graph.input}
    shapes = {v.name: v for v in graph.value_info}

    def fail(msg: str):
        raise OrtLoweringError(f"GroupQueryAttention rewrite: {msg}")

    def chain_to(tensor: str, op_type: str) -> list[onnx.NodeProto]:
        return follow_chain(consumers, tensor, op_type, fail)

    def cache_concat(past: str) -> onnx.NodeProto:
        """The Concat (axis 2) that appends the new entry to the dequantized ``past``."""
        return downstream_node(consumers, past, is_cache_concat) or fail(f"no Concat appends to {past}")

    def static_quantizer(present: str) -> onnx.NodeProto:
        """The Div(x, static scale) that starts the quantizer writing ``present``."""
        n = producers.get(present)
        while n is not None and not (n.op_type == "Div" and n.input[1] in inits):
            n = producers.get(n.input[0])
        if n is None:
            fail(f"{present} is not written by a static quantizer")
        return n

    layers = sorted(int(n.split(".")[1]) for n in inputs if n.startswith(PAST) and n.endswith(".key"))
    if not layers:
        fail("the graph has no past.<i>.key inputs")
    first = inputs[kv_name(PAST, layers[0], "key")].type.tensor_type
    if first.elem_type != TensorProto.UINT8:
        fail("the cache is not uint8 codes (only the per_channel INT4 cache has GroupQueryAttention's layout)")
    kv_heads = first.shape.dim[1].dim_value
    head_dim = 2 * first.shape.dim[3].dim_value
    batch_of = graph.input[0].name  # input_ids [B, 1]

    replaced: dict[int, list[onnx.NodeProto]] = {}
    new_inits: list[onnx.TensorProto] = []
    added = [
        helper.make_node("Shape", [batch_of], ["gqa_batch"], start=0, end=1, name="gqa_batch"),
    ]
    new_inits += [
        numpy_helper.from_array(np.array([0, 0, -1], np.int64), "gqa_flat"),
        numpy_helper.from_array(np.array([1], np.int32), "gqa_one"),
    ]
    lengths: dict[str, tuple[str, str]] = {}  # bias -> (seqlens_k, total_sequence_length)
    scales: set[str] = set()
    for i in layers:
        past_k, past_v, present_k, present_v = (kv_name(PAST, i, "key"), kv_name(PAST, i, "value"), kv_name(PRESENT, i, "key"), kv_name(PRESENT, i, "value"))
        scores = chain_to(cache_concat(past_k).output[0], "MatMul")[-1]
        to_softmax = chain_to(scores.output[0], "Softmax")
        muls = [n for n in to_softmax if n.op_type == "Mul"]
        adds = [n for n in to_softmax if n.op_type == "Add"]
        if len(muls) != 1 or len(adds) != 1:
            fail(f"layer {i}: expected one scaling Mul and one bias Add before the softmax")
        const = [x for x in muls[0].input if x in inits]
        if not const:
            fail(f"layer {i}: the score scaling is not a constant")
        scaling = float(numpy_helper.to_array(inits[const[0]]).reshape(()))
        bias = next(x for x in adds[0].input if x != muls[0].output[0] and producers.get(x) is not muls[0])
        weighted = chain_to(to_softmax[-1].output[0], "MatMul")[-1]
        merge = chain_to(weighted.output[0], "Reshape")[-1]  # [B, H, 1, D] -> [B, 1, H*D]
        k_quant, v_quant = static_quantizer(present_k), static_quantizer(present_v)
        query, key, value = scores.input[0], k_quant.input[0], v_quant.input[0]
        cache_concat(past_v)  # the value cache must be appended the same way (fails otherwise)

        tag = f"gqa{i}"
        flat = []
        for name, x in (("q", query), ("k", key), ("v", value)):  # [B, heads, 1, D] -> [B, 1, heads*D]
            added += [
                helper.make_node("Transpose", [x], [f"{tag}_{name}_t"], perm=[0, 2, 1, 3], name=f"{tag}_{name}_t"),
                helper.make_node("Reshape", [f"{tag}_{name}_t", "gqa_flat"], [f"{tag}_{name}"], name=f"{tag}_{name}"),
            ]
            flat.append(f"{tag}_{name}")
        if bias not in lengths:
            b = f"gqa_len{len(lengths)}"
            added += [
                helper.make_node("Shape", [bias], [f"{b}_total1"], start=3, end=4, name=f"{b}_shape"),
                helper.make_node("Cast", [f"{b}_total1"], [f"{b}_total_i32"], to=TensorProto.INT32, name=f"{b}_cast"),
                helper.make_node("Squeeze", [f"{b}_total_i32"], [f"{b}_total"], name=f"{b}_total"),
                helper.make_node("Sub", [f"{b}_total_i32", "gqa_one"], [f"{b}_last"], name=f"{b}_last"),
                helper.make_node("Expand", [f"{b}_last", "gqa_batch"], [f"{b}_seqlens"], name=f"{b}_seqlens"),
            ]
            lengths[bias] = (f"{b}_seqlens", f"{b}_total")
        seqlens, total = lengths[bias]
        scale_names = []
        for q in (k_quant, v_quant):
            name = f"{q.input[1]}_gqa"
            if name not in scales:
                scales.add(name)
                s = numpy_helper.to_array(inits[q.input[1]]).astype(np.float32)
                new_inits.append(numpy_helper.from_array(s.reshape(1, kv_heads, 1, head_dim), name))
            scale_names.append(name)
        q_dims = [d.dim_value for d in shapes[query].type.tensor_type.shape.dim] if query in shapes else []
        if len(q_dims) != 4 or not q_dims[1] or q_dims[3] != head_dim:
            fail(f"layer {i}: the query {query} has no [batch, heads, 1, {head_dim}] shape in the graph")
        num_heads = q_dims[1]
        added.append(helper.make_node(
            "GroupQueryAttention",
            [*flat, past_k, past_v, seqlens, total, "", "", "", bias, "", *scale_names],
            [merge.output[0], present_k, present_v], name=tag, domain=MS_DOMAIN,
            num_heads=num_heads, kv_num_heads=kv_heads, scale=scaling, kv_cache_bit_width=4,
            k_quant_type="PER_CHANNEL", v_quant_type="PER_CHANNEL",
        ))
        for n in (producers[present_k], producers[present_v], merge):
            replaced[id(n)] = []

    nodes = live_nodes([n for n in graph.node if id(n) not in replaced] + added, graph)  # drops the old attention
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {t.name for t in new_inits}
    # topological order (the new nodes read tensors from all over the graph)
    write_back(out, toposort_nodes(nodes, available, fail), new_inits)
    del graph.value_info[:]  # shapes of removed tensors; onnxruntime infers what it needs
    for o in graph.output:
        if o.name.startswith(PRESENT):
            o.type.tensor_type.shape.dim[2].Clear()
            o.type.tensor_type.shape.dim[2].dim_param = "total"
    entry = out.metadata_props.add()
    entry.key, entry.value = KV_UPDATE_KEY, KV_REPLACE
    return out, len(layers)
