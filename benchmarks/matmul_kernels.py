"""onnxruntime CPU matmul kernels on one decoder-sized product, to see what INT4/INT8 arithmetic
buys on this machine.

    python benchmarks/matmul_kernels.py [--m 651] [--k 768] [--n 2048] [--block 128] [--threads 2]

Times (median of --runs calls after one warm-up) a [M, K] x [K, N] product as: fp32 MatMul;
MatMulNBits (INT4 weights, group --block) at accuracy_level 0 and 4; MatMulInteger with uint8
and with int8 activations (int8 weights); MatMulIntegerToFloat (uint8 x int8 with per-row and
per-column scales: what the flavour's integer W4A4 Linear runs); DynamicQuantizeMatMul (fp32 in, int8 weights). Then it
times the two ways of making the integer product's input codes (per-token INT4, uint8 with
zero point 8): element-wise ops, or one per-row QuantizeLinear. The operands are random; only
the times mean anything.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from quota_compile.flavours.onnxruntime.lower import matmulnbits_weights  # noqa: E402


def session(nodes, inputs, outputs, inits, threads):
    """An onnxruntime CPU session over a one-graph model of ``nodes`` (opset 21 + com.microsoft)."""
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _time(session, feed, runs):
    session.run(None, feed)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, default=651)
    ap.add_argument("--k", type=int, default=768)
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=20)
    a = ap.parse_args()
    m, k, n, g = a.m, a.k, a.n, a.block
    rng = np.random.default_rng(0)
    x = rng.standard_normal((m, k)).astype(np.float32)
    codes = rng.integers(-8, 8, (k, n)).astype(np.int8)
    scales = (rng.random((k // g, n)) * 0.1).astype(np.float32)
    fx = helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])
    fy = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    iy = helper.make_tensor_value_info("y", TensorProto.INT32, None)
    w = numpy_helper.from_array(codes, "W")
    rows = []
    s = session([helper.make_node("MatMul", ["x", "W"], ["y"])], [fx], [fy],
                 [numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "W")], a.threads)
    rows.append(("fp32 MatMul", _time(s, {"x": x}, a.runs)))
    b, sc = matmulnbits_weights(codes, scales, g)
    for level in (0, 4):
        node = helper.make_node("MatMulNBits", ["x", "B", "S"], ["y"], domain="com.microsoft", K=k, N=n, bits=4, block_size=g, accuracy_level=level)
        s = session([node], [fx], [fy], [numpy_helper.from_array(b, "B"), numpy_helper.from_array(sc, "S")], a.threads)
        rows.append((f"MatMulNBits int4, accuracy_level {level}", _time(s, {"x": x}, a.runs)))
    for name, dtype, np_dtype, lo, hi in (("uint8", TensorProto.UINT8, np.uint8, 0, 256), ("int8", TensorProto.INT8, np.int8, -8, 8)):
        xi = rng.integers(lo, hi, (m, k)).astype(np_dtype)
        s = session([helper.make_node("MatMulInteger", ["x", "W"], ["y"])], [helper.make_tensor_value_info("x", dtype, [m, k])], [iy], [w], a.threads)
        rows.append((f"MatMulInteger {name} x int8", _time(s, {"x": xi}, a.runs)))
    xu = rng.integers(0, 16, (m, k)).astype(np.uint8)
    node = helper.make_node("MatMulIntegerToFloat", ["x", "W", "sx", "ws", "zp"], ["y"], domain="com.microsoft")
    s = session([node], [helper.make_tensor_value_info("x", TensorProto.UINT8, [m, k]), helper.make_tensor_value_info("sx", TensorProto.FLOAT, [m, 1])],
                 [fy], [w, numpy_helper.from_array(np.ones(n, np.float32), "ws"), numpy_helper.from_array(np.array(8, np.uint8), "zp")], a.threads)
    rows.append(("MatMulIntegerToFloat uint8 x int8, scaled", _time(s, {"x": xu, "sx": np.ones((m, 1), np.float32)}, a.runs)))
    node = helper.make_node("DynamicQuantizeMatMul", ["x", "W", "ws"], ["y"], domain="com.microsoft")
    s = session([node], [fx], [fy], [w, numpy_helper.from_array(np.ones(n, np.float32), "ws")], a.threads)
    rows.append(("DynamicQuantizeMatMul (fp32 in, int8 W)", _time(s, {"x": x}, a.runs)))
    base = rows[0][1]
    print(f"[{m}, {k}] x [{k}, {n}], {a.threads} threads, onnxruntime {ort.__version__}, median of {a.runs}")
    for name, ms in rows:
        print(f"  {name:<42} {ms:8.3f} ms   {base / ms:5.2f}x fp32")

    # The integer product's input: per-token INT4 codes (uint8, zero point 8) of x [M, K], two
    # ways; both give the same integers (checked here).
    def scale_nodes():
        return [
            helper.make_node("Abs", ["x"], ["a"]),
            helper.make_node("ReduceMax", ["a", "axes"], ["mx"], keepdims=1),
            helper.make_node("Div", ["mx", "seven"], ["s0"]),
            helper.make_node("Max", ["s0", "eps"], ["s"]),
        ]

    consts = [numpy_helper.from_array(v, name) for name, v in (
        ("axes", np.array([-1], np.int64)), ("seven", np.array(7, np.float32)), ("eps", np.array(1e-8, np.float32)),
        ("lo", np.array(-8, np.float32)), ("hi", np.array(7, np.float32)), ("off", np.array(8, np.float32)),
        ("flat", np.array([-1], np.int64)), ("zp", np.array(8, np.uint8)), ("u0", np.array(0, np.uint8)), ("u15", np.array(15, np.uint8)))]
    uy = helper.make_tensor_value_info("y", TensorProto.UINT8, None)
    elementwise = session(scale_nodes() + [
        helper.make_node("Div", ["x", "s"], ["d"]), helper.make_node("Round", ["d"], ["r"]),
        helper.make_node("Clip", ["r", "lo", "hi"], ["c"]), helper.make_node("Add", ["c", "off"], ["e"]),
        helper.make_node("Cast", ["e"], ["y"], to=TensorProto.UINT8),
    ], [fx], [uy], consts, a.threads)
    per_row = session(scale_nodes() + [
        helper.make_node("Reshape", ["s", "flat"], ["s1"]), helper.make_node("Shape", ["s1"], ["count"]),
        helper.make_node("Expand", ["zp", "count"], ["zps"]),
        helper.make_node("QuantizeLinear", ["x", "s1", "zps"], ["q"], axis=0),
        helper.make_node("Clip", ["q", "u0", "u15"], ["y"]),
    ], [fx], [uy], consts, a.threads)
    same = np.array_equal(elementwise.run(None, {"x": x})[0], per_row.run(None, {"x": x})[0])
    print(f"per-token INT4 codes of x [{m}, {k}] (identical: {same})")
    for name, s in (("Div, Round, Clip, Add, Cast", elementwise), ("QuantizeLinear per row (uint8) + Clip", per_row)):
        print(f"  {name:<42} {_time(s, {'x': x}, a.runs):8.3f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
