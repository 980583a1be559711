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
- in the decode, each layer's attention over the quantized cache (quantizing the new token's
  key and value, dequantizing the past, the grouped-query products, the mask bias, the
  softmax and the product with the values) becomes one :data:`DECODE_ATTENTION` node. Its
  ``present_*`` outputs are the new token's entries only, like the portable graph's: the
  runtime's cache protocol stays "append" (:data:`quota_compile.flavours.onnxruntime.lower.KV_APPEND`).
  The decode attention is not a semantic operator yet, so this one is a rewrite of the
  translated graph (:func:`decode_attention`).

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
from onnx import helper, numpy_helper

from quota_compile.export.onnx import SemanticGraph
from quota_compile.export.semantic import JOINED_RULES, PORTABLE_RULES, SEMANTIC_DOMAIN, constant, constant_data, custom_op, join_readers
from quota_compile.export.graph_edit import downstream_node, follow_chain, indexed_copy, is_cache_concat, live_nodes, node_attrs, toposort_nodes, write_back
from quota_compile.bundle.schema import KV_APPEND, KV_UPDATE_KEY, PAST, PRESENT, TRT_FOLDER, kv_name  # noqa: F401  (TRT_FOLDER: also this module's)

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
    """A graph this flavour cannot translate (an odd N, an INT4 block TensorRT does not take), or
    a translated decode graph without the form the attention rewrite expects."""


def _int4_dequantize_blocks(model: onnx.ModelProto) -> list[int]:
    """``block_size`` of every DequantizeLinear of an INT4 / UINT4 initializer (0: not blocked)."""
    int4 = {t.name for t in model.graph.initializer if t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)}
    return [int(node_attrs(n).get("block_size", 0)) for n in model.graph.node
            if n.op_type == "DequantizeLinear" and n.input[0] in int4]


def _scalar(inits: dict, name: str) -> float | None:
    t = inits.get(name)
    if t is None:
        return None
    a = numpy_helper.to_array(t)
    return float(a.reshape(-1)[0]) if a.size == 1 else None


def _plugin(op_type: str, inputs: list[str], outputs: list[str], name: str, **attrs) -> onnx.NodeProto:
    return helper.make_node(op_type, inputs, outputs, name=name, domain=PLUGIN_DOMAIN, **attrs, **PLUGIN_ATTRS)


class _Rewrite:
    """One graph being rewritten: lookups, new initializers, replaced producers."""

    def __init__(self, model: onnx.ModelProto, what: str):
        self.out, self.graph, self.inits, self.producers, self.consumers = indexed_copy(model)
        self.what = what
        self.new_inits: list[onnx.TensorProto] = []
        self.have: set[str] = set()
        self.added: list[onnx.NodeProto] = []
        self.removed: set[int] = set()  # id() of nodes whose outputs a plugin now writes
        self.shapes = {v.name: v for v in list(self.graph.value_info) + list(self.graph.input) + list(self.graph.output)}

    def fail(self, msg: str):
        raise TrtLoweringError(f"TensorRT flavour, {self.what}: {msg}")

    def init(self, array: np.ndarray, name: str) -> str:
        if name not in self.have and name not in self.inits:
            self.have.add(name)
            self.new_inits.append(numpy_helper.from_array(array, name))
        return name

    def take_over(self, tensor: str) -> None:
        """A plugin writes ``tensor`` from now on: drop its old producer."""
        n = self.producers.get(tensor)
        if n is not None:
            self.removed.add(id(n))

    def dims(self, tensor: str) -> list:
        v = self.shapes.get(tensor)
        if v is None:
            self.fail(f"no shape recorded for {tensor}")
        return [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]

    def finish(self) -> onnx.ModelProto:
        nodes = live_nodes([n for n in self.graph.node if id(n) not in self.removed] + self.added, self.graph)
        given = {i.name for i in self.graph.input} | set(self.inits) | self.have
        ordered = toposort_nodes(nodes, given, self.fail) if self.added else nodes
        write_back(self.out, ordered, self.new_inits)
        produced = {o for n in self.graph.node for o in n.output}
        infos = [v for v in self.graph.value_info if v.name in produced]
        del self.graph.value_info[:]
        self.graph.value_info.extend(infos)
        if self.added and not any(o.domain == PLUGIN_DOMAIN for o in self.out.opset_import):
            self.out.opset_import.append(helper.make_opsetid(PLUGIN_DOMAIN, 1))
        return self.out


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


# the joins (join_readers) this flavour translates
TRT_JOINS = ("quantized_matmul", "linear_bias")


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
           "quantized_matmul": _quantized_matmul, "quantized_matmul_bias": _quantized_matmul_bias}
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
    """One graph of the flavour from its semantic graph (the decode's attention still a rewrite
    of the translated graph, :func:`decode_attention`)."""
    prefill = graph == "prefill"
    model = semantic.expand(rules(prefill), standard_only=False, prepare=_prepare(prefill))
    if graph == "decode":
        model, _ = decode_attention(model)
    return model


# --------------------------------------------------------------------------------------------
# KV cache: the prefill's quantizers and the decode's attention


def _kv_layout(rw: _Rewrite, codes: str, x: str) -> tuple[int, int]:
    """``(bits, head_dim)`` from the stored codes' and the float source's last dimensions."""
    stored, d = rw.dims(codes)[-1], rw.dims(x)[-1]
    if not isinstance(stored, int) or not isinstance(d, int):
        rw.fail(f"the last dimensions of {codes} and {x} are not static")
    if d == 2 * stored:
        return 4, d
    if d == stored:
        return 8, d
    rw.fail(f"{codes} stores {stored} bytes per head of {d} channels: neither INT4 nor INT8")


def _kv_quantizer(rw: _Rewrite, codes: str) -> tuple[str, str | None]:
    """``(x, static scale or None)``: the float tensor the quantizer writing ``codes`` starts
    from (per_token: the ``QuantizeLinear(x, scale, zero_point)`` of the codes; per_channel:
    the ``Div(x, static scale)``), found along the first inputs of the writers of ``codes``."""
    n = rw.producers.get(codes)
    while n is not None:
        if n.op_type == "QuantizeLinear" and len(n.input) == 3:
            return n.input[0], None
        if n.op_type == "Div" and n.input[1] in rw.inits:
            return n.input[0], n.input[1]
        n = rw.producers.get(n.input[0])
    rw.fail(f"{codes} is not written by a KV quantizer")


def _chain_to(rw: _Rewrite, tensor: str, op_type: str) -> list[onnx.NodeProto]:
    return follow_chain(rw.consumers, tensor, op_type, rw.fail)


def _cache_concat(rw: _Rewrite, past: str) -> onnx.NodeProto:
    """The Concat (axis 2) that appends the new entry to the dequantized ``past``."""
    return downstream_node(rw.consumers, past, is_cache_concat) or rw.fail(f"no Concat appends to {past}")


def _static_params(rw: _Rewrite, static: str | None, bits: int) -> tuple[str, str]:
    """``(scale, zero_point)`` inputs of a plugin: per_channel the static scale and the
    constant zero point ``2**(bits-1)``; per_token unused placeholders."""
    if static is None:
        return (rw.init(np.ones(1, np.float32), "quota_kv_no_scale"), rw.init(np.zeros(1, np.uint8), "quota_kv_no_zero_point"))
    return static, rw.init(np.full((1, 1, 1, 1), 2 ** (bits - 1), np.uint8), f"quota_kv_zero_point{bits}")


def _layers(prefix: str, names) -> list[int]:
    return sorted(int(n.split(".")[1]) for n in names if n.startswith(prefix) and n.endswith(".key"))


def decode_attention(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy of the decode graph ``model`` with each layer's attention over the quantized
    cache as one :data:`DECODE_ATTENTION` node; returns it and the number of layers."""
    rw = _Rewrite(model, "decode")
    layers = _layers(PAST, {i.name for i in rw.graph.input})
    if not layers:
        rw.fail("the graph has no past.<i>.key inputs")
    inputs = {i.name for i in rw.graph.input}
    for i in layers:
        past = {kind: kv_name(PAST, i, kind) for kind in ("key", "value")}
        present = {kind: kv_name(PRESENT, i, kind) for kind in ("key", "value")}
        (xk, static_k), (xv, static_v) = (_kv_quantizer(rw, present[k]) for k in ("key", "value"))
        if (static_k is None) != (static_v is None):
            rw.fail(f"layer {i}: the key and value caches have different granularities")
        bits, head_dim = _kv_layout(rw, present["key"], xk)
        granularity = "per_channel" if static_k is not None else "per_token"

        scores = _chain_to(rw, _cache_concat(rw, past["key"]).output[0], "MatMul")[-1]
        to_softmax = _chain_to(rw, scores.output[0], "Softmax")
        muls = [n for n in to_softmax if n.op_type == "Mul"]
        adds = [n for n in to_softmax if n.op_type == "Add"]
        if len(muls) != 1 or len(adds) != 1:
            rw.fail(f"layer {i}: expected one scaling Mul and one bias Add between the scores and the softmax")
        scaling = next((v for v in (_scalar(rw.inits, x) for x in muls[0].input) if v is not None), None)
        if scaling is None:
            rw.fail(f"layer {i}: the score scaling is not a constant")
        bias = next(x for x in adds[0].input if x not in muls[0].output)
        weighted = _chain_to(rw, to_softmax[-1].output[0], "MatMul")[-1]
        if _chain_to(rw, _cache_concat(rw, past["value"]).output[0], "MatMul")[-1] is not weighted:
            rw.fail(f"layer {i}: the value cache does not feed the product with the attention weights")
        query = scores.input[0]
        q_dims = rw.dims(query)
        if len(q_dims) != 4 or not isinstance(q_dims[1], int) or q_dims[3] != head_dim:
            rw.fail(f"layer {i}: the query {query} has no [batch, heads, 1, {head_dim}] shape")
        kv_heads = rw.dims(past["key"])[1]

        tag = f"decode_attention_{i}"
        if granularity == "per_token":
            stats_in = [kv_name(PAST, i, t) for t in ("key_scale", "value_scale", "key_zero_point", "value_zero_point")]
            if not set(stats_in) <= inputs:
                rw.fail(f"layer {i}: the per_token cache has no {stats_in} inputs")
            stats_out = [kv_name(PRESENT, i, t) for t in ("key_scale", "value_scale", "key_zero_point", "value_zero_point")]
        else:
            _, zp = _static_params(rw, static_k, bits)
            stats_in = [static_k, static_v, zp, zp]
            stats_out = [f"{tag}_{n}" for n in ("key_scale", "value_scale", "key_zero_point", "value_zero_point")]  # unused
        outs = [weighted.output[0], present["key"], present["value"], *stats_out]
        for t in outs:
            rw.take_over(t)
        rw.added.append(_plugin(
            DECODE_ATTENTION, [query, xk, xv, bias, past["key"], past["value"], *stats_in], outs, tag,
            bits=bits, granularity=granularity, num_heads=int(q_dims[1]), kv_num_heads=int(kv_heads), scale=scaling,
        ))
    return rw.finish(), len(layers)


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
