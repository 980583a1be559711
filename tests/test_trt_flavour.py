"""The ``tensorrt`` flavour: plugin nodes in place of the W4A4 Linears and the quantized-KV
path, verified without TensorRT (onnxruntime-extensions custom ops running the plugins'
references), the plugins' references against the Triton kernels' references, the AOT kernels
in Triton's CPU interpreter and compiled for sm_90, and the target's options.

Nothing here runs TensorRT or a GPU: see quota_compile/flavours/tensorrt/engines.py for what is not checked.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from quota_compile.cli import main
from quota_compile.export.onnx import SemanticGraph, export_semantic
from quota_compile.flavours.tensorrt.lower import (
    DECODE_ATTENTION, FLAVOUR_KEY, KV_QUANTIZE, PLUGIN_DOMAIN, W4A4_LINEAR, TrtLoweringError, lower_graph, plugin_counts, to_tensorrt,
)
from quota_compile.bundle.format import KV_APPEND, kv_update_of
from quota_compile.quant import ops

from .conftest import write_config

from quota_compile.flavours.tensorrt import verify as trt_verify  # noqa: E402  (imports onnxruntime-extensions only when used)

# onnxruntime-extensions runs the plugins' references in the verification: the test extra
# installs it (every platform), so without it these tests fail, with the reason, not skip.
try:
    import onnxruntime_extensions  # noqa: F401
    CANNOT_RUN = None
except ImportError as err:
    CANNOT_RUN = f"onnxruntime-extensions is not installed: the test extra installs it (pip install -e '.[test]'): {err}"


@pytest.fixture(autouse=True)
def _test_extra():
    if CANNOT_RUN is not None:
        pytest.fail(CANNOT_RUN, pytrace=False)


GRAPHS = ("vision", "prefill", "decode")
ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- compiled bundles


def _compile(tmp_path_factory, folder: Path, granularity: str) -> tuple[Path, str]:
    work = tmp_path_factory.mktemp(f"trt_{granularity}")
    cfg = write_config(
        work / f"{granularity}.yaml", str(folder), work / "out",
        quantization={"weights": {"group_size": 16}, "kv_cache": {"bits": 4, "granularity": granularity}},
        pruning={"method": "fastv", "keep_ratio": 0.75, "fastv_layer": 1},
        export={"targets": ["portable", "tensorrt"]},
        verify={"samples": 2, "new_tokens": 6},
    )
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main([str(cfg)]) == 0
    return work / "out" / granularity, err.getvalue()


@pytest.fixture(scope="module")
def per_token(tmp_path_factory, small_folder: Path) -> tuple[Path, str]:
    return _compile(tmp_path_factory, small_folder, "per_token")


@pytest.fixture(scope="module")
def per_channel(tmp_path_factory, small_folder: Path) -> tuple[Path, str]:
    return _compile(tmp_path_factory, small_folder, "per_channel")


def _w4a4_matmuls(model: onnx.ModelProto) -> int:
    """MatMuls of the portable graph whose input is a per-token Q/DQ and whose weight an INT4 DQ."""
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name: t for t in model.graph.initializer}
    count = 0
    for n in model.graph.node:
        if n.op_type != "MatMul":
            continue
        a, b = producers.get(n.input[0]), producers.get(n.input[1])
        if a is not None and a.op_type == "DequantizeLinear" and producers.get(a.input[0]) is not None \
                and producers[a.input[0]].op_type == "QuantizeLinear" and b is not None and b.op_type == "DequantizeLinear" \
                and inits.get(b.input[0]) is not None and inits[b.input[0]].data_type == TensorProto.INT4:
            count += 1
    return count


@pytest.mark.parametrize("which", ["per_token", "per_channel"])
def test_one_plugin_per_w4a4_linear_and_per_layer_and_no_quantizer_chain_left(which, request):
    bundle, _ = request.getfixturevalue(which)
    layers = json.loads((bundle / "manifest.json").read_text())["model"]["num_layers"]
    for g in GRAPHS:
        portable = onnx.load(bundle / f"{g}.onnx")
        flavour = onnx.load(bundle / "tensorrt" / f"{g}.onnx")
        onnx.checker.check_model(flavour, full_check=True)
        counts = plugin_counts(flavour)
        assert counts[W4A4_LINEAR] == _w4a4_matmuls(portable) > 0
        assert counts[KV_QUANTIZE] == (2 * layers if g == "prefill" else 0)
        assert counts[DECODE_ATTENTION] == (layers if g == "decode" else 0)
        ops_left = {n.op_type for n in flavour.graph.node}
        # lm_head and the vision tower are ignored: no INT4 weight is weight-only, so no Q/DQ at all
        assert not ops_left & {"QuantizeLinear", "DequantizeLinear", "BitShift", "BitwiseAnd", "BitwiseOr"}
        if g == "decode":
            assert not ops_left & {"Softmax", "MatMul"}  # all attention (and every Linear but lm_head's Gemm) is in plugins
        # same interface as the portable graph
        io_of = lambda m: [(v.name, v.type.tensor_type.elem_type) for v in (*m.graph.input, *m.graph.output)]  # noqa: E731
        assert io_of(flavour) == io_of(portable)
        meta = {p.key: p.value for p in flavour.metadata_props}
        assert meta[FLAVOUR_KEY] == "tensorrt"
        for n in flavour.graph.node:
            if n.domain == PLUGIN_DOMAIN:
                attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
                assert attrs["plugin_namespace"] == b"quota" and attrs["plugin_version"] == b"1" and attrs["aot"] == 1
    decode = onnx.load(bundle / "tensorrt" / "decode.onnx")
    assert kv_update_of(decode) == KV_APPEND
    for i, n in enumerate(x for x in decode.graph.node if x.op_type == DECODE_ATTENTION):
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        assert attrs["granularity"] == which.encode() and attrs["bits"] == 4 and attrs["num_heads"] % attrs["kv_num_heads"] == 0
        assert n.input[4:6] == [f"past.{i}.key", f"past.{i}.value"] and n.output[1:3] == [f"present.{i}.key", f"present.{i}.value"]


@pytest.mark.parametrize("which", ["per_token", "per_channel"])
def test_flavour_is_verified_like_the_others_and_matches_the_portable_graphs(which, request):
    bundle, _ = request.getfixturevalue(which)
    v = json.loads((bundle / "verify.json").read_text())
    t = v["flavours"]["tensorrt"]
    assert v["passed"] and t["passed"] and t["flavour"] == "tensorrt" and "onnxruntime-extensions" in t["runtime"]
    assert t["greedy_agreement"] == 1.0 and t["kept_index_agreement"] == 1.0 and t["max_logits_rel_error"] < 1e-4
    # its KV codes are compared (its plugins read their own codes: not teacher-forced); its
    # activations are quantized inside the W4A4 plugin, and verify.json says none was observed
    assert t["codes"]["kv_cache"]["compared"] > 0 and t["codes"]["kv_cache"]["flips"] == 0
    assert t["codes"]["kv_cache"]["teacher_forced_tensors"] == {g: 0 for g in GRAPHS}
    assert all(o["observed"] == 0 < o["in_graph"] for g, o in t["codes"]["activations"]["observed_quantizers"].items() if g != "vision")
    assert t["codes"]["activations"]["compared"] == 0 and v["codes"]["activations"]["compared"] > 0
    assert set(t["polygraphy"]) == set(GRAPHS) and all(r["passed"] for r in t["polygraphy"].values())
    assert t["polygraphy"]["decode"]["identical_kv_bytes"] == 1.0
    m = json.loads((bundle / "manifest.json").read_text())
    f = m["flavours"]["tensorrt"]
    assert f["folder"] == "tensorrt" and f["kv_update"] == KV_APPEND and f["plugins"] == t["plugins"]
    assert f["engines"]["built"] is False and not f["used_by_runtime"]
    assert {f"tensorrt/{g}.onnx" for g in GRAPHS} <= set(m["files"])


def _padded_batch(bundle: Path):
    """Two prompts of different lengths, right-padded (masked positions inside the cache)."""
    from transformers import AutoProcessor

    from quota_compile.runtime.ort import make_batch
    from quota_compile.data.samples import synthetic_images

    m = json.loads((bundle / "manifest.json").read_text())["model"]
    proc = AutoProcessor.from_pretrained(bundle / "tokenizer")
    proc.tokenizer.padding_side = "right"
    images = synthetic_images(2, m["image_size"], 7)
    return make_batch(proc, m["prompt_template"], images, ["What is it?", "Is there a red circle on the left side of the picture?"],
                      (m["visual_start"], m["visual_tokens"]), m["image_token_id"])


@pytest.mark.parametrize("which", ["per_token", "per_channel"])
def test_padded_batch_decodes_like_the_portable_graphs(which, request):
    """Two prompts of different lengths (right padding: masked positions inside the cache):
    the flavour gives the portable graphs' tokens, kept indices and (nearly) logits."""
    from quota_compile.runtime.ort import OrtBackend, greedy_generate

    bundle, _ = request.getfixturevalue(which)
    batch = _padded_batch(bundle)
    assert batch.attention_mask.sum(axis=1).min() < batch.attention_mask.shape[1]
    a = greedy_generate(trt_verify.TensorrtReferenceBackend(bundle / "tensorrt"), batch, 6, None, keep_logits=True)
    b = greedy_generate(OrtBackend(bundle), batch, 6, None, keep_logits=True)
    assert a.tokens == b.tokens and all(np.array_equal(x, y) for x, y in zip(a.kept, b.kept))
    assert max(np.abs(x - y).max() / np.abs(y).max() for x, y in zip(a.step_logits, b.step_logits)) < 1e-5


def test_compile_without_tensorrt_says_so_in_one_line(per_token):
    bundle, err = per_token
    lines = [line for line in err.splitlines() if "tensorrt" in line.lower() and "engine" in line.lower()]
    assert len(lines) == 1, err
    assert lines[0].startswith("tensorrt: engines not built: the tensorrt package is not installed")
    assert "quota-compile[tensorrt]" in lines[0]
    assert not list((bundle / "tensorrt").glob("*.engine")) and (bundle / "verify.json").is_file()


# ---------------------------------------------------------------- the rewrite on small graphs


class _Linear(torch.nn.Module):
    """One Linear as the traced programs hold it: a W4A4 Linear (``quota::w4a4_linear``), or its
    pieces with 8-bit activations (``act_bits`` 8: a per-token quantizer, the INT4 weight's
    dequantizer, a matmul), or weight-only (``act_bits`` None); then an optional bias add."""

    def __init__(self, codes, w_scale, b, clip: float, act_bits, bias: bool):
        super().__init__()
        self.k, self.n = codes.shape
        self.group = self.k // w_scale.shape[0]
        self.clip, self.act_bits, self.with_bias = clip, act_bits, bias
        self.register_buffer("packed", ops.pack_int4(torch.from_numpy(codes)))
        self.register_buffer("scale", torch.from_numpy(w_scale))
        self.register_buffer("bias", torch.from_numpy(b))

    def forward(self, x):
        if self.act_bits == 4:
            y = torch.ops.quota.w4a4_linear(x, self.packed, self.scale, self.k, self.n, self.group, self.clip)
        else:
            if self.act_bits is not None:
                x = torch.ops.quota.qdq_per_token(x, self.act_bits, self.clip)
            y = torch.matmul(x, torch.ops.quota.dequantize_int4(self.packed, self.scale, self.k, self.n, self.group))
        return y + self.bias if self.with_bias else y


def _linear_graph(k: int, n: int, group: int, clip: float, act_bits, bias: bool, seed: int = 0):
    """The semantic graph of one :class:`_Linear` with random codes ``[K, N]``, scales and bias
    (x ``[2, 3, K]``); returns it, the codes, the scales and the bias."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(-8, 8, (k, n)).astype(np.int8)
    w_scale = (rng.random((k // group, n)) * 0.1 + 0.01).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    module = _Linear(codes, w_scale, b, clip, act_bits, bias).eval()
    semantic = SemanticGraph.of(export_semantic(module, (torch.zeros(2, 3, k),), ["x"], ["y"], None), 21)
    return semantic, codes, w_scale, b


@pytest.mark.parametrize("clip,bias,group,act_bits", [(1.0, True, 16, 4), (0.5, False, 48, 4), (0.75, True, 16, 8)])
def test_w4a4_linear_becomes_one_plugin_that_computes_the_integer_w4a4(clip, bias, group, act_bits):
    """A W4A4 Linear (with its bias, if any), or a Linear with 8-bit activations, is one plugin
    node that computes per-token codes x INT4 codes, scaled."""
    k, n = 48, 32
    semantic, codes, w_scale, b = _linear_graph(k, n, group, clip, act_bits, bias)
    flavour = lower_graph(semantic, "vision")
    assert [x.op_type for x in flavour.graph.node] == [W4A4_LINEAR]
    node = flavour.graph.node[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["group_size"] == group and attrs["act_bits"] == act_bits and math.isclose(attrs["clip_ratio"], clip, rel_tol=1e-7)
    inits = {t.name: numpy_helper.to_array(t) for t in flavour.graph.initializer}
    packed = inits[node.input[1]]
    assert packed.dtype == np.uint8 and packed.shape == (k, n // 2)
    assert np.array_equal(ops.unpack_int4(torch.from_numpy(packed.copy()), (k, n)).numpy(), codes)  # pack_int4 layout
    assert np.array_equal(inits[node.input[3]], b if bias else np.zeros(n, np.float32))
    # run it: the arithmetic in float64 (per-token codes x INT4 codes, scaled)
    x = np.random.default_rng(1).standard_normal((2, 3, k)).astype(np.float32)
    got = trt_verify.session(flavour).run(None, {"x": x})[0]
    qmax = 2 ** (act_bits - 1) - 1
    s = np.maximum(np.float32(clip) * np.abs(x).max(-1, keepdims=True) / np.float32(qmax), np.float32(ops.SCALE_EPS)).astype(np.float32)
    qx = np.clip(np.round(x / s), -qmax - 1, qmax).astype(np.float64)
    w = codes.astype(np.float64) * np.repeat(w_scale.astype(np.float64), group, axis=0)
    ref = (qx @ w) * s + (b if bias else 0.0)
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


def test_weight_only_int4_linear_stays_blocked_dequantize_and_matmul():
    semantic, *_ = _linear_graph(64, 32, 16, 1.0, None, bias=True)
    flavour = lower_graph(semantic, "vision")
    assert [x.op_type for x in flavour.graph.node] == ["DequantizeLinear", "MatMul", "Add"]
    assert any(t.data_type == TensorProto.INT4 for t in flavour.graph.initializer)


@pytest.mark.parametrize("group", [16, 32, 64, 128])
def test_the_flavour_keeps_only_int4_blocks_tensorrt_accepts(group):
    """A weight-only INT4 DequantizeLinear left in the flavour must have a block TensorRT takes
    (64 or 128); a smaller one is refused when the flavour is made, not at engine build."""
    semantic, *_ = _linear_graph(256, 32, group, 1.0, None, bias=False)
    if group in (64, 128):
        (flavour,) = to_tensorrt({"vision": semantic}).values()
        assert [n.op_type for n in flavour.graph.node] == ["DequantizeLinear", "MatMul"]
    else:
        with pytest.raises(TrtLoweringError, match=f"block size \\[{group}\\]"):
            to_tensorrt({"vision": semantic})


@pytest.mark.parametrize("granularity", ["per_token", "per_channel"])
def test_decode_attention_over_the_cache_becomes_one_plugin_that_computes_the_portable_graph(granularity):
    """One decode layer (tests/test_semantic.CacheAttention): its attention with the new
    entries' quantizers and the past's dequantizers is one :data:`DECODE_ATTENTION` node, which
    (run on the plugins' references) gives the portable graph's attention and new entries."""
    import onnxruntime as ort

    from quota_compile.export.onnx import export_onnx

    from .test_semantic import CacheAttention

    module = CacheAttention(granularity).eval()
    args, names, outputs, dynamic, feeds = module.inputs()
    semantic = SemanticGraph.of(export_semantic(module, args, names, outputs, dynamic), 21)
    flavour = to_tensorrt({"decode": semantic})["decode"]
    (node,) = [n for n in flavour.graph.node if n.domain == PLUGIN_DOMAIN]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert node.op_type == DECODE_ATTENTION and attrs["granularity"] == granularity.encode() and attrs["bits"] == 4
    assert (attrs["num_heads"], attrs["kv_num_heads"]) == (CacheAttention.HEADS, CacheAttention.KV_HEADS) and abs(attrs["scale"] - 0.35) < 1e-7
    assert list(node.input[:6]) == ["q", "k", "v", "bias", "past.0.key", "past.0.value"] and kv_update_of(flavour) == KV_APPEND
    assert not any(n.op_type in ("Softmax", "BitShift", "QuantizeLinear") for n in flavour.graph.node)
    portable = export_onnx(module, args, names, outputs, dynamic)
    want = ort.InferenceSession(portable.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    got = trt_verify.session(flavour).run(None, feeds)
    assert np.abs(got[0] - want[0]).max() <= 1e-5 * np.abs(want[0]).max()
    assert all(np.array_equal(a, b) for a, b in zip(got[1:], want[1:]))


def test_a_decode_attention_not_over_the_cache_form_is_refused_not_half_rewritten():
    """The past key reaches the attention through a Mul: nothing to join, and the portable
    cache arithmetic left in the graph is what TensorRT's parser cannot take."""
    from .test_semantic import CacheAttention

    module = CacheAttention("per_token", detour=True).eval()
    args, names, outputs, dynamic, _ = module.inputs()
    semantic = SemanticGraph.of(export_semantic(module, args, names, outputs, dynamic), 21)
    with pytest.raises(TrtLoweringError, match="left in the graph"):
        to_tensorrt({"decode": semantic})


# ---------------------------------------------------------------- references and kernels


@pytest.fixture(scope="module")
def interpreted():
    """The kernel modules in Triton's CPU interpreter (``TRITON_INTERPRET=1`` when triton was
    first imported, which tests/__init__.py sees to, and when the kernel modules are, reloaded
    here if need be; restored afterwards). Fails, with the reason, where that cannot be (see
    tests/test_kernels.py); skips only where the test extra does not install triton."""
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        try:
            import triton
        except ImportError as err:
            if not sys.platform.startswith("linux"):
                pytest.skip(f"triton is not installed (the test extra installs it on Linux only): {err}")
            pytest.fail(f"triton is not installed: the test extra installs it on Linux (pip install -e '.[test]'): {err}",
                        pytrace=False)
        from quota_compile import kernels

        if not kernels.is_interpreted(triton.language.cdiv):
            pytest.fail("triton was imported before TRITON_INTERPRET=1 was set (tests/__init__.py imports it first, "
                        "interpreted): something imported it earlier in this session", pytrace=False)
        mods = {}
        for name in ("w4a4_linear", "kv_attention", "trt_aot"):
            mod = importlib.import_module(f"quota_compile.kernels.{name}")
            mods[name] = mod if kernels.module_is_interpreted(mod) else importlib.reload(mod)
        yield triton, mods
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous


@pytest.mark.parametrize("m,k,n,group,clip", [(7, 64, 48, 16, 1.0), (3, 96, 32, 96, 0.8), (1, 256, 64, 128, 1.0)])
def test_w4a4_plugin_reference_is_the_kernel_reference_and_the_aot_kernel(interpreted, m, k, n, group, clip):
    triton, mods = interpreted
    W, K = mods["w4a4_linear"], mods["trt_aot"]
    gen = torch.Generator().manual_seed(m * k)
    x = torch.randn(m, k, generator=gen) * 3
    x[0, :2] = torch.tensor([3.5, -3.5])  # ties are possible on the INT4 grid
    codes, scale = ops.quantize_weight_rtn(torch.randn(n, k, generator=gen), 4, group)
    packed = ops.pack_int4(codes).reshape(k, n // 2)
    bias = torch.randn(n, generator=gen)
    ref = W.w4a4_linear_reference(x, packed, scale, group, clip, bias)
    assert torch.equal(trt_verify.w4a4_linear(x, packed, scale, bias, group, clip, 4), ref)
    out = torch.empty(m, n)
    bk = K.block_k(group)
    K.w4a4_linear_kernel[(triton.cdiv(m, 16) * triton.cdiv(n, 16),)](
        x, packed, scale, bias, m, n, k, out, GROUP_SIZE=group, CLIP=clip, TILE_GROUPS=bk == group,
        BLOCK_M=16, BLOCK_N=16, BLOCK_K=bk, GROUP_M=8)
    assert torch.equal(out, ref)  # same integers, same float32 operations in the same order


def _kv_case(b, hkv, t, d, bits, granularity, gen):
    x = torch.randn(b, hkv, t, d, generator=gen) * 2
    if granularity == "per_token":
        codes, s, z = torch.ops.quota.quantize_kv(x, bits)
        return codes, s, z
    s = ops.kv_static_scale(x.abs().amax(dim=(0, 2))[:, None, :] * 0.8, bits)  # some values saturate
    return torch.ops.quota.quantize_kv_static(x, s, bits), s, torch.full((1, 1, 1, 1), 2 ** (bits - 1), dtype=torch.uint8)


@pytest.mark.parametrize("granularity", ["per_token", "per_channel"])
@pytest.mark.parametrize("bits", [4, 8])
def test_kv_plugin_references_are_the_kernel_references_and_the_aot_kernels(interpreted, granularity, bits):
    triton, mods = interpreted
    A, K = mods["kv_attention"], mods["trt_aot"]
    gen = torch.Generator().manual_seed(bits)
    b, h, hkv, p, d = 2, 6, 2, 19, 8
    pk, ks, kz = _kv_case(b, hkv, p, d, bits, granularity, gen)
    pv, vs, vz = _kv_case(b, hkv, p, d, bits, granularity, gen)
    q = torch.randn(b, h, 1, d, generator=gen)
    new_k, new_v = torch.randn(b, hkv, 1, d, generator=gen) * 2, torch.randn(b, hkv, 1, d, generator=gen) * 2
    seqlens = torch.tensor([p + 1, 9], dtype=torch.int32)  # the second sequence sees positions 0..8 only
    bias = trt_verify.reference_seqlens_bias(seqlens, p + 1)
    args = (q, new_k, new_v, bias, pk, pv, ks, vs, kz, vz)
    out = trt_verify.decode_attention(*args, bits, granularity, h, hkv, 0.3)

    # the new entries are the cache quantizer's, and the attention is the kernel reference's
    # over the cache with them appended
    nk, nks, nkz, _ = trt_verify.kv_quantize(new_k, ks, kz, bits, granularity)
    if granularity == "per_token":
        ck, cks, ckz = torch.ops.quota.quantize_kv(new_k, bits)
        assert torch.equal(nk, ck) and torch.equal(nks, cks) and torch.equal(nkz, ckz)
        extra = {"k_scale": torch.cat([ks, out[3]], 2), "v_scale": torch.cat([vs, out[4]], 2),
                 "k_zero_point": torch.cat([kz, out[5]], 2), "v_zero_point": torch.cat([vz, out[6]], 2)}
    else:
        assert torch.equal(nk, torch.ops.quota.quantize_kv_static(new_k, ks, bits))
        extra = {"k_scale": ks, "v_scale": vs}
    assert torch.equal(out[1], nk)
    ref = A.kv_decode_attention_reference(
        q[:, :, 0], torch.cat([pk, out[1]], 2), torch.cat([pv, out[2]], 2), extra.pop("k_scale"), extra.pop("v_scale"), seqlens,
        bits=bits, granularity=granularity, sm_scale=0.3, **extra)
    assert torch.allclose(out[0][:, :, 0], ref, atol=1e-6, rtol=1e-5)

    # the AOT kernels (interpreter): attention within float reassociation, the codes exactly
    got = [torch.empty_like(r) for r in out]
    K.decode_attention_kernel[(b * h,)](*args, h, hkv, p, *got, SM_SCALE=0.3, D=d, BITS=bits,
                                         PER_TOKEN=granularity == "per_token", BLOCK_T=8, BLOCK_D=d)
    assert (got[0] - out[0]).abs().max() <= 1e-5 * out[0].abs().max()
    assert all(torch.equal(x, y) for x, y in zip(got[1:], out[1:]))

    x = torch.randn(b, hkv, p, d, generator=gen) * 3
    s_in, z_in = (ks, kz) if granularity == "per_channel" else (torch.ones(1), torch.zeros(1, dtype=torch.uint8))
    want = trt_verify.kv_quantize(x, s_in, z_in, bits, granularity)
    got = [torch.empty_like(r) for r in want]
    K.kv_quantize_kernel[(b * hkv * p,)](x, s_in, z_in, p, hkv, *got, D=d, BITS=bits, PER_TOKEN=granularity == "per_token",
                                         BLOCK_P=triton.next_power_of_2(d // 2))
    assert all(torch.equal(g, w) for g, w in zip(got, want))


# ---------------------------------------------------------------- the plugin definitions
# quota_compile.flavours.tensorrt.engines.register_plugins run against tests/trt_standin.py, a stand-in for
# the parts of tensorrt.plugin it uses (TensorRT itself cannot be installed here): the
# decorators' schema rules of TensorRT 11.4, shape expressions, launch parameters.

_TORCH_TRT = {torch.float32: "FLOAT", torch.float16: "HALF", torch.uint8: "UINT8"}


@pytest.fixture
def standin(monkeypatch):
    """register_plugins() with tests/trt_standin.py as ``tensorrt`` / ``tensorrt.plugin``."""
    from quota_compile.flavours.tensorrt import engines as trt_plugins

    from . import trt_standin

    trt_standin.install(monkeypatch)  # a fresh tensorrt.plugin: register_plugins registers with it
    trt_plugins.register_plugins()
    yield trt_standin
    trt_standin.REGISTRY.clear()


def _desc(S, t: torch.Tensor, constant_last: bool = True):
    """A stand-in TensorDesc of a tensor: dimensions dynamic except the last (head size, K, N)."""
    dims = [S.dim(v, constant=constant_last and i == t.dim() - 1) for i, v in enumerate(t.shape)]
    return S.TensorDesc(tuple(dims), S.DataType[_TORCH_TRT[t.dtype]])


def _plugin_calls(bundle: Path, plugins) -> list[tuple[str, list, dict, list]]:
    """``(plugin, inputs, attributes, outputs)`` of every plugin node the TensorRT flavour runs
    (references, through onnxruntime-extensions) while greedily decoding a right-padded batch
    of two prompts; attributes named as the plugin definition (``plugins``: the stand-in's
    registry) names them. Calls with the same input shapes and attributes are kept once."""
    from quota_compile.runtime.ort import greedy_generate

    refs = {W4A4_LINEAR: "w4a4_linear", KV_QUANTIZE: "kv_quantize", DECODE_ATTENTION: "decode_attention"}
    calls, seen, depth = [], set(), [0]

    def recording(plugin, fn):
        spec = plugins[f"quota::{plugin}"]

        def call(*args):
            depth[0] += 1  # decode_attention quantizes through kv_quantize: record the outer call only
            try:
                out = fn(*args)
            finally:
                depth[0] -= 1
            k = len(spec.inputs)
            attrs = dict(zip(spec.attrs, args[k:]))
            key = (plugin, tuple(tuple(a.shape) for a in args[:k]), tuple(attrs.items()))
            if depth[0] == 0 and key not in seen:
                seen.add(key)
                calls.append((plugin, [a.clone() for a in args[:k]], attrs, [o.clone() for o in (out if isinstance(out, tuple) else (out,))]))
            return out

        return call

    with pytest.MonkeyPatch.context() as mp:
        for plugin, name in refs.items():
            mp.setattr(trt_verify, name, recording(plugin, getattr(trt_verify, name)))
        greedy_generate(trt_verify.TensorrtReferenceBackend(bundle / "tensorrt"), _padded_batch(bundle), 3, None)
    return calls


def test_plugin_definitions_follow_tensorrt_plugin_schemas_and_the_graph_nodes(per_token, standin):
    """Every plugin has register / autotune / impl / aot_impl accepted by the stand-in's
    schema rules; every plugin node of the flavour's graphs names a registered plugin and gives
    exactly its inputs, outputs and attributes (names and types), and the verification
    references take the attributes in the registered order."""
    import inspect

    bundle, _ = per_token
    plugins = standin.REGISTRY
    assert set(plugins) == {f"quota::{p}" for p in (W4A4_LINEAR, KV_QUANTIZE, DECODE_ATTENTION)}
    assert all(p.impl and p.aot_impl and p.autotune for p in plugins.values())
    onnx_types = {int: onnx.AttributeProto.INT, float: onnx.AttributeProto.FLOAT, str: onnx.AttributeProto.STRING}
    seen = set()
    for g in GRAPHS:
        for node in onnx.load(bundle / "tensorrt" / f"{g}.onnx").graph.node:
            if node.domain != PLUGIN_DOMAIN:
                continue
            attrs = {a.name: a for a in node.attribute}
            spec = plugins[f"{helper.get_attribute_value(attrs.pop('plugin_namespace')).decode()}::{node.op_type}"]
            assert helper.get_attribute_value(attrs.pop("aot")) == 1 and "plugin_version" in attrs.pop("plugin_version").name
            assert {n: a.type for n, a in attrs.items()} == {n: onnx_types[t] for n, t in spec.attrs.items()}, node.op_type
            assert (len(node.input), len(node.output)) == (len(spec.inputs), spec.num_outputs), node.op_type
            seen.add(node.op_type)
    assert seen == {W4A4_LINEAR, KV_QUANTIZE, DECODE_ATTENTION}
    for plugin, fn in ((W4A4_LINEAR, trt_verify.w4a4_linear), (KV_QUANTIZE, trt_verify.kv_quantize),
                       (DECODE_ATTENTION, trt_verify.decode_attention)):
        spec = plugins[f"quota::{plugin}"]
        assert list(inspect.signature(fn).parameters) == spec.inputs + list(spec.attrs), plugin


def test_the_stand_in_refuses_what_tensorrt_plugin_refuses(standin):
    """The stand-in's checks can fail: an aot_impl without its return annotation (as
    trt_plugins had before it was checked against TensorRT 11.4), attributes out of order, a
    non-constant head size asked for its value."""
    S = standin
    # (this module's annotations are strings, as tensorrt.plugin would not accept: compiled apart)
    source = """
@S.register("t::p")
def desc(x: S.TensorDesc, a: int, b: float) -> S.TensorDesc:
    return x.like()

def aot(x: S.TensorDesc, a: int, b: float, outputs: tuple, tactic: int):
    return None

def impl(x, b: float, a: int, outputs, stream):
    return None
"""
    space = {"S": S}
    exec(compile(source, "plugin_definitions", "exec", dont_inherit=True), space)
    S.autotune("t::p")(lambda x, outputs: [])  # the schema's order: accepted
    with pytest.raises(ValueError, match="no return annotation"):
        S.aot_impl("t::p")(space["aot"])
    with pytest.raises(ValueError, match="schema"):
        S.impl("t::p")(space["impl"])
    with pytest.raises(RuntimeError, match="non-constant"):
        S.dim(4, constant=False).constant_value()


@pytest.mark.parametrize("which", ["per_token", "per_channel"])
def test_plugins_give_the_references_shapes_types_and_launch_their_aot_kernels_as_tensorrt_would(which, request, standin, interpreted):
    """For every distinct plugin call of a padded-batch decode through the references: the
    registration gives the reference outputs' shapes and dtypes, autotune offers the call's
    types, and the aot_impl's kernel, launched as TensorRT launches it (its grid, the input
    pointers, its extra int32 arguments, the output pointers, the compile-time constants it
    compiled with; run here by Triton's interpreter), computes the reference outputs: codes and
    the W4A4 products exactly, attention within float reassociation."""
    triton, mods = interpreted
    K = mods["trt_aot"]
    bundle, _ = request.getfixturevalue(which)
    plugins = standin.REGISTRY
    calls = _plugin_calls(bundle, plugins)
    assert {c[0] for c in calls} == {W4A4_LINEAR, KV_QUANTIZE, DECODE_ATTENTION}
    compiled = {}

    class Compiled:  # what trt_plugins reads of triton.compile's result
        def __init__(self, fn, consts, warps):
            self.metadata = type("M", (), {"name": fn.fn.__name__ if hasattr(fn, "fn") else fn.__name__, "num_warps": warps, "shared": 0})
            self.asm = {"ptx": "(not compiled: interpreter)"}
            compiled["last"] = (fn, consts)

    def fake_compile(fn, types, constexprs, num_warps=4, num_stages=3, target=None):
        assert set(types) <= set(fn.arg_names) and set(constexprs) <= set(fn.arg_names)
        return Compiled(fn, constexprs, num_warps)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(K, "compile_kernel", fake_compile)
        for plugin, inputs, attrs, outputs in calls:
            spec = plugins[f"quota::{plugin}"]
            descs = [_desc(standin, t) for t in inputs]
            got = spec.register_func(*descs, *attrs.values())
            got = got if isinstance(got, tuple) else (got,)
            assert [(d.values, d.dtype.name) for d in got] == [(tuple(o.shape), _TORCH_TRT[o.dtype]) for o in outputs], plugin
            types = [_TORCH_TRT[t.dtype] for t in inputs + outputs]
            combos = spec.autotune(*descs, got)
            assert any(all(S.DataType[t].value in c.io_types[i].replace("*", "|").split("|") for i, t in enumerate(types))
                       for c in combos for S in [standin] if len(c.io_types) == len(types)), plugin
            tactics = [t for c in combos for t in (c.tactics or [0])]
            for tactic in tactics if plugin != W4A4_LINEAR or inputs[0].numel() < 4096 else tactics[:1]:
                name, _, launch, extra = standin.run_aot(f"quota::{plugin}", descs, attrs, list(got), tactic)
                fn, consts = compiled["last"]
                assert launch["block_x"] % 32 == 0 and launch["grid_y"] == launch["grid_z"] == 1
                outs = [torch.empty_like(o) for o in outputs]
                fn[(launch["grid_x"],)](*inputs, *extra, *outs, **consts)
                for o, ref in zip(outs, outputs):
                    if plugin == DECODE_ATTENTION and o.dtype == torch.float32 and o.dim() == 4 and o.shape[-1] == ref.shape[-1] and o is outs[0]:
                        assert (o - ref).abs().max() <= 1e-5 * ref.abs().max(), (plugin, tactic)
                    else:
                        assert torch.equal(o, ref), (plugin, name, tactic)


def test_aot_kernels_compile_for_hopper_with_the_plugin_calling_convention():
    """Each plugin's aot_impl (through the stand-in, every tactic its autotune offers) compiles
    its kernel for sm_90 at LLaVA-1.5-7B sizes, and the PTX entry takes what TensorRT passes:
    the input pointers, the aot_impl's extra int32 arguments, the output pointers; Triton adds
    two scratch pointers after them, which must be unused (scratch sizes 0). The launch's
    block and shared memory are the compiled kernel's."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    script = """
import json, re
from triton.backends.compiler import GPUTarget
from tests import trt_standin as S
S.install()
from quota_compile.flavours.tensorrt import engines as trt_plugins
from quota_compile.kernels import trt_aot as K
compile_kernel, last = K.compile_kernel, {}
def for_hopper(*args, **kw):
    last["c"] = compile_kernel(*args, target=GPUTarget("cuda", 90, 32), **kw)
    return last["c"]
K.compile_kernel = for_hopper
trt_plugins.register_plugins()
F, H, U = S.DataType.FLOAT, S.DataType.HALF, S.DataType.UINT8
def d(shape, dt, dynamic=()):
    return S.TensorDesc(tuple(S.dim(v, i not in dynamic) for i, v in enumerate(shape)), dt)
cache = [d((1, 32, 40, 64), U, (0, 2))] * 2 + [d((1, 32, 40, 1), F, (0, 2))] * 2 + [d((1, 32, 40, 1), U, (0, 2))] * 2
new = [d((1, 32, 1, 128), F, (0,))] * 3 + [d((1, 1, 1, 41), F, (0, 3))]
cases = [  # plugin, inputs, attributes, whether every division must be correctly rounded
    ("QuotaW4A4Linear", [d((1, 40, 4096), H, (0, 1)), d((4096, 2048), U), d((32, 4096), F), d((4096,), F)],
     dict(group_size=128, clip_ratio=1.0, act_bits=4), True),
    ("QuotaKVQuantize", [d((1, 32, 40, 128), F, (0, 2)), d((1,), F), d((1,), U)], dict(bits=4, granularity="per_token"), True),
    # the softmax normalisation may divide approximately; the new token's quantizer may not
    ("QuotaKVDecodeAttention", new + cache, dict(bits=4, granularity="per_token", num_heads=32, kv_num_heads=32, scale=0.088), False),
]
for plugin, ins, attrs, only_rn in cases:
    spec = S.REGISTRY["quota::" + plugin]
    outs = spec.register_func(*ins, *attrs.values())
    outs = outs if isinstance(outs, tuple) else (outs,)
    for tactic in [t for c in spec.autotune(*ins, outs) for t in (c.tactics or [0])]:
        name, ptx, launch, extra = S.run_aot("quota::" + plugin, ins, attrs, list(outs), tactic)
        c = last["c"]
        params = re.search(r"\\.entry " + name + r"\\(([^)]*)\\)", ptx).group(1).count(".param")
        assert params == len(ins) + len(extra) + len(outs) + 2, (name, params)
        assert c.metadata.global_scratch_size == 0 and c.metadata.profile_scratch_size == 0, name
        assert launch["block_x"] == 32 * c.metadata.num_warps and launch["shared_mem"] == c.metadata.shared, name
        assert "div.rn.f32" in ptx and not (only_rn and ("div.approx" in ptx or "div.full" in ptx)), name
        target = re.search(r"^[.]target\\s+(\\w+)", ptx, re.M).group(1)
        print(json.dumps({"plugin": plugin, "tactic": tactic, "warps": c.metadata.num_warps, "target": target}))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    got = [json.loads(line) for line in run.stdout.splitlines()]
    # every GEMM tile of trt_plugins.W4A4_TACTICS, each with its warps; the KV plugins offer no
    # tactics (TensorRT's default, tactic 0)
    from quota_compile.flavours.tensorrt.engines import W4A4_TACTICS

    assert sorted((g["plugin"], g["tactic"]) for g in got) == sorted(
        [(W4A4_LINEAR, t) for t in W4A4_TACTICS] + [(KV_QUANTIZE, 0), (DECODE_ATTENTION, 0)])
    for g in got:
        assert g["target"].startswith("sm_90"), g
        if g["plugin"] == W4A4_LINEAR:
            assert g["warps"] == W4A4_TACTICS[g["tactic"]][2], g


# ---------------------------------------------------------------- plugins module and options


def test_plugins_module_imports_without_tensorrt_and_says_why_nothing_is_built(tmp_path: Path):
    code = ("import sys, quota_compile.flavours.tensorrt.engines as p; print('tensorrt' in sys.modules, 'triton' in sys.modules); "
            "print(p.build_engines(sys.argv[1], min_length=5))")
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr
    first, second = run.stdout.strip().splitlines()
    assert first == "False False"
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert second.startswith("tensorrt: engines not built: the tensorrt package is not installed")
        from quota_compile.flavours.tensorrt.engines import register_plugins

        with pytest.raises(ImportError, match="tensorrt"):
            register_plugins()


def test_shape_profiles_follow_the_symbolic_dimensions(per_token):
    from quota_compile.flavours.tensorrt.engines import shape_profiles

    bundle, _ = per_token
    decode = onnx.load(bundle / "tensorrt" / "decode.onnx")
    profiles = shape_profiles(decode, min_length=40, max_batch=4, max_length=512)
    lo, opt, hi = profiles["attention_mask"]
    past_lo, _, past_hi = profiles["past.1.key"]
    first_lo, _, _ = profiles["past.0.key"]
    assert (lo[0], opt[0], hi[0]) == (1, 1, 4) and past_lo[2] == 40 and past_hi[2] == 512
    # derived dimensions ('past_1 + 33') follow their symbol: the mask covers the longest
    # (unpruned) cache and the new token
    assert first_lo[2] > past_lo[2] and lo[1] == first_lo[2] + 1


def _fake_engines(monkeypatch, agree: bool) -> list:
    """build_engines and compare_engines replaced (TensorRT is not installed here); the
    comparison disagrees on the decode graph unless ``agree``. Returns the comparisons' calls."""
    from quota_compile.flavours.tensorrt import engines as trt_plugins

    calls = []

    def built(bundle, min_length=None, **_):
        assert {f"{g}.onnx" for g in GRAPHS} <= {p.name for p in (Path(bundle) / "tensorrt").iterdir()}
        return {"built": True, "engines": {g: f"tensorrt/{g}.engine" for g in GRAPHS}, "tensorrt": "stand-in"}

    def compared(bundle, models, sample):
        calls.append((Path(bundle), set(models), sample))
        return {g: {"passed": agree or g != "decode", "outputs_compared": 1, "identical_kv_bytes": None} for g in GRAPHS}

    monkeypatch.setattr(trt_plugins, "build_engines", built)
    monkeypatch.setattr(trt_plugins, "compare_engines", compared)
    return calls


@pytest.mark.parametrize("agree", [True, False])
def test_engine_comparison_is_recorded_and_a_disagreement_fails_verification(tmp_path: Path, monkeypatch, agree):
    """Where engines are built, the compile's bundle stage calls check_engines: Polygraphy's
    --trt / --onnxrt result is recorded into the report (verify.json's
    ``flavours.tensorrt.engines``, written once by the compile afterwards: check_engines writes
    no file); a graph that disagrees raises VerificationFailed (exit 1, the bundle's temporary
    folder dropped, as for every other verification failure: tests/test_e2e.py)."""
    from quota_compile.errors import VerificationFailed
    from quota_compile.flavours.tensorrt.flavour import check_engines

    calls = _fake_engines(monkeypatch, agree)
    report = {"passed": True, "flavours": {"tensorrt": {"passed": True}}}
    if agree:
        got = check_engines(tmp_path, {g: None for g in GRAPHS}, "sample", report)
        assert set(got) == set(GRAPHS) and report["flavours"]["tensorrt"]["engines"] == got
    else:
        with pytest.raises(VerificationFailed, match="Polygraphy --trt against --onnxrt disagrees on decode"):
            check_engines(tmp_path, {g: None for g in GRAPHS}, "sample", report)
    assert list(tmp_path.iterdir()) == []
    assert calls == [(tmp_path, set(GRAPHS), "sample")]


def test_tensorrt_without_portable_is_refused(tmp_path: Path, capsys):
    cfg = write_config(tmp_path / "bad.yaml", "builtin:tiny-llava", tmp_path / "out", export={"targets": ["tensorrt"]})
    assert main([str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "export.targets" in err and "portable" in err and "tensorrt" in err
    assert not (tmp_path / "out").exists()


def test_tensorrt_with_int8_activations_is_refused(tmp_path: Path, capsys):
    cfg = write_config(tmp_path / "bad.yaml", "builtin:tiny-llava", tmp_path / "out",
                       quantization={"weights": {"group_size": 16}, "activations": {"bits": 8}}, export={"targets": ["portable", "tensorrt"]})
    assert main([str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "quantization.activations.bits" in err and "INT4" in err
    assert not (tmp_path / "out").exists()


def test_tensorrt_with_int4_embeddings_in_small_blocks_is_refused(tmp_path: Path, capsys):
    cfg = write_config(tmp_path / "bad.yaml", "builtin:tiny-llava", tmp_path / "out",
                       quantization={"weights": {"group_size": 16}, "embeddings": {"bits": 4}},
                       export={"targets": ["portable", "tensorrt"]})
    assert main([str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "quantization.embeddings.group_size" in err and "64 or 128" in err and "not 16" in err
    assert sum("error" in line for line in err.splitlines()) == 1 and not (tmp_path / "out").exists()


def test_tensorrt_without_onnxruntime_extensions_is_refused(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime_extensions", None)  # import fails
    cfg = write_config(tmp_path / "bad.yaml", "builtin:tiny-llava", tmp_path / "out", export={"targets": ["portable", "tensorrt"]})
    assert main([str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "export.targets" in err and "onnxruntime-extensions" in err


def test_unknown_target_is_refused(tmp_path: Path, capsys):
    cfg = write_config(tmp_path / "bad.yaml", "builtin:tiny-llava", tmp_path / "out", export={"targets": ["portable", "tensorrt-llm"]})
    assert main([str(cfg)]) == 2
    assert "export.targets" in capsys.readouterr().err
