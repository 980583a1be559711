"""fuse_w4a4_linear: make each W4A4 Linear one semantic operator, ``quota.w4a4_linear``.

``insert_qdq`` writes a W4A4 Linear as ``matmul(qdq_per_token(x, 4, clip), qdq_weight(w))`` and
``pack_int4_weights`` turns the weight's quantizer into ``dequantize_int4(packed, scale, k, n,
g)``. This pass, run right after them, joins the three into ``w4a4_linear(x, packed, scale, k,
n, g, clip)`` (:mod:`quota_compile.kernels.ops`): from here on the graph says what the operation
is, and each flavour translates that operator instead of recognising its pieces. The portable
ONNX translation writes it back as the per-token ``QuantizeLinear`` / ``DequantizeLinear``
pair, the INT4 weight's ``DequantizeLinear`` and a ``MatMul``
(:mod:`quota_compile.export.onnx_translation`); the PyTorch path runs it as the Triton kernel.

Requires: nothing beyond a graph (with no W4A4 Linear it changes nothing).
Ensures: no ``matmul`` of an INT4 ``qdq_per_token`` and a ``dequantize_int4`` remains; there is
one ``w4a4_linear`` per such matmul found (``bias`` stays the ``add`` after it); an activation
quantizer or weight dequantizer read by nothing else afterwards is removed (a quantizer shared
by the Q/K/V or gate/up Linears is read by each of their ``w4a4_linear`` nodes instead).
Linears with 8-bit activations and weight-only Linears keep their pieces.
"""

from __future__ import annotations

import torch
from torch import fx

from quota_compile.kernels import ops as kernel_ops  # noqa: F401  (registers quota::w4a4_linear)
from quota_compile.quant import ops  # noqa: F401  (registers torch.ops.quota)

from . import GraphPass, PassError, PassResult, count_calls


def w4a4_matmuls(gm: fx.GraphModule) -> list[fx.Node]:
    """The ``aten.matmul`` nodes of ``gm`` that multiply an INT4 ``qdq_per_token`` by a
    ``dequantize_int4``: the W4A4 Linears as ``insert_qdq`` and ``pack_int4_weights`` leave them."""
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


class FuseW4A4Linear(GraphPass):
    name = "fuse_w4a4_linear"

    def call(self, gm: fx.GraphModule) -> PassResult:
        graph = gm.graph
        matmuls = w4a4_matmuls(gm)
        self._expected = count_calls(gm, torch.ops.quota.w4a4_linear.default) + len(matmuls)
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
        return PassResult(gm, bool(matmuls))

    def ensures(self, gm: fx.GraphModule) -> None:
        if w4a4_matmuls(gm):
            raise PassError(f"{self.name}: W4A4 Linears were left as float MatMuls")
        got = count_calls(gm, torch.ops.quota.w4a4_linear.default)
        if got != self._expected:
            raise PassError(f"{self.name}: expected {self._expected} w4a4_linear nodes, found {got}")
