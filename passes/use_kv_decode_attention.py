"""use_kv_decode_attention: run each decode layer's attention over the quantized KV cache as one
``quota.kv_decode_attention`` (the Triton flash-decoding kernel on a GPU; its contract: the
class docstring of :class:`UseKVDecodeAttention`).

The decode program traces each layer's attention as one ``quota.decode_attention`` operator
(:mod:`quota_compile.quant.attention`), which ``quantize_kv_io`` leaves reading the stored past
through its dequantizers; this pass swaps each for the operator that reads the stored codes
themselves, node for node, with no pattern to recognise.

Not used for the ONNX export (where ``quota.decode_attention`` is one semantic node that each
flavour translates by its own rule: :mod:`quota_compile.export.semantic`): it builds the PyTorch execution path
(:mod:`quota_compile.flavours.torch_path`). The W4A4 Linears need no pass of their own there:
every traced graph already holds them as ``quota.w4a4_linear`` (``fuse_w4a4_linear``).
"""

from __future__ import annotations

import torch
from torch import fx

from quota_compile.kernels import ops as kernel_ops  # noqa: F401  (registers quota::kv_decode_attention)
from quota_compile.quant import attention, ops  # noqa: F401  (register quota::decode_attention and the quantizers)

from . import GraphPass, PassError, PassResult, count_calls

_SOFTMAX = (torch.ops.aten.softmax.int, torch.ops.aten._softmax.default)
_DECODE_ATTENTION = torch.ops.quota.decode_attention.default
_PAST_DEQUANTIZE = {
    torch.ops.quota.dequantize_kv.default: "per_token",
    torch.ops.quota.dequantize_kv_static.default: "per_channel",
}
_KV_QUANTIZE = (torch.ops.quota.quantize_kv.default, torch.ops.quota.quantize_kv_static.default)


def _is(node, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def quantized_past(gm: fx.GraphModule) -> list[fx.Node]:
    """The dequantizers of the stored past cache (``dequantize_kv`` / ``_static`` of a graph input)."""
    return [n for n in gm.graph.nodes if _is(n, *_PAST_DEQUANTIZE) and n.args[0].op == "placeholder"]


def _stored_arguments(node: fx.Node) -> tuple | None:
    """``kv_decode_attention``'s arguments for one ``decode_attention`` node whose past key and
    value are dequantizers of stored graph inputs (same granularity and bits), else None."""
    q, k_past, k_new, v_past, v_new, bias, sm_scale = node.args
    if not (_is(k_past, *_PAST_DEQUANTIZE) and _is(v_past, *_PAST_DEQUANTIZE)):
        return None
    if k_past.target != v_past.target or k_past.args[-1] != v_past.args[-1]:
        return None
    if k_past.args[0].op != "placeholder" or v_past.args[0].op != "placeholder":
        return None
    granularity, bits = _PAST_DEQUANTIZE[k_past.target], k_past.args[-1]
    if granularity == "per_token":
        (kc, ks, kz), (vc, vs, vz) = k_past.args[:3], v_past.args[:3]
    else:
        (kc, ks), (vc, vs), kz, vz = k_past.args[:2], v_past.args[:2], None, None
    return (q, kc, vc, ks, vs, kz, vz, k_new, v_new, bias, sm_scale, bits, granularity)


class UseKVDecodeAttention(GraphPass):
    """use_kv_decode_attention: run each decode layer's attention over the quantized KV cache as
    one ``quota.kv_decode_attention`` (the Triton flash-decoding kernel on a GPU, reading the
    stored past in place) instead of ``quota.decode_attention`` over the dequantized past (whose
    definition dequantizes and concatenates the cache, repeats the KV heads, and runs the matmul
    / scale / mask / softmax / matmul chain).

    Requires: the decode graph after ``quantize_kv_io`` (the past cache enters as stored codes,
    scales and zero points, or codes with static scales, read through ``dequantize_kv`` /
    ``dequantize_kv_static``), with ``num_layers`` decoder layers; every ``decode_attention``
    reads its past key and value from those dequantizers (else :class:`PassError`).
    Ensures: one ``kv_decode_attention`` per layer in place of its ``decode_attention``, with
    the same query, new entries (the new token's dequantized key and value), mask bias and
    scale; no ``decode_attention`` and no softmax left; the past cache is dequantized nowhere (a
    shape read from a past dequantizer reads the codes instead: same batch, heads and length);
    the new entries' quantizers stay (their codes are the graph's ``present.*`` outputs). Not
    for the prefill graph (QUOTA reads its softmax probabilities) nor for a float cache, and
    not used for the ONNX export (:mod:`quota_compile.flavours.torch_path` only).
    """

    name = "use_kv_decode_attention"

    def __init__(self, num_layers: int):
        self.num_layers = num_layers

    def requires(self, gm: fx.GraphModule) -> None:
        if self.num_layers < 1:
            raise PassError(f"{self.name}: num_layers must be positive, got {self.num_layers}")
        if not quantized_past(gm):
            raise PassError(f"{self.name}: no quantized past KV cache (dequantize_kv of a graph input) in the graph")
        self._quantizers = sum(count_calls(gm, op) for op in _KV_QUANTIZE)

    def call(self, gm: fx.GraphModule) -> PassResult:
        graph = gm.graph
        rewritten = 0
        for node in [n for n in graph.nodes if _is(n, _DECODE_ATTENTION)]:
            args = _stored_arguments(node)
            if args is None:
                raise PassError(f"{self.name}: {node.name} does not read its past from the stored cache")
            pasts = (node.args[1], node.args[3])
            with graph.inserting_before(node):
                y = graph.call_function(torch.ops.quota.kv_decode_attention.default, args)
            y.meta.update(node.meta)
            node.replace_all_uses_with(y)
            graph.erase_node(node)
            rewritten += 1
            for deq in pasts:
                for user in list(deq.users):
                    if _is(user, torch.ops.aten.sym_size.int) and user.args[1] in (0, 1, 2, -2, -3, -4):
                        user.args = (deq.args[0], *user.args[1:])  # codes: same [B, Hkv, T]
        graph.eliminate_dead_code()
        return PassResult(gm, bool(rewritten))

    def ensures(self, gm: fx.GraphModule) -> None:
        got = count_calls(gm, torch.ops.quota.kv_decode_attention.default)
        if got != self.num_layers:
            raise PassError(f"{self.name}: expected one kv_decode_attention per decoder layer ({self.num_layers}), found {got}")
        left = sum(count_calls(gm, op) for op in _SOFTMAX)
        if left:
            raise PassError(f"{self.name}: {left} softmax node(s) left in the decode graph (an attention not matched)")
        if quantized_past(gm):
            raise PassError(f"{self.name}: the past KV cache is still dequantized")
        if sum(count_calls(gm, op) for op in _KV_QUANTIZE) != self._quantizers:
            raise PassError(f"{self.name}: the new KV entries' quantizers changed")
        if count_calls(gm, _DECODE_ATTENTION):
            raise PassError(f"{self.name}: a decode_attention node is left")
