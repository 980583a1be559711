"""fold_topk_gather: turn each QUOTA pruning point into its top-k selection and gathers.

Requires: ``quota::prune_point`` nodes whose ``k`` and ``visual_start`` are static ints
smaller than the visual count they receive (the recipe's per-layer keep counts).
Ensures: no ``prune_point`` remains; each became a call of
:func:`quota_compile.pruning.score.gather_visual` with the same static ``k``: a ``select_topk``
(TopK by score, ties to the lower index, kept indices sorted ascending) followed by gathers of
the visual span of the hidden states, positions (original RoPE positions are kept) and mask,
and of the original visual indices. The text before and after the visual span is untouched,
so every later layer runs on ``text + k`` tokens. The number of folded points equals the
number of markers, and their ``k`` values are reported by :attr:`FoldTopKGather.folded`.
"""

from __future__ import annotations

import torch
from torch import fx

from quota_compile.pruning.score import gather_visual

from . import GraphPass, PassError, PassResult


class FoldTopKGather(GraphPass):
    name = "fold_topk_gather"

    def __init__(self) -> None:
        self.folded: list[int] = []

    @staticmethod
    def _markers(gm: fx.GraphModule) -> list[fx.Node]:
        return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == torch.ops.quota.prune_point.default]

    def requires(self, gm: fx.GraphModule) -> None:
        for n in self._markers(gm):
            k, start = n.args[5], n.args[6]
            if not (isinstance(k, int) and isinstance(start, int)) or k < 1:
                raise PassError(f"{self.name}: {n.name} needs static k and visual_start, got {k!r}, {start!r}")

    def call(self, gm: fx.GraphModule) -> PassResult:
        self.folded = []
        for node in self._markers(gm):
            node.target = gather_visual
            self.folded.append(node.args[5])
        return PassResult(gm, bool(self.folded))

    def ensures(self, gm: fx.GraphModule) -> None:
        if self._markers(gm):
            raise PassError(f"{self.name}: pruning markers remain")
        found = [n.args[5] for n in gm.graph.nodes if n.op == "call_function" and n.target is gather_visual]
        if found != self.folded:
            raise PassError(f"{self.name}: expected folded k values {self.folded}, found {found}")
