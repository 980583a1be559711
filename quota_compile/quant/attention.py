"""The attention arithmetic, written once.

Every place that computes a decoder layer's attention from its query, key and value calls
:func:`attend`: the simulation and the traced programs (:mod:`quota_compile.capture.programs`;
a decode step's attention there is the operator ``quota::decode_attention`` defined below),
the CPU fallback of ``quota::kv_decode_attention`` (:mod:`quota_compile.kernels.ops`), the
reference the Triton decode kernel is tested against (:mod:`quota_compile.kernels.kv_attention`)
and the definition of the TensorRT decode-attention plugin
(:mod:`quota_compile.flavours.tensorrt.verify`). What differs between them is only where the
key and value come from (a float tensor, or a quantized cache dequantized by
:mod:`quota_compile.quant.ops`) and how invalid positions are masked (an additive bias).

The arithmetic: grouped-query heads (query head ``h`` reads KV head ``h // (H / Hkv)``),
scores ``q @ kᵀ * sm_scale + bias``, a softmax in float32, cast back to the query's dtype,
times ``v``.
"""

from __future__ import annotations

import torch


def repeat_kv(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``[B, Hkv, S, D] -> [B, H, S, D]``, query head ``h`` reading KV head ``h // (H / Hkv)``.

    The heads are repeated with the sequence axis outside them (``[B, S, Hkv, rep, D]``): the
    copy that the repetition needs then has one symbolic stride, the batch's. Repeated as
    ``[B, Hkv, rep, S, D]``, its strides are different multiples of S, and ordering them asks
    torch.export to prove guards such as ``min(32*S, 64*S) == 32*S``, which torch before 2.13
    cannot do for a ranged S (the export then fails)."""
    b, hkv, s, d = x.shape
    if num_heads % hkv:
        raise ValueError(f"attention: {num_heads} query heads cannot share {hkv} KV heads evenly")
    rep = num_heads // hkv
    return x.transpose(1, 2).unsqueeze(3).expand(b, s, hkv, rep, d).reshape(b, s, num_heads, d).transpose(1, 2)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
           sm_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, H, T, D], probs [B, H, T, S])`` from ``q [B, H, T, D]``, ``k, v [B, Hkv, S, D]``
    and an additive ``bias`` broadcastable to ``[B, H, T, S]`` (None: no mask).

    ``k`` and ``v`` must already be in the query's dtype; the softmax runs in float32."""
    h = q.shape[1]
    k, v = repeat_kv(k, h), repeat_kv(v, h)
    scores = torch.matmul(q, k.transpose(2, 3)) * sm_scale
    if bias is not None:
        scores = scores + bias
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v), probs


def decode_attention_reference(q: torch.Tensor, k_past: torch.Tensor, k_new: torch.Tensor, v_past: torch.Tensor,
                               v_new: torch.Tensor, bias: torch.Tensor, sm_scale: float) -> torch.Tensor:
    """One decode step's attention: the past keys and values ``[B, Hkv, S, D]`` with the new
    token's ``[B, Hkv, 1, D]`` appended, then :func:`attend`; ``[B, H, 1, D]``. The definition
    of ``quota::decode_attention``; the portable ONNX form of that operator is the exporter's
    translation of this function (:func:`quota_compile.export.onnx_translation.decode_attention`)."""
    k = torch.cat([k_past, k_new], dim=2)
    v = torch.cat([v_past, v_new], dim=2)
    return attend(q, k, v, bias, sm_scale)[0]


@torch.library.custom_op("quota::decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, k_past: torch.Tensor, k_new: torch.Tensor, v_past: torch.Tensor,
                     v_new: torch.Tensor, bias: torch.Tensor, sm_scale: float) -> torch.Tensor:
    """The decode attention as one operator in the traced decode program (the semantic form):
    the PyTorch path turns it into ``quota::kv_decode_attention`` over the stored cache
    (``passes/use_kv_decode_attention.py``); the ONNX export writes it as one semantic node,
    which each flavour translates (the portable graph: :func:`decode_attention_reference`'s
    operations)."""
    return decode_attention_reference(q, k_past, k_new, v_past, v_new, bias, sm_scale)


@decode_attention.register_fake
def _(q, k_past, k_new, v_past, v_new, bias, sm_scale):
    # The lengths the definition's arithmetic ties together, stated for torch.export (which
    # does not see inside the operator): the past and new entries add up to the mask bias's
    # last axis, and keys and values agree. The exported graphs' input shapes then say so.
    torch._check(bias.shape[-1] == k_past.shape[2] + k_new.shape[2])
    torch._check(v_past.shape[2] == k_past.shape[2])
    torch._check(v_new.shape[2] == k_new.shape[2])
    return q.new_empty(q.shape)
