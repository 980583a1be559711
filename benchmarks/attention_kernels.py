"""Prefill attention on onnxruntime's CPU provider: the graph's own ops against the fused
contrib operators, at bench-llava's shapes.

    python benchmarks/attention_kernels.py [--tokens 651] [--vision-tokens 577] [--threads 2] [--runs 15]

Two comparisons, each checked for equal outputs and timed (median of --runs calls, the two
forms alternating):
- decoder prefill, causal, 12 query / 4 KV heads of 64: Expand of the KV heads, MatMul,
  scaling, mask bias, Softmax, MatMul (what the flavour's prefill graph runs) against
  ``com.microsoft.GroupQueryAttention`` with a float cache (no past, causal by construction);
- vision tower, no mask, 6 heads of 64: MatMul, scaling, Softmax, MatMul against
  ``com.microsoft.MultiHeadAttention``.
Random operands; only the times mean anything.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from matmul_kernels import session  # the same session set-up (this folder is on sys.path when run)


def _session(nodes, inputs, inits, threads):
    """A session whose one output is ``o`` (float)."""
    return session(nodes, inputs, [helper.make_tensor_value_info("o", TensorProto.FLOAT, None)], inits, threads)


def _flat(x: str) -> list:
    """[B, heads, T, D] -> [B, T, heads * D], the contrib ops' layout."""
    return [helper.make_node("Transpose", [x], [f"{x}_t"], perm=[0, 2, 1, 3]), helper.make_node("Reshape", [f"{x}_t", "flat"], [f"{x}_f"])]


def _compare(name: str, a, b, feed_a: dict, feed_b: dict, runs: int) -> None:
    out_a, out_b = a.run(None, feed_a)[0], b.run(None, feed_b)[0]
    diff = float(np.abs(out_a - out_b).max() / np.abs(out_a).max())
    times: dict[str, list[float]] = {"graph ops": [], "fused op": []}
    for _ in range(runs):
        for key, s, f in (("graph ops", a, feed_a), ("fused op", b, feed_b)):
            t0 = time.perf_counter()
            s.run(None, f)
            times[key].append(time.perf_counter() - t0)
    base = statistics.median(times["graph ops"])
    print(f"{name} (outputs differ by {diff:.1e}, relative)")
    for key, ts in times.items():
        med = statistics.median(ts)
        print(f"  {key:<10} {1e3 * med:8.2f} ms   {base / med:5.2f}x")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=651)
    ap.add_argument("--vision-tokens", type=int, default=577)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=15)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    vi = lambda n, shape: helper.make_tensor_value_info(n, TensorProto.FLOAT, shape)  # noqa: E731
    c = numpy_helper.from_array

    # decoder prefill: grouped-query, causal
    t, h, hk, d = a.tokens, 12, 4, 64
    rep = h // hk
    q, k, v = f32(1, h, t, d), f32(1, hk, t, d), f32(1, hk, t, d)
    bias = np.triu(np.full((t, t), np.finfo(np.float32).min, np.float32), 1)[None, None]
    inits = [c(np.array([2], np.int64), "ax2"), c(np.array([1, hk, rep, t, d], np.int64), "expand"),
             c(np.array([1, h, t, d], np.int64), "heads"), c(np.array(d**-0.5, np.float32), "scale"),
             c(np.array([0, 0, -1], np.int64), "flat")]
    graph = _session([
        helper.make_node("Unsqueeze", ["k", "ax2"], ["k1"]), helper.make_node("Expand", ["k1", "expand"], ["k2"]),
        helper.make_node("Reshape", ["k2", "heads"], ["k3"]), helper.make_node("Unsqueeze", ["v", "ax2"], ["v1"]),
        helper.make_node("Expand", ["v1", "expand"], ["v2"]), helper.make_node("Reshape", ["v2", "heads"], ["v3"]),
        helper.make_node("Transpose", ["k3"], ["kt"], perm=[0, 1, 3, 2]), helper.make_node("MatMul", ["q", "kt"], ["s0"]),
        helper.make_node("Mul", ["s0", "scale"], ["s1"]), helper.make_node("Add", ["s1", "bias"], ["s2"]),
        helper.make_node("Softmax", ["s2"], ["p"], axis=-1), helper.make_node("MatMul", ["p", "v3"], ["o4"]),
        helper.make_node("Transpose", ["o4"], ["o5"], perm=[0, 2, 1, 3]), helper.make_node("Reshape", ["o5", "flat"], ["o"]),
    ], [vi("q", [1, h, t, d]), vi("k", [1, hk, t, d]), vi("v", [1, hk, t, d]), vi("bias", [1, 1, t, t])], inits, a.threads)
    fused = _session(_flat("q") + _flat("k") + _flat("v") + [helper.make_node(
        "GroupQueryAttention", ["q_f", "k_f", "v_f", "", "", "seqlens", "total"], ["o", "present_k", "present_v"],
        domain="com.microsoft", num_heads=h, kv_num_heads=hk, scale=d**-0.5,
    )], [vi("q", [1, h, t, d]), vi("k", [1, hk, t, d]), vi("v", [1, hk, t, d])],
        [c(np.array([0, 0, -1], np.int64), "flat"), c(np.array([t - 1], np.int32), "seqlens"), c(np.array(t, np.int32), "total")], a.threads)
    _compare(f"decoder prefill attention, {t} tokens, {h}/{hk} heads of {d}, causal: GroupQueryAttention (float cache)",
             graph, fused, {"q": q, "k": k, "v": v, "bias": bias}, {"q": q, "k": k, "v": v}, a.runs)

    # vision tower: plain multi-head, no mask
    t, h = a.vision_tokens, 6
    q, k, v = f32(1, h, t, d), f32(1, h, t, d), f32(1, h, t, d)
    ins = [vi("q", [1, h, t, d]), vi("k", [1, h, t, d]), vi("v", [1, h, t, d])]
    inits = [c(np.array(d**-0.5, np.float32), "scale"), c(np.array([0, 0, -1], np.int64), "flat")]
    graph = _session([
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]), helper.make_node("MatMul", ["q", "kt"], ["s0"]),
        helper.make_node("Mul", ["s0", "scale"], ["s1"]), helper.make_node("Softmax", ["s1"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["o4"]), helper.make_node("Transpose", ["o4"], ["o5"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["o5", "flat"], ["o"]),
    ], ins, inits, a.threads)
    fused = _session(_flat("q") + _flat("k") + _flat("v") + [helper.make_node(
        "MultiHeadAttention", ["q_f", "k_f", "v_f"], ["o"], domain="com.microsoft", num_heads=h, scale=d**-0.5,
    )], ins, inits, a.threads)
    feed = {"q": q, "k": k, "v": v}
    _compare(f"vision attention, {t} tokens, {h} heads of {d}, no mask: MultiHeadAttention", graph, fused, feed, feed, a.runs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
