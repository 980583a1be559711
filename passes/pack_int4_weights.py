"""pack_int4_weights: store quantized weights as packed INT4 codes plus group scales.

Requires: every ``qdq_weight`` reads its float weight through a ``get_attr`` node, and codes
are given (or derivable by RTN) for each.
Ensures: no ``qdq_weight`` remains; each is replaced by ``dequantize_int4(packed, scale)``
reading a ``uint8[K*N/2]`` buffer (two codes per byte, even index in the low nibble: the ONNX
INT4 layout) and a float32 ``[K/g, N]`` scale buffer; the float weights those nodes read are
deleted from the module unless something else still reads them.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import fx

from quota_compile.quant import ops
from quota_compile.quant.simulate import QuantizedWeight

from . import GraphPass, PassError, PassResult, remove_unused_attributes


def _free_name(gm: fx.GraphModule, target: str, suffix: str) -> str:
    """A top-level attribute name for a new buffer; distinct targets such as ``a.b_c`` and
    ``a_b.c`` flatten to the same string, so a counter keeps them apart."""
    base = target.replace(".", "_") + suffix
    name, i = base, 1
    while hasattr(gm, name):
        name, i = f"{base}_{i}", i + 1
    return name


class PackInt4Weights(GraphPass):
    name = "pack_int4_weights"

    def __init__(self, weights: Mapping[str, QuantizedWeight] | None = None):
        """``weights``: ``get_attr`` target of a float weight -> its codes (e.g. from the
        quantized simulation, so graph and simulation share codes). Missing ones use RTN."""
        self.weights = dict(weights or {})

    def _nodes(self, gm: fx.GraphModule) -> list[fx.Node]:
        return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == torch.ops.quota.qdq_weight.default]

    def requires(self, gm: fx.GraphModule) -> None:
        for n in self._nodes(gm):
            if n.args[0].op != "get_attr":
                raise PassError(f"{self.name}: {n.name} does not read a stored weight")
            if n.args[1] != 4:
                raise PassError(f"{self.name}: {n.name} quantizes to {n.args[1]} bits; only INT4 weights can be packed")

    def call(self, gm: fx.GraphModule) -> PassResult:
        graph = gm.graph
        nodes = self._nodes(gm)
        for node in nodes:
            w_node, bits, group = node.args
            weight = gm.get_parameter(w_node.target) if _is_param(gm, w_node.target) else gm.get_buffer(w_node.target)
            qw = self.weights.get(w_node.target)
            if qw is None:
                codes, scale = ops.quantize_weight_rtn(weight, bits, group)
                qw = QuantizedWeight(codes=codes, scale=scale, group_size=group)
            if qw.group_size != group:
                raise PassError(f"{self.name}: codes for {w_node.target} use group {qw.group_size}, graph says {group}")
            k, n = qw.codes.shape
            packed_name, scale_name = _free_name(gm, w_node.target, "_int4"), _free_name(gm, w_node.target, "_scale")
            gm.register_buffer(packed_name, ops.pack_int4(qw.codes))
            gm.register_buffer(scale_name, qw.scale.to(torch.float32).contiguous())
            with graph.inserting_before(node):
                p = graph.get_attr(packed_name)
                s = graph.get_attr(scale_name)
                dq = graph.call_function(torch.ops.quota.dequantize_int4.default, (p, s, k, n, group))
            dq.meta.update(node.meta)
            node.replace_all_uses_with(dq)
            graph.erase_node(node)
        remove_unused_attributes(gm)
        return PassResult(gm, bool(nodes))

    def ensures(self, gm: fx.GraphModule) -> None:
        if self._nodes(gm):
            raise PassError(f"{self.name}: qdq_weight nodes remain")
        for n in gm.graph.nodes:
            if n.op == "call_function" and n.target == torch.ops.quota.dequantize_int4.default:
                packed = gm.get_buffer(n.args[0].target)
                k, nn = n.args[2], n.args[3]
                if packed.dtype != torch.uint8 or packed.numel() * 2 != k * nn:
                    raise PassError(f"{self.name}: {n.args[0].target} is not uint8[{k * nn // 2}]")


def _is_param(gm: fx.GraphModule, target: str) -> bool:
    owner, _, attr = target.rpartition(".")
    mod = gm.get_submodule(owner) if owner else gm
    return attr in mod._parameters
