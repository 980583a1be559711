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
  of a 640 ms prefill) while these are vectorised element-wise kernels.

The KV cache keeps the portable graph's quantize / dequantize arithmetic: onnxruntime's
GroupQueryAttention runs a quantized cache only with static scales and a contiguous cache
buffer (../shared/RESEARCH.md measured its prefill 3-5.5x slower than fp32), and is not used
here (yet); see docs/benchmark.md for what that costs.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MS_DOMAIN = "com.microsoft"
ORT_FOLDER = "onnxruntime"  # the flavour's graphs inside a bundle
ORT_ARITHMETIC = {
    0: "MatMulNBits accuracy_level 0: float32 activations x dequantized INT4 weights (the deployed W4A4 up to summation order)",
    4: "MatMulNBits accuracy_level 4: the per-token INT4 activations requantized to int8 per block of group_size along K, int8 x int4 dot products",
}


def describe_arithmetic(accuracy_level: int, integer_graphs: list[str], per_channel_weights: bool) -> dict[str, str]:
    """How each graph of the flavour multiplies its W4A4 Linears (for verify.json / manifest)."""
    out = {}
    for g in ("vision", "prefill", "decode"):
        if per_channel_weights and g in integer_graphs:
            out[g] = "MatMulInteger: exact integer products of the per-token activation codes (uint8, zero point 2^(bits-1)) and the INT4 weight codes (int8), rescaled by the weight and token scales in float32"
        else:
            out[g] = ORT_ARITHMETIC[accuracy_level]
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
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = {t.name: t for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

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
        qa = {a.name: helper.get_attribute_value(a) for a in q.attribute}
        da = {a.name: helper.get_attribute_value(a) for a in node.attribute}
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
        attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
        block = int(attrs.get("block_size", 0))
        k, n = w.dims
        if attrs.get("axis", 1) != 0:
            raise OrtLoweringError(f"{dq.name}: INT4 weight quantized along axis {attrs.get('axis')}, expected 0")
        scale = numpy_helper.to_array(inits[dq.input[1]])
        a = node.input[0]
        if integer and block == k and a in pairs:
            # Per-channel weights and a per-token quantized input: exact integer W4A4.
            # y = (sum_k (qx + off - off) * qw) * s_w[n] * s_x[m] with uint8 activations
            # (onnxruntime's fast u8 x s8 kernels), the INT4 codes cast to int8 once (the Cast
            # of an initializer is folded when the session loads).
            x, s_x, bits, base = pairs[a]
            off = 2 ** (bits - 1)
            u8 = f"{base}_u8"
            nodes = []
            if u8 not in codes_u8:
                codes_u8.add(u8)
                nodes += [
                    helper.make_node("Add", [f"{base}_clip", add_init(np.array(off, np.float32), f"quota_off{bits}")], [f"{base}_shift"], name=f"{base}_shift"),
                    helper.make_node("Cast", [f"{base}_shift"], [u8], name=f"{base}_cast_u8", to=TensorProto.UINT8),
                ]
            w8 = f"{w.name}_int8"
            out_name = node.output[0]
            nodes += [
                helper.make_node("Cast", [w.name], [w8], name=f"{w.name}_cast_int8", to=TensorProto.INT8),
                helper.make_node("MatMulInteger", [u8, w8, add_init(np.array(off, np.uint8), f"quota_zp{bits}")], [f"{out_name}_i32"], name=f"{node.name}_int"),
                helper.make_node("Cast", [f"{out_name}_i32"], [f"{out_name}_f32"], name=f"{node.name}_float", to=TensorProto.FLOAT),
                helper.make_node("Mul", [f"{out_name}_f32", add_init(scale.reshape(n).astype(np.float32), f"{w.name}_channel_scale")], [f"{out_name}_sw"], name=f"{node.name}_sw"),
                helper.make_node("Mul", [f"{out_name}_sw", s_x], [out_name], name=f"{node.name}_sx"),
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
        attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
        gattrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
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
    # Dead-node elimination (e.g. the float Mul of a Q/DQ whose readers all went integer).
    outputs_needed = {o.name for o in graph.output}
    while True:
        used = outputs_needed | {i for x in nodes for i in x.input}
        kept = [x for x in nodes if any(o in used for o in x.output)]
        if len(kept) == len(nodes):
            break
        nodes = kept
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep + [t for t in new_inits if t.name in used])
    names = {t.name for t in graph.initializer}
    infos = [v for v in graph.value_info if v.name not in names]
    del graph.value_info[:]
    graph.value_info.extend(infos)
    if any(n.domain == MS_DOMAIN for n in graph.node) and not any(o.domain == MS_DOMAIN for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return out, rewritten


def lower_flavour(models: dict[str, onnx.ModelProto], options) -> dict[str, onnx.ModelProto]:
    """The onnxruntime flavour of each graph (``vision``, ``prefill``, ``decode``) under the
    ``export.onnxruntime`` options: their accuracy level, and integer products in the graphs
    of ``integer_graphs``."""
    return {g: to_onnxruntime(m, options.accuracy_level, g in options.integer_graphs)[0] for g, m in models.items()}


def ort_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Nodes of the kinds this rewrite produces or removes (for reports and tests)."""
    kinds = ("MatMulNBits", "MatMulInteger", "GatherBlockQuantized", "QuantizeLinear", "DequantizeLinear", "MatMul")
    return {k: sum(1 for n in model.graph.node if n.op_type == k) for k in kinds}
