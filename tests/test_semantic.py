"""The semantic ONNX graph (quota_compile.export.semantic): each quota:: operator of a traced
program exported as one ``quota.<op>`` node, and flavour rules that replace those nodes.

- the semantic graph holds one node per operator call, with the call's attributes, and none
  of the operators' arithmetic;
- the portable rules turn it into the graph ``export_onnx`` writes;
- a flavour's own rule for one operator replaces that operator only, keeps the output's name,
  type and shape and the node's provenance, and computes what the rule says (run by
  onnxruntime against NumPy);
- a missing rule, a wrong number of values, or a rule that hands back a value it did not make
  are refused.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnxscript import opset21 as op
from torch.export import Dim

from quota_compile.export import onnx_translation
from quota_compile.export.onnx import expand_to_onnx, export_onnx, export_semantic
from quota_compile.export.semantic import JOINED_RULES, PORTABLE_RULES, SEMANTIC_DOMAIN, SemanticError, expand, join_readers
from quota_compile.kernels import ops as kernel_ops  # noqa: F401  (registers quota::w4a4_linear)
from quota_compile.pruning import score  # noqa: F401  (registers quota::select_topk)
from quota_compile.quant import ops
from quota_compile.verify.gate import activation_quantizers

K, N, GROUP = 64, 24, 32


class _Block(torch.nn.Module):
    """Two W4A4 Linears on one input, a KV quantizer round trip and a top-k selection."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(11)
        for name in ("a", "b"):
            q, scale = ops.quantize_weight_rtn(torch.randn(N, K, generator=g) * 0.1, 4, GROUP)
            self.register_buffer(f"packed_{name}", ops.pack_int4(q))
            self.register_buffer(f"scale_{name}", scale)

    def forward(self, x):
        ya = torch.ops.quota.w4a4_linear(x, self.packed_a, self.scale_a, K, N, GROUP, 1.0)
        yb = torch.ops.quota.w4a4_linear(x, self.packed_b, self.scale_b, K, N, GROUP, 0.9)
        codes, s, zp = torch.ops.quota.quantize_kv(ya.unsqueeze(1), 4)  # [B, 1, T, N]: one head
        kv = torch.ops.quota.dequantize_kv(codes, s, zp, 4)
        keep = torch.ops.quota.select_topk(yb.sum(-1), 2)
        return kv, keep


ARGS = (torch.randn(1, 6, K, generator=torch.Generator().manual_seed(5)),)
NAMES = (["x"], ["kv", "keep"], ({1: Dim("seq", min=2)},))


def _semantic() -> ir.Model:
    return export_semantic(_Block().eval(), ARGS, *NAMES)


def test_semantic_graph_holds_one_node_per_operator_call_with_its_attributes():
    model = _semantic()
    found = [(n.op_type, {k: a.value for k, a in n.attributes.items()}) for n in model.graph if n.domain == SEMANTIC_DOMAIN]
    assert found == [
        ("w4a4_linear", {"k": K, "n": N, "group_size": GROUP, "clip_ratio": 1.0}),
        ("w4a4_linear", {"k": K, "n": N, "group_size": GROUP, "clip_ratio": pytest.approx(0.9)}),
        ("quantize_kv", {"bits": 4}),
        ("dequantize_kv", {"bits": 4}),
        ("select_topk", {"k": 2}),
    ]
    # none of the operators' arithmetic is in the graph yet
    standard = {n.op_type for n in model.graph if n.domain in ("", "ai.onnx")}
    assert not standard & {"QuantizeLinear", "DequantizeLinear", "MatMul", "TopK", "BitShift"}
    linear = next(n for n in model.graph if n.op_type == "w4a4_linear")
    assert [v.name for v in linear.inputs] == ["x", "packed_a", "scale_a"]
    assert linear.outputs[0].shape[-1] == N


def test_portable_rules_give_the_exported_graph():
    model = _semantic()
    assert expand(model, PORTABLE_RULES) == 5
    assert not [n for n in model.graph if n.domain == SEMANTIC_DOMAIN]
    assert SEMANTIC_DOMAIN not in model.opset_imports
    proto = expand_to_onnx(model, PORTABLE_RULES)  # nothing left to expand
    assert proto.SerializeToString() == export_onnx(_Block().eval(), ARGS, *NAMES).SerializeToString()


def _weight_only(x, packed, scale, k: int, n: int, group_size: int, clip_ratio: float):
    """A flavour's W4A4 Linear that leaves the activations in float (weight-only INT4)."""
    return op.MatMul(x, onnx_translation.dequantize_int4(packed, scale, k, n, group_size))


def test_a_flavour_rule_replaces_its_operator_and_keeps_names_shapes_and_provenance():
    model = _semantic()
    linears = [n for n in model.graph if n.op_type == "w4a4_linear"]
    names = [n.outputs[0].name for n in linears]
    shapes = [n.outputs[0].shape for n in linears]
    provenance = [dict(n.metadata_props) for n in linears]
    expand(model, {**PORTABLE_RULES, "w4a4_linear": _weight_only})  # (expand_to_onnx below has nothing left to expand)
    by_output = {v.name: v for n in model.graph for v in n.outputs}
    for name, shape, meta in zip(names, shapes, provenance):
        producer = by_output[name].producer()
        assert producer.op_type == "MatMul" and producer.name == f"node_{name}"
        assert by_output[name].shape == shape
        assert dict(producer.metadata_props) == meta and meta  # the exporter's stamps, carried over
    proto = expand_to_onnx(model, PORTABLE_RULES)
    # the activation quantizers of the W4A4 Linears went; the KV quantizer stayed
    assert activation_quantizers(proto) == []
    assert len(activation_quantizers(export_onnx(_Block().eval(), ARGS, *NAMES))) == 2  # portable: one per Linear (their clip ratios differ)
    assert any(n.op_type == "QuantizeLinear" and len(n.input) == 3 for n in proto.graph.node)  # the KV codes, with zero points
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x = ARGS[0].numpy()
    _, keep = sess.run(None, {"x": x})
    block = _Block()
    w_b = ops.dequantize_weight(ops.unpack_int4(block.packed_b, (K, N)).to(torch.float32), block.scale_b, GROUP).numpy()
    expected = np.argsort(-(x @ w_b).sum(-1), kind="stable")[:, :2]
    assert np.array_equal(keep, np.sort(expected, axis=-1))


@pytest.mark.parametrize("rules, message", [
    ({k: v for k, v in PORTABLE_RULES.items() if k != "quantize_kv"}, "no rule for quota.quantize_kv"),
    ({**PORTABLE_RULES, "quantize_kv": lambda x, bits: op.Identity(x)}, "returned 1 values for 3 outputs"),
    ({**PORTABLE_RULES, "select_topk": lambda scores, k: scores}, "returned a value it did not make"),
])
def test_rule_errors(rules, message):
    with pytest.raises(SemanticError, match=message):
        expand(_semantic(), rules)


class _Pieces(torch.nn.Module):
    """A W4A4 Linear with a bias, a Linear with 8-bit activations (its pieces: quantizer,
    weight dequantizer, matmul) and a bias, a weight-only Linear, and an INT4 embedding lookup."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        for name in ("a", "b", "c"):
            q, scale = ops.quantize_weight_rtn(torch.randn(K, K, generator=g) * 0.1, 4, GROUP)
            self.register_buffer(f"packed_{name}", ops.pack_int4(q))
            self.register_buffer(f"scale_{name}", scale)
            self.register_buffer(f"bias_{name}", torch.randn(K, generator=g))
        codes, scale = ops.quantize_rows_rtn(torch.randn(10, K, generator=g), 4, GROUP)
        self.register_buffer("table", ops.pack_int4(codes))
        self.register_buffer("table_scale", scale)

    def forward(self, x, ids):
        x = x + torch.nn.functional.embedding(ids, torch.ops.quota.dequantize_int4_rows(self.table, self.table_scale, 10, K, GROUP))
        a = torch.ops.quota.w4a4_linear(x, self.packed_a, self.scale_a, K, K, GROUP, 1.0) + self.bias_a
        w_b = torch.ops.quota.dequantize_int4(self.packed_b, self.scale_b, K, K, GROUP)
        b = torch.matmul(torch.ops.quota.qdq_per_token(a, 8, 1.0), w_b) + self.bias_b
        w_c = torch.ops.quota.dequantize_int4(self.packed_c, self.scale_c, K, K, GROUP)
        return torch.matmul(b, w_c)


def test_joins_replace_a_node_and_its_reader_and_their_portable_forms_compute_the_same():
    args = (torch.randn(1, 5, K, generator=torch.Generator().manual_seed(8)), torch.tensor([[1, 4, 4, 9, 0]]))
    names = (["x", "ids"], ["y"], None)
    model = export_semantic(_Pieces().eval(), args, *names)
    assert join_readers(model, ["quantized_matmul", "int4_matmul", "int4_gather", "linear_bias"]) == 5
    found = sorted(n.op_type for n in model.graph if n.domain == SEMANTIC_DOMAIN)
    assert found == ["int4_gather", "int4_matmul", "quantized_matmul_bias", "w4a4_linear_bias"]
    assert not [n for n in model.graph if n.op_type in ("MatMul", "Gather")]  # the readers went into the joins
    joined = expand_to_onnx(model, {**PORTABLE_RULES, **JOINED_RULES})
    plain = export_onnx(_Pieces().eval(), args, *names)
    feeds = {"x": args[0].numpy(), "ids": args[1].numpy()}
    run = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0] for m in (joined, plain)]
    assert np.array_equal(run[0], run[1])  # the same operations: the same bits


class CacheAttention(torch.nn.Module):
    """One decode layer's attention over an INT4 cache, as the decode program writes it: the
    past dequantized, the new key and value quantized (the ``present`` outputs) and read back
    dequantized, then ``quota::decode_attention``. ``per_channel``: static scales, the past's
    and the new entries' equal but separate buffers (as the program has them). ``detour``: the
    past key reaches the attention through a ``Mul`` by one, which no join takes."""

    HEADS, KV_HEADS, D = 4, 2, 16

    def __init__(self, granularity: str, detour: bool = False):
        super().__init__()
        self.static, self.detour = granularity == "per_channel", detour
        if self.static:
            g = torch.Generator().manual_seed(2)
            for which in ("k", "v"):
                scale = ops.kv_static_scale(torch.rand(self.KV_HEADS, 1, self.D, generator=g) + 0.5, 4)
                self.register_buffer(f"{which}_scale_past", scale)
                self.register_buffer(f"{which}_scale_new", scale.clone())

    def forward(self, q, k, v, bias, *past):
        if self.static:
            k_past = torch.ops.quota.dequantize_kv_static(past[0], self.k_scale_past, 4)
            v_past = torch.ops.quota.dequantize_kv_static(past[1], self.v_scale_past, 4)
            kc, vc = torch.ops.quota.quantize_kv_static(k, self.k_scale_new, 4), torch.ops.quota.quantize_kv_static(v, self.v_scale_new, 4)
            k_new, v_new = torch.ops.quota.dequantize_kv_static(kc, self.k_scale_new, 4), torch.ops.quota.dequantize_kv_static(vc, self.v_scale_new, 4)
            stored = (kc, vc)
        else:
            k_past, v_past = torch.ops.quota.dequantize_kv(*past[:3], 4), torch.ops.quota.dequantize_kv(*past[3:], 4)
            ks, vs = torch.ops.quota.quantize_kv(k, 4), torch.ops.quota.quantize_kv(v, 4)
            k_new, v_new = torch.ops.quota.dequantize_kv(*ks, 4), torch.ops.quota.dequantize_kv(*vs, 4)
            stored = (*ks, *vs)
        if self.detour:
            k_past = k_past * 1.0
        return (torch.ops.quota.decode_attention(q, k_past, k_new, v_past, v_new, bias, 0.35), *stored)

    def inputs(self, batch: int = 2, past: int = 5, seed: int = 0):
        """``(args, names, output names, dynamic shapes, feeds)``; the second row's last past
        position is masked."""
        g = torch.Generator().manual_seed(seed)
        h, hkv, d = self.HEADS, self.KV_HEADS, self.D
        q, k, v = (torch.randn(batch, n, 1, d, generator=g) for n in (h, hkv, hkv))
        bias = torch.zeros(batch, 1, 1, past + 1)
        bias[1, ..., past - 1] = torch.finfo(torch.float32).min
        floats = [torch.randn(batch, hkv, past, d, generator=g) for _ in range(2)]
        if self.static:
            stored = [torch.ops.quota.quantize_kv_static(x, s, 4) for x, s in zip(floats, (self.k_scale_past, self.v_scale_past))]
            kinds = ("key", "value")
        else:
            stored = [t for x in floats for t in torch.ops.quota.quantize_kv(x, 4)]
            kinds = ("key", "key_scale", "key_zero_point", "value", "value_scale", "value_zero_point")
        names = ["q", "k", "v", "bias", *[f"past.0.{n}" for n in kinds]]
        outputs = ["attention", *[f"present.0.{n}" for n in kinds]]
        b, p = Dim("batch", min=1), Dim("past", min=2)
        dynamic = ({0: b}, {0: b}, {0: b}, {0: b, 3: p + 1}, tuple({0: b, 2: p} for _ in stored))  # (*past: one input)
        args = (q, k, v, bias, *stored)
        return args, names, outputs, dynamic, {n: a.numpy() for n, a in zip(names, args)}


@pytest.mark.parametrize("granularity", ["per_token", "per_channel"])
def test_cache_attention_join_takes_the_quantizers_and_its_portable_form_computes_the_same(granularity):
    module = CacheAttention(granularity).eval()
    args, names, outputs, dynamic, feeds = module.inputs()
    model = export_semantic(module, args, names, outputs, dynamic)
    assert join_readers(model, ["kv_decode_attention"]) == 1
    found = [n.op_type for n in model.graph if n.domain == SEMANTIC_DOMAIN]
    assert found == ["kv_decode_attention" if granularity == "per_token" else "kv_decode_attention_static"]
    joined = expand_to_onnx(model, {**PORTABLE_RULES, **JOINED_RULES})
    plain = export_onnx(module, args, names, outputs, dynamic)
    run = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds) for m in (joined, plain)]
    assert all(np.array_equal(a, b) for a, b in zip(*run))
    # and the portable graph computes the operator's PyTorch definition
    expected = module(*args)
    assert np.abs(run[1][0] - expected[0].numpy()).max() <= 1e-6
    assert all(np.array_equal(a, b.numpy()) for a, b in zip(run[1][1:], expected[1:]))
    # where the past reaches the attention through anything else, nothing is joined
    detour = CacheAttention(granularity, detour=True).eval()
    assert join_readers(export_semantic(detour, args, names, outputs, dynamic), ["kv_decode_attention"]) == 0
