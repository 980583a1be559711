"""use_kv_decode_attention: run each decode layer's attention over the quantized KV cache as one
``quota.kv_decode_attention`` (the Triton flash-decoding kernel on a GPU; its contract: the
class docstring of :class:`UseKVDecodeAttention`).

Not used for the ONNX export: it builds the PyTorch execution path
(:mod:`quota_compile.flavours.torch_path`). The W4A4 Linears need no pass of their own there:
every traced graph already holds them as ``quota.w4a4_linear`` (``fuse_w4a4_linear``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from quota_compile.kernels import ops as kernel_ops  # noqa: F401  (registers quota::kv_decode_attention)
from quota_compile.quant import ops  # noqa: F401

from . import GraphPass, PassError, PassResult, count_calls

_SOFTMAX = (torch.ops.aten.softmax.int, torch.ops.aten._softmax.default)
_CASTS = (torch.ops.aten.to.dtype, torch.ops.aten._to_copy.default)
_RESHAPES = (torch.ops.aten.reshape.default, torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default)
_PAST_DEQUANTIZE = {
    torch.ops.quota.dequantize_kv.default: "per_token",
    torch.ops.quota.dequantize_kv_static.default: "per_channel",
}
_KV_QUANTIZE = (torch.ops.quota.quantize_kv.default, torch.ops.quota.quantize_kv_static.default)


def _is(node, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _shape(node: fx.Node) -> tuple | None:
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def quantized_past(gm: fx.GraphModule) -> list[fx.Node]:
    """The dequantizers of the stored past cache (``dequantize_kv`` / ``_static`` of a graph input)."""
    return [n for n in gm.graph.nodes if _is(n, *_PAST_DEQUANTIZE) and n.args[0].op == "placeholder"]


@dataclass
class _DecodeAttention:
    """One matched layer: the nodes the op reads and the nodes it replaces."""

    out: fx.Node  # matmul(probs, values): [B, H, 1, D]
    args: tuple  # the arguments of quota.kv_decode_attention
    pasts: tuple[fx.Node, fx.Node]  # the key and value past dequantizers
    inner: list[fx.Node]  # every other node of the subgraph (dead once ``out`` is replaced)


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _unrepeat(node: fx.Node, inner: list[fx.Node]) -> fx.Node | None:
    """The ``[B, Hkv, S, D]`` tensor whose heads ``node`` repeats (``quota_compile.quant.attention.repeat_kv``:
    ``x.transpose(1, 2).unsqueeze(3).expand(B, S, Hkv, rep, D).reshape(B, S, H, D)
    .transpose(1, 2)``, query head ``h`` on KV head ``h // rep``), or ``node`` itself when it
    repeats nothing."""
    if not _is(node, torch.ops.aten.transpose.int) or not _is(node.args[0], *_RESHAPES):
        return node
    reshape = node.args[0]
    expand = reshape.args[0]
    if not _is(expand, torch.ops.aten.expand.default):
        return None
    unsq = expand.args[0]
    if not _is(unsq, torch.ops.aten.unsqueeze.default) or unsq.args[1] not in (3, -2):
        return None
    outer = unsq.args[0]
    if not _is(outer, torch.ops.aten.transpose.int) or {outer.args[1], outer.args[2]} != {1, 2}:
        return None
    inner.extend([node, reshape, expand, unsq, outer])
    return outer.args[0]


def _cache_read(node: fx.Node, inner: list[fx.Node]) -> tuple[fx.Node, fx.Node] | None:
    """``(past dequantizer, new entry)`` of ``cat([dequantize(past), new], dim=2)``."""
    if not _is(node, torch.ops.aten.cat.default) or len(node.args[0]) != 2:
        return None
    if (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)) not in (2, -2):
        return None
    past, new = node.args[0]
    if not _is(past, *_PAST_DEQUANTIZE) or not isinstance(new, fx.Node):
        return None
    shape = _shape(new)  # (quantize_kv_io's dequantizer of the new entry has no shape: the op checks it)
    if shape is not None and (len(shape) != 4 or shape[2] != 1):
        return None
    inner.append(node)
    return past, new


def _match_decode_attention(softmax: fx.Node) -> _DecodeAttention | None:
    """``matmul(softmax(matmul(q, repeat(cat([deq(past_k), k_new])).transpose(2, 3)) * scale +
    bias, -1).to(dtype), repeat(cat([deq(past_v), v_new])))`` with a one-token query and a
    ``[B, 1, 1, S + 1]`` bias; every intermediate read by nothing else."""
    if softmax.args[1] not in (-1, 3):
        return None
    inner = [softmax]
    probs = softmax
    while len(probs.users) == 1 and _is(_only_user(probs), *_CASTS):
        probs = _only_user(probs)
        inner.append(probs)
    out = _only_user(probs)
    if not _is(out, torch.ops.aten.matmul.default) or out.args[0] is not probs:
        return None
    scores = softmax.args[0]
    if not _is(scores, torch.ops.aten.add.Tensor) or len(scores.users) != 1:
        return None
    scaled, bias = scores.args
    if not _is(scaled, torch.ops.aten.mul.Tensor, torch.ops.aten.div.Tensor):
        scaled, bias = bias, scaled
    if not _is(scaled, torch.ops.aten.mul.Tensor, torch.ops.aten.div.Tensor) or not isinstance(bias, fx.Node):
        return None
    qk, factor = scaled.args
    if not isinstance(factor, (int, float)) or not _is(qk, torch.ops.aten.matmul.default) or len(scaled.users) != 1:
        return None
    sm_scale = float(factor) if scaled.target == torch.ops.aten.mul.Tensor else 1.0 / float(factor)
    q, kt = qk.args
    if not _is(kt, torch.ops.aten.transpose.int) or {kt.args[1], kt.args[2]} not in ({2, 3}, {-2, -1}):
        return None
    q_shape, bias_shape = _shape(q), _shape(bias)
    if q_shape is None or len(q_shape) != 4 or q_shape[2] != 1:
        return None  # not one new token: not the decode attention
    if bias_shape is None or len(bias_shape) != 4 or bias_shape[1:3] != (1, 1):
        return None
    inner.extend([scores, scaled, qk, kt])
    k_cat, v_cat = _unrepeat(kt.args[0], inner), _unrepeat(out.args[1], inner)
    k = _cache_read(k_cat, inner) if k_cat is not None else None
    v = _cache_read(v_cat, inner) if v_cat is not None else None
    if k is None or v is None or k[0].target != v[0].target or k[0].args[-1] != v[0].args[-1]:
        return None
    if any(len(n.users) != 1 for n in inner if n is not probs):
        return None
    granularity, bits = _PAST_DEQUANTIZE[k[0].target], k[0].args[-1]
    if granularity == "per_token":
        (kc, ks, kz), (vc, vs, vz) = k[0].args[:3], v[0].args[:3]
    else:
        (kc, ks), (vc, vs), kz, vz = k[0].args[:2], v[0].args[:2], None, None
    args = (q, kc, vc, ks, vs, kz, vz, k[1], v[1], bias, sm_scale, bits, granularity)
    return _DecodeAttention(out, args, (k[0], v[0]), inner)


def _decode_attentions(gm: fx.GraphModule) -> list[_DecodeAttention]:
    found = []
    for n in gm.graph.nodes:
        if _is(n, *_SOFTMAX):
            m = _match_decode_attention(n)
            if m is not None:
                found.append(m)
    return found


class UseKVDecodeAttention(GraphPass):
    """use_kv_decode_attention: run each decode layer's attention over the quantized KV cache as
    one ``quota.kv_decode_attention`` (the Triton flash-decoding kernel on a GPU, reading the
    stored past in place) instead of dequantizing and concatenating the cache, repeating the KV
    heads, and the matmul / scale / mask / softmax / matmul chain.

    Requires: the decode graph after ``quantize_kv_io`` (the past cache enters as stored codes,
    scales and zero points, or codes with static scales, read through ``dequantize_kv`` /
    ``dequantize_kv_static``), with ``num_layers`` decoder layers.
    Ensures: one ``kv_decode_attention`` per layer, whose output takes the place of the layer's
    ``probs @ values``; no softmax left; the past cache is dequantized nowhere (a shape read
    from a past dequantizer reads the codes instead: same batch, heads and length); the new
    entries' quantizers stay (their codes are the graph's ``present.*`` outputs, their
    dequantized values the op's ``k_new`` / ``v_new``); the replaced nodes are removed. Not for
    the prefill graph (QUOTA reads its softmax probabilities) nor for a float cache, and not
    used for the ONNX export (:mod:`quota_compile.flavours.torch_path` only).
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
        matches = _decode_attentions(gm)
        for m in matches:
            with graph.inserting_before(m.out):
                y = graph.call_function(torch.ops.quota.kv_decode_attention.default, m.args)
            y.meta.update(m.out.meta)
            m.out.replace_all_uses_with(y)
            for deq in m.pasts:
                for user in list(deq.users):
                    if _is(user, torch.ops.aten.sym_size.int) and user.args[1] in (0, 1, 2, -2, -3, -4):
                        user.args = (deq.args[0], *user.args[1:])  # codes: same [B, Hkv, T]
        graph.eliminate_dead_code()
        return PassResult(gm, bool(matches))

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
