"""Quantizer semantics: the ``quota::`` ops must produce the integers onnxruntime produces.

Three references for every quantizer:
- an independent numpy implementation of the quantizer definitions (``np.rint`` is round half to even),
- onnxruntime's QuantizeLinear / DequantizeLinear on hand-built opset-21 graphs fed the same
  scales (isolates rounding, saturation and the INT4 / UINT4 layouts),
- the ops' own ONNX lowerings (``quota_compile.export.onnx.export_onnx``) run by onnxruntime on the
  same inputs (the whole arithmetic, scales included).
Integer outputs and the float outputs of Q/DQ paths are compared bit for bit.
"""

from __future__ import annotations

import functools
import itertools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch.export import Dim

from quota_compile.export.onnx import export_onnx
from quota_compile.quant import ops
from quota_compile.export.onnx_translation import MARKER_DOMAIN

OPSET = 21
EPS32 = np.float32(ops.SCALE_EPS)
MAGNITUDES = (1e-3, 1e-1, 1.0, 1e1, 1e3)


# ---------------------------------------------------------------------------- helpers


def _model(nodes, inputs, outputs, initializers=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _vi(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, list(shape))


def _f32(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


def _assert_bits_equal(a: np.ndarray, b: np.ndarray) -> None:
    """Same dtype, same shape, equal elementwise (no tolerance)."""
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert np.array_equal(a, b), f"max abs diff {np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))}"


def _np_per_token(x: np.ndarray, bits: int, clip: float) -> tuple[np.ndarray, np.ndarray]:
    """The activation quantizer, in numpy float32."""
    qmax = 2 ** (bits - 1) - 1
    amax = np.abs(x).max(axis=-1, keepdims=True)
    if clip != 1.0:
        amax = amax * np.float32(clip)
    scale = np.maximum(amax / np.float32(qmax), EPS32)
    q = np.clip(np.rint(x / scale), -qmax - 1, qmax).astype(np.int8)
    return q, scale.astype(np.float32)


def _np_kv(x: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The KV-cache quantizer (unpacked codes), in numpy float32."""
    qmax = np.float32(2**bits - 1)
    lo = np.minimum(x.min(axis=-1, keepdims=True), np.float32(0))
    hi = np.maximum(x.max(axis=-1, keepdims=True), np.float32(0))
    scale = np.maximum((hi - lo) / qmax, EPS32)
    zp = np.clip(np.rint(-lo / scale), 0, qmax)
    q = np.clip(np.rint(x / scale) + zp, 0, qmax)
    return q.astype(np.uint8), scale.astype(np.float32), zp.astype(np.uint8)


def _tie_row(bits: int, k: int, scale: float = 1.0) -> np.ndarray:
    """A row whose absmax is qmax * scale (so the per-token scale is exactly ``scale``) and whose
    other entries sit exactly on k + 0.5 steps, both signs, up to qmax - 0.5."""
    qmax = 2 ** (bits - 1) - 1
    halves = [h + 0.5 for h in range(qmax)]
    pool = [v for h in halves for v in (h, -h)]
    row = [float(qmax)] + [pool[i % len(pool)] for i in range(k - 1)]
    return _f32(row) * np.float32(scale)


def _adversarial_rows(bits: int, k: int) -> np.ndarray:
    """Ties at scale 1 and 2**-3, an all-zero row, a huge outlier, negative and positive only."""
    rng = np.random.default_rng(1234)
    rows = [
        _tie_row(bits, k, 1.0),
        _tie_row(bits, k, 0.125),
        -_tie_row(bits, k, 4.0),
        np.zeros(k, np.float32),
    ]
    outlier = rng.standard_normal(k).astype(np.float32) * np.float32(1e-2)
    outlier[k // 2] = np.float32(3e4)
    rows.append(outlier)
    rows.append(-np.abs(rng.standard_normal(k)).astype(np.float32))
    rows.append(np.abs(rng.standard_normal(k)).astype(np.float32))
    return np.stack(rows)


# ---------------------------------------------------------------------------- activations


@functools.lru_cache(maxsize=None)
def _act_quantize_session(bits: int, k: int) -> ort.InferenceSession:
    """QuantizeLinear (block_size = K along the last axis) + DequantizeLinear, scale as input."""
    qt = TensorProto.INT4 if bits == 4 else TensorProto.INT8
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s"], ["q"], axis=-1, block_size=k, output_dtype=qt),
        helper.make_node("DequantizeLinear", ["q", "s"], ["d"], axis=-1, block_size=k),
        helper.make_node("Cast", ["q"], ["q8"], to=TensorProto.INT8),
    ]
    model = _model(
        nodes,
        [_vi("x", TensorProto.FLOAT, ["n", k]), _vi("s", TensorProto.FLOAT, ["n", 1])],
        [_vi("q8", TensorProto.INT8, ["n", k]), _vi("d", TensorProto.FLOAT, ["n", k])],
    )
    return _session(model)


@pytest.mark.parametrize("clip", [1.0, 0.85])
@pytest.mark.parametrize("k", [1, 3, 37, 128])
@pytest.mark.parametrize("bits", [4, 8])
def test_per_token_codes_match_ort_quantizelinear(bits, k, clip):
    rng = np.random.default_rng(100 * bits + k)
    sess = _act_quantize_session(bits, k)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    for mag in MAGNITUDES:
        x = (rng.standard_normal((64, k)) * mag).astype(np.float32)
        if k > 1:
            x = np.concatenate([x, _adversarial_rows(bits, k) * np.float32(mag)])
        q, scale = ops.quantize_per_token(torch.from_numpy(x), bits, clip)
        q, scale = q.numpy(), scale.numpy()
        ref_q, ref_scale = _np_per_token(x, bits, clip)
        _assert_bits_equal(scale, ref_scale)
        assert q.dtype == np.int8 and q.shape == x.shape
        assert np.array_equal(q, ref_q)
        assert q.min() >= qmin and q.max() <= qmax
        if clip == 1.0:
            # symmetric: the absmax maps to +-qmax, so -qmax - 1 never occurs
            assert q.min() >= -qmax
        ort_q, ort_d = sess.run(None, {"x": x, "s": scale})
        assert np.array_equal(ort_q, q), f"codes differ from QuantizeLinear at magnitude {mag}"
        fq = ops.qdq_per_token(torch.from_numpy(x), bits, clip).numpy()
        _assert_bits_equal(fq, ort_d)


@pytest.mark.parametrize("bits", [4, 8])
def test_per_token_ties_round_half_to_even(bits):
    qmax = 2 ** (bits - 1) - 1
    row = _f32([qmax, 0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 3.5, -3.5, qmax - 0.5, -(qmax - 0.5), -qmax])
    x = np.stack([row, row * np.float32(2.0), row * np.float32(0.0625)])
    # round half to even: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, 3.5 -> 4, 6.5 -> 6 / 126.5 -> 126
    even = qmax - 1  # qmax - 0.5 rounds to the even neighbour qmax - 1 (both 7 and 127 are odd)
    expected = np.array([qmax, 0, 0, 2, -2, 2, -2, 4, -4, even, -even, -qmax], dtype=np.int8)
    q, scale = ops.quantize_per_token(torch.from_numpy(x), bits, 1.0)
    assert scale.flatten().tolist() == [1.0, 2.0, 0.0625]
    for r in range(3):
        assert q[r].tolist() == expected.tolist()
    ort_q, ort_d = _act_quantize_session(bits, x.shape[1]).run(None, {"x": x, "s": scale.numpy()})
    assert np.array_equal(ort_q, q.numpy())
    fq = ops.qdq_per_token(torch.from_numpy(x), bits, 1.0).numpy()
    _assert_bits_equal(fq, ort_d)
    _assert_bits_equal(fq[0], expected.astype(np.float32))


@pytest.mark.parametrize("bits", [4, 8])
def test_per_token_zero_row_and_outlier(bits):
    k = 9
    zeros = np.zeros(k, np.float32)
    outlier = _f32([1e6, 1.0, -3.0, 70.0, -70.0, 0.25, 5e3, -6e4, 1e-3])
    x = np.stack([zeros, outlier])
    q, scale = ops.quantize_per_token(torch.from_numpy(x), bits, 1.0)
    assert scale[0, 0].item() == EPS32  # floored, finite
    assert q[0].tolist() == [0] * k
    qmax = 2 ** (bits - 1) - 1
    ref_q, ref_scale = _np_per_token(x, bits, 1.0)
    assert np.array_equal(q.numpy(), ref_q)
    assert q[1, 0].item() == qmax
    # everything below half a step (1e6 / qmax / 2) collapses to zero
    small = np.abs(outlier) < 1e6 / qmax / 2
    assert np.all(q[1].numpy()[small] == 0)
    ort_q, ort_d = _act_quantize_session(bits, k).run(None, {"x": x, "s": scale.numpy()})
    assert np.array_equal(ort_q, q.numpy())
    fq = ops.qdq_per_token(torch.from_numpy(x), bits, 1.0).numpy()
    _assert_bits_equal(fq, ort_d)
    assert np.all(fq[0] == 0) and np.all(np.isfinite(fq))


@pytest.mark.parametrize("bits", [4, 8])
def test_per_token_clip_ratio_saturates_at_qmin_qmax(bits):
    qmax = 2 ** (bits - 1) - 1
    qmin = -qmax - 1
    # clip 0.5: scale = 0.5 * qmax / qmax = 0.5 exactly
    h = qmax / 2  # maps to qmax
    row = _f32([qmax, -qmax, h, -h, h + 0.25, -(h + 0.25), h - 0.25, -(h - 0.25), 1.25, -1.25, 0.0, -h - 0.5])
    x = row[None, :]
    q, scale = ops.quantize_per_token(torch.from_numpy(x), bits, 0.5)
    assert scale.item() == 0.5
    # x / 0.5 with q = qmax: [2q, -2q, q, -q, q + .5, -q - .5, q - .5, -q + .5, 2.5, -2.5, 0, -q - 1]
    # ties to even (q is odd: q + .5 -> q + 1, q - .5 -> q - 1), then saturation to [qmin, qmax]
    expected = [qmax, qmin, qmax, -qmax, qmax, qmin, qmax - 1, -qmax + 1, 2, -2, 0, qmin]
    assert q[0].tolist() == expected
    assert qmin in q[0].tolist() and qmax in q[0].tolist()
    ort_q, ort_d = _act_quantize_session(bits, x.shape[1]).run(None, {"x": x, "s": scale.numpy()})
    assert np.array_equal(ort_q, q.numpy())
    fq = ops.qdq_per_token(torch.from_numpy(x), bits, 0.5).numpy()
    _assert_bits_equal(fq, ort_d)
    _assert_bits_equal(fq[0], _f32(expected) * np.float32(0.5))


class _ActQDQ(torch.nn.Module):
    def __init__(self, bits: int, clip: float):
        super().__init__()
        self.bits, self.clip = bits, clip

    def forward(self, x):
        return torch.ops.quota.qdq_per_token(x, self.bits, self.clip)


@functools.lru_cache(maxsize=None)
def _exported_act(bits: int, clip: float, k: int) -> tuple[onnx.ModelProto, ort.InferenceSession]:
    x = torch.randn(2, 5, k, generator=torch.Generator().manual_seed(0))
    model = export_onnx(_ActQDQ(bits, clip).eval(), (x,), ["x"], ["y"], ({0: Dim("batch"), 1: Dim("seq")},))
    return model, _session(model)


@pytest.mark.parametrize("clip", [1.0, 0.9])
@pytest.mark.parametrize("bits", [4, 8])
def test_exported_qdq_per_token_matches_ort(bits, clip):
    k = 37
    model, sess = _exported_act(bits, clip, k)
    ops_used = [n.op_type for n in model.graph.node]
    assert ops_used.count("QuantizeLinear") == 1 and ops_used.count("DequantizeLinear") == 1
    qnode = next(n for n in model.graph.node if n.op_type == "QuantizeLinear")
    attrs = {a.name: helper.get_attribute_value(a) for a in qnode.attribute}
    assert attrs["output_dtype"] == (TensorProto.INT4 if bits == 4 else TensorProto.INT8)
    assert attrs["block_size"] == k
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
    g = torch.Generator().manual_seed(7 + bits)
    for mag in MAGNITUDES:
        x = torch.randn(3, 11, k, generator=g) * mag  # batch / seq differ from the traced example
        adv = torch.from_numpy(_adversarial_rows(bits, k) * np.float32(mag))
        x[0, : adv.shape[0]] = adv
        (y,) = sess.run(None, {"x": x.numpy()})
        _assert_bits_equal(y, ops.qdq_per_token(x, bits, clip).numpy())


# ---------------------------------------------------------------------------- weights


def _np_weight_rtn(w: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    n, k = w.shape
    wt = w.T.reshape(k // group, group, n)
    scale = np.maximum(np.abs(wt).max(axis=1) / np.float32(7), EPS32)
    q = np.clip(np.rint(wt / scale[:, None, :]), -8, 7).reshape(k, n).astype(np.int8)
    return q, scale.astype(np.float32)


def _weight_with_ties(n: int, k: int, group: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32) * np.float32(0.05)
    # output channel 0, first group: absmax 7 -> scale 1, entries on .5 ties
    w[0, :group] = _tie_row(4, group, 1.0)
    # output channel n-1, last group: all zeros (scale floored)
    w[n - 1, k - group :] = 0.0
    # an outlier in another group
    w[n // 2, group // 2] = 40.0
    return w


@pytest.mark.parametrize(("k", "n", "group"), [(64, 24, 32), (48, 10, 16), (128, 3, 128), (32, 5, 8)])
def test_weight_rtn_codes_match_ort_blocked_quantizelinear(k, n, group):
    w = _weight_with_ties(n, k, group, seed=k * n)
    q, scale = ops.quantize_weight_rtn(torch.from_numpy(w), 4, group)
    assert q.dtype == torch.int8 and tuple(q.shape) == (k, n)
    assert scale.dtype == torch.float32 and tuple(scale.shape) == (k // group, n)
    ref_q, ref_scale = _np_weight_rtn(w, group)
    _assert_bits_equal(scale.numpy(), ref_scale)
    assert np.array_equal(q.numpy(), ref_q)
    assert scale[0, 0].item() == 1.0 and scale[-1, -1].item() == EPS32
    assert q[:group, 0].tolist()[:8] == [7, 0, 0, 2, -2, 2, -2, 4][: min(8, group)]
    nodes = [
        helper.make_node("QuantizeLinear", ["w", "s"], ["q"], axis=0, block_size=group, output_dtype=TensorProto.INT4),
        helper.make_node("Cast", ["q"], ["q8"], to=TensorProto.INT8),
    ]
    sess = _session(
        _model(
            nodes,
            [_vi("w", TensorProto.FLOAT, [k, n]), _vi("s", TensorProto.FLOAT, [k // group, n])],
            [_vi("q8", TensorProto.INT8, [k, n])],
        )
    )
    (ort_q,) = sess.run(None, {"w": np.ascontiguousarray(w.T), "s": scale.numpy()})
    assert np.array_equal(ort_q, q.numpy())


@pytest.mark.parametrize(("k", "n", "group"), [(64, 24, 32), (128, 3, 128), (32, 5, 8)])
def test_int4_initializer_dequantizes_like_dequantize_weight(k, n, group):
    w = _weight_with_ties(n, k, group, seed=k + n)
    q, scale = ops.quantize_weight_rtn(torch.from_numpy(w), 4, group)
    packed = ops.pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.numel() == k * n // 2
    init_w = helper.make_tensor("w4", TensorProto.INT4, [k, n], packed.numpy().tobytes(), raw=True)
    init_s = numpy_helper.from_array(scale.numpy(), "s")
    nodes = [helper.make_node("DequantizeLinear", ["w4", "s"], ["d"], axis=0, block_size=group)]
    sess = _session(_model(nodes, [], [_vi("d", TensorProto.FLOAT, [k, n])], [init_w, init_s]))
    (ort_d,) = sess.run(None, {})
    reference = ops.dequantize_weight(q, scale, group).numpy()
    _assert_bits_equal(ort_d, reference)
    _assert_bits_equal(torch.ops.quota.dequantize_int4(packed, scale, k, n, group).numpy(), reference)
    _assert_bits_equal(torch.ops.quota.qdq_weight(torch.from_numpy(w), 4, group).numpy(), reference)


class _W4A4Linear(torch.nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, group: int):
        super().__init__()
        q, scale = ops.quantize_weight_rtn(weight, 4, group)
        self.k, self.n, self.group = q.shape[0], q.shape[1], group
        self.register_buffer("packed", ops.pack_int4(q))
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias)

    def forward(self, x):
        xq = torch.ops.quota.qdq_per_token(x, 4, 1.0)
        w = torch.ops.quota.dequantize_int4(self.packed, self.scale, self.k, self.n, self.group)
        return xq, w, xq @ w + self.bias


def test_exported_w4a4_linear_matches_ort():
    g = torch.Generator().manual_seed(3)
    n, k, group = 24, 64, 32
    weight = torch.randn(n, k, generator=g) * 0.1
    mod = _W4A4Linear(weight, torch.randn(n, generator=g), group).eval()
    x = torch.randn(2, 5, k, generator=g)
    model = export_onnx(mod, (x,), ["x"], ["xq", "w", "y"], ({0: Dim("batch"), 1: Dim("seq")},))
    assert {n_.domain for n_ in model.graph.node} <= {"", "ai.onnx"}
    assert all(o.domain != MARKER_DOMAIN for o in model.opset_import)
    int4 = [t for t in model.graph.initializer if t.data_type == TensorProto.INT4]
    assert len(int4) == 1
    assert list(int4[0].dims) == [k, n]
    assert int4[0].raw_data == mod.packed.numpy().tobytes()
    # the uint8 packed buffer was replaced, not kept beside the INT4 initializer
    assert not [t for t in model.graph.initializer if t.data_type == TensorProto.UINT8]
    sess = _session(model)
    for mag in (1e-2, 1.0, 1e2):
        xin = torch.randn(3, 7, k, generator=g) * mag
        xin[0, 0] = torch.from_numpy(_tie_row(4, k))
        xq, w, y = sess.run(None, {"x": xin.numpy()})
        ref_xq, ref_w, ref_y = (t.numpy() for t in mod(xin))
        _assert_bits_equal(xq, ref_xq)
        _assert_bits_equal(w, ref_w)
        # float matmul: accumulation order may differ between MLAS and ATen
        np.testing.assert_allclose(y, ref_y, rtol=1e-6, atol=1e-6 * float(np.abs(ref_y).max()))


# ---------------------------------------------------------------------------- INT4 packing


@pytest.mark.parametrize("shape", [(2,), (4, 6), (3, 5, 2), (128, 3), (7, 1, 4)])
def test_pack_unpack_roundtrip(shape):
    g = torch.Generator().manual_seed(sum(shape))
    q = torch.randint(-8, 8, shape, generator=g, dtype=torch.int8)
    packed = ops.pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (q.numel() // 2,)
    back = ops.unpack_int4(packed, shape)
    assert back.dtype == torch.int8 and back.shape == q.shape
    assert torch.equal(back, q)


def test_pack_int4_all_nibble_pairs():
    pairs = list(itertools.product(range(-8, 8), repeat=2))
    flat = torch.tensor([v for p in pairs for v in p], dtype=torch.int8)
    packed = ops.pack_int4(flat)
    expected = [(lo & 0xF) | ((hi & 0xF) << 4) for lo, hi in pairs]
    assert packed.tolist() == expected
    assert sorted(expected) == list(range(256))
    assert torch.equal(ops.unpack_int4(packed, flat.shape), flat)
    # even flat index in the low nibble
    assert ops.pack_int4(torch.tensor([1, -2], dtype=torch.int8)).tolist() == [0xE1]
    assert ops.pack_int4(torch.tensor([[-8, 7], [0, -1]], dtype=torch.int8)).tolist() == [0x78, 0xF0]


def test_pack_int4_rejects_odd_count():
    with pytest.raises(ValueError):
        ops.pack_int4(torch.zeros(3, dtype=torch.int8))
    with pytest.raises(ValueError):
        ops.pack_int4(torch.zeros(3, 5, dtype=torch.int8))


@pytest.mark.parametrize("shape", [(2, 3), (5, 6), (1, 16)])
def test_pack_int4_matches_onnx_int4_layout(shape):
    rng = np.random.default_rng(int(np.prod(shape)))
    vals = rng.integers(-8, 8, size=shape).astype(np.int8)
    vals.flat[0], vals.flat[-1] = -8, 7
    ours = ops.pack_int4(torch.from_numpy(vals)).numpy().tobytes()
    # onnx's own (non-raw) INT4 encoding: packed bytes, one per int32_data entry
    nonraw = helper.make_tensor("a", TensorProto.INT4, list(shape), vals=vals.flatten().tolist())
    assert not nonraw.raw_data
    assert bytes(nonraw.int32_data) == ours
    assert np.array_equal(numpy_helper.to_array(nonraw).astype(np.int8), vals)
    raw = helper.make_tensor("b", TensorProto.INT4, list(shape), ours, raw=True)
    assert np.array_equal(numpy_helper.to_array(raw).astype(np.int8), vals)
    # and onnxruntime decodes our bytes to the same values
    nodes = [
        helper.make_node("Cast", ["a"], ["a8"], to=TensorProto.INT8),
        helper.make_node("Cast", ["b"], ["b8"], to=TensorProto.INT8),
    ]
    sess = _session(
        _model(nodes, [], [_vi("a8", TensorProto.INT8, shape), _vi("b8", TensorProto.INT8, shape)], [nonraw, raw])
    )
    a8, b8 = sess.run(None, {})
    assert np.array_equal(a8, vals) and np.array_equal(b8, vals)


# ---------------------------------------------------------------------------- KV cache


def _kv_ort_session(bits: int, scale: np.ndarray, zp: np.ndarray, shape) -> ort.InferenceSession:
    """QuantizeLinear / DequantizeLinear with torch's scale and zero point as initializers, and a
    QuantizeLinear(-lo, scale) computing the zero point the way onnxruntime rounds it."""
    qt = TensorProto.UINT4 if bits == 4 else TensorProto.UINT8
    d = shape[-1]
    init_s = numpy_helper.from_array(scale, "s")
    init_z = helper.make_tensor("z", qt, list(zp.shape), vals=zp.flatten().tolist())
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], axis=-1, block_size=d),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"], axis=-1, block_size=d),
        helper.make_node("Cast", ["q"], ["q8"], to=TensorProto.UINT8),
        helper.make_node("QuantizeLinear", ["neg_lo", "s"], ["zq"], axis=-1, block_size=1, output_dtype=qt),
        helper.make_node("Cast", ["zq"], ["zq8"], to=TensorProto.UINT8),
    ]
    stat = list(shape[:-1]) + [1]
    model = _model(
        nodes,
        [_vi("x", TensorProto.FLOAT, shape), _vi("neg_lo", TensorProto.FLOAT, stat)],
        [_vi("q8", TensorProto.UINT8, shape), _vi("d", TensorProto.FLOAT, shape), _vi("zq8", TensorProto.UINT8, stat)],
        [init_s, init_z],
    )
    return _session(model)


def _kv_adversarial(bits: int, d: int) -> np.ndarray:
    """[R, d] rows: ties at scale 1, negative-only, positive-only, zeros, outlier."""
    qmax = 2**bits - 1
    rng = np.random.default_rng(99 + d)
    rows = []
    # lo = -(zp), hi = qmax - zp -> scale exactly 1; the others sit on .5 ties
    base = [-7.0, 8.0] if bits == 4 else [-100.0, 155.0]
    ties = [0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 6.5, -6.5]
    rows.append(_f32((base + ties * d)[:d]) if d >= 2 else _f32([base[1]]))
    rows.append(-np.abs(rng.standard_normal(d)).astype(np.float32) - np.float32(0.01))  # negative only
    rows.append(np.abs(rng.standard_normal(d)).astype(np.float32) + np.float32(0.01))  # positive only
    rows.append(np.zeros(d, np.float32))
    out = rng.standard_normal(d).astype(np.float32) * np.float32(1e-3)
    out[d // 2] = np.float32(-2e4)
    rows.append(out)
    # zero point on a tie: lo = -2.5, hi = qmax - 2.5 -> scale 1, -lo / scale = 2.5 -> zp 2
    if d >= 2:
        rows.append(_f32(([-2.5, qmax - 2.5] + ties * d)[:d]))
    return np.stack(rows)


@pytest.mark.parametrize(("bits", "d"), [(4, 2), (4, 6), (4, 64), (8, 1), (8, 7), (8, 64)])
def test_kv_codes_match_ort_quantizelinear(bits, d):
    rng = np.random.default_rng(bits * 1000 + d)
    qmax = 2**bits - 1
    for mag in MAGNITUDES:
        x = (rng.standard_normal((2, 3, 8, d)) * mag).astype(np.float32)
        adv = _kv_adversarial(bits, d) * np.float32(mag)
        x[1, 2, : adv.shape[0]] = adv
        codes, scale, zp = (t.numpy() for t in ops.quantize_kv(torch.from_numpy(x), bits))
        assert codes.dtype == np.uint8 and scale.dtype == np.float32 and zp.dtype == np.uint8
        assert codes.shape == (2, 3, 8, ops.kv_packed_dim(d, bits))
        assert scale.shape == zp.shape == (2, 3, 8, 1)
        unpacked = ops.unpack_kv_codes(torch.from_numpy(codes), bits).numpy()
        ref_q, ref_s, ref_z = _np_kv(x, bits)
        _assert_bits_equal(scale, ref_s)
        assert np.array_equal(zp, ref_z)
        assert np.array_equal(unpacked, ref_q)
        assert unpacked.max() <= qmax and zp.max() <= qmax
        neg_lo = -np.minimum(x.min(axis=-1, keepdims=True), np.float32(0))
        q8, deq, zq8 = _kv_ort_session(bits, scale, zp, x.shape).run(None, {"x": x, "neg_lo": neg_lo})
        assert np.array_equal(zq8, zp), f"zero point differs from QuantizeLinear at magnitude {mag}"
        assert np.array_equal(q8, unpacked), f"codes differ from QuantizeLinear at magnitude {mag}"
        ours = ops.dequantize_kv(torch.from_numpy(codes), torch.from_numpy(scale), torch.from_numpy(zp), bits).numpy()
        _assert_bits_equal(ours, deq)


@pytest.mark.parametrize("bits", [4, 8])
def test_kv_adversarial_rows_exact(bits):
    qmax = 2**bits - 1
    d = 8
    x = torch.from_numpy(_kv_adversarial(bits, d))[None, None]  # [1, 1, R, 8]
    codes, scale, zp = ops.quantize_kv(x, bits)
    q = ops.unpack_kv_codes(codes, bits)[0, 0]
    scale, zp = scale[0, 0, :, 0], zp[0, 0, :, 0]
    # row 0: scale 1, ties to even around the zero point
    z0 = 7 if bits == 4 else 100
    assert scale[0].item() == 1.0 and zp[0].item() == z0
    assert q[0].tolist() == [0, qmax, z0, z0, z0 + 2, z0 - 2, z0 + 2, z0 - 2]
    # row 1: negative only -> hi = 0 -> the zero point is qmax and the min maps to code 0
    assert zp[1].item() == qmax and q[1].min().item() == 0
    # row 2: positive only -> lo = 0 -> zero point 0 and the max maps to qmax
    assert zp[2].item() == 0 and q[2].max().item() == qmax
    # row 3: zeros -> floored scale, zero point 0, codes 0, dequantizes to exactly 0
    assert scale[3].item() == EPS32 and zp[3].item() == 0 and q[3].tolist() == [0] * d
    # row 4: the outlier takes the code 0, everything else collapses onto the zero point
    assert q[4, d // 2].item() == 0 and (q[4] == zp[4]).sum().item() == d - 1
    # row 5: -lo / scale = 2.5 -> zero point 2 (half to even); qmax - 2.5 -> round(qmax - 2.5) + 2
    assert scale[5].item() == 1.0 and zp[5].item() == 2
    assert q[5, :2].tolist() == [0, qmax - 1]
    deq = ops.dequantize_kv(codes, *ops.quantize_kv(x, bits)[1:], bits)[0, 0]
    assert deq[0].tolist() == [-z0, qmax - z0, 0, 0, 2, -2, 2, -2]
    assert deq[3].tolist() == [0.0] * d
    if bits == 4:
        # INT4 codes: two per byte along head_dim, the even channel in the low nibble
        assert codes.shape[-1] == d // 2
        assert codes[0, 0, 0].tolist() == [0 | (15 << 4), 7 | (7 << 4), 9 | (5 << 4), 9 | (5 << 4)]
        # onnxruntime reads our bytes as UINT4 [.., 8] the same way
        raw = helper.make_tensor("c", TensorProto.UINT4, list(q.shape), codes.numpy().tobytes(), raw=True)
        nodes = [helper.make_node("Cast", ["c"], ["c8"], to=TensorProto.UINT8)]
        sess = _session(_model(nodes, [], [_vi("c8", TensorProto.UINT8, list(q.shape))], [raw]))
        (c8,) = sess.run(None, {})
        assert np.array_equal(c8, q.numpy())


class _KVRoundTrip(torch.nn.Module):
    def __init__(self, bits: int):
        super().__init__()
        self.bits = bits

    def forward(self, x):
        codes, scale, zp = torch.ops.quota.quantize_kv(x, self.bits)
        return codes, scale, zp, torch.ops.quota.dequantize_kv(codes, scale, zp, self.bits)


@pytest.mark.parametrize(("bits", "d"), [(4, 6), (4, 32), (8, 7), (8, 32)])
def test_exported_kv_matches_ort(bits, d):
    g = torch.Generator().manual_seed(bits * 100 + d)
    example = torch.randn(2, 3, 5, d, generator=g)
    model = export_onnx(
        _KVRoundTrip(bits).eval(), (example,), ["x"], ["codes", "scale", "zero_point", "deq"], ({0: Dim("batch"), 2: Dim("seq")},)
    )
    op_types = [n.op_type for n in model.graph.node]
    # quantize_kv lowers to two QuantizeLinear (zero point, codes), dequantize_kv to one DQ
    assert op_types.count("QuantizeLinear") == 2 and op_types.count("DequantizeLinear") == 1
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
    sess = _session(model)
    for mag in MAGNITUDES:
        x = torch.randn(3, 3, 9, d, generator=g) * mag
        adv = torch.from_numpy(_kv_adversarial(bits, d) * np.float32(mag))
        x[2, 1, : adv.shape[0]] = adv
        got = sess.run(None, {"x": x.numpy()})
        ref = [t.numpy() for t in _KVRoundTrip(bits)(x)]
        assert [g_.dtype for g_ in got] == [np.uint8, np.float32, np.uint8, np.float32]
        assert got[0].shape == (3, 3, 9, ops.kv_packed_dim(d, bits))
        for a, b in zip(got, ref):
            _assert_bits_equal(a, b)


# ---------------------------------------------------------------- rounding margins


def test_rounding_margin_is_the_distance_to_the_nearest_boundary_that_can_change_the_code():
    # INT4 symmetric: codes -8..7; the boundaries that change a code: -7.5, -6.5, ..., 6.5
    # (7.5 separates 7 from 8, which the clamp makes 7 again)
    v = torch.tensor([2.3, 2.7, 2.5, -2.5, 0.0, 7.4, 9.0, -8.2, -11.0])
    want = [0.2, 0.2, 0.0, 0.0, 0.5, 0.9, 2.5, 0.7, 3.5]
    got = ops.rounding_margin(v, -8, 7)
    assert got.tolist() == pytest.approx(want, abs=1e-6)
    # a value moved by less than its margin keeps its code; by more (toward the boundary), changes it
    rng = np.random.default_rng(0)
    v = torch.from_numpy(rng.uniform(-9.0, 9.0, 2000).astype(np.float64))
    m = ops.rounding_margin(v, -8, 7)
    code = lambda t: torch.clamp(torch.round(t), -8, 7)
    inside = m > 1e-6
    assert torch.equal(code(v + 0.99 * m)[inside], code(v)[inside]) and torch.equal(code(v - 0.99 * m)[inside], code(v)[inside])
    up, down = code(v + 1.01 * m), code(v - 1.01 * m)
    assert bool(((up != code(v)) | (down != code(v)))[inside].all())  # (the nearest boundary is on one side)


def test_kv_margins_use_the_asymmetric_range_and_the_zero_point_rounding():
    x = torch.tensor([[[[-1.0, 0.0, 0.5, 2.0]]]])  # lo -1, hi 2: scale 0.2, zero point 5 (INT4)
    m, zp = ops.kv_margins(x, 4)
    codes, scale, zero = ops.quantize_kv(x, 4)
    assert float(scale) == pytest.approx(0.2) and int(zero) == 5
    assert zp.reshape(-1).tolist() == pytest.approx([0.5], abs=1e-5)  # -lo / scale = 5.0: half a step from 4.5 and 5.5
    # x / scale = -5, 0, 2.5, 10 (clamped to [-5, 10]): margins 0.5, 0.5, 0, 0.5
    assert m.reshape(-1).tolist() == pytest.approx([0.5, 0.5, 0.0, 0.5], abs=1e-5)
