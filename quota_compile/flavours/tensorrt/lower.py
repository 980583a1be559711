"""The ``tensorrt`` flavour: the semantic graphs translated for TensorRT's ONNX parser.

TensorRT executes INT4 only as weight-only blocked ``DequantizeLinear`` and has no quantized
KV cache; its ONNX parser knows no ``BitShift`` / ``BitwiseAnd`` / ``BitwiseOr`` and takes
``uint8`` only at the network's edges (TensorRT's support matrix; ``DataType.UINT8``:
https://docs.nvidia.com/deeplearning/tensorrt/api/python_api/infer/FoundationalTypes/DataType.html;
onnx-tensorrt ``docs/operators.md``: BitShift unsupported). So everything that computes on the
INT4 activations or on the packed cache becomes a plugin node, and everything else is the
portable rules' translation, as in the portable graph. The flavour starts from each program's
semantic graph (:mod:`quota_compile.export.semantic`): :func:`~quota_compile.export.semantic.join_readers`
and :func:`join_kv_quantizers` join what one plugin replaces, then :func:`rules` translate:

- every W4A4 Linear (``quota.w4a4_linear``; a Linear with 8-bit activations joined into
  ``quantized_matmul``), with the bias ``Add`` that is its only reader where there is one,
  becomes one :data:`W4A4_LINEAR` node (schema below): the plugin quantizes its input itself,
  as the Triton kernel does. Weight-only INT4 Linears stay blocked ``DequantizeLinear`` +
  ``MatMul``, which TensorRT runs natively (it needs block size 64 or 128 there: TensorRT's
  ONNX operator documentation for DequantizeLinear);
- in the prefill, each layer's key and value quantizer with the dequantizer reading it (the
  codes, per-token scales and zero points written to ``present.*``, and the dequantized
  values the layer's attention reads) becomes one :data:`KV_QUANTIZE` node;
- in the decode, each layer's ``quota.decode_attention`` over the quantized cache, joined with
  the new token's key and value quantizers and the past's dequantizers
  (``quota.kv_decode_attention`` / ``_static``, :func:`~quota_compile.export.semantic.join_readers`),
  becomes one :data:`DECODE_ATTENTION` node. Its ``present_*`` outputs are the new token's
  entries only, like the portable graph's: the runtime's cache protocol stays "append"
  (:data:`~quota_compile.bundle.schema.KV_APPEND`).

``export.passes`` edit the portable graphs only; they do not reach this flavour.

Plugin nodes are in domain :data:`PLUGIN_DOMAIN`; ``op_type`` is the plugin name, with the
string attributes ``plugin_namespace`` (``"quota"``) and ``plugin_version`` (``"1"``) and the
int attribute ``aot = 1``, which is what TensorRT's ONNX parser reads to map a node to a plugin
registered as ``quota::<op_type>`` and to take its ahead-of-time implementation (TensorRT
samples/python/quickly_deployable_plugins/README.md, "ONNX model with an AOT plugin";
https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/tensorrt.plugin/trt_plugin_aot_impl/index.html).
The parser dispatches on ``op_type`` alone (onnx-tensorrt ModelImporter.cpp: no importer for
the op -> ``FallbackPluginImporter``), so the domain only keeps the graph valid for the ONNX
checker.

Plugin schemas (shapes: ``B`` batch, ``T`` tokens, ``H`` / ``Hkv`` query / KV heads, ``D``
head size, ``Dc = D/2`` for INT4 codes and ``D`` for INT8, ``P`` past length):

``QuotaW4A4Linear(x f32 [..., K], weight u8 [K, N/2], scale f32 [K/g, N], bias f32 [N]) ->
y f32 [..., N]``; attributes ``group_size``, ``clip_ratio``, ``act_bits``. ``weight`` is
``ops.pack_int4`` of the ``[K, N]`` codes (the INT4 initializer's own bytes); ``bias`` is
zeros where the Linear has none (one input list for TensorRT's fixed plugin signature).
Semantics: ``kernels.w4a4_linear.w4a4_linear_reference(x, weight, scale, group_size,
clip_ratio, bias)`` (per-token INT4 codes of ``x`` exactly as ``ops.quantize_per_token``,
exact integer dot per group, float32 group sum, times the row scale, plus bias).

``QuotaKVQuantize(x f32 [B, Hkv, T, D], scale, zero_point) -> (codes u8 [B, Hkv, T, Dc],
scale, zero_point, dequantized f32 [B, Hkv, T, D])``; attributes ``bits``, ``granularity``.
``per_token``: ``ops.quantize_kv(x, bits)``; the ``scale`` / ``zero_point`` inputs are unused
placeholders (f32 / u8 ``[1]``) and the outputs are the dynamic ``[B, Hkv, T, 1]`` ones.
``per_channel``: ``ops.quantize_kv_static(x, scale, bits)`` with the static ``scale
[Hkv, 1, D]`` and ``zero_point = 2**(bits-1)`` (u8 ``[1, 1, 1, 1]``); the scale and zero
point outputs repeat those inputs. ``dequantized = (codes - zero_point) * scale`` (unpacked).

``QuotaKVDecodeAttention(query f32 [B, H, 1, D], key f32 [B, Hkv, 1, D], value f32
[B, Hkv, 1, D], bias f32 [B, 1, 1, P+1], past_key u8 [B, Hkv, P, Dc], past_value,
key_scale, value_scale, key_zero_point, value_zero_point) -> (attention f32 [B, H, 1, D],
present_key u8 [B, Hkv, 1, Dc], present_value, present_key_scale, present_value_scale,
present_key_zero_point, present_value_zero_point)``; attributes ``bits``, ``granularity``,
``num_heads``, ``kv_num_heads``, ``scale``. ``key`` / ``value`` are the new token's (after
RoPE), quantized like :data:`KV_QUANTIZE` into the ``present_*`` outputs; the scale and zero
point inputs describe the past (``per_token``: ``[B, Hkv, P, 1]``; ``per_channel``: the
static ones, as for :data:`KV_QUANTIZE`). ``attention`` is
``kernels.kv_attention.kv_decode_attention_reference`` over the cache with the new token
appended (``P + 1`` positions), with ``sm_scale = scale`` and the additive ``bias`` (the
graph's mask: 0 or a large negative number per position, which generalises the reference's
``t < seqlens[b]``: a right-padded batch masks positions inside the cache) added to the
scaled scores before the float32 softmax; the query axis of length 1 is kept.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper

from quota_compile.export.onnx import SemanticGraph
from quota_compile.export.onnx_translation import static_dim
from quota_compile.export.semantic import JOINED_RULES, PORTABLE_RULES, SEMANTIC_DOMAIN, constant, constant_data, custom_op, join_readers
from quota_compile.bundle.schema import KV_APPEND, KV_UPDATE_KEY

PLUGIN_DOMAIN = "quota"
PLUGIN_NAMESPACE = "quota"
PLUGIN_VERSION = "1"
W4A4_LINEAR = "QuotaW4A4Linear"
KV_QUANTIZE = "QuotaKVQuantize"
DECODE_ATTENTION = "QuotaKVDecodeAttention"
PLUGINS = (W4A4_LINEAR, KV_QUANTIZE, DECODE_ATTENTION)
FLAVOUR_KEY = "quota_compile.flavour"  # graph metadata: which flavour a graph is
FLAVOUR = "tensorrt"
# What TensorRT's ONNX parser cannot take and this rewrite must therefore remove.
TRT_UNSUPPORTED = ("BitShift", "BitwiseAnd", "BitwiseOr", "QuantizeLinear")
# Block sizes TensorRT accepts for a weight-only INT4 DequantizeLinear (TensorRT's ONNX operator
# documentation for DequantizeLinear: blocked INT4 with block size 64 or 128).
TRT_INT4_BLOCKS = (64, 128)

PLUGIN_ATTRS = {"plugin_namespace": PLUGIN_NAMESPACE, "plugin_version": PLUGIN_VERSION, "aot": 1}


class TrtLoweringError(RuntimeError):
    """A graph this flavour cannot translate: an odd N, an INT4 block TensorRT does not take,
    operations its ONNX parser cannot take left in the graph (e.g. a decode attention whose cache
    arithmetic was not in the form the plugin replaces)."""


def _int4_dequantize_blocks(model: onnx.ModelProto) -> list[int]:
    """``block_size`` of every DequantizeLinear of an INT4 / UINT4 initializer (0: not blocked)."""
    int4 = {t.name for t in model.graph.initializer if t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)}
    return [int(next((helper.get_attribute_value(a) for a in n.attribute if a.name == "block_size"), 0)) for n in model.graph.node
            if n.op_type == "DequantizeLinear" and n.input[0] in int4]


# --------------------------------------------------------------------------------------------
# Rules over the semantic graph: the W4A4 Linears and the prefill's KV quantizers


_A = onnx.defs.OpSchema.AttrType
_PLUGIN_ATTRIBUTES = [("plugin_namespace", _A.STRING), ("plugin_version", _A.STRING), ("aot", _A.INT)]
_W4A4_OP = custom_op(PLUGIN_DOMAIN, W4A4_LINEAR, ["x", "weight", "scale", "bias"],
                     attributes=[("group_size", _A.INT), ("clip_ratio", _A.FLOAT), ("act_bits", _A.INT), *_PLUGIN_ATTRIBUTES])
_KV_QUANTIZE_OP = custom_op(PLUGIN_DOMAIN, KV_QUANTIZE, ["x", "scale", "zero_point"], outputs=4,
                            attributes=[("bits", _A.INT), ("granularity", _A.STRING), *_PLUGIN_ATTRIBUTES])


def _array(value, what: str) -> np.ndarray:
    return constant_data(value, "TensorRT flavour: " + what, TrtLoweringError)


def _linear(x, packed, scale, bias, k: int, n: int, group_size: int, clip_ratio: float, act_bits: int):
    """One :data:`W4A4_LINEAR`: ``weight`` is the packed ``[K, N]`` codes as ``uint8 [K, N/2]``
    (the INT4 initializer's own bytes), ``bias`` zeros where the Linear has none."""
    if n % 2:
        raise TrtLoweringError(f"TensorRT flavour: {packed.name}: N = {n} is odd; the packed layout holds columns in pairs")
    weight = _array(packed, "the packed INT4 weight").reshape(-1).view(np.uint8)[: k * n // 2].reshape(k, n // 2)
    w_scale = _array(scale, "the INT4 weight's scale").astype(np.float32)
    return _W4A4_OP(x, constant(weight), constant(w_scale), bias if bias is not None else constant(np.zeros(n, np.float32)),
                    group_size=group_size, clip_ratio=clip_ratio, act_bits=act_bits, **PLUGIN_ATTRS)


def _w4a4_linear(x, packed, scale, k: int, n: int, group_size: int, clip_ratio: float):
    return _linear(x, packed, scale, None, k, n, group_size, clip_ratio, 4)


def _w4a4_linear_bias(x, packed, scale, bias, k: int, n: int, group_size: int, clip_ratio: float):
    return _linear(x, packed, scale, bias, k, n, group_size, clip_ratio, 4)


def _quantized_matmul(x, packed, scale, bits: int, clip_ratio: float, k: int, n: int, group_size: int):
    return _linear(x, packed, scale, None, k, n, group_size, clip_ratio, bits)


def _quantized_matmul_bias(x, packed, scale, bias, bits: int, clip_ratio: float, k: int, n: int, group_size: int):
    return _linear(x, packed, scale, bias, k, n, group_size, clip_ratio, bits)


def _kv_quantize(x, bits: int):
    """A per_token KV quantizer and its dequantizer: codes, scale, zero point, dequantized."""
    none_scale, none_zero_point = constant(np.ones(1, np.float32)), constant(np.zeros(1, np.uint8))
    return _KV_QUANTIZE_OP(x, none_scale, none_zero_point, bits=bits, granularity="per_token", **PLUGIN_ATTRS)


def _kv_quantize_static(x, scale, bits: int):
    """A per_channel KV quantizer (static scale, zero point 2^(bits-1)) and its dequantizer:
    codes and dequantized (the plugin's scale and zero point outputs repeat its inputs, unused)."""
    codes, _, _, dequantized = _KV_QUANTIZE_OP(x, scale, constant(np.full((1, 1, 1, 1), 2 ** (bits - 1), np.uint8)),
                                              bits=bits, granularity="per_channel", **PLUGIN_ATTRS)
    return codes, dequantized


_DECODE_ATTENTION_OP = custom_op(
    PLUGIN_DOMAIN, DECODE_ATTENTION,
    ["query", "key", "value", "bias", "past_key", "past_value", "key_scale", "value_scale", "key_zero_point", "value_zero_point"], outputs=7,
    attributes=[("bits", _A.INT), ("granularity", _A.STRING), ("num_heads", _A.INT), ("kv_num_heads", _A.INT), ("scale", _A.FLOAT),
                *_PLUGIN_ATTRIBUTES])


def _heads(q, past_key) -> tuple[int, int]:
    """``(query heads, KV heads)`` of a decode attention, the plugin's attributes."""
    return (static_dim([q], 1, "TensorRT flavour: the decode attention's query heads", TrtLoweringError),
            static_dim([past_key], 1, "TensorRT flavour: the decode attention's KV heads", TrtLoweringError))


def _kv_decode_attention(q, k, v, bias, past_key, past_key_scale, past_key_zero_point, past_value, past_value_scale,
                         past_value_zero_point, bits: int, sm_scale: float):
    """A decode layer's attention over the ``per_token`` cache with its new entries' quantizers
    (the joined ``quota.kv_decode_attention``) as one :data:`DECODE_ATTENTION`."""
    heads, kv_heads = _heads(q, past_key)
    attention, key, value, key_scale, value_scale, key_zero_point, value_zero_point = _DECODE_ATTENTION_OP(
        q, k, v, bias, past_key, past_value, past_key_scale, past_value_scale, past_key_zero_point, past_value_zero_point,
        bits=bits, granularity="per_token", num_heads=heads, kv_num_heads=kv_heads, scale=sm_scale, **PLUGIN_ATTRS)
    return attention, key, key_scale, key_zero_point, value, value_scale, value_zero_point


def _kv_decode_attention_static(q, k, v, bias, past_key, past_value, key_scale, value_scale, bits: int, sm_scale: float):
    """The same over the ``per_channel`` cache (``quota.kv_decode_attention_static``): the
    static scales and the constant zero point ``2**(bits-1)``; the plugin's scale and zero
    point outputs are unused."""
    heads, kv_heads = _heads(q, past_key)
    zero_point = constant(np.full((1, 1, 1, 1), 2 ** (bits - 1), np.uint8))
    attention, key, value, *_ = _DECODE_ATTENTION_OP(
        q, k, v, bias, past_key, past_value, key_scale, value_scale, zero_point, zero_point,
        bits=bits, granularity="per_channel", num_heads=heads, kv_num_heads=kv_heads, scale=sm_scale, **PLUGIN_ATTRS)
    return attention, key, value


# the joins (join_readers) this flavour translates
TRT_JOINS = ("quantized_matmul", "linear_bias", "kv_decode_attention")


def join_kv_quantizers(model: ir.Model) -> int:
    """Join each KV quantizer with the dequantizer that reads exactly its outputs (in place):
    ``quota.kv_quantize`` (per_token: outputs codes, scale, zero point, dequantized) and
    ``quota.kv_quantize_static`` (per_channel: codes, dequantized), each translated into one
    :data:`KV_QUANTIZE` node. Returns the number joined."""
    graph = model.graph
    joined = 0
    pairs = {"quantize_kv": ("dequantize_kv", "kv_quantize"), "quantize_kv_static": ("dequantize_kv_static", "kv_quantize_static")}
    for node in list(graph):
        if node.domain != SEMANTIC_DOMAIN or node.op_type not in pairs:
            continue
        reader_type, joined_type = pairs[node.op_type]
        readers = {id(u): u for out in node.outputs[:1] for u, _ in out.uses()
                   if u.domain == SEMANTIC_DOMAIN and u.op_type == reader_type}
        reader = next((u for u in readers.values()
                       if list(u.inputs[: len(node.outputs)]) == list(node.outputs) and u.inputs[len(node.outputs):] == node.inputs[1:]), None)
        if reader is None:
            continue
        new = ir.Node(SEMANTIC_DOMAIN, joined_type, list(node.inputs), ir.convenience.convert_attributes(
            {name: a.value for name, a in node.attributes.items()}), num_outputs=len(node.outputs) + 1)
        new.metadata_props.update(node.metadata_props)
        ir.convenience.replace_nodes_and_values(graph, node, [node, reader], [new], [*node.outputs, reader.outputs[0]], list(new.outputs))
        joined += 1
    return joined


def rules(prefill: bool) -> dict:
    """The flavour's rules (:func:`quota_compile.export.semantic.expand`): the W4A4 Linears
    (with their bias, and the Linears with 8-bit activations) as :data:`W4A4_LINEAR`, in the
    prefill the joined KV quantizers as :data:`KV_QUANTIZE`; the other operators keep their
    portable rules (weight-only INT4 stays a blocked ``DequantizeLinear`` + ``MatMul``, which
    TensorRT runs natively)."""
    out = {**PORTABLE_RULES, **JOINED_RULES, "w4a4_linear": _w4a4_linear, "w4a4_linear_bias": _w4a4_linear_bias,
           "quantized_matmul": _quantized_matmul, "quantized_matmul_bias": _quantized_matmul_bias,
           "kv_decode_attention": _kv_decode_attention, "kv_decode_attention_static": _kv_decode_attention_static}
    if prefill:
        out.update(kv_quantize=_kv_quantize, kv_quantize_static=_kv_quantize_static)
    return out


def _prepare(prefill: bool):
    def prepare(model: ir.Model) -> None:
        join_readers(model, TRT_JOINS)
        if prefill:
            join_kv_quantizers(model)
    return prepare


def lower_graph(semantic: SemanticGraph, graph: str) -> onnx.ModelProto:
    """One graph of the flavour from its semantic graph: the joins, then :func:`rules`."""
    prefill = graph == "prefill"
    return semantic.expand(rules(prefill), standard_only=False, prepare=_prepare(prefill))


# --------------------------------------------------------------------------------------------
# The flavour


def to_tensorrt(semantic: dict[str, SemanticGraph]) -> dict[str, onnx.ModelProto]:
    """The TensorRT flavour of each graph (``vision``, ``prefill``, ``decode``) from its semantic
    graph (:func:`lower_graph`): W4A4 Linears as :data:`W4A4_LINEAR` everywhere, the prefill's KV
    quantizers as :data:`KV_QUANTIZE`, the decode's attention as :data:`DECODE_ATTENTION`; the
    metadata says ``quota_compile.flavour = tensorrt`` and (decode) that the runtime appends
    the cache."""
    out = {}
    for g, graph in semantic.items():
        m = lower_graph(graph, g)
        left = sorted({n.op_type for n in m.graph.node if n.op_type in TRT_UNSUPPORTED})
        if left:
            raise TrtLoweringError(f"TensorRT flavour, {g}: {', '.join(left)} left in the graph (TensorRT's ONNX parser cannot take them)")
        blocks = sorted(set(_int4_dequantize_blocks(m)) - set(TRT_INT4_BLOCKS))
        if blocks:
            raise TrtLoweringError(f"TensorRT flavour, {g}: INT4 DequantizeLinear with block size {blocks} "
                                   f"(TensorRT takes {TRT_INT4_BLOCKS} only)")
        meta = {p.key: p.value for p in m.metadata_props}
        meta[FLAVOUR_KEY] = FLAVOUR
        if g == "decode":
            meta[KV_UPDATE_KEY] = KV_APPEND
        del m.metadata_props[:]
        for k, v in meta.items():
            entry = m.metadata_props.add()
            entry.key, entry.value = k, v
        out[g] = m
    return out


def plugin_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Plugin nodes of each kind in a graph of the flavour."""
    return {p: sum(1 for n in model.graph.node if n.op_type == p and n.domain == PLUGIN_DOMAIN) for p in PLUGINS}
