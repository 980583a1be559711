"""The ``onnxruntime`` flavour: the portable graphs rewritten for onnxruntime's CPU provider.

What changes (and only this; everything else is the portable graph, node for node):

- every INT4 weight, i.e. ``DequantizeLinear(INT4 [K, N] initializer, scale [K/g, N], axis=0,
  block_size=g)`` feeding ``MatMul(x, ·)``, becomes one ``com.microsoft.MatMulNBits(x, B,
  scales)`` with the same codes (``B uint8 [N, K/g, g/2]``, code + 8 in each nibble, even k in
  the low nibble; ``scales float32 [N, K/g]``; the default zero point 8), so the weights stay
  4-bit in memory and the kernel dequantizes block by block;
- its ``accuracy_level`` (``export.onnxruntime.accuracy_level``) says how the kernel computes:
  ``0`` in float32 (the deployed W4A4 arithmetic, up to float summation order), ``4`` with
  the activations requantized to int8 per block of ``g`` along K, symmetric, and int8 x int4
  dot products. The activations are already on the per-token INT4 grid (the graph's
  ``qdq_per_token`` stays), so level 4 changes the arithmetic only where a block's INT4
  values do not land on the int8 grid of that block (``x / scale_b`` with
  ``scale_b = max|x_b| / 127``): a relative error of at most 1/254 per activation. The
  verification measures what that does (``verify.json``, flavour ``onnxruntime``).

- an INT4 token-embedding table (``quantization.embeddings.bits: 4``), i.e.
  ``DequantizeLinear(INT4 [V, D], scale [V, D/g], axis=1, block_size=g)`` feeding
  ``Gather(·, ids, axis=0)``, becomes ``com.microsoft.GatherBlockQuantized`` over the packed
  table (code + 8 per nibble, the default zero point 8): only the gathered rows are
  dequantized, where onnxruntime would otherwise dequantize the whole table on every call;
- every per-token activation fake-quant, ``QuantizeLinear(x, s, axis=-1, block_size=K,
  INT4|INT8) -> DequantizeLinear(·, s)``, becomes ``Mul(Clip(Round(Div(x, s)), qmin, qmax),
  s)``: the same float operations (ONNX Round is half to even, like QuantizeLinear), but
  onnxruntime's blocked Q/DQ kernels are generic loops (measured on builtin:bench-llava: 84 ms
  of a 640 ms prefill) while these are vectorised element-wise kernels;
- with per-channel weights (``quantization.weights.granularity: per_channel``), in the graphs
  of ``export.onnxruntime.integer_graphs``, a W4A4 Linear becomes exact integer arithmetic
  instead: the input's per-token codes as uint8 (code + 2^(bits-1)) from one per-row
  ``QuantizeLinear`` (zero point 2^(bits-1), then a uint8 ``Clip`` to the INT4 range), and
  ``com.microsoft.MatMulIntegerToFloat`` of those codes with the INT4 weight codes cast to
  int8, scaled by the token and weight scales;

- with an INT4 ``per_channel`` KV cache (``export.onnxruntime.group_query_attention``, on by
  default), each decode layer's attention over the cache becomes one
  ``com.microsoft.GroupQueryAttention`` with ``kv_cache_bit_width=4`` and the static
  per-channel scales (:func:`group_query_attention`): the cache's codes are already that op's
  layout, and it replaces the in-graph unpacking, dequantization, ``Expand``, ``Concat``,
  products and softmax. Its ``present.*`` outputs are the whole updated cache, which the
  graph's metadata records for the runtime. The prefill keeps the graph's attention:
  GroupQueryAttention's prefill with a quantized cache measured 3-5.5x slower than fp32
  (onnxruntime 1.32, CPU provider). See docs/speed.md for the measurements.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from quota_compile.bundle.schema import KV_REPLACE, KV_UPDATE_KEY, ORT_FOLDER, PAST, PRESENT, kv_name  # noqa: F401  (ORT_FOLDER: also this module's)
from quota_compile.export.graph_edit import MS_DOMAIN, downstream_node, follow_chain, indexed_copy, is_cache_concat, live_nodes, node_attrs, toposort_nodes, write_back

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
    """The portable graph does not have the form this rewrite expects (a bug)."""


def _int4_codes(t: onnx.TensorProto) -> np.ndarray:
    """Signed INT4 codes of an INT4 initializer, in its shape (int8)."""
    shape = tuple(t.dims)
    raw = np.frombuffer(t.raw_data, dtype=np.uint8)
    nib = np.stack([raw & 0xF, raw >> 4], axis=-1).reshape(-1)[: int(np.prod(shape))].astype(np.int8)
    return np.where(nib >= 8, nib - 16, nib).astype(np.int8).reshape(shape)


def matmulnbits_weights(codes: np.ndarray, scale: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """``(B uint8 [N, K/g, g/2], scales float32 [N, K/g])`` from codes ``[K, N]`` (int8, -8..7)
    and scales ``[K/g, N]``."""
    k, n = codes.shape
    u = (codes.astype(np.int16) + 8).astype(np.uint8).T.reshape(n, k // block, block)  # [N, K/g, g]
    b = (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)
    return np.ascontiguousarray(b), np.ascontiguousarray(scale.astype(np.float32).T)


def to_onnxruntime(model: onnx.ModelProto, accuracy_level: int, integer: bool = True) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` with every INT4 DequantizeLinear + MatMul as MatMulNBits; returns
    it and the number of MatMuls rewritten."""
    out, graph, inits, producers, consumers = indexed_copy(model)

    replaced: dict[int, onnx.NodeProto | list[onnx.NodeProto]] = {}  # id(node) -> its replacement(s)
    dead: set[int] = set()
    new_inits: list[onnx.TensorProto] = []
    have: set[str] = set()

    def add_init(array: np.ndarray, name: str) -> str:
        if name not in have:
            have.add(name)
            new_inits.append(numpy_helper.from_array(array, name))
        return name

    # Per-token Q -> DQ pairs (the activation fake-quant): found first, so that the MatMuls
    # they feed can take the integer path.
    pairs: dict[str, tuple[str, str, int, str]] = {}  # DQ output -> (x, scale, bits, base)
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
            continue
        q = producers.get(node.input[0])
        if q is None or q.op_type != "QuantizeLinear" or len(q.input) != 2 or q.input[1] != node.input[1]:
            continue
        if len(consumers.get(q.output[0], [])) != 1:
            continue
        qa = node_attrs(q)
        da = node_attrs(node)
        dtype = qa.get("output_dtype")
        if dtype not in (TensorProto.INT4, TensorProto.INT8) or qa.get("axis") != -1 or da.get("axis") != -1:
            continue
        if qa.get("block_size") != da.get("block_size"):
            continue
        bits = 4 if dtype == TensorProto.INT4 else 8
        pairs[node.output[0]] = (q.input[0], q.input[1], bits, q.name or node.output[0])
        lo = add_init(np.array(-(2 ** (bits - 1)), np.float32), f"quota_qmin{bits}")
        hi = add_init(np.array(2 ** (bits - 1) - 1, np.float32), f"quota_qmax{bits}")
        x, scale, base = pairs[node.output[0]][0], q.input[1], pairs[node.output[0]][3]
        replaced[id(node)] = [
            helper.make_node("Div", [x, scale], [f"{base}_div"], name=f"{base}_div"),
            helper.make_node("Round", [f"{base}_div"], [f"{base}_round"], name=f"{base}_round"),
            helper.make_node("Clip", [f"{base}_round", lo, hi], [f"{base}_clip"], name=f"{base}_clip"),
            helper.make_node("Mul", [f"{base}_clip", scale], [node.output[0]], name=f"{base}_mul"),
        ]
        dead.add(id(q))

    codes_u8: set[str] = set()
    rewritten = 0
    for node in graph.node:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            continue
        dq = producers.get(node.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
            continue
        w = inits[dq.input[0]]
        if w.data_type != TensorProto.INT4 or len(w.dims) != 2 or len(dq.input) > 2 or dq.input[1] not in inits:
            continue
        attrs = node_attrs(dq)
        block = int(attrs.get("block_size", 0))
        k, n = w.dims
        if attrs.get("axis", 1) != 0:
            raise OrtLoweringError(f"{dq.name}: INT4 weight quantized along axis {attrs.get('axis')}, expected 0")
        scale = numpy_helper.to_array(inits[dq.input[1]])
        a = node.input[0]
        if integer and block == k and a in pairs:
            # Per-channel weights and a per-token quantized input: exact integer W4A4.
            # y = (sum_k (qx + off - off) * qw) * s_x[m] * s_w[n] with uint8 activations
            # (onnxruntime's fast u8 x s8 kernels), the INT4 codes cast to int8 once (the Cast
            # of an initializer is folded when the session loads).
            x, s_x, bits, base = pairs[a]
            off = 2 ** (bits - 1)
            u8 = f"{base}_u8"
            nodes = []
            if u8 not in codes_u8:
                codes_u8.add(u8)
                # The codes in one pass: a per-row QuantizeLinear (uint8, zero point `off`) over
                # the tokens, i.e. saturate(round_half_even(x / s) + off), then the INT4/INT8
                # range. The same integers as Clip(Round(Div(x, s))) + off, but one vectorised
                # kernel instead of five element-wise passes (docs/speed.md).
                p = f"{base}_rows"
                nodes += [
                    helper.make_node("Shape", [x], [f"{p}_shape"], name=f"{p}_shape"),
                    helper.make_node("Reshape", [x, add_init(np.array([-1, k], np.int64), f"quota_rows{k}")], [p], name=p),
                    helper.make_node("Reshape", [s_x, add_init(np.array([-1], np.int64), "quota_flat")], [f"{p}_scale"], name=f"{p}_scale"),
                    helper.make_node("Shape", [f"{p}_scale"], [f"{p}_count"], name=f"{p}_count"),
                    helper.make_node("Expand", [add_init(np.array(off, np.uint8), f"quota_zp{bits}"), f"{p}_count"], [f"{p}_zp"], name=f"{p}_zp"),
                    helper.make_node("QuantizeLinear", [p, f"{p}_scale", f"{p}_zp"], [f"{p}_q"], name=f"{p}_q", axis=0),
                ]
                if bits == 4:
                    nodes.append(helper.make_node(
                        "Clip", [f"{p}_q", add_init(np.array(0, np.uint8), "quota_u4_lo"), add_init(np.array(15, np.uint8), "quota_u4_hi")],
                        [f"{p}_q4"], name=f"{p}_q4",
                    ))
                nodes.append(helper.make_node("Reshape", [f"{p}_q4" if bits == 4 else f"{p}_q", f"{p}_shape"], [u8], name=f"{p}_codes"))
            w8 = f"{w.name}_int8"
            out_name = node.output[0]
            # MatMulIntegerToFloat applies both scales in the kernel's output loop. onnxruntime's
            # optimizer fuses MatMulInteger -> Cast -> Mul into it in our graphs anyway (same
            # logits, bit for bit, on bench-llava), but not in every graph (an isolated
            # MatMulInteger -> Cast -> Mul -> Mul measured 3x slower), so the flavour says it.
            nodes += [
                helper.make_node("Cast", [w.name], [w8], name=f"{w.name}_cast_int8", to=TensorProto.INT8),
                helper.make_node(
                    "MatMulIntegerToFloat",
                    [u8, w8, s_x, add_init(scale.reshape(n).astype(np.float32), f"{w.name}_channel_scale"), add_init(np.array(off, np.uint8), f"quota_zp{bits}")],
                    [out_name], name=f"{node.name}_int", domain=MS_DOMAIN,
                ),
            ]
            replaced[id(node)] = nodes
        else:
            if block == k:  # per-channel scales, float input: any block dividing K, scales repeated
                block = next((b for b in (128, 64, 32, 16) if k % b == 0), 0)
                scale = np.repeat(scale, k // block, axis=0) if block else scale
            if block < 16 or block & (block - 1):
                raise OrtLoweringError(f"{dq.name}: INT4 weight with block {block} has no MatMulNBits form (block must be a power of two >= 16)")
            b, scales = matmulnbits_weights(_int4_codes(w), scale, block)
            b_name = add_init(b, f"{w.name}_nbits_b{block}")
            s_name = add_init(scales, f"{w.name}_nbits_b{block}_scales")
            replaced[id(node)] = helper.make_node(
                "MatMulNBits", [a, b_name, s_name], list(node.output), name=f"{node.name}_nbits", domain=MS_DOMAIN,
                K=k, N=n, bits=4, block_size=block, accuracy_level=accuracy_level,
            )
        rewritten += 1
        if all(id(c) in replaced for c in consumers[dq.output[0]]):
            dead.add(id(dq))

    # INT4 embedding tables: DequantizeLinear(axis 1) + Gather(axis 0) -> GatherBlockQuantized.
    for node in graph.node:
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx"):
            continue
        dq = producers.get(node.input[0])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits or len(dq.input) > 2:
            continue
        w = inits[dq.input[0]]
        attrs = node_attrs(dq)
        gattrs = node_attrs(node)
        if w.data_type != TensorProto.INT4 or len(w.dims) != 2 or attrs.get("axis") != 1 or gattrs.get("axis", 0) != 0:
            continue
        block = int(attrs["block_size"])
        if block < 16 or block & (block - 1):
            raise OrtLoweringError(f"{dq.name}: INT4 embedding block {block} has no GatherBlockQuantized form (a power of two >= 16)")
        codes = _int4_codes(w)
        u = (codes.astype(np.int16) + 8).astype(np.uint8)
        packed = np.ascontiguousarray(u[:, 0::2] | (u[:, 1::2] << 4))
        t_name = add_init(packed, f"{w.name}_gbq")
        s_name = add_init(numpy_helper.to_array(inits[dq.input[1]]).astype(np.float32), f"{w.name}_gbq_scales")
        replaced[id(node)] = helper.make_node(
            "GatherBlockQuantized", [t_name, node.input[1], s_name], list(node.output), name=f"{node.name}_gbq", domain=MS_DOMAIN,
            bits=4, block_size=block, gather_axis=0, quantize_axis=1,
        )
        if all(id(c) in replaced for c in consumers[dq.output[0]]):
            dead.add(id(dq))

    nodes = []
    for n in graph.node:
        if id(n) in dead:
            continue
        r = replaced.get(id(n), n)
        nodes.extend(r if isinstance(r, list) else [r])
    # dead-node elimination drops e.g. the float Mul of a Q/DQ whose readers all went integer
    write_back(out, live_nodes(nodes, graph), new_inits)
    names = {t.name for t in graph.initializer}
    infos = [v for v in graph.value_info if v.name not in names]
    del graph.value_info[:]
    graph.value_info.extend(infos)
    return out, rewritten


def uses_group_query_attention(cfg, quantized_kv: bool = True) -> bool:
    """Whether the flavour's decode graph runs GroupQueryAttention: asked for
    (``export.onnxruntime.group_query_attention``) and the cache is INT4 ``per_channel``
    (``quantized_kv=False``: a variant with a float cache, e.g. the bench's baselines)."""
    kv = cfg.quantization.kv_cache
    return quantized_kv and cfg.export.onnxruntime.group_query_attention and kv.granularity == "per_channel" and kv.bits == 4


def lower_flavour(models: dict[str, onnx.ModelProto], options, group_query: bool = False) -> dict[str, onnx.ModelProto]:
    """The onnxruntime flavour of each graph (``vision``, ``prefill``, ``decode``) under the
    ``export.onnxruntime`` options: their accuracy level, and integer products in the graphs
    of ``integer_graphs``; with ``group_query``, the decode attention as GroupQueryAttention
    (:func:`group_query_attention`)."""
    out = {g: to_onnxruntime(m, options.accuracy_level, g in options.integer_graphs)[0] for g, m in models.items()}
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
