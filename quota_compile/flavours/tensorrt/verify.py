"""Verify the TensorRT flavour without TensorRT: its graphs in onnxruntime, each plugin node run
by a Python custom op (onnxruntime-extensions, domain ``ai.onnx.contrib``) that computes the
plugin's definition (:mod:`quota_compile.flavours.tensorrt.lower`) with ``quant.ops`` in PyTorch on the CPU.

What this checks: that the rewritten graphs (which nodes the plugins replaced, what they take
and return, the cache protocol) compute what the portable graphs and the simulation compute.
What it does not check: TensorRT's parser, the engine build and the Triton kernels behind the
plugins on a GPU (:mod:`quota_compile.flavours.tensorrt.engines`; the kernels against these same references:
``tests/test_kernels.py``, ``tests/test_trt_flavour.py``).

The references here do not import the kernel modules (they import triton, which the test suite
must first import in its interpreter mode: see ``tests/test_kernels.py``): the W4A4 product is
``kernels.reference.w4a4_matmul_reference``, shared with the kernel's reference, and
``tests/test_trt_flavour.py`` checks that these equal ``w4a4_linear_reference`` and
``kv_decode_attention_reference`` on random inputs.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import torch

from quota_compile.kernels.reference import w4a4_matmul_reference
from quota_compile.flavours.tensorrt.lower import DECODE_ATTENTION, KV_QUANTIZE, PLUGIN_DOMAIN, PLUGINS, W4A4_LINEAR, PLUGIN_ATTRS
from quota_compile.quant import ops
from quota_compile.quant.attention import attend
from quota_compile.bundle.schema import GRAPHS, KEPT
from quota_compile.runtime.ort import OrtBackend, session_options
from quota_compile.bundle.format import kv_update_of

CONTRIB_DOMAIN = "ai.onnx.contrib"
RUNTIME = "onnxruntime CPUExecutionProvider, the plugin nodes as onnxruntime-extensions Python custom ops (the plugins' PyTorch references)"


class MissingExtensions(RuntimeError):
    """onnxruntime-extensions is not installed."""


# --------------------------------------------------------------------------------------------
# The plugins' definitions (PyTorch, CPU)


def w4a4_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                group_size: int, clip_ratio: float, act_bits: int) -> torch.Tensor:
    """:data:`~quota_compile.flavours.tensorrt.lower.W4A4_LINEAR`: ``kernels.w4a4_linear.w4a4_linear_reference``
    (float32 in and out), generalised to ``act_bits`` 8: per-token codes of ``x``
    (``ops.quantize_per_token``), per group an exact integer dot with the weight codes, the
    groups' float32 sums times the weight scales added in order, times the row scale, plus
    bias."""
    k, n = x.shape[-1], scale.shape[-1]
    codes, row_scale = ops.quantize_per_token(x.reshape(-1, k).to(torch.float32), act_bits, clip_ratio)
    return w4a4_matmul_reference(codes, row_scale, weight, scale, group_size, bias).reshape(*x.shape[:-1], n)


def kv_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int, granularity: str):
    """:data:`~quota_compile.flavours.tensorrt.lower.KV_QUANTIZE`: ``(codes, scale, zero_point, dequantized)``."""
    x = x.to(torch.float32)
    if granularity == "per_token":
        codes, s, zp = torch.ops.quota.quantize_kv(x, bits)
        return codes, s, zp, torch.ops.quota.dequantize_kv(codes, s, zp, bits)
    codes = torch.ops.quota.quantize_kv_static(x, scale, bits)
    return codes, scale, zero_point, dequantize(codes, scale, zero_point, bits)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """``(code - zero_point) * scale`` in float32, INT4 codes unpacked (both granularities:
    per_channel's zero point is ``2**(bits-1)``, which is ``ops.dequantize_kv_static``)."""
    return (ops.unpack_kv_codes(codes, bits).to(torch.float32) - zero_point.to(torch.float32)) * scale


def decode_attention(query, key, value, bias, past_key, past_value, key_scale, value_scale, key_zero_point,
                     value_zero_point, bits: int, granularity: str, num_heads: int, kv_num_heads: int, scale: float):
    """:data:`~quota_compile.flavours.tensorrt.lower.DECODE_ATTENTION`: the new token's key and value quantized
    into the cache, then ``kv_decode_attention_reference`` over all ``P + 1`` positions with
    the additive ``bias``; returns ``(attention [B, H, 1, D], present_key, present_value,
    present_key_scale, present_value_scale, present_key_zero_point, present_value_zero_point)``."""
    b, h, _, d = query.shape
    if h != num_heads or past_key.shape[1] != kv_num_heads or h % kv_num_heads:
        raise ValueError(f"{DECODE_ATTENTION}: query heads {h} / cache heads {past_key.shape[1]} differ from the attributes {num_heads} / {kv_num_heads}")
    nk, nk_s, nk_z, _ = kv_quantize(key, key_scale, key_zero_point, bits, granularity)
    nv, nv_s, nv_z, _ = kv_quantize(value, value_scale, value_zero_point, bits, granularity)
    if granularity == "per_token":
        cache = [(torch.cat([past_key, nk], 2), torch.cat([key_scale, nk_s], 2), torch.cat([key_zero_point, nk_z], 2)),
                 (torch.cat([past_value, nv], 2), torch.cat([value_scale, nv_s], 2), torch.cat([value_zero_point, nv_z], 2))]
    else:
        cache = [(torch.cat([past_key, nk], 2), key_scale, key_zero_point), (torch.cat([past_value, nv], 2), value_scale, value_zero_point)]
    k, v = (dequantize(c, s, z, bits) for c, s, z in cache)
    out, _ = attend(query.to(torch.float32), k, v, bias.to(torch.float32), scale)
    return out, nk, nv, nk_s, nv_s, nk_z, nv_z


def reference_seqlens_bias(seqlens: torch.Tensor, length: int) -> torch.Tensor:
    """The additive bias ``[B, 1, 1, length]`` equivalent to the kernel reference's
    ``t < seqlens[b]`` mask."""
    valid = torch.arange(length)[None, :] < seqlens.long()[:, None]
    return torch.where(valid, 0.0, -math.inf)[:, None, None, :].to(torch.float32)


# --------------------------------------------------------------------------------------------
# onnxruntime-extensions custom ops


_REGISTERED = False


def register_custom_ops() -> str:
    """Register the three plugins as Python custom ops (once per process); returns the path of
    the extensions library to give ``SessionOptions.register_custom_ops_library``."""
    global _REGISTERED
    try:
        from onnxruntime_extensions import PyCustomOpDef as T
        from onnxruntime_extensions import get_library_path, onnx_op
    except ImportError as e:
        raise MissingExtensions("the tensorrt flavour is verified with onnxruntime-extensions: pip install onnxruntime-extensions") from e
    if _REGISTERED:
        return get_library_path()
    t = torch.from_numpy

    @onnx_op(op_type=W4A4_LINEAR, inputs=[T.dt_float, T.dt_uint8, T.dt_float, T.dt_float], outputs=[T.dt_float],
             attrs={"group_size": T.dt_int64, "clip_ratio": T.dt_float, "act_bits": T.dt_int64})
    def _w4a4(x, weight, scale, bias, group_size, clip_ratio, act_bits):
        return w4a4_linear(t(x), t(weight), t(scale), t(bias), group_size, clip_ratio, act_bits).numpy()

    @onnx_op(op_type=KV_QUANTIZE, inputs=[T.dt_float, T.dt_float, T.dt_uint8],
             outputs=[T.dt_uint8, T.dt_float, T.dt_uint8, T.dt_float], attrs={"bits": T.dt_int64, "granularity": T.dt_string})
    def _kvq(x, scale, zero_point, bits, granularity):
        return tuple(np.ascontiguousarray(r.numpy()) for r in kv_quantize(t(x), t(scale), t(zero_point), bits, granularity))

    @onnx_op(op_type=DECODE_ATTENTION,
             inputs=[T.dt_float] * 4 + [T.dt_uint8, T.dt_uint8, T.dt_float, T.dt_float, T.dt_uint8, T.dt_uint8],
             outputs=[T.dt_float, T.dt_uint8, T.dt_uint8, T.dt_float, T.dt_float, T.dt_uint8, T.dt_uint8],
             attrs={"bits": T.dt_int64, "granularity": T.dt_string, "num_heads": T.dt_int64, "kv_num_heads": T.dt_int64, "scale": T.dt_float})
    def _attn(*args, bits, granularity, num_heads, kv_num_heads, scale):
        out = decode_attention(*[t(np.ascontiguousarray(a)) for a in args], bits, granularity, num_heads, kv_num_heads, scale)
        return tuple(np.ascontiguousarray(r.numpy()) for r in out)

    _REGISTERED = True
    return get_library_path()


def contrib_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a TensorRT-flavour graph with its plugin nodes in domain ``ai.onnx.contrib``
    (without the TensorRT-only attributes), for onnxruntime with the custom ops above."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for n in out.graph.node:
        if n.domain == PLUGIN_DOMAIN and n.op_type in PLUGINS:
            n.domain = CONTRIB_DOMAIN
            kept = [a for a in n.attribute if a.name not in PLUGIN_ATTRS]
            del n.attribute[:]
            n.attribute.extend(kept)
    imports = [o for o in out.opset_import if o.domain != PLUGIN_DOMAIN]
    del out.opset_import[:]
    out.opset_import.extend(imports + [onnx.helper.make_opsetid(CONTRIB_DOMAIN, 1)])
    return out


def session(model: onnx.ModelProto, threads: int | None = None):
    """An onnxruntime session of a TensorRT-flavour graph (plugins as custom ops), with the
    options :class:`~quota_compile.runtime.ort.OrtBackend` uses, without the memory arena (it
    serves verification, as the other flavours' verification sessions)."""
    import onnxruntime as ort

    opts = session_options(threads, arena=False)
    opts.register_custom_ops_library(register_custom_ops())
    return ort.InferenceSession(contrib_copy(model).SerializeToString(), opts, providers=["CPUExecutionProvider"])


class TensorrtReferenceBackend(OrtBackend):
    """The TensorRT flavour's three graphs behind the :class:`~quota_compile.runtime.ort.Backend`
    interface, run as :func:`session` runs them."""

    def __init__(self, models: dict[str, onnx.ModelProto] | Path, threads: int | None = None):
        if not isinstance(models, dict):
            models = {g: onnx.load(Path(models) / f"{g}.onnx") for g in GRAPHS}
        self.folder = None
        self.sessions = {g: session(models[g], threads) for g in GRAPHS}
        self._inputs = {g: [i.name for i in s.get_inputs()] for g, s in self.sessions.items()}
        self.kv_update = kv_update_of(models["decode"])


def describe_arithmetic() -> dict[str, str]:
    """What the plugins compute (for verify.json / the report)."""
    return {
        "linear": f"{W4A4_LINEAR}: per-token INT4 codes of the input, exact integer dot products with the INT4 weight codes per group, float32 group sums scaled, times the token scale, plus bias",
        "prefill_kv": f"{KV_QUANTIZE}: the cache quantizer of quant.ops (codes, scales, zero points) and the dequantized values the layer's attention reads",
        "decode_attention": f"{DECODE_ATTENTION}: the new token quantized into the cache, then float32 softmax attention over the dequantized cache with the graph's mask bias (new entries returned, appended by the runtime)",
    }


# --------------------------------------------------------------------------------------------
# Polygraphy: the flavour against the portable graphs, graph by graph


def polygraphy_compare(portable_folder: Path, models: dict[str, onnx.ModelProto], feeds: dict[str, list[np.ndarray]] | None = None,
                       sample=None) -> dict:
    """Polygraphy's Comparator on one sample: each TensorRT-flavour graph (plugins as custom ops)
    against the portable graph in ``portable_folder``, same inputs (the vision features and the
    cache come from the portable graphs); :func:`compare_runners` judges each pair."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    if feeds is None:
        feeds = feeds_of(portable_folder, sample)
    results = {}
    for graph, values in feeds.items():
        portable = OnnxrtRunner(SessionFromOnnx(str(portable_folder / f"{graph}.onnx")), name=f"portable-{graph}")
        sess = session(models[graph])
        flavour = OnnxrtRunner(sess, name=f"tensorrt-{graph}")
        results[graph] = compare_runners(portable, flavour, [i.name for i in sess.get_inputs()],
                                         [o.name for o in sess.get_outputs()], values)
    return results


def compare_runners(reference, candidate, names_in: list[str], names_out: list[str], values: list[np.ndarray]) -> dict:
    """Run two Polygraphy runners of the same graph on one feed and compare their outputs: kept
    indices must be identical; float outputs agree in mean error within rtol 1e-2 / atol 1e-4.
    KV codes are compared apart (share of identical bytes, reported): exact-integer W4A4 sums
    and a float32 MatMul may put a value on either side of a rounding boundary, which the
    greedy decode then judges."""
    from polygraphy.comparator import Comparator, CompareFunc, RunResults
    from polygraphy.comparator.struct import IterationResult
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.ERROR
    feed = {n: np.ascontiguousarray(v) for n, v in zip(names_in, values)}
    run = Comparator.run([reference, candidate], data_loader=[feed])
    codes = [n for n in names_out if n.endswith((".key", ".value", "zero_point"))]
    compared = [n for n in names_out if n not in codes]
    kept = [n for n in compared if n.startswith(KEPT)]
    atol = {"": 1e-4, **dict.fromkeys(kept, 0.0)}
    rtol = {"": 1e-2, **dict.fromkeys(kept, 0.0)}
    stat = {"": "mean", **dict.fromkeys(kept, "elemwise")}
    a, b = (dict(run[r.name][0].items()) for r in (reference, candidate))
    floats = RunResults()
    for r, out in ((reference, a), (candidate, b)):
        floats.append((r.name, [IterationResult({n: out[n] for n in compared}, runner_name=r.name)]))
    with np.errstate(divide="ignore", invalid="ignore"):
        acc = Comparator.compare_accuracy(floats, compare_func=CompareFunc.simple(rtol=rtol, atol=atol, check_error_stat=stat))
    same = sum(int(np.sum(a[n] == b[n])) for n in codes)
    total = sum(a[n].size for n in codes)
    return {"passed": bool(acc), "outputs_compared": len(compared), "identical_kv_bytes": (same / total) if total else None}


def feeds_of(folder: Path, sample) -> dict[str, list[np.ndarray]]:
    """Inputs of the three graphs for one verification sample, from the portable graphs."""
    backend = OrtBackend(folder, arena=False)
    batch = sample.batch
    feats = backend.vision(batch.pixel_values)
    _, cache, _ = backend.prefill(batch.input_ids, batch.attention_mask, feats)
    length = batch.attention_mask.sum(axis=1)
    step = [np.array([[1]], dtype=np.int64), length[:, None].astype(np.int64), np.ones((1, cache[0].shape[2] + 1), dtype=np.int64)]
    return {"vision": [batch.pixel_values], "prefill": [batch.input_ids, batch.attention_mask, feats], "decode": step + cache}
