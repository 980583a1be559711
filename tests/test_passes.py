"""The graph passes on tiny exported programs: counts of the ops the passes insert (derived
from the model's structure), which node reads which (nodes compared by identity, never by the
names or node counts torch's exporter happens to produce), I/O signatures, dtypes and shapes
before and after each pass, and bit-exact agreement with an eager reference built from the
same ``quota::`` ops (in the style of torchao's PT2E quantization tests).

Two programs stand in for the compiler's:
- ``Prefill``: one transformer block (q/k/v share an input, o, gate/up share an input, down)
  plus an unquantized ``head`` Linear; returns ``(logits, k, v)`` with ``k, v`` ``[B, H, T, D]``
  that attention also reads.
- ``Decode``: q/k/v/o plus ``head``; takes ``past_k, past_v [B, H, S, D]``, concatenates the new
  entry, returns ``(logits, k_new, v_new)``.
Both are exported with a dynamic batch (and past length), as ``quota_compile.capture.trace`` does.
"""

from __future__ import annotations

import operator

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto
from torch import nn
from torch.export import Dim

from quota_compile.passes import PassError, count_calls, outputs, placeholders, plain_signature, remove_unused_attributes
from quota_compile.passes.fuse_w4a4_linear import FuseW4A4Linear, w4a4_matmuls
from quota_compile.passes.insert_qdq import InsertQDQ, LinearQuantSpec
from quota_compile.passes.pack_int4_weights import PackInt4Weights
from quota_compile.passes.quantize_kv_io import STORED_SUFFIXES, QuantizeKVIO
from quota_compile.passes.strip_runtime_asserts import ASSERT_TARGETS, GUARD_MODULE, StripRuntimeAsserts
from quota_compile.export.onnx import export_onnx
from quota_compile.quant import ops
from quota_compile.quant.simulate import QuantizedWeight

QDQ_ACT = torch.ops.quota.qdq_per_token.default
QDQ_W = torch.ops.quota.qdq_weight.default
DQ_INT4 = torch.ops.quota.dequantize_int4.default
W4A4 = torch.ops.quota.w4a4_linear.default
Q_KV = torch.ops.quota.quantize_kv.default
DQ_KV = torch.ops.quota.dequantize_kv.default
LINEAR = torch.ops.aten.linear.default
MATMUL = torch.ops.aten.matmul.default
ADD = torch.ops.aten.add.Tensor
ASSERT_META = torch.ops.aten._assert_tensor_metadata.default

D_MODEL, HEADS, HEAD_DIM, FFN, VOCAB, GROUP = 32, 2, 16, 48, 11, 16
T_PREFILL, S_PAST = 5, 3
SPEC = LinearQuantSpec(weight_bits=4, group_size=GROUP, act_bits=4, clip_ratio=1.0)
PREFILL_LINEARS = ("q", "k", "v", "o", "gate", "up", "down")  # "head" stays float
DECODE_LINEARS = ("q", "k", "v", "o")
# The prefill Linears that read the same input: x (q, k, v), the attention output (o),
# h (gate, up), silu(gate) * up (down). InsertQDQ gives each group one activation quantizer.
INPUT_GROUPS = (("q", "k", "v"), ("o",), ("gate", "up"), ("down",))
# (K, N) of each Linear's weight in the MatMul layout
SHAPES = {"q": (32, 32), "k": (32, 32), "v": (32, 32), "o": (32, 32), "gate": (32, 48), "up": (32, 48), "down": (48, 32)}


# ---------------------------------------------------------------------------- programs


class _Sim:
    """What the passes are meant to produce, applied eagerly with the same ops."""

    def __init__(self, specs: dict[str, LinearQuantSpec], kv_bits: int | None):
        self.specs, self.kv_bits = specs, kv_bits


class _Base(nn.Module):
    def __init__(self):
        super().__init__()
        self.sim: _Sim | None = None

    def lin(self, name: str, x: torch.Tensor) -> torch.Tensor:
        layer = getattr(self, name)
        spec = self.sim.specs.get(f"{name}.weight") if self.sim else None
        if spec is None:
            return layer(x)
        xq = torch.ops.quota.qdq_per_token(x, spec.act_bits, spec.clip_ratio)
        y = xq @ torch.ops.quota.qdq_weight(layer.weight, spec.weight_bits, spec.group_size)
        return y if layer.bias is None else y + layer.bias

    def store(self, x: torch.Tensor):
        """(what attention reads, what the program returns) for a new KV entry."""
        if self.sim is None or self.sim.kv_bits is None:
            return x, (x,)
        stored = torch.ops.quota.quantize_kv(x, self.sim.kv_bits)
        return torch.ops.quota.dequantize_kv(*stored, self.sim.kv_bits), tuple(stored)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, HEADS, HEAD_DIM).transpose(1, 2)

    def attend(self, q, k, v, b, t):
        a = torch.softmax(q @ k.transpose(-1, -2) * HEAD_DIM**-0.5, dim=-1) @ v
        return a.transpose(1, 2).reshape(b, t, D_MODEL)


class Prefill(_Base):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(D_MODEL, D_MODEL, bias=True)
        self.k = nn.Linear(D_MODEL, D_MODEL, bias=False)
        self.v = nn.Linear(D_MODEL, D_MODEL, bias=False)
        self.o = nn.Linear(D_MODEL, D_MODEL, bias=False)
        self.gate = nn.Linear(D_MODEL, FFN, bias=False)
        self.up = nn.Linear(D_MODEL, FFN, bias=False)
        self.down = nn.Linear(FFN, D_MODEL, bias=False)
        self.head = nn.Linear(D_MODEL, VOCAB, bias=False)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.heads(self.lin("q", x)), self.heads(self.lin("k", x)), self.heads(self.lin("v", x))
        k_read, k_out = self.store(k)
        v_read, v_out = self.store(v)
        h = x + self.lin("o", self.attend(q, k_read, v_read, b, t))
        h = h + self.lin("down", F.silu(self.lin("gate", h)) * self.lin("up", h))
        return (self.lin("head", h), *k_out, *v_out)


class Decode(_Base):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(D_MODEL, D_MODEL, bias=True)
        self.k = nn.Linear(D_MODEL, D_MODEL, bias=False)
        self.v = nn.Linear(D_MODEL, D_MODEL, bias=False)
        self.o = nn.Linear(D_MODEL, D_MODEL, bias=False)
        self.head = nn.Linear(D_MODEL, VOCAB, bias=False)

    def forward(self, x, *past):
        x = x.to(torch.float32)  # leaves an _assert_tensor_metadata in the exported graph
        b, t, _ = x.shape
        if self.sim is not None and self.sim.kv_bits is not None:
            bits = self.sim.kv_bits
            past_k, past_v = (torch.ops.quota.dequantize_kv(*past[i : i + 3], bits) for i in (0, 3))
        else:
            past_k, past_v = past
        q, k, v = self.heads(self.lin("q", x)), self.heads(self.lin("k", x)), self.heads(self.lin("v", x))
        k_read, k_out = self.store(k)
        v_read, v_out = self.store(v)
        kk = torch.cat([past_k, k_read], dim=2)
        vv = torch.cat([past_v, v_read], dim=2)
        h = x + self.lin("o", self.attend(q, kk, vv, b, t))
        return (self.lin("head", h), *k_out, *v_out)


def _make(cls, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    m = cls().eval()
    with torch.no_grad():  # weights at a scale where 4-bit codes are spread out
        for p in m.parameters():
            p.mul_(2.0)
    return m


@pytest.fixture(scope="module")
def prefill_model() -> nn.Module:
    return _make(Prefill, 0)


@pytest.fixture(scope="module")
def decode_model() -> nn.Module:
    return _make(Decode, 1)


def _x(batch: int, t: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, t, D_MODEL, generator=torch.Generator().manual_seed(seed))


def _past(batch: int, s: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, HEADS, s, HEAD_DIM, generator=g) for _ in range(2))


PREFILL_DYN = ({0: Dim("batch")},)
_BATCH = Dim("batch")
_PAST = Dim("past")
DECODE_DYN = ({0: _BATCH}, ({0: _BATCH, 2: _PAST}, {0: _BATCH, 2: _PAST}))


@pytest.fixture(scope="module")
def prefill_ep(prefill_model):
    with torch.no_grad():
        return torch.export.export(prefill_model, (_x(2, T_PREFILL, 0),), dynamic_shapes=PREFILL_DYN, strict=False)


@pytest.fixture(scope="module")
def decode_ep(decode_model):
    args = (_x(2, 1, 0), *_past(2, S_PAST, 0))
    with torch.no_grad():
        return torch.export.export(decode_model, args, dynamic_shapes=DECODE_DYN, strict=False)


def _fresh(ep) -> torch.fx.GraphModule:
    """A new unlifted module with the compiler's plain positional signature (the passes edit
    the graph in place; the parameter tensors are shared but never written)."""
    return plain_signature(ep.module())


def _targets(names, spec=SPEC) -> dict[str, LinearQuantSpec]:
    return {f"{n}.weight": spec for n in names}


def _is_assert(node: torch.fx.Node) -> bool:
    """A runtime check, found by its target (never by the name torch gives the node)."""
    if node.op == "call_function":
        return node.target in ASSERT_TARGETS
    return node.op == "call_module" and node.target == GUARD_MODULE


def _add_asserts(gm) -> list[torch.fx.Node]:
    """Runtime checks of our own, whatever the exporter left: a metadata check on each input
    and a scalar check, so that stripping is never vacuous. Returns the nodes added."""
    first = next(n for n in gm.graph.nodes if n.op != "placeholder")
    added = []
    with gm.graph.inserting_before(first):
        for p in placeholders(gm):
            added.append(gm.graph.call_function(ASSERT_META, (p,), {"dtype": torch.float32}))
        added.append(gm.graph.call_function(torch.ops.aten._assert_scalar.default, (True, "added by the test")))
    gm.recompile()
    return added


def _snapshot(gm) -> list[tuple]:
    """The graph as ``(node, op, target, args, kwargs)`` in order. Nodes compare by identity, so
    two snapshots are equal when the same nodes compute the same things from the same inputs,
    whatever torch named them."""
    return [(n, n.op, n.target, n.args, dict(n.kwargs)) for n in gm.graph.nodes]


def _linear_weights(gm) -> list[str]:
    """The weights read by a float ``aten.linear`` (InsertQDQ quantizes those it is given)."""
    return sorted(n.args[1].target for n in gm.graph.nodes if n.op == "call_function" and n.target == LINEAR)


def _run(gm, *args):
    with torch.no_grad():
        return tuple(gm(*args))


# Float outputs of two separate runs are compared within float32 reassociation: a matmul's sum
# order depends on the GEMM kernel's blocking, which follows the thread count (and buffer
# alignment), so two runs of the same products can differ by a few ulps (3.6e-7 measured with 2
# threads; identical with OMP_NUM_THREADS=1). A wrong quantizer or weight moves an output by a
# quantization step (>= 1e-3 here), far above this tolerance. Integer outputs (KV codes, zero
# points, indices) are compared exactly.
FLOAT_RTOL, FLOAT_ATOL = 1e-5, 1e-6


def _assert_same(got, want):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype and a.shape == b.shape, (i, a.dtype, b.dtype, a.shape, b.shape)
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=FLOAT_RTOL, atol=FLOAT_ATOL, msg=lambda m, i=i: f"output {i}: {m}")
        else:
            assert torch.equal(a, b), f"output {i} differs: max abs diff {(a.double() - b.double()).abs().max().item()}"


# ---------------------------------------------------------------------------- StripRuntimeAsserts


def _check_strip(gm, model, *args) -> None:
    """Strip the checks the exporter left plus those ``_add_asserts`` adds: afterwards no check
    remains (found by target), every other node is still there with the same inputs, the
    program computes what the model does, and a second run finds nothing to do."""
    added = _add_asserts(gm)
    before = _snapshot(gm)
    checks = [n for n in gm.graph.nodes if _is_assert(n)]
    assert all(n in checks for n in added)
    result = StripRuntimeAsserts()(gm)
    assert result.modified is True and result.graph_module is gm
    assert not [n for n in gm.graph.nodes if _is_assert(n)]
    assert not hasattr(gm, GUARD_MODULE)
    after = _snapshot(gm)
    assert after == [entry for entry in before if entry[0] not in checks]
    _assert_same(_run(gm, *args), _run(model, *args))
    again = StripRuntimeAsserts()(gm)
    assert again.modified is False and _snapshot(gm) == after


def test_strip_runtime_asserts_prefill(prefill_ep, prefill_model):
    _check_strip(_fresh(prefill_ep), prefill_model, _x(3, T_PREFILL, 5))


def test_strip_runtime_asserts_decode(decode_ep, decode_model):
    # the decode program also converts its input (``x.to(torch.float32)``): the conversion is
    # not a check and must stay (``_check_strip`` compares every other node)
    _check_strip(_fresh(decode_ep), decode_model, _x(3, 1, 6), *_past(3, S_PAST + 2, 6))


# ---------------------------------------------------------------------------- InsertQDQ


def _act_qdq_inputs(gm) -> list[str]:
    return [n.args[0].name for n in gm.graph.nodes if n.op == "call_function" and n.target == QDQ_ACT]


def _quantized_linears(gm) -> dict[str, torch.fx.Node]:
    """Listed Linear name -> the activation quantizer its matmul reads, checking the pattern
    InsertQDQ promises: ``matmul(qdq_per_token(x), qdq_weight(weight))``."""
    act_of = {}
    for wq in (n for n in gm.graph.nodes if n.op == "call_function" and n.target == QDQ_W):
        (mm,) = wq.users
        assert mm.target == MATMUL and mm.args[1] is wq
        assert mm.args[0].target == QDQ_ACT
        act_of[wq.args[0].target.removesuffix(".weight")] = mm.args[0]
    return act_of


def test_insert_qdq_counts(prefill_ep, prefill_model):
    """Counts of our ops from the model's structure: one weight quantizer per listed Linear,
    one activation quantizer per distinct input (``INPUT_GROUPS``), one matmul per listed
    Linear and one add per listed bias; each quantizer reads what its Linear read."""
    gm = _fresh(prefill_ep)
    StripRuntimeAsserts()(gm)
    linears = [name for name, m in prefill_model.named_modules() if isinstance(m, nn.Linear)]
    assert _linear_weights(gm) == sorted(f"{n}.weight" for n in linears)  # what InsertQDQ requires
    assert count_calls(gm, QDQ_ACT) == count_calls(gm, QDQ_W) == 0
    read = {n.args[1].target.removesuffix(".weight"): n.args[0] for n in gm.graph.nodes if n.op == "call_function" and n.target == LINEAR}
    n_matmul, n_add = count_calls(gm, MATMUL), count_calls(gm, ADD)

    result = InsertQDQ(_targets(PREFILL_LINEARS))(gm)
    assert result.modified is True
    assert count_calls(gm, QDQ_W) == len(PREFILL_LINEARS)
    assert count_calls(gm, QDQ_ACT) == len(INPUT_GROUPS)
    assert count_calls(gm, MATMUL) - n_matmul == len(PREFILL_LINEARS)
    assert count_calls(gm, ADD) - n_add == sum(getattr(prefill_model, n).bias is not None for n in PREFILL_LINEARS)
    # only the unlisted head is still a float Linear
    assert _linear_weights(gm) == ["head.weight"]
    # the Linears that read one input share one activation quantizer, which reads that input
    act_of = _quantized_linears(gm)
    assert set(act_of) == set(PREFILL_LINEARS)
    groups = {frozenset(n for n in act_of if act_of[n] is a) for a in act_of.values()}
    assert groups == {frozenset(g) for g in INPUT_GROUPS}
    for name, act in act_of.items():
        assert act.args == (read[name], SPEC.act_bits, SPEC.clip_ratio)
    assert act_of["q"].args[0] is placeholders(gm)[0]  # q/k/v read the program's input
    # every weight quantizer reads its own float weight, with the spec's bits and group
    wq = [n for n in gm.graph.nodes if n.op == "call_function" and n.target == QDQ_W]
    assert sorted(n.args[0].target for n in wq) == sorted(f"{n}.weight" for n in PREFILL_LINEARS)
    for n in wq:
        assert n.args[1:] == (SPEC.weight_bits, SPEC.group_size)
        k, n_out = SHAPES[n.args[0].target.removesuffix(".weight")]
        assert tuple(gm.get_parameter(n.args[0].target).shape) == (n_out, k)
    # a bias is added to the quantized product, not to an input
    (q_mm,) = [mm for mm in act_of["q"].users if mm.args[1].args[0].target == "q.weight"]
    (bias_add,) = q_mm.users
    assert bias_add.target == ADD and bias_add.args[0] is q_mm and bias_add.args[1].target == "q.bias"


def test_insert_qdq_one_quantizer_per_input_and_spec(prefill_ep):
    """Linears that read the same input share a quantizer only if their activation spec
    (bits, clip ratio) is the same."""
    gm = _fresh(prefill_ep)
    StripRuntimeAsserts()(gm)
    targets = _targets(PREFILL_LINEARS)
    targets["up.weight"] = LinearQuantSpec(4, GROUP, 4, 0.9)  # gate keeps clip 1.0
    targets["down.weight"] = LinearQuantSpec(4, 16, 8, 1.0)  # 8-bit activations
    targets["v.weight"] = LinearQuantSpec(4, 32, 4, 1.0)  # other group size, same act spec as q/k
    InsertQDQ(targets)(gm)
    # one quantizer per (input, activation spec): {q, k, v}, {o}, {gate}, {up}, {down}
    expected = {
        (i, targets[f"{n}.weight"].act_bits, targets[f"{n}.weight"].clip_ratio)
        for i, group in enumerate(INPUT_GROUPS)
        for n in group
    }
    assert count_calls(gm, QDQ_W) == len(targets)
    assert count_calls(gm, QDQ_ACT) == len(expected) == 5
    act_args = sorted((n.args[1], n.args[2]) for n in gm.graph.nodes if n.op == "call_function" and n.target == QDQ_ACT)
    assert act_args == sorted((bits, clip) for _, bits, clip in expected)
    act_of = _quantized_linears(gm)
    assert act_of["q"] is act_of["k"] is act_of["v"]
    assert act_of["gate"] is not act_of["up"] and act_of["gate"].args[0] is act_of["up"].args[0]
    for name, act in act_of.items():
        assert act.args[1:] == (targets[f"{name}.weight"].act_bits, targets[f"{name}.weight"].clip_ratio)
    groups = sorted(n.args[2] for n in gm.graph.nodes if n.op == "call_function" and n.target == QDQ_W)
    assert groups == sorted(spec.group_size for spec in targets.values())


@pytest.mark.parametrize("batch", [1, 3])
def test_insert_qdq_matches_eager_reference(prefill_ep, prefill_model, batch):
    gm = _fresh(prefill_ep)
    StripRuntimeAsserts()(gm)
    targets = _targets(PREFILL_LINEARS)
    targets["up.weight"] = LinearQuantSpec(4, GROUP, 8, 0.9)
    InsertQDQ(targets)(gm)
    x = _x(batch, T_PREFILL, 10 + batch)
    got = _run(gm, x)
    prefill_model.sim = _Sim(targets, kv_bits=None)
    try:
        want = _run(prefill_model, x)
    finally:
        prefill_model.sim = None
    _assert_same(got, want)
    # and the quantizers do change the function, beyond the float tolerance (the test would not be vacuous)
    assert not torch.allclose(got[0], _run(prefill_model, x)[0], rtol=FLOAT_RTOL, atol=FLOAT_ATOL)


def test_insert_qdq_requires_listed_weights(prefill_ep):
    gm = _fresh(prefill_ep)
    before = _snapshot(gm)
    with pytest.raises(PassError, match="not read by a linear"):
        InsertQDQ({**_targets(PREFILL_LINEARS), "missing.weight": SPEC})(gm)
    # a get_attr that exists but is not a Linear weight
    with pytest.raises(PassError, match="not read by a linear"):
        InsertQDQ({"q.bias": SPEC})(gm)
    assert _snapshot(gm) == before


def test_insert_qdq_rejects_quantized_graph(prefill_ep):
    gm = _fresh(prefill_ep)
    InsertQDQ(_targets(PREFILL_LINEARS))(gm)
    # the head is still a float Linear, so only the "already quantized" rule can refuse this
    before = _snapshot(gm)
    with pytest.raises(PassError, match="already quantized"):
        InsertQDQ({"head.weight": SPEC})(gm)
    assert _snapshot(gm) == before and _linear_weights(gm) == ["head.weight"]
    # listing the same weights again: they are no longer read by a linear
    with pytest.raises(PassError):
        InsertQDQ(_targets(PREFILL_LINEARS))(gm)


def test_insert_qdq_nothing_listed_is_a_noop(prefill_ep, prefill_model):
    gm = _fresh(prefill_ep)
    before = _snapshot(gm)
    result = InsertQDQ({})(gm)
    assert result.modified is False
    assert _snapshot(gm) == before  # the same nodes, computing the same things from the same inputs
    x = _x(2, T_PREFILL, 12)
    _assert_same(_run(gm, x), _run(prefill_model, x))


# ---------------------------------------------------------------------------- QuantizeKVIO


def _kv_readers(gm) -> dict[torch.fx.Node, set[torch.fx.Node]]:
    """The new K/V entries (outputs 1 and 2) -> the nodes other than the output that read
    them (attention)."""
    return {src: {u for u in src.users if u.op != "output"} for src in outputs(gm)[1:3]}


def _check_stored_outputs(gm, readers, outs, bits) -> None:
    """Each new K/V entry is now read by its quantizer alone, the three stored tensors are
    outputs, and the former readers read ``dequantize_kv`` of exactly those tensors: attention
    sees what the cache holds."""
    for src, stored in zip(readers, (outs[1:4], outs[4:7])):
        (q,) = src.users
        assert q.target == Q_KV and q.args == (src, bits)
        assert [(s.target, s.args) for s in stored] == [(operator.getitem, (q, i)) for i in range(3)]
        (dq,) = [u for u in stored[0].users if u.target == DQ_KV]
        assert dq.args == (*stored, bits)
        assert set(dq.users) == readers[src]


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_kv_io_prefill(prefill_ep, prefill_model, bits):
    gm = _fresh(prefill_ep)
    StripRuntimeAsserts()(gm)
    # the model's signature: x -> (logits, k, v)
    assert (len(placeholders(gm)), len(outputs(gm))) == (1, 3)
    logits = outputs(gm)[0]
    readers = _kv_readers(gm)
    assert all(readers.values())  # attention reads each entry it returns
    result = QuantizeKVIO(bits, kv_inputs=(), kv_outputs=(1, 2))(gm)
    assert result.modified is True
    assert (len(placeholders(gm)), len(outputs(gm))) == (1, 3 + 2 * 2)
    assert count_calls(gm, Q_KV) == 2 and count_calls(gm, DQ_KV) == 2
    outs = outputs(gm)
    assert outs[0] is logits  # untouched
    _check_stored_outputs(gm, readers, outs, bits)

    batch = 3
    x = _x(batch, T_PREFILL, 20 + bits)
    got = _run(gm, x)
    d = HEAD_DIM // 2 if bits == 4 else HEAD_DIM
    stat = (batch, HEADS, T_PREFILL, 1)
    assert [(t.dtype, tuple(t.shape)) for t in got] == [
        (torch.float32, (batch, T_PREFILL, VOCAB)),
        (torch.uint8, (batch, HEADS, T_PREFILL, d)),
        (torch.float32, stat),
        (torch.uint8, stat),
        (torch.uint8, (batch, HEADS, T_PREFILL, d)),
        (torch.float32, stat),
        (torch.uint8, stat),
    ]
    prefill_model.sim = _Sim({}, kv_bits=bits)
    try:
        want = _run(prefill_model, x)
    finally:
        prefill_model.sim = None
    _assert_same(got, want)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_kv_io_decode(decode_ep, decode_model, bits):
    gm = _fresh(decode_ep)
    StripRuntimeAsserts()(gm)
    # the model's signature: (x, past_k, past_v) -> (logits, k, v)
    x_in, *past_in = placeholders(gm)
    assert len(past_in) == 2 and len(outputs(gm)) == 3
    past_readers = {p.target: set(p.users) for p in past_in}
    assert all(past_readers.values())
    readers = _kv_readers(gm)
    QuantizeKVIO(bits, kv_inputs=(1, 2), kv_outputs=(1, 2))(gm)
    # each listed input becomes its stored tensors, named after it; x stays first
    ph = placeholders(gm)
    assert ph[0] is x_in
    assert [p.target for p in ph[1:]] == [f"{p}_{s}" for p in past_readers for s in STORED_SUFFIXES]
    assert len({p.target for p in ph}) == len(ph)
    assert len(outputs(gm)) == 3 + 2 * 2
    assert count_calls(gm, Q_KV) == 2
    assert count_calls(gm, DQ_KV) == 2 + 2  # new entries (attention reads them) + past inputs
    # each past input is read through one dequantize_kv, which the input's readers now read
    for i, old in zip((1, 4), past_readers):
        (dq,) = ph[i].users
        assert dq.target == DQ_KV and dq.args == (*ph[i : i + 3], bits)
        assert all(len(p.users) == 1 and next(iter(p.users)) is dq for p in ph[i : i + 3])
        assert set(dq.users) == past_readers[old]
    _check_stored_outputs(gm, readers, outputs(gm), bits)

    batch, past = 3, S_PAST + 4
    x, pk, pv = _x(batch, 1, 30 + bits), *_past(batch, past, 30 + bits)
    stored = [*ops.quantize_kv(pk, bits), *ops.quantize_kv(pv, bits)]
    got = _run(gm, x, *stored)
    d = HEAD_DIM // 2 if bits == 4 else HEAD_DIM
    stat = (batch, HEADS, 1, 1)
    assert [(t.dtype, tuple(t.shape)) for t in got] == [
        (torch.float32, (batch, 1, VOCAB)),
        (torch.uint8, (batch, HEADS, 1, d)),
        (torch.float32, stat),
        (torch.uint8, stat),
        (torch.uint8, (batch, HEADS, 1, d)),
        (torch.float32, stat),
        (torch.uint8, stat),
    ]
    decode_model.sim = _Sim({}, kv_bits=bits)
    try:
        want = _run(decode_model, x, *stored)
    finally:
        decode_model.sim = None
    _assert_same(got, want)


def test_quantize_kv_io_requires(prefill_ep, decode_ep):
    gm = _fresh(prefill_ep)
    with pytest.raises(PassError, match="outside"):
        QuantizeKVIO(4, kv_outputs=(1, 3))(gm)
    with pytest.raises(PassError, match="outside"):
        QuantizeKVIO(4, kv_inputs=(1,))(gm)
    assert count_calls(gm, Q_KV) == 0 and len(outputs(gm)) == 3
    QuantizeKVIO(4, kv_outputs=(1, 2))(gm)
    with pytest.raises(PassError, match="already quantized"):
        QuantizeKVIO(4, kv_outputs=(0,))(gm)
    # nothing listed: a no-op that says so
    gm = _fresh(decode_ep)
    assert QuantizeKVIO(8)(gm).modified is False
    assert (len(placeholders(gm)), len(outputs(gm))) == (3, 3)


# ---------------------------------------------------------------------------- PackInt4Weights


def test_pack_int4_weights(prefill_ep):
    gm = _fresh(prefill_ep)
    StripRuntimeAsserts()(gm)
    InsertQDQ(_targets(PREFILL_LINEARS))(gm)
    x = _x(3, T_PREFILL, 40)
    before = _run(gm, x)
    n_qdq_w = count_calls(gm, QDQ_W)
    assert n_qdq_w == len(PREFILL_LINEARS) and count_calls(gm, DQ_INT4) == 0
    float_w = {f"{n}.weight": gm.get_parameter(f"{n}.weight").detach().clone() for n in PREFILL_LINEARS}
    assert {name for name, _ in gm.named_parameters()} == {*float_w, "q.bias", "head.weight"}
    assert not list(gm.named_buffers())

    result = PackInt4Weights()(gm)
    assert result.modified is True
    assert count_calls(gm, QDQ_W) == 0
    assert count_calls(gm, DQ_INT4) == n_qdq_w
    # the float weights of the packed Linears are gone; the head and the bias stay
    assert {name for name, _ in gm.named_parameters()} == {"q.bias", "head.weight"}
    buffers = dict(gm.named_buffers())
    assert set(buffers) == {f"{n}_weight_{s}" for n in PREFILL_LINEARS for s in ("int4", "scale")}
    for node in (n for n in gm.graph.nodes if n.op == "call_function" and n.target == DQ_INT4):
        packed_node, scale_node, k, n, group = node.args
        name = packed_node.target.removesuffix("_weight_int4")
        assert (k, n, group) == (*SHAPES[name], GROUP)
        assert scale_node.target == f"{name}_weight_scale"
        packed, scale = buffers[packed_node.target], buffers[scale_node.target]
        assert packed.dtype == torch.uint8 and packed.shape == (k * n // 2,)
        assert scale.dtype == torch.float32 and tuple(scale.shape) == (k // GROUP, n)
        codes, ref_scale = ops.quantize_weight_rtn(float_w[f"{name}.weight"], 4, GROUP)
        assert torch.equal(ops.unpack_int4(packed, (k, n)), codes)
        assert torch.equal(scale, ref_scale)
        assert [u.target for u in node.users] == [MATMUL]
    _assert_same(_run(gm, x), before)


def test_pack_int4_weights_uses_given_codes(prefill_ep):
    gm = _fresh(prefill_ep)
    InsertQDQ(_targets(("q", "k")))(gm)
    codes, scale = ops.quantize_weight_rtn(gm.get_parameter("k.weight"), 4, GROUP)
    given = QuantizedWeight(codes=-codes.clamp(min=-7), scale=scale * 2, group_size=GROUP)
    PackInt4Weights({"k.weight": given})(gm)
    assert torch.equal(ops.unpack_int4(gm.get_buffer("k_weight_int4"), (32, 32)), given.codes)
    assert torch.equal(gm.get_buffer("k_weight_scale"), given.scale)
    # q had no codes given: RTN
    q_codes, _ = ops.quantize_weight_rtn(prefill_ep.module().get_parameter("q.weight"), 4, GROUP)
    assert torch.equal(ops.unpack_int4(gm.get_buffer("q_weight_int4"), (32, 32)), q_codes)

    gm = _fresh(prefill_ep)
    InsertQDQ(_targets(("k",)))(gm)
    wrong = QuantizedWeight(codes=codes, scale=scale[:1], group_size=32)
    with pytest.raises(PassError, match="group"):
        PackInt4Weights({"k.weight": wrong})(gm)


class _WeightFromInput(nn.Module):
    def forward(self, x, w):
        return x @ torch.ops.quota.qdq_weight(w, 4, GROUP)


def test_pack_int4_weights_requires_stored_weight():
    args = (torch.randn(2, 32), torch.randn(8, 32))
    gm = plain_signature(torch.export.export(_WeightFromInput(), args, strict=False).module())
    assert count_calls(gm, QDQ_W) == 1
    with pytest.raises(PassError, match="does not read a stored weight"):
        PackInt4Weights()(gm)
    assert count_calls(gm, QDQ_W) == 1 and count_calls(gm, DQ_INT4) == 0


def test_pack_int4_weights_refuses_other_bit_widths(prefill_ep):
    """Regression: an 8-bit ``qdq_weight`` used to be packed as INT4 (its codes masked to a
    nibble), silently changing the weights."""
    gm = _fresh(prefill_ep)
    InsertQDQ(_targets(("q",), LinearQuantSpec(8, GROUP, 4, 1.0)))(gm)
    x = _x(2, T_PREFILL, 41)
    before = _run(gm, x)
    (qdq,) = [n for n in gm.graph.nodes if n.op == "call_function" and n.target == QDQ_W]
    assert qdq.args[0].target == "q.weight" and qdq.args[1:] == (8, GROUP)

    with pytest.raises(PassError, match="8 bits"):
        PackInt4Weights()(gm)
    assert count_calls(gm, QDQ_W) == 1 and count_calls(gm, DQ_INT4) == 0
    assert qdq in gm.graph.nodes and qdq.args[0].target == "q.weight" and qdq.args[1:] == (8, GROUP)
    assert "q.weight" in dict(gm.named_parameters()) and not list(gm.named_buffers())
    _assert_same(_run(gm, x), before)


class _Inner(nn.Module):
    def __init__(self, name: str):
        super().__init__()
        self.add_module(name, nn.Linear(D_MODEL, D_MODEL, bias=False))


class _CollidingNames(nn.Module):
    """``a.b_c.weight`` and ``a_b.c.weight`` both flatten to ``a_b_c_weight``; same shapes,
    so a shared buffer would pass the shape check in ``ensures``."""

    def __init__(self):
        super().__init__()
        self.a, self.a_b = _Inner("b_c"), _Inner("c")

    def forward(self, x):
        return self.a.b_c(x), self.a_b.c(x)


def test_pack_int4_weights_distinct_buffers_for_colliding_names():
    """Regression: the second weight's buffers used to overwrite the first's, so both
    ``dequantize_int4`` nodes read the same codes."""
    model = _make(_CollidingNames, 7)
    x = _x(2, T_PREFILL, 42)
    with torch.no_grad():
        ep = torch.export.export(model, (x,), dynamic_shapes=PREFILL_DYN, strict=False)
    gm = _fresh(ep)
    targets = _targets(("a.b_c", "a_b.c"))
    InsertQDQ(targets)(gm)
    assert count_calls(gm, QDQ_W) == 2
    before = _run(gm, x)
    assert not torch.allclose(before[0], before[1], rtol=FLOAT_RTOL, atol=FLOAT_ATOL)
    float_w = {t: gm.get_parameter(t).detach().clone() for t in targets}

    PackInt4Weights()(gm)
    assert count_calls(gm, QDQ_W) == 0
    dqs = [n for n in gm.graph.nodes if n.op == "call_function" and n.target == DQ_INT4]
    assert len(dqs) == 2
    packed_names = {n.args[0].target for n in dqs}
    scale_names = {n.args[1].target for n in dqs}
    assert len(packed_names) == 2 and len(scale_names) == 2 and not packed_names & scale_names
    assert set(dict(gm.named_buffers())) == packed_names | scale_names
    # each node reads the codes of its own weight (outputs are in forward order: a.b_c, a_b.c)
    out_nodes = outputs(gm)
    for target, out in zip(targets, out_nodes):
        (dq,) = [n for n in dqs if n in _ancestors(out)]
        codes, scale = ops.quantize_weight_rtn(float_w[target], 4, GROUP)
        assert torch.equal(ops.unpack_int4(gm.get_buffer(dq.args[0].target), (D_MODEL, D_MODEL)), codes)
        assert torch.equal(gm.get_buffer(dq.args[1].target), scale)
    _assert_same(_run(gm, x), before)


def _ancestors(node: torch.fx.Node) -> set[torch.fx.Node]:
    seen, todo = set(), [node]
    while todo:
        for m in todo.pop().all_input_nodes:
            if m not in seen:
                seen.add(m)
                todo.append(m)
    return seen


# ---------------------------------------------------------------------------- FuseW4A4Linear


def _pieces(gm) -> dict[torch.fx.Node, tuple]:
    """Each W4A4 Linear as insert_qdq and pack_int4_weights left it: matmul -> (activation
    input, packed weight node, scale node, k, n, group, clip ratio), read from the nodes."""
    out = {}
    for mm in w4a4_matmuls(gm):
        qdq, deq = mm.args
        out[mm] = (qdq.args[0], *deq.args, qdq.args[2])
    return out


def test_fuse_w4a4_linear_makes_each_w4a4_linear_one_operator(prefill_ep):
    gm = _fresh(prefill_ep)
    for p in (StripRuntimeAsserts(), InsertQDQ(_targets(PREFILL_LINEARS, LinearQuantSpec(4, GROUP, 4, 0.9))), PackInt4Weights()):
        p(gm)
    x = _x(3, T_PREFILL, 70)
    before = _run(gm, x)
    pieces = _pieces(gm)
    assert len(pieces) == len(PREFILL_LINEARS)
    # where each Linear's result goes (the bias add of q, the attention, the residual...)
    readers = {args[1].target: {u for u in mm.users} for mm, args in pieces.items()}
    assert FuseW4A4Linear()(gm).modified is True
    assert w4a4_matmuls(gm) == [] and count_calls(gm, QDQ_ACT) == count_calls(gm, DQ_INT4) == 0
    fused = [n for n in gm.graph.nodes if n.op == "call_function" and n.target == W4A4]
    # one operator per Linear, with the arguments its pieces had, read by what read the matmul
    assert sorted(n.args[1:] for n in fused) == sorted(args[1:] for args in pieces.values())
    for n in fused:
        want = next(args for args in pieces.values() if args[1] is n.args[1])
        assert n.args == want
        assert set(n.users) == readers[n.args[1].target]
    # Linears that read the same input read it through their own operator, from that input
    assert len({n.args[0] for n in fused}) == len(INPUT_GROUPS)
    assert all(n.args[6] == 0.9 for n in fused)
    _assert_same(_run(gm, x), before)


def test_use_kmajor_weights_holds_the_same_codes_in_the_kmajor_layout(prefill_ep):
    """The PyTorch path's optional layout: each W4A4 Linear whose K-major form exists (K/2 a
    multiple of the group) reads a new constant with the same codes in that layout through
    ``w4a4_linear_kmajor``; the one that does not fit (down: K = 48, 3 groups) is left; the
    old packed constants go; the outputs are the same (the CPU computes both alike)."""
    from quota_compile.kernels.reference import unpack_int4_kmajor
    from quota_compile.passes.use_kmajor_weights import UseKMajorWeights, fits_kmajor

    gm = _fresh(prefill_ep)
    for p in (StripRuntimeAsserts(), InsertQDQ(_targets(PREFILL_LINEARS, LinearQuantSpec(4, GROUP, 4, 0.9))), PackInt4Weights(),
              FuseW4A4Linear()):
        p(gm)
    x = _x(3, T_PREFILL, 71)
    before = _run(gm, x)
    fused = {n.args[1].target: n.args for n in gm.graph.nodes if n.op == "call_function" and n.target == W4A4}
    packed = {t: getattr(gm, t).clone() for t in fused}
    assert UseKMajorWeights()(gm).modified is True
    kmajor = [n for n in gm.graph.nodes if n.op == "call_function" and n.target == torch.ops.quota.w4a4_linear_kmajor.default]
    left = [n for n in gm.graph.nodes if n.op == "call_function" and n.target == W4A4]
    assert len(kmajor) == len(PREFILL_LINEARS) - 1 and [n.args[3] for n in left] == [FFN]
    assert not fits_kmajor(FFN, GROUP) and fits_kmajor(D_MODEL, GROUP) and fits_kmajor(FFN, FFN)
    for n in kmajor:
        old = next(t for t, args in fused.items() if args[0] is n.args[0] and args[2] is n.args[2])
        assert n.args[2:] == fused[old][2:]
        k, width = n.args[3], n.args[4]
        assert torch.equal(unpack_int4_kmajor(getattr(gm, n.args[1].target), k), ops.unpack_int4(packed[old], (k, width)))
        assert not hasattr(gm, old)  # no operator reads the graph-packing copy any more
    _assert_same(_run(gm, x), before)


def test_fuse_w4a4_linear_leaves_other_linears_as_their_pieces(prefill_ep):
    """8-bit activations and weight-only Linears are not W4A4 Linears: nothing changes."""
    specs = {"q.weight": LinearQuantSpec(4, GROUP, 8, 1.0), "k.weight": LinearQuantSpec(4, GROUP, 8, 1.0),
             "gate.weight": LinearQuantSpec(4, GROUP, None, 1.0)}
    gm = _fresh(prefill_ep)
    for p in (InsertQDQ(specs), PackInt4Weights()):
        p(gm)
    snapshot = _snapshot(gm)
    assert FuseW4A4Linear()(gm).modified is False
    assert _snapshot(gm) == snapshot and count_calls(gm, W4A4) == 0


def test_the_fused_graph_lowers_to_the_graph_its_pieces_lower_to(prefill_ep, decode_ep):
    """The portable ONNX translation of ``quota.w4a4_linear`` is the graph the pieces gave:
    node for node the same operators, attributes, inputs and initializers (names aside)."""
    from tests.graph_structure import differences, structure

    names = ["logits", "k", "k_scale", "k_zero_point", "v", "v_scale", "v_zero_point"]
    models = []
    for fuse in (False, True):
        gm = _fresh(prefill_ep)
        _pipeline(gm, _targets(PREFILL_LINEARS), 4, kv_outputs=(1, 2), fuse=fuse)
        assert count_calls(gm, W4A4) == (len(PREFILL_LINEARS) if fuse else 0)
        models.append(export_onnx(gm, (_x(2, T_PREFILL, 50),), ["x"], names, PREFILL_DYN))
    assert differences(*models) == []
    ops_used = [n[1] for n in structure(models[1])["nodes"]]
    assert ops_used.count("MatMul") >= len(PREFILL_LINEARS) and ops_used.count("QuantizeLinear") == len(INPUT_GROUPS) + 4
    # and the comparison sees a difference where there is one: the decode graph is another graph
    gm = _fresh(decode_ep)
    _pipeline(gm, _targets(DECODE_LINEARS), 4, kv_inputs=(1, 2), kv_outputs=(1, 2))
    x, pk, pv = _x(2, 1, 60), *_past(2, S_PAST, 60)
    args = (x, *ops.quantize_kv(pk, 4), *ops.quantize_kv(pv, 4))
    in_names = ["x"] + [f"past_{kv}{s}" for kv in "kv" for s in ("", "_scale", "_zero_point")]
    other = export_onnx(gm, args, in_names, names, ({0: _BATCH},) + ({0: _BATCH, 2: _PAST},) * 6)
    assert differences(models[1], other)


# ---------------------------------------------------------------------------- lowering


def _pipeline(gm, targets, kv_bits, kv_inputs=(), kv_outputs=(), fuse: bool = True) -> list[tuple[str, bool]]:
    """The passes in the order the compiler applies them (``quota_compile.capture.trace``);
    ``fuse=False`` stops before ``fuse_w4a4_linear`` (the W4A4 Linears as their pieces)."""
    log = []
    passes = [StripRuntimeAsserts(), InsertQDQ(targets), QuantizeKVIO(kv_bits, kv_inputs, kv_outputs), PackInt4Weights()]
    for p in passes + ([FuseW4A4Linear()] if fuse else []):
        log.append((p.name, p(gm).modified))
    remove_unused_attributes(gm)
    return log


def _op_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in model.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def _expected_qdq(counts: dict, act_inputs: int) -> dict[str, int]:
    """ONNX QuantizeLinear / DequantizeLinear counts from our ops' lowering: each distinct
    activation quantizer input (``act_inputs``: Linears that read the same input share one) ->
    1 Q + 1 DQ; each w4a4_linear -> 1 DQ of its weight; quantize_kv -> 2 Q (zero point,
    codes); dequantize_kv -> 1 DQ."""
    return {
        "n_q": act_inputs + 2 * counts[Q_KV],
        "n_dq": act_inputs + counts[W4A4] + counts[DQ_KV],
    }


def _w4a4_inputs(gm) -> int:
    return len({n.args[0] for n in gm.graph.nodes if n.op == "call_function" and n.target == W4A4})


def _check_lowered(model: onnx.ModelProto, n_q: int, n_dq: int, int4_shapes: list[tuple[int, int]]) -> None:
    counts = _op_counts(model)
    assert (counts.get("QuantizeLinear", 0), counts.get("DequantizeLinear", 0)) == (n_q, n_dq)
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}
    int4 = {t.name: t for t in model.graph.initializer if t.data_type == TensorProto.INT4}
    assert sorted(tuple(t.dims) for t in int4.values()) == sorted(int4_shapes)
    for t in int4.values():
        assert len(t.raw_data) == t.dims[0] * t.dims[1] // 2
    # every INT4 initializer is read by exactly one DequantizeLinear (blocked along K)
    for name in int4:
        readers = [n for n in model.graph.node if name in n.input]
        assert [n.op_type for n in readers] == ["DequantizeLinear"]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in readers[0].attribute}
        assert attrs["axis"] == 0 and attrs["block_size"] == GROUP
    # no float copy of a quantized weight survived (only the head's [32, 11] / [11, 32] may)
    float_2d = [tuple(t.dims) for t in model.graph.initializer if t.data_type == TensorProto.FLOAT and len(t.dims) == 2]
    assert sorted(float_2d) == sorted([(k // GROUP, n) for k, n in int4_shapes] + [_head_shape(model)])
    # no uint8 packed buffer left beside its INT4 initializer
    assert not [t for t in model.graph.initializer if t.data_type == TensorProto.UINT8 and len(t.dims) == 1 and t.dims[0] > 1]
    onnx.checker.check_model(model, full_check=True)


def _head_shape(model) -> tuple[int, int]:
    shapes = [tuple(t.dims) for t in model.graph.initializer if t.data_type == TensorProto.FLOAT and VOCAB in t.dims]
    assert len(shapes) == 1 and sorted(shapes[0]) == sorted((D_MODEL, VOCAB))
    return shapes[0]


def _session(model):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def test_lowered_prefill_graph(prefill_ep):
    gm = _fresh(prefill_ep)
    log = _pipeline(gm, _targets(PREFILL_LINEARS), 4, kv_outputs=(1, 2))
    assert log == [("strip_runtime_asserts", True), ("insert_qdq", True), ("quantize_kv_io", True), ("pack_int4_weights", True),
                   ("fuse_w4a4_linear", True)]
    counts = {t: count_calls(gm, t) for t in (QDQ_ACT, DQ_INT4, W4A4, Q_KV, DQ_KV, QDQ_W)}
    n_pl = len(PREFILL_LINEARS)
    assert counts == {QDQ_ACT: 0, DQ_INT4: 0, W4A4: n_pl, Q_KV: 2, DQ_KV: 2, QDQ_W: 0}
    assert _w4a4_inputs(gm) == len(INPUT_GROUPS)
    assert _linear_weights(gm) == ["head.weight"]
    x = _x(2, T_PREFILL, 50)
    names = ["logits", "k", "k_scale", "k_zero_point", "v", "v_scale", "v_zero_point"]
    model = export_onnx(gm, (x,), ["x"], names, PREFILL_DYN)
    # Each w4a4_linear is written as its activation Q/DQ, its weight's DQ and a MatMul; the
    # Linears of one input group write the same Q/DQ pair, which the exporter's CSE keeps once.
    _check_lowered(model, int4_shapes=[SHAPES[n] for n in PREFILL_LINEARS], **_expected_qdq(counts, len(INPUT_GROUPS)))
    assert [o.name for o in model.graph.output] == names
    elem = [o.type.tensor_type.elem_type for o in model.graph.output]
    assert elem == [TensorProto.FLOAT] + [TensorProto.UINT8, TensorProto.FLOAT, TensorProto.UINT8] * 2
    # runs in onnxruntime at another batch size with the stored dtypes and shapes
    got = _session(model).run(None, {"x": _x(3, T_PREFILL, 51).numpy()})
    ref = _run(gm, _x(3, T_PREFILL, 51))
    assert [(g.dtype, g.shape) for g in got] == [(r.numpy().dtype, tuple(r.shape)) for r in ref]
    assert got[1].shape == (3, HEADS, T_PREFILL, HEAD_DIM // 2)


def test_lowered_decode_graph(decode_ep):
    gm = _fresh(decode_ep)
    _pipeline(gm, _targets(DECODE_LINEARS), 8, kv_inputs=(1, 2), kv_outputs=(1, 2))
    counts = {t: count_calls(gm, t) for t in (QDQ_ACT, DQ_INT4, W4A4, Q_KV, DQ_KV)}
    # activations: x (q, k, v) and the attention output (o); KV: 2 new entries, 2 + 2 read back
    assert counts == {QDQ_ACT: 0, DQ_INT4: 0, W4A4: len(DECODE_LINEARS), Q_KV: 2, DQ_KV: 4}
    assert _w4a4_inputs(gm) == 2
    assert not [n for n in gm.graph.nodes if _is_assert(n)]
    x, pk, pv = _x(2, 1, 60), *_past(2, S_PAST, 60)
    args = (x, *ops.quantize_kv(pk, 8), *ops.quantize_kv(pv, 8))
    in_names = ["x"] + [f"past_{kv}{s}" for kv in "kv" for s in ("", "_scale", "_zero_point")]
    out_names = ["logits"] + [f"present_{kv}{s}" for kv in "kv" for s in ("", "_scale", "_zero_point")]
    stored_dyn = {0: _BATCH, 2: _PAST}
    model = export_onnx(gm, args, in_names, out_names, ({0: _BATCH},) + (stored_dyn,) * 6)
    _check_lowered(model, int4_shapes=[SHAPES[n] for n in DECODE_LINEARS], **_expected_qdq(counts, 2))
    elem = [i.type.tensor_type.elem_type for i in model.graph.input]
    assert elem == [TensorProto.FLOAT] + [TensorProto.UINT8, TensorProto.FLOAT, TensorProto.UINT8] * 2
    batch, past = 3, S_PAST + 3
    x, pk, pv = _x(batch, 1, 61), *_past(batch, past, 61)
    feed = dict(zip(in_names, (t.numpy() for t in (x, *ops.quantize_kv(pk, 8), *ops.quantize_kv(pv, 8)))))
    got = _session(model).run(None, feed)
    stat = (batch, HEADS, 1, 1)
    assert [(g.dtype, g.shape) for g in got] == [
        (np.float32, (batch, 1, VOCAB)),
        (np.uint8, (batch, HEADS, 1, HEAD_DIM)),
        (np.float32, stat),
        (np.uint8, stat),
        (np.uint8, (batch, HEADS, 1, HEAD_DIM)),
        (np.float32, stat),
        (np.uint8, stat),
    ]


# ---------------------------------------------------------------------------- decode attention


class _DecodeStep(nn.Module):
    """One decode step's attention with grouped heads (4 query heads on 2 KV heads), written
    as the semantic operator or as its definition inline."""

    def __init__(self, semantic: bool):
        super().__init__()
        self.semantic = semantic

    def forward(self, q, k_past, k_new, v_past, v_new, bias):
        from quota_compile.quant.attention import decode_attention_reference

        attend = torch.ops.quota.decode_attention if self.semantic else decode_attention_reference
        return (attend(q, k_past, k_new, v_past, v_new, bias, 0.25) * 2.0,)


def _decode_step_args(batch: int, past: int, seed: int) -> tuple:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, 4, 1, HEAD_DIM, generator=g)
    kv = [torch.randn(batch, 2, n, HEAD_DIM, generator=g) for n in (past, 1, past, 1)]
    bias = torch.zeros(batch, 1, 1, past + 1)
    bias[0, ..., :2] = float("-inf")  # two masked positions in the first sample
    return (q, *kv, bias)


def test_the_decode_attention_operator_exports_as_its_definition():
    """``quota.decode_attention`` stays one node in the traced program, and the ONNX export
    writes it as the operations of its PyTorch definition: the same computation, dimension
    names and I/O as the definition traced inline, and onnxruntime's result is the definition's."""
    from quota_compile.quant.attention import decode_attention_reference
    from tests.graph_structure import computation, computation_differences

    args = _decode_step_args(2, S_PAST, 80)
    batch, past = Dim("batch"), Dim("past")
    dyn = ({0: batch}, {0: batch, 2: past}, {0: batch}, {0: batch, 2: past}, {0: batch}, {0: batch, 3: past + 1})
    names = ["q", "k_past", "k_new", "v_past", "v_new", "bias"]
    models, graphs = [], []
    for semantic in (True, False):
        with torch.no_grad():
            gm = plain_signature(torch.export.export(_DecodeStep(semantic), args, dynamic_shapes=dyn, strict=False).module())
        graphs.append(gm)
        models.append(export_onnx(gm, args, names, ["out"], dyn))
    assert count_calls(graphs[0], torch.ops.quota.decode_attention.default) == 1
    assert count_calls(graphs[1], torch.ops.quota.decode_attention.default) == 0
    assert computation_differences(*models) == []
    assert computation(models[0])["io"][0] == ("q", TensorProto.FLOAT, ("batch", 4, 1, HEAD_DIM))
    assert "Softmax" in [n.op_type for n in models[0].graph.node]
    other = _decode_step_args(3, S_PAST + 4, 81)
    got = _session(models[0]).run(None, dict(zip(names, (t.numpy() for t in other))))[0]
    want = decode_attention_reference(*other, 0.25) * 2.0
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-6)


def test_use_kv_decode_attention_refuses_an_attention_over_a_float_past():
    from quota_compile.passes.use_kv_decode_attention import UseKVDecodeAttention

    args = _decode_step_args(2, S_PAST, 82)
    batch = Dim("batch")
    gm = plain_signature(torch.export.export(_DecodeStep(True), args, dynamic_shapes=({0: batch},) * 6, strict=False).module())
    QuantizeKVIO(4, [1], [])(gm)  # the past key is stored; the past value stays float
    with pytest.raises(PassError, match="does not read its past from the stored cache"):
        UseKVDecodeAttention(1)(gm)
