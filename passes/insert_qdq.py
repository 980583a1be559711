"""insert_qdq: put the W4A4 quantizers around every Linear chosen for quantization.

Requires: the listed weights are read by ``get_attr`` nodes feeding ``aten.linear`` nodes
(``linear(x, weight[, bias])``), and no ``quota`` quantizer is in the graph yet.
Ensures: each listed Linear becomes ``matmul(qdq_per_token(x), qdq_weight(weight)) [+ bias]``;
one ``qdq_per_token`` serves all Linears that read the same input (Q/K/V, gate/up);
Linears not listed are untouched. Counts: ``qdq_weight`` = listed Linears,
``qdq_per_token`` = distinct inputs among them. A spec with ``act_bits=None`` quantizes the
weight only (the INT4 weight-only baseline): no ``qdq_per_token`` for that Linear.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import fx

from quota_compile.quant import ops  # noqa: F401  (registers torch.ops.quota)

from . import GraphPass, PassError, PassResult, count_calls


@dataclass(frozen=True)
class LinearQuantSpec:
    weight_bits: int
    group_size: int
    act_bits: int | None
    clip_ratio: float


class InsertQDQ(GraphPass):
    name = "insert_qdq"

    def __init__(self, targets: Mapping[str, LinearQuantSpec]):
        """``targets``: ``get_attr`` target of each weight to quantize -> its spec."""
        self.targets = dict(targets)

    def _linears(self, gm: fx.GraphModule) -> list[fx.Node]:
        return [
            n
            for n in gm.graph.nodes
            if n.op == "call_function"
            and n.target == torch.ops.aten.linear.default
            and n.args[1].op == "get_attr"
            and n.args[1].target in self.targets
        ]

    def requires(self, gm: fx.GraphModule) -> None:
        found = {n.args[1].target for n in self._linears(gm)}
        missing = set(self.targets) - found
        if missing:
            raise PassError(f"{self.name}: weights not read by a linear: {sorted(missing)[:3]}")
        if count_calls(gm, torch.ops.quota.qdq_per_token.default) or count_calls(gm, torch.ops.quota.qdq_weight.default):
            raise PassError(f"{self.name}: the graph is already quantized")

    def call(self, gm: fx.GraphModule) -> PassResult:
        graph = gm.graph
        act_qdq: dict[tuple, fx.Node] = {}
        linears = self._linears(gm)
        for node in linears:
            spec = self.targets[node.args[1].target]
            x, w = node.args[0], node.args[1]
            bias = node.args[2] if len(node.args) > 2 else None
            key = (x, spec.act_bits, spec.clip_ratio)
            with graph.inserting_before(node):
                if spec.act_bits is None:
                    xq = x
                else:
                    if key not in act_qdq:
                        act_qdq[key] = graph.call_function(torch.ops.quota.qdq_per_token.default, (x, spec.act_bits, spec.clip_ratio))
                    xq = act_qdq[key]
                wq = graph.call_function(torch.ops.quota.qdq_weight.default, (w, spec.weight_bits, spec.group_size))
                y = graph.call_function(torch.ops.aten.matmul.default, (xq, wq))
                if bias is not None:
                    y = graph.call_function(torch.ops.aten.add.Tensor, (y, bias))
            y.meta.update(node.meta)
            node.replace_all_uses_with(y)
            graph.erase_node(node)
        self._expected = (len(linears), len(act_qdq))
        return PassResult(gm, bool(linears))

    def ensures(self, gm: fx.GraphModule) -> None:
        if self._linears(gm):
            raise PassError(f"{self.name}: listed Linears were left unquantized")
        got = (count_calls(gm, torch.ops.quota.qdq_weight.default), count_calls(gm, torch.ops.quota.qdq_per_token.default))
        if got != self._expected:
            raise PassError(f"{self.name}: expected (qdq_weight, qdq_per_token) = {self._expected}, found {got}")
