"""Decode attention over a quantized KV cache: one query token per sequence, flash-decoding.

Layouts (``quota_compile.quant.ops``; ``Hkv`` KV heads, ``T`` padded cache length, ``D``
head_dim; INT4 codes are packed two per byte along ``D``, the even channel in the low nibble,
so the stored last dimension is ``D/2`` for INT4 and ``D`` for INT8)
- ``per_token`` (``ops.quantize_kv``): asymmetric; codes uint8 ``[B, Hkv, T, D or D/2]``,
  scales float32 ``[B, Hkv, T, 1]``, zero points uint8 ``[B, Hkv, T, 1]``;
  ``value = (code - zero_point) * scale``.
- ``per_channel`` (``ops.quantize_kv_static``): symmetric static scales float32
  ``[Hkv, 1, D]``; stored code ``q + 2**(bits-1)`` (uint8); ``value = (code - 2**(bits-1)) *
  scale``.
The kernel dequantizes in float32 with exactly those operations, so its K and V values are
bit-identical to ``ops.dequantize_kv`` / ``ops.dequantize_kv_static``; only the attention
arithmetic (dot products, exponentials, summation order) differs from the reference.

Query ``q [B, H, D]`` (any float dtype, computed in float32) with ``H`` a multiple of ``Hkv``:
query head ``h`` reads KV head ``h // (H // Hkv)`` (grouped-query attention, the order of
Hugging Face's ``repeat_kv``). ``seqlens [B]`` (int32): sequence ``b`` attends to cache
positions ``t < min(seqlens[b], T)``; a sequence with no position gives NaN, as the
reference's softmax over nothing does. Output ``[B, H, D]`` in ``out_dtype`` (default ``q``'s).

Optional, for the decode graph of the PyTorch execution path (``quota.kv_decode_attention``,
:mod:`quota_compile.kernels.ops`):
- ``k_new``, ``v_new`` (float ``[B, Hkv, D]``): the new token's key and value, already
  dequantized (what the cache will hold), attended as one more position after the ``T``
  cache positions (whatever ``seqlens`` says); the cache is read in place, never concatenated.
- ``bias`` (float32 ``[B, T + 1]`` with the new entry, ``[B, T]`` without): added to the
  scaled scores (the decode graph's additive mask; right-padded batches leave masked holes
  inside the cache). A position whose biased score is ``-inf`` or whose bias is
  ``finfo(float32).min`` (the graph's "masked") contributes nothing, exactly as in the
  graph's float32 softmax, where ``exp(finfo.min - max)`` is 0 once any position is unmasked.

Kernel: grid ``(B * H, splits)``. Each program runs an online softmax (running maximum, sum
and weighted value sum, float32) over its chunk of the context in tiles of ``BLOCK_T``
positions (``_decode_split_kernel``; ``_decode_split_bias_kernel`` adds the bias); while every
position so far is masked the running maximum is ``-inf`` and the tile changes nothing (the
exponentials are taken against 0 instead: no ``-inf - -inf``, as the ``live`` guard of
``trt_aot.decode_attention_kernel``), so a split with no unmasked position returns
``m = -inf, l = 0, acc = 0`` and weighs 0 in the merge. A second kernel merges the splits'
partial results (``_decode_combine_kernel``) and, with ``k_new`` (``_decode_combine_new_kernel``),
the new entry as one more partial state ``m = s_new, l = 1, acc = v_new``: it is one dot product
per query head, and keeping it out of the splits leaves every split a plain tile loop over the
stored cache. With grouped-query heads (``H > Hkv``) the split kernels run one program per KV
head instead (``_decode_split_group_kernel``, grid ``(B * Hkv, splits)``): each K and V tile
is read and dequantized once for the ``H / Hkv`` query heads that attend to it, and the
partial states land where the per-head kernel puts them, so the merge is the same. With
``H == Hkv`` (LLaVA-1.5-7B) the per-head kernel runs, at full tile width.

Verified (``tests/test_kernels.py``): every variant against the reference in Triton's CPU
interpreter; the bias and new-entry variants compiled for sm_90 there, the others by
``benchmarks/gpu_kernels.py --compile-only``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from quota_compile.kernels import is_interpreted
from quota_compile.kernels.reference import dequantize_cache
from quota_compile.quant import ops
from quota_compile.quant.attention import attend

GRANULARITIES = ("per_token", "per_channel")
_INTERPRET_BLOCK_T = 16
_CHUNK_ALIGN = 128  # split boundaries are multiples of every BLOCK_T the autotuner tries
MASKED = float(torch.finfo(torch.float32).min)  # a bias at or below this masks its position
_MASKED = tl.constexpr(MASKED)


# ---------------------------------------------------------------------------- jit helpers


@triton.jit
def _load_codes(c_ptr, row0, offs_t, t_mask, D, BITS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Unsigned codes ``[BLOCK_T, BLOCK_D]`` as float32 of positions ``offs_t`` of the cache row
    starting at element ``row0`` (INT4: byte ``j`` holds channels ``2j`` low and ``2j+1`` high)."""
    if BITS == 4:
        offs_p = tl.arange(0, BLOCK_D // 2)
        mask = t_mask[:, None] & (offs_p < D // 2)[None, :]
        packed = tl.load(c_ptr + row0 + offs_t[:, None] * (D // 2) + offs_p[None, :], mask=mask, other=0)
        codes = tl.interleave(packed & 0xF, packed >> 4)
    else:
        offs_d = tl.arange(0, BLOCK_D)
        mask = t_mask[:, None] & (offs_d < D)[None, :]
        codes = tl.load(c_ptr + row0 + offs_t[:, None] * D + offs_d[None, :], mask=mask, other=0)
    return codes.to(tl.float32)


@triton.jit
def kv_tile(c_ptr, s_ptr, z_ptr, seq, channel_scale, offs_t, t_mask, T, D,
             PER_TOKEN: tl.constexpr, BITS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Dequantized float32 K or V tile ``[BLOCK_T, BLOCK_D]`` of cache row ``seq = b*Hkv + hk``."""
    stored = D // 2 if BITS == 4 else D
    codes = _load_codes(c_ptr, seq * T * stored, offs_t, t_mask, D, BITS, BLOCK_D)
    if PER_TOKEN:
        scale = tl.load(s_ptr + seq * T + offs_t, mask=t_mask, other=0.0)
        zero = tl.load(z_ptr + seq * T + offs_t, mask=t_mask, other=0).to(tl.float32)
        return (codes - zero[:, None]) * scale[:, None]
    else:
        return (codes - 2.0 ** (BITS - 1)) * channel_scale[None, :]


@triton.jit
def kv_channel_scale(s_ptr, hk, offs_d, D, PER_TOKEN: tl.constexpr):
    """The ``per_channel`` static scale ``[BLOCK_D]`` of KV head ``hk`` (unused per token)."""
    if PER_TOKEN:
        return tl.zeros_like(offs_d).to(tl.float32)
    else:
        return tl.load(s_ptr + hk * D + offs_d, mask=offs_d < D, other=0.0)


# ---------------------------------------------------------------------------- kernels


@triton.jit
def _split_body(q_ptr, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, seqlens_ptr, bias_ptr,
                part_m_ptr, part_l_ptr, part_acc_ptr, H, H_KV, T, D, chunk, sm_scale,
                stride_qb, stride_qh, stride_bias, PER_TOKEN: tl.constexpr, BITS: tl.constexpr,
                HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Partial softmax state (max ``m``, sum ``l``, weighted values ``acc [D]``) of query head
    ``program_id(0) = b*H + h`` over positions ``[split*chunk, (split+1)*chunk)`` of its row;
    with ``HAS_BIAS`` the row ``b`` of ``bias`` is added to the scaled scores."""
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // (H // H_KV)
    seq = (b * H_KV + hk).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_d, mask=offs_d < D, other=0.0)
    q = q.to(tl.float32)
    k_cs = kv_channel_scale(ks_ptr, hk, offs_d, D, PER_TOKEN)
    v_cs = kv_channel_scale(vs_ptr, hk, offs_d, D, PER_TOKEN)
    start = split * chunk
    stop = tl.minimum(tl.minimum(start + chunk, tl.load(seqlens_ptr + b)), T)
    m_i = -float("inf")
    l_i = 0.0
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for t0 in range(start, stop, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_mask = offs_t < stop
        k = kv_tile(kc_ptr, ks_ptr, kz_ptr, seq, k_cs, offs_t, t_mask, T, D, PER_TOKEN, BITS, BLOCK_D)
        s = tl.sum(k * q[None, :], axis=1) * sm_scale
        if HAS_BIAS:
            bias = tl.load(bias_ptr + b.to(tl.int64) * stride_bias + offs_t, mask=t_mask, other=0.0)
            s = tl.where(bias > _MASKED, s + bias, -float("inf"))
        s = tl.where(t_mask, s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        # while every position so far is masked (m_new = -inf), subtract 0 instead: p = 0 and
        # l_i = acc = 0 stay, no -inf - -inf
        m_ref = tl.where(m_new > -float("inf"), m_new, 0.0)
        alpha = tl.exp(m_i - m_ref)
        p = tl.exp(s - m_ref)
        v = kv_tile(vc_ptr, vs_ptr, vz_ptr, seq, v_cs, offs_t, t_mask, T, D, PER_TOKEN, BITS, BLOCK_D)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        m_i = m_new
    part = pid_bh * tl.num_programs(1) + split
    tl.store(part_m_ptr + part, m_i)
    tl.store(part_l_ptr + part, l_i)
    tl.store(part_acc_ptr + part * BLOCK_D + offs_d, acc)


@triton.jit
def _decode_split_kernel(q_ptr, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, seqlens_ptr,
                         part_m_ptr, part_l_ptr, part_acc_ptr, H, H_KV, T, D, chunk, sm_scale,
                         stride_qb, stride_qh, PER_TOKEN: tl.constexpr, BITS: tl.constexpr,
                         BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """:func:`_split_body` without a bias (positions ``t < seqlens[b]``)."""
    _split_body(q_ptr, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, seqlens_ptr, part_m_ptr,
                part_m_ptr, part_l_ptr, part_acc_ptr, H, H_KV, T, D, chunk, sm_scale, stride_qb, stride_qh,
                0, PER_TOKEN, BITS, False, BLOCK_T, BLOCK_D)


@triton.jit
def _decode_split_bias_kernel(q_ptr, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, seqlens_ptr, bias_ptr,
                              part_m_ptr, part_l_ptr, part_acc_ptr, H, H_KV, T, D, chunk, sm_scale,
                              stride_qb, stride_qh, stride_bias, PER_TOKEN: tl.constexpr, BITS: tl.constexpr,
                              BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """:func:`_split_body` with the additive bias ``[B, stride_bias]`` (row ``b``, positions ``t``)."""
    _split_body(q_ptr, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, seqlens_ptr, bias_ptr,
                part_m_ptr, part_l_ptr, part_acc_ptr, H, H_KV, T, D, chunk, sm_scale, stride_qb, stride_qh,
                stride_bias, PER_TOKEN, BITS, True, BLOCK_T, BLOCK_D)


@triton.jit
def _split_group_body(q_ptr, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, seqlens_ptr, bias_ptr,
                      part_m_ptr, part_l_ptr, part_acc_ptr, H, H_KV, T, D, chunk, sm_scale,
                      stride_qb, stride_qh, stride_bias, PER_TOKEN: tl.constexpr, BITS: tl.constexpr,
                      HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                      BLOCK_R: tl.constexpr):
    """:func:`_split_body` for the whole query group of KV head ``program_id(0) = b*H_KV + hk``
    (its ``H / H_KV`` query heads, padded to ``BLOCK_R`` rows, a power of two): each K and V
    tile is loaded and dequantized once for the group; the scores ``[BLOCK_R, BLOCK_T]`` and the
    weighted values are float32 products summed over ``[BLOCK_R, BLOCK_T, BLOCK_D]`` (CUDA
    cores, as :func:`_split_body`; a ``tl.dot`` would need 16 rows and round to TF32 or, in
    IEEE float32, spill), and each head's partial state goes where :func:`_split_body` puts
    it, so the same merge kernels follow."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // H_KV
    hk = pid % H_KV
    rep = H // H_KV
    seq = pid.to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < rep
    heads = hk * rep + offs_r
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=r_mask[:, None] & (offs_d < D)[None, :], other=0.0).to(tl.float32)
    k_cs = kv_channel_scale(ks_ptr, hk, offs_d, D, PER_TOKEN)
    v_cs = kv_channel_scale(vs_ptr, hk, offs_d, D, PER_TOKEN)
    start = split * chunk
    stop = tl.minimum(tl.minimum(start + chunk, tl.load(seqlens_ptr + b)), T)
    m_i = tl.full([BLOCK_R], -float("inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for t0 in range(start, stop, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_mask = offs_t < stop
        k = kv_tile(kc_ptr, ks_ptr, kz_ptr, seq, k_cs, offs_t, t_mask, T, D, PER_TOKEN, BITS, BLOCK_D)
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * sm_scale
        if HAS_BIAS:
            bias = tl.load(bias_ptr + b.to(tl.int64) * stride_bias + offs_t, mask=t_mask, other=0.0)
            s = tl.where((bias > _MASKED)[None, :], s + bias[None, :], -float("inf"))
        s = tl.where(t_mask[None, :], s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_ref = tl.where(m_new > -float("inf"), m_new, 0.0)  # as in _split_body
        alpha = tl.exp(m_i - m_ref)
        p = tl.exp(s - m_ref[:, None])
        v = kv_tile(vc_ptr, vs_ptr, vz_ptr, seq, v_cs, offs_t, t_mask, T, D, PER_TOKEN, BITS, BLOCK_D)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m_i = m_new
    part = (b * H + heads) * tl.num_programs(1) + split
    tl.store(part_m_ptr + part, m_i, mask=r_mask)
    tl.store(part_l_ptr + part, l_i, mask=r_mask)
    tl.store(part_acc_ptr + part[:, None] * BLOCK_D + offs_d[None, :], acc, mask=r_mask[:, None])


@triton.jit
def _decode_split_group_kernel(q_ptr, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, seqlens_ptr,
                               part_m_ptr, part_l_ptr, part_acc_ptr, H, H_KV, T, D, chunk, sm_scale,
                               stride_qb, stride_qh, PER_TOKEN: tl.constexpr, BITS: tl.constexpr,
                               BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    """:func:`_split_group_body` without a bias."""
    _split_group_body(q_ptr, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, seqlens_ptr, part_m_ptr,
                      part_m_ptr, part_l_ptr, part_acc_ptr, H, H_KV, T, D, chunk, sm_scale, stride_qb, stride_qh,
                      0, PER_TOKEN, BITS, False, BLOCK_T, BLOCK_D, BLOCK_R)


@triton.jit
def _decode_split_group_bias_kernel(q_ptr, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, seqlens_ptr, bias_ptr,
                                    part_m_ptr, part_l_ptr, part_acc_ptr, H, H_KV, T, D, chunk, sm_scale,
                                    stride_qb, stride_qh, stride_bias, PER_TOKEN: tl.constexpr, BITS: tl.constexpr,
                                    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    """:func:`_split_group_body` with the additive bias."""
    _split_group_body(q_ptr, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, seqlens_ptr, bias_ptr,
                      part_m_ptr, part_l_ptr, part_acc_ptr, H, H_KV, T, D, chunk, sm_scale, stride_qb, stride_qh,
                      stride_bias, PER_TOKEN, BITS, True, BLOCK_T, BLOCK_D, BLOCK_R)


@triton.jit
def _combine_body(part_m_ptr, part_l_ptr, part_acc_ptr, out_ptr, q_ptr, kn_ptr, vn_ptr, bias_ptr,
                  H, H_KV, D, T, n_splits, sm_scale, stride_qb, stride_qh, stride_bias,
                  stride_ob, stride_oh, HAS_NEW: tl.constexpr, HAS_BIAS: tl.constexpr,
                  BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """``out[b, h] = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s`` over the splits and, with
    ``HAS_NEW``, the new entry (``m = s_new``, ``l = 1``, ``acc = v_new``; its bias at ``T``).
    A split with no unmasked position (``m = -inf``) weighs 0; all of them and a masked new
    entry give NaN (no position, as the reference's softmax over nothing)."""
    pid_bh = tl.program_id(0)
    b = pid_bh // H
    h = pid_bh % H
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < n_splits
    part = pid_bh * n_splits + offs_s
    m = tl.load(part_m_ptr + part, mask=s_mask, other=-float("inf"))
    l = tl.load(part_l_ptr + part, mask=s_mask, other=0.0)
    acc = tl.load(part_acc_ptr + part[:, None] * BLOCK_D + offs_d[None, :], mask=s_mask[:, None], other=0.0)
    m_max = tl.max(m, axis=0)
    if HAS_NEW:
        seq = (b * H_KV + h // (H // H_KV)).to(tl.int64)
        d_mask = offs_d < D
        q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_d, mask=d_mask, other=0.0).to(tl.float32)
        k_new = tl.load(kn_ptr + seq * D + offs_d, mask=d_mask, other=0.0).to(tl.float32)
        v_new = tl.load(vn_ptr + seq * D + offs_d, mask=d_mask, other=0.0).to(tl.float32)
        s_new = tl.sum(k_new * q, axis=0) * sm_scale
        if HAS_BIAS:
            bias_new = tl.load(bias_ptr + b.to(tl.int64) * stride_bias + T)
            s_new = tl.where(bias_new > _MASKED, s_new + bias_new, -float("inf"))
        m_max = tl.maximum(m_max, s_new)
    w = tl.exp(m - m_max)
    num = tl.sum(w[:, None] * acc, axis=0)
    den = tl.sum(w * l, axis=0)
    if HAS_NEW:
        w_new = tl.exp(s_new - m_max)
        num = num + w_new * v_new
        den = den + w_new
    out = num / den
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty),
             mask=offs_d < D)


@triton.jit
def _decode_combine_kernel(part_m_ptr, part_l_ptr, part_acc_ptr, out_ptr, H, D, n_splits,
                           stride_ob, stride_oh, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """:func:`_combine_body` of the splits alone."""
    _combine_body(part_m_ptr, part_l_ptr, part_acc_ptr, out_ptr, part_m_ptr, part_m_ptr, part_m_ptr, part_m_ptr,
                  H, 1, D, 0, n_splits, 1.0, 0, 0, 0, stride_ob, stride_oh, False, False, BLOCK_S, BLOCK_D)


@triton.jit
def _decode_combine_new_kernel(part_m_ptr, part_l_ptr, part_acc_ptr, out_ptr, q_ptr, kn_ptr, vn_ptr, bias_ptr,
                               H, H_KV, D, T, n_splits, sm_scale, stride_qb, stride_qh, stride_bias,
                               stride_ob, stride_oh, HAS_BIAS: tl.constexpr, BLOCK_S: tl.constexpr,
                               BLOCK_D: tl.constexpr):
    """:func:`_combine_body` of the splits and the new entry ``k_new``, ``v_new`` ``[B, H_KV, D]``
    (with ``HAS_BIAS``, its bias ``bias[b, T]``)."""
    _combine_body(part_m_ptr, part_l_ptr, part_acc_ptr, out_ptr, q_ptr, kn_ptr, vn_ptr, bias_ptr,
                  H, H_KV, D, T, n_splits, sm_scale, stride_qb, stride_qh, stride_bias, stride_ob, stride_oh,
                  True, HAS_BIAS, BLOCK_S, BLOCK_D)


# GPU tiles: (BLOCK_T, warps). At head_dim 128, ptxas (sm_90) reports no spills for these and
# spills for (128, 4).
_SPLIT_TILES = ((32, 4), (64, 4), (64, 8), (128, 8))
# The kernels a decode step launches, by role, and the GPU tiles of the split kernels: public
# for the checks that compile them for a GPU (tests/test_kernels.py).
SPLIT_TILES = _SPLIT_TILES
DECODE_KERNELS = {"split": _decode_split_kernel, "split_bias": _decode_split_bias_kernel,
                  "split_group": _decode_split_group_kernel, "split_group_bias": _decode_split_group_bias_kernel,
                  "combine": _decode_combine_kernel, "combine_new": _decode_combine_new_kernel}
_decode_split_tuned, _decode_split_bias_tuned = (triton.autotune(
    configs=[triton.Config({"BLOCK_T": bt}, num_warps=w) for bt, w in _SPLIT_TILES],
    key=["chunk", "D", "PER_TOKEN", "BITS"],
)(kernel) for kernel in (_decode_split_kernel, _decode_split_bias_kernel))
# the grouped splits' tiles: positions per step, by the group's padded size (the product
# [BLOCK_R, BLOCK_T, BLOCK_D] is held in registers)
_GROUP_BLOCK_T = {1: 64, 2: 32, 4: 16, 8: 8, 16: 4}


# ---------------------------------------------------------------------------- host side


def _check_attention_args(q: torch.Tensor, k_codes: torch.Tensor, v_codes: torch.Tensor,
                          k_scale: torch.Tensor, v_scale: torch.Tensor, seqlens: torch.Tensor,
                          bits: int, granularity: str, k_zero_point: torch.Tensor | None,
                          v_zero_point: torch.Tensor | None) -> tuple[int, int, int, int, int]:
    """``(B, H, Hkv, T, D)`` of a valid call; raises ``ValueError`` on the first inconsistency."""
    if bits not in (4, 8) or granularity not in GRANULARITIES:
        raise ValueError(f"bits must be 4 or 8 and granularity one of {GRANULARITIES}")
    b, h, d = q.shape
    bk, hkv, t, stored = k_codes.shape
    if (bk, stored) != (b, ops.kv_packed_dim(d, bits)) or v_codes.shape != k_codes.shape or d % 2:
        raise ValueError(f"codes must be uint8 [B={b}, Hkv, T, {ops.kv_packed_dim(d, bits)}] for "
                         f"head_dim {d} at {bits} bits, got {list(k_codes.shape)}, {list(v_codes.shape)}")
    if k_codes.dtype != torch.uint8 or v_codes.dtype != torch.uint8 or h % hkv:
        raise ValueError(f"codes must be uint8 and H={h} a multiple of Hkv={hkv}")
    stat = (b, hkv, t, 1) if granularity == "per_token" else (hkv, 1, d)
    for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
        if s.shape != stat or s.dtype != torch.float32:
            raise ValueError(f"{name} must be float32 {list(stat)}, got {s.dtype} {list(s.shape)}")
    if granularity == "per_token":
        for name, z in (("k_zero_point", k_zero_point), ("v_zero_point", v_zero_point)):
            if z is None or z.shape != stat or z.dtype != torch.uint8:
                raise ValueError(f"{name} must be uint8 {list(stat)} for the per_token cache")
    if seqlens.shape != (b,):
        raise ValueError(f"seqlens must have shape [{b}], got {list(seqlens.shape)}")
    return b, h, hkv, t, d


def _check_extra_args(q: torch.Tensor, b: int, hkv: int, t: int, d: int, bias: torch.Tensor | None,
                      k_new: torch.Tensor | None, v_new: torch.Tensor | None) -> None:
    """The optional ``bias`` / ``k_new`` / ``v_new`` (module docstring); raises ``ValueError``."""
    if (k_new is None) != (v_new is None):
        raise ValueError("k_new and v_new go together: give both (the new entry) or neither")
    if k_new is not None:
        for name, x in (("k_new", k_new), ("v_new", v_new)):
            if x.shape != (b, hkv, d) or not x.is_floating_point() or x.device != q.device:
                raise ValueError(f"{name} must be a float [B={b}, Hkv={hkv}, D={d}] tensor on {q.device}, "
                                 f"got {x.dtype} {list(x.shape)} on {x.device}")
    if bias is not None:
        n = t + (k_new is not None)
        if bias.shape != (b, n) or bias.dtype != torch.float32 or bias.device != q.device:
            what = "T + 1 (the cache, then the new entry)" if k_new is not None else "T (no new entry)"
            raise ValueError(f"bias must be float32 [B={b}, {n}] on {q.device}: {what} positions; got "
                             f"{bias.dtype} {list(bias.shape)} on {bias.device}")


def _split_plan(device: torch.device, rows: int, t: int, num_splits: int | None) -> tuple[int, int]:
    """``(splits, chunk)``: enough programs to fill the GPU twice over (or ``num_splits``), each
    chunk a multiple of the tile sizes."""
    if num_splits is None:
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        num_splits = max(1, min(triton.cdiv(t, _CHUNK_ALIGN), triton.cdiv(2 * sms, rows)))
    align = _INTERPRET_BLOCK_T if is_interpreted(_decode_split_kernel) else _CHUNK_ALIGN
    chunk = triton.cdiv(triton.cdiv(max(t, 1), max(1, num_splits)), align) * align
    return triton.cdiv(max(t, 1), chunk), chunk


def kv_decode_attention(q: torch.Tensor, k_codes: torch.Tensor, v_codes: torch.Tensor,
                        k_scale: torch.Tensor, v_scale: torch.Tensor, seqlens: torch.Tensor, *,
                        bits: int, granularity: str = "per_token",
                        k_zero_point: torch.Tensor | None = None, v_zero_point: torch.Tensor | None = None,
                        sm_scale: float | None = None, out_dtype: torch.dtype | None = None,
                        num_splits: int | None = None, bias: torch.Tensor | None = None,
                        k_new: torch.Tensor | None = None, v_new: torch.Tensor | None = None,
                        grouped: bool | None = None) -> torch.Tensor:
    """Attention of one query token per sequence over the quantized cache (module docstring):
    ``[B, H, D]``. ``sm_scale`` defaults to ``1/sqrt(D)``; ``num_splits`` (launch option) fixes
    the number of context chunks (default: enough programs to fill the GPU); ``bias``,
    ``k_new``, ``v_new``: the additive mask and the new entry (module docstring); ``grouped``
    (launch option; default: when ``H > Hkv``): one program per KV head and split for all the
    query heads that read it (:func:`_split_group_body`: each KV tile read once per group)
    instead of one per query head."""
    b, h, hkv, t, d = _check_attention_args(q, k_codes, v_codes, k_scale, v_scale, seqlens, bits,
                                             granularity, k_zero_point, v_zero_point)
    _check_extra_args(q, b, hkv, t, d, bias, k_new, v_new)
    if not q.is_cuda and not is_interpreted(_decode_split_kernel):
        raise RuntimeError("the Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 set before "
                           "triton is first imported (CPU interpreter)")
    q = q.contiguous()
    out = torch.empty((b, h, d), dtype=out_dtype or q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    grouped = h > hkv if grouped is None else grouped
    splits, chunk = _split_plan(q.device, b * (hkv if grouped else h), t, num_splits)
    block_d = triton.next_power_of_2(d)
    part_m = torch.empty((b * h, splits), dtype=torch.float32, device=q.device)
    part_l = torch.empty_like(part_m)
    part_acc = torch.empty((b * h, splits, block_d), dtype=torch.float32, device=q.device)
    per_token = granularity == "per_token"
    k_zp = k_zero_point if per_token else k_scale  # placeholders, unused per channel
    v_zp = v_zero_point if per_token else v_scale
    has_bias, has_new = bias is not None, k_new is not None
    scale = float(1.0 / math.sqrt(d) if sm_scale is None else sm_scale)
    args = [q, k_codes.contiguous(), k_scale.contiguous(), k_zp.contiguous(), v_codes.contiguous(),
            v_scale.contiguous(), v_zp.contiguous(), seqlens.to(torch.int32).contiguous(),
            part_m, part_l, part_acc, h, hkv, t, d, chunk, scale, q.stride(0), q.stride(1)]
    if has_bias:
        bias = bias.contiguous()
        args.insert(8, bias)
        args.append(bias.stride(0))
    flags = {"PER_TOKEN": per_token, "BITS": bits, "BLOCK_D": block_d}
    interpreted = is_interpreted(_decode_split_kernel)
    if grouped:
        flags["BLOCK_R"] = triton.next_power_of_2(h // hkv)
        kernel = _decode_split_group_bias_kernel if has_bias else _decode_split_group_kernel
        if not interpreted:
            flags["BLOCK_T"] = _GROUP_BLOCK_T.get(flags["BLOCK_R"], 4)
        programs = b * hkv
    else:
        if interpreted:
            kernel = _decode_split_bias_kernel if has_bias else _decode_split_kernel
        else:
            kernel = _decode_split_bias_tuned if has_bias else _decode_split_tuned
        programs = b * h
    if interpreted:
        flags["BLOCK_T"] = _INTERPRET_BLOCK_T
    kernel[(programs, splits)](*args, **flags)
    block_s = triton.next_power_of_2(splits)
    if has_new:
        bias_arg = bias if has_bias else part_m  # placeholder, unused without bias
        _decode_combine_new_kernel[(b * h,)](
            part_m, part_l, part_acc, out, q, k_new.contiguous(), v_new.contiguous(), bias_arg, h, hkv, d, t, splits,
            scale, q.stride(0), q.stride(1), bias_arg.stride(0), out.stride(0), out.stride(1), HAS_BIAS=has_bias,
            BLOCK_S=block_s, BLOCK_D=block_d)
    else:
        _decode_combine_kernel[(b * h,)](part_m, part_l, part_acc, out, h, d, splits, out.stride(0),
                                         out.stride(1), BLOCK_S=block_s, BLOCK_D=block_d)
    return out


def kv_decode_attention_reference(q: torch.Tensor, k_codes: torch.Tensor, v_codes: torch.Tensor,
                                  k_scale: torch.Tensor, v_scale: torch.Tensor, seqlens: torch.Tensor, *,
                                  bits: int, granularity: str = "per_token",
                                  k_zero_point: torch.Tensor | None = None,
                                  v_zero_point: torch.Tensor | None = None,
                                  sm_scale: float | None = None,
                                  out_dtype: torch.dtype | None = None, bias: torch.Tensor | None = None,
                                  k_new: torch.Tensor | None = None,
                                  v_new: torch.Tensor | None = None) -> torch.Tensor:
    """PyTorch reference of :func:`kv_decode_attention`: dequantize with ``quant.ops``, append
    the new entry (if any), repeat the KV heads, float32 softmax attention over the positions
    ``t < seqlens[b]`` (and the new entry) whose bias (if any) is above ``finfo.min``, with the
    bias added to the scaled scores."""
    b, h, hkv, t, d = _check_attention_args(q, k_codes, v_codes, k_scale, v_scale, seqlens, bits,
                                             granularity, k_zero_point, v_zero_point)
    _check_extra_args(q, b, hkv, t, d, bias, k_new, v_new)
    k = dequantize_cache(k_codes, k_scale, k_zero_point, bits, granularity)
    v = dequantize_cache(v_codes, v_scale, v_zero_point, bits, granularity)
    valid = torch.arange(t, device=q.device)[None, :] < seqlens.to(q.device).long()[:, None]
    if k_new is not None:
        k = torch.cat([k, k_new[:, :, None].to(torch.float32)], dim=2)
        v = torch.cat([v, v_new[:, :, None].to(torch.float32)], dim=2)
        valid = torch.cat([valid, torch.ones_like(valid[:, :1])], dim=1)
    scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    # the positions to ignore as -inf in one additive bias, then the shared attention in float32
    if bias is not None:
        valid = valid & (bias > MASKED)
        mask = torch.where(valid, bias.to(torch.float32), float("-inf"))
    else:
        mask = torch.where(valid, 0.0, float("-inf"))
    out, _ = attend(q.to(torch.float32)[:, :, None], k, v, mask[:, None, None, :], scale)
    return out[:, :, 0].to(out_dtype or q.dtype)
