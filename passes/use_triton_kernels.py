"""use_triton_kernels: run each W4A4 Linear as one ``quota.w4a4_linear`` (the Triton kernel on a
GPU) instead of the quantize-dequantize ops and a float MatMul.

Requires: the graph went through ``insert_qdq`` and ``pack_int4_weights`` (there are
``matmul(qdq_per_token(x, 4, clip), dequantize_int4(packed, scale, k, n, g))`` nodes).
Ensures: none of those remain; each is one ``w4a4_linear(x, packed, scale, k, n, g, clip)``
node (count preserved); an activation quantizer read by nothing else is removed. Linears with
8-bit activations, weight-only ones and everything else are untouched.
This pass is not used for the ONNX export: it builds the PyTorch execution path
(:mod:`quota_compile.kernels.torch_path`).
"""

from __future__ import annotations

import torch
from torch import fx

from quota_compile.kernels import ops as kernel_ops  # noqa: F401  (registers quota::w4a4_linear)
from quota_compile.quant import ops  # noqa: F401

from . import GraphPass, PassError, PassResult, count_calls


def _w4a4_matmuls(gm: fx.GraphModule) -> list[fx.Node]:
    found = []
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target != torch.ops.aten.matmul.default:
            continue
        a, b = n.args[0], n.args[1]
        if (
            isinstance(a, fx.Node) and a.target == torch.ops.quota.qdq_per_token.default and a.args[1] == 4
            and isinstance(b, fx.Node) and b.target == torch.ops.quota.dequantize_int4.default
        ):
            found.append(n)
    return found


class UseTritonKernels(GraphPass):
    name = "use_triton_kernels"

    def requires(self, gm: fx.GraphModule) -> None:
        if not _w4a4_matmuls(gm):
            raise PassError(f"{self.name}: no W4A4 Linear (qdq_per_token INT4 x dequantize_int4) in the graph")

    def call(self, gm: fx.GraphModule) -> PassResult:
        graph = gm.graph
        matmuls = _w4a4_matmuls(gm)
        for node in matmuls:
            qdq, deq = node.args
            x, _, clip = qdq.args
            packed, scale, k, n, g = deq.args
            with graph.inserting_before(node):
                y = graph.call_function(torch.ops.quota.w4a4_linear.default, (x, packed, scale, k, n, g, clip))
            y.meta.update(node.meta)
            node.replace_all_uses_with(y)
            graph.erase_node(node)
            for old in (qdq, deq):
                if not old.users:
                    graph.erase_node(old)
        self._expected = len(matmuls)
        return PassResult(gm, True)

    def ensures(self, gm: fx.GraphModule) -> None:
        if _w4a4_matmuls(gm):
            raise PassError(f"{self.name}: W4A4 Linears were left as float MatMuls")
        got = count_calls(gm, torch.ops.quota.w4a4_linear.default)
        if got != self._expected:
            raise PassError(f"{self.name}: expected {self._expected} w4a4_linear nodes, found {got}")
