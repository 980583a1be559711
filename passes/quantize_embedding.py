"""quantize_embedding: read the token-embedding table through its INT4 codes.

Requires: each listed table is read by ``get_attr`` nodes feeding ``aten.embedding`` (as the
table, argument 0), and codes are given for it.
Ensures: no listed float table is read any more; each ``embedding(table, ids)`` reads
``dequantize_int4_rows(packed, scale)`` instead: ``packed`` a ``uint8[V*D/2]`` buffer (two
codes per byte, row-major, even index in the low nibble: the ONNX INT4 layout) and ``scale`` a
float32 ``[V, D/g]`` buffer. The float tables are deleted from the module.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import fx

from quota_compile.quant import ops

from . import GraphPass, PassError, PassResult, remove_unused_attributes


class QuantizeEmbedding(GraphPass):
    name = "quantize_embedding"

    def __init__(self, tables: Mapping[str, tuple[torch.Tensor, torch.Tensor, int]]):
        """``tables``: ``get_attr`` target of a float table -> (codes ``[V, D]`` int8, scales
        ``[V, D/g]``, g)."""
        self.tables = dict(tables)

    def _nodes(self, gm: fx.GraphModule) -> list[fx.Node]:
        return [
            n for n in gm.graph.nodes
            if n.op == "call_function" and n.target == torch.ops.aten.embedding.default
            and n.args[0].op == "get_attr" and n.args[0].target in self.tables
        ]

    def requires(self, gm: fx.GraphModule) -> None:
        for target, (codes, scale, g) in self.tables.items():
            if codes.shape[1] % g or scale.shape != (codes.shape[0], codes.shape[1] // g):
                raise PassError(f"{self.name}: codes {tuple(codes.shape)} and scales {tuple(scale.shape)} of {target} disagree with group {g}")

    def call(self, gm: fx.GraphModule) -> PassResult:
        graph = gm.graph
        nodes = self._nodes(gm)
        made: dict[str, fx.Node] = {}
        for node in nodes:
            target = node.args[0].target
            codes, scale, g = self.tables[target]
            v, d = codes.shape
            base = target.replace(".", "_")
            if target not in made:
                gm.register_buffer(f"{base}_int4", ops.pack_int4(codes))
                gm.register_buffer(f"{base}_scale", scale.to(torch.float32).contiguous())
            with graph.inserting_before(node):
                p = graph.get_attr(f"{base}_int4")
                s = graph.get_attr(f"{base}_scale")
                table = graph.call_function(torch.ops.quota.dequantize_int4_rows.default, (p, s, v, d, g))
            made[target] = table
            node.args = (table, *node.args[1:])
        remove_unused_attributes(gm)
        return PassResult(gm, bool(nodes))

    def ensures(self, gm: fx.GraphModule) -> None:
        if self._nodes(gm):
            raise PassError(f"{self.name}: a float embedding table is still read")
