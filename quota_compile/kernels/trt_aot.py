"""Single-launch Triton kernels for the TensorRT plugins' ahead-of-time implementations.

TensorRT's ``@trtp.aot_impl`` embeds ONE compiled kernel per plugin in the engine and launches
it with the plugin's input pointers, then int32 extra arguments (symbolic shape expressions),
then the output pointers (TensorRT samples/python/quickly_deployable_plugins, ``qdp_defs.py``;
https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/tensorrt.plugin/trt_plugin_aot_impl/index.html).
Float parameters cannot be passed at run time, so attributes such as ``clip_ratio`` and the
softmax scale are compile-time constants. These kernels have exactly that calling convention
and compute the plugin definitions of :mod:`quota_compile.flavours.tensorrt.lower`
(:mod:`quota_compile.flavours.tensorrt.verify` has them in PyTorch):

- :func:`w4a4_linear_kernel`: ``QuotaW4A4Linear``; the GEMM of :mod:`.w4a4_linear` in its
  ``FUSED`` form (each program quantizes its rows itself: one launch, at the price of
  recomputing the row scales per column block, which the two-launch path avoids for large M);
- :func:`kv_quantize_kernel`: ``QuotaKVQuantize``, one program per cached token and head;
- :func:`decode_attention_kernel`: ``QuotaKVDecodeAttention``, one program per sequence and
  query head: quantizes the new key and value (the first query head of each KV group writes
  them), then one online-softmax pass over the past (the tile loader of
  :mod:`.kv_attention`) and the new entry, with the additive mask bias. No split over the
  context (a second launch would be needed to merge splits), so long contexts at small batch
  use the GPU less well than :func:`.kv_attention.kv_decode_attention`.

Quantizer arithmetic (``quant.ops``): divisions ``tl.math.div_rn`` (IEEE, as PyTorch on the
CPU), rounding half to even by :func:`.w4a4_linear.round_half_even` after clamping to the
code range (which commutes with rounding). Cache entries are handled as even and odd channel
halves, which is the INT4 packing (byte ``j`` = channel ``2j`` low, ``2j + 1`` high) and, for
INT8, a stride-2 view of the bytes.

Correctness is tested under ``TRITON_INTERPRET=1`` against the references
(``tests/test_trt_flavour.py``); compiling for sm_90 is checked there too (no GPU needed);
running in a TensorRT engine is not checked anywhere here.
"""

from __future__ import annotations

import triton
import triton.language as tl

from quota_compile.kernels.kv_attention import kv_channel_scale, kv_tile
from quota_compile.kernels.w4a4_linear import round_half_even, w4a4_gemm_kernel

SCALE_EPS = 1e-8  # quant.ops.SCALE_EPS


@triton.jit
def w4a4_linear_kernel(x_ptr, w_ptr, w_scale_ptr, bias_ptr, M, N, K, out_ptr,
                       GROUP_SIZE: tl.constexpr, CLIP: tl.constexpr, TILE_GROUPS: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       GROUP_M: tl.constexpr):
    """``out [M, N] = QuotaW4A4Linear(x [M, K], w, w_scale, bias)``; grid
    ``cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N)``; ``TILE_GROUPS``: ``GROUP_SIZE == BLOCK_K``."""
    w4a4_gemm_kernel(x_ptr, w_scale_ptr, w_ptr, w_scale_ptr, bias_ptr, out_ptr, M, N, K, GROUP_SIZE, CLIP, K, N,
                      FUSED=True, HAS_BIAS=True, TILE_GROUPS=TILE_GROUPS, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                      BLOCK_K=BLOCK_K, GROUP_M=GROUP_M)


@triton.jit
def _round_clamped(v, lo, hi):
    """``clamp(round_half_even(v), lo, hi)`` as float32 (clamping first keeps ``|v| < 2**22``)."""
    return round_half_even(tl.minimum(tl.maximum(v, lo), hi)).to(tl.float32)


@triton.jit
def _quantize_entry(x_e, x_o, mask, s_e, s_o, BITS: tl.constexpr, PER_TOKEN: tl.constexpr):
    """One cache entry (its even and odd channels, float32): ``(codes_e, codes_o, scale,
    zero_point, dequantized_e, dequantized_o)``; codes and zero point as float32 integers.
    ``per_token``: asymmetric with a dynamic scale (scalar); ``per_channel``: the static
    scale halves ``s_e``, ``s_o`` and zero point ``2**(BITS-1)``."""
    qmax = 2.0 ** BITS - 1.0
    if PER_TOKEN:
        x_e = tl.where(mask, x_e, 0.0)
        x_o = tl.where(mask, x_o, 0.0)
        lo = tl.minimum(tl.minimum(tl.min(x_e, axis=0), tl.min(x_o, axis=0)), 0.0)
        hi = tl.maximum(tl.maximum(tl.max(x_e, axis=0), tl.max(x_o, axis=0)), 0.0)
        scale = tl.maximum(tl.math.div_rn(hi - lo, qmax), 1e-8)
        zp = _round_clamped(tl.math.div_rn(-lo, scale), 0.0, qmax)
        q_e = tl.minimum(tl.maximum(_round_clamped(tl.math.div_rn(x_e, scale), -qmax, qmax) + zp, 0.0), qmax)
        q_o = tl.minimum(tl.maximum(_round_clamped(tl.math.div_rn(x_o, scale), -qmax, qmax) + zp, 0.0), qmax)
        return q_e, q_o, scale, zp, (q_e - zp) * scale, (q_o - zp) * scale
    else:
        half = 2.0 ** (BITS - 1)
        q_e = _round_clamped(tl.math.div_rn(x_e, s_e), -half, half - 1.0) + half
        q_o = _round_clamped(tl.math.div_rn(x_o, s_o), -half, half - 1.0) + half
        return q_e, q_o, s_e, half, (q_e - half) * s_e, (q_o - half) * s_o


@triton.jit
def _store_codes(c_ptr, row, offs_p, mask, q_e, q_o, D: tl.constexpr, BITS: tl.constexpr):
    """Store one entry's codes at cache row ``row`` (INT4: packed pairs; INT8: bytes)."""
    if BITS == 4:
        packed = q_e.to(tl.int32) | (q_o.to(tl.int32) << 4)
        tl.store(c_ptr + row * (D // 2) + offs_p, packed.to(tl.uint8), mask=mask)
    else:
        tl.store(c_ptr + row * D + 2 * offs_p, q_e.to(tl.uint8), mask=mask)
        tl.store(c_ptr + row * D + 2 * offs_p + 1, q_o.to(tl.uint8), mask=mask)


@triton.jit
def kv_quantize_kernel(x_ptr, s_ptr, z_ptr, T, HKV, codes_ptr, scale_ptr, zp_ptr, deq_ptr,
                       D: tl.constexpr, BITS: tl.constexpr, PER_TOKEN: tl.constexpr, BLOCK_P: tl.constexpr):
    """``QuotaKVQuantize`` of ``x [B, HKV, T, D]`` (float32, contiguous); grid ``B * HKV * T``.
    ``per_channel``: ``s_ptr`` the static scale ``[HKV, 1, D]``, ``z_ptr`` the zero point ``[1]``,
    copied to ``scale_ptr`` / ``zp_ptr``; ``per_token``: those inputs unused, the outputs
    ``[B, HKV, T, 1]``."""
    row = tl.program_id(0).to(tl.int64)
    hk = (row // T) % HKV
    offs_p = tl.arange(0, BLOCK_P)
    mask = offs_p < D // 2
    x_e = tl.load(x_ptr + row * D + 2 * offs_p, mask=mask, other=0.0).to(tl.float32)
    x_o = tl.load(x_ptr + row * D + 2 * offs_p + 1, mask=mask, other=0.0).to(tl.float32)
    if PER_TOKEN:
        s_e = x_e
        s_o = x_o
    else:
        s_e = tl.load(s_ptr + hk * D + 2 * offs_p, mask=mask, other=1.0)
        s_o = tl.load(s_ptr + hk * D + 2 * offs_p + 1, mask=mask, other=1.0)
    q_e, q_o, scale, zp, d_e, d_o = _quantize_entry(x_e, x_o, mask, s_e, s_o, BITS, PER_TOKEN)
    _store_codes(codes_ptr, row, offs_p, mask, q_e, q_o, D, BITS)
    tl.store(deq_ptr + row * D + 2 * offs_p, d_e, mask=mask)
    tl.store(deq_ptr + row * D + 2 * offs_p + 1, d_o, mask=mask)
    if PER_TOKEN:
        tl.store(scale_ptr + row, scale)
        tl.store(zp_ptr + row, zp.to(tl.uint8))
    else:
        zeros_p = offs_p * 0  # (block masks from the block itself: see decode_attention_kernel)
        copy = mask & ((zeros_p + row) < HKV)
        tl.store(scale_ptr + row * D + 2 * offs_p, tl.load(s_ptr + row * D + 2 * offs_p, mask=copy), mask=copy)
        tl.store(scale_ptr + row * D + 2 * offs_p + 1, tl.load(s_ptr + row * D + 2 * offs_p + 1, mask=copy), mask=copy)
        first = offs_p == 0
        first = first & ((zeros_p + row) == 0)
        tl.store(zp_ptr + offs_p, tl.load(z_ptr + offs_p, mask=first), mask=first)


@triton.jit
def decode_attention_kernel(q_ptr, k_ptr, v_ptr, bias_ptr, pk_ptr, pv_ptr, ks_ptr, vs_ptr, kz_ptr, vz_ptr,
                            H, HKV, P,
                            out_ptr, nk_ptr, nv_ptr, nks_ptr, nvs_ptr, nkz_ptr, nvz_ptr,
                            SM_SCALE: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr,
                            PER_TOKEN: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """``QuotaKVDecodeAttention`` (all tensors contiguous; query ``[B, H, 1, D]``, new key / value
    ``[B, HKV, 1, D]``, bias ``[B, 1, 1, P + 1]``, past codes ``[B, HKV, P, Dc]``); grid ``B * H``."""
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    group = H // HKV
    hk = h // group
    seq = (b * HKV + hk).to(tl.int64)
    writer = (h % group) == 0
    offs_p = tl.arange(0, BLOCK_D // 2)
    pmask = offs_p < D // 2
    # block masks built from the block itself: triton 3.9's interpreter refuses a mask made by
    # `block & scalar` ("mask has unsupported dtype")
    zeros_p = offs_p * 0
    writer_p = (zeros_p + h % group) == 0
    offs_d = tl.arange(0, BLOCK_D)

    # the new token's key and value, quantized as the cache stores them
    if PER_TOKEN:
        ks_e = tl.zeros([BLOCK_D // 2], dtype=tl.float32)
        ks_o = ks_e
        vs_e = ks_e
        vs_o = ks_e
    else:
        ks_e = tl.load(ks_ptr + hk * D + 2 * offs_p, mask=pmask, other=1.0)
        ks_o = tl.load(ks_ptr + hk * D + 2 * offs_p + 1, mask=pmask, other=1.0)
        vs_e = tl.load(vs_ptr + hk * D + 2 * offs_p, mask=pmask, other=1.0)
        vs_o = tl.load(vs_ptr + hk * D + 2 * offs_p + 1, mask=pmask, other=1.0)
    k_e = tl.load(k_ptr + seq * D + 2 * offs_p, mask=pmask, other=0.0).to(tl.float32)
    k_o = tl.load(k_ptr + seq * D + 2 * offs_p + 1, mask=pmask, other=0.0).to(tl.float32)
    v_e = tl.load(v_ptr + seq * D + 2 * offs_p, mask=pmask, other=0.0).to(tl.float32)
    v_o = tl.load(v_ptr + seq * D + 2 * offs_p + 1, mask=pmask, other=0.0).to(tl.float32)
    kq_e, kq_o, k_scale, k_zp, kd_e, kd_o = _quantize_entry(k_e, k_o, pmask, ks_e, ks_o, BITS, PER_TOKEN)
    vq_e, vq_o, v_scale, v_zp, vd_e, vd_o = _quantize_entry(v_e, v_o, pmask, vs_e, vs_o, BITS, PER_TOKEN)
    _store_codes(nk_ptr, seq, offs_p, pmask & writer_p, kq_e, kq_o, D, BITS)
    _store_codes(nv_ptr, seq, offs_p, pmask & writer_p, vq_e, vq_o, D, BITS)
    if PER_TOKEN:
        tl.store(nks_ptr + seq, k_scale, mask=writer)
        tl.store(nvs_ptr + seq, v_scale, mask=writer)
        tl.store(nkz_ptr + seq, k_zp.to(tl.uint8), mask=writer)
        tl.store(nvz_ptr + seq, v_zp.to(tl.uint8), mask=writer)
    else:  # the static parameters, copied by the first sequence's writers
        copy = pmask & writer_p & ((zeros_p + b) == 0)
        tl.store(nks_ptr + hk * D + 2 * offs_p, ks_e, mask=copy)
        tl.store(nks_ptr + hk * D + 2 * offs_p + 1, ks_o, mask=copy)
        tl.store(nvs_ptr + hk * D + 2 * offs_p, vs_e, mask=copy)
        tl.store(nvs_ptr + hk * D + 2 * offs_p + 1, vs_o, mask=copy)
        first = (offs_p == 0) & writer_p & ((zeros_p + pid) == 0)
        tl.store(nkz_ptr + offs_p, tl.load(kz_ptr + offs_p, mask=first), mask=first)
        tl.store(nvz_ptr + offs_p, tl.load(vz_ptr + offs_p, mask=first), mask=first)

    # one online-softmax pass over the past, then the new entry
    q = tl.interleave(tl.load(q_ptr + pid * D + 2 * offs_p, mask=pmask, other=0.0),
                      tl.load(q_ptr + pid * D + 2 * offs_p + 1, mask=pmask, other=0.0)).to(tl.float32)
    k_cs = kv_channel_scale(ks_ptr, hk, offs_d, D, PER_TOKEN)
    v_cs = kv_channel_scale(vs_ptr, hk, offs_d, D, PER_TOKEN)
    bias_row = bias_ptr + b.to(tl.int64) * (P + 1)
    m_i = -float("inf")
    l_i = 0.0
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for t0 in range(0, P, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_mask = offs_t < P
        k = kv_tile(pk_ptr, ks_ptr, kz_ptr, seq, k_cs, offs_t, t_mask, P, D, PER_TOKEN, BITS, BLOCK_D)
        bias = tl.load(bias_row + offs_t, mask=t_mask, other=0.0)
        s = tl.where(t_mask, tl.sum(k * q[None, :], axis=1) * SM_SCALE + bias, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        live = m_new > -float("inf")  # a tile of fully masked positions changes nothing
        alpha = tl.where(live, tl.exp(m_i - m_new), 1.0)
        p = tl.where(live, tl.exp(s - m_new), 0.0)
        v = kv_tile(pv_ptr, vs_ptr, vz_ptr, seq, v_cs, offs_t, t_mask, P, D, PER_TOKEN, BITS, BLOCK_D)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        m_i = m_new
    kd = tl.interleave(kd_e, kd_o)
    vd = tl.interleave(vd_e, vd_o)
    s_new = tl.sum(kd * q, axis=0) * SM_SCALE + tl.load(bias_row + P)
    m_new = tl.maximum(m_i, s_new)
    live = m_new > -float("inf")
    alpha = tl.where(live, tl.exp(m_i - m_new), 1.0)
    p_new = tl.where(live, tl.exp(s_new - m_new), 0.0)
    acc = acc * alpha + p_new * vd
    l_i = l_i * alpha + p_new
    tl.store(out_ptr + pid * D + offs_d, acc / l_i, mask=offs_d < D)


def block_k(group_size: int) -> int:
    """The GEMM's K tile for a group size (as :mod:`.w4a4_linear` chooses it)."""
    return next((b for b in (128, 64, 32) if group_size % b == 0), 32)


def compile_kernel(fn, types: dict[str, str], constexprs: dict, num_warps: int = 4, num_stages: int = 3, target=None):
    """``triton.compile`` of ``fn`` with the given argument types (``"*fp32"``, ``"i32"``, ...;
    every other non-constexpr argument ``i32``) for ``target`` (default: the current GPU).
    Pointers are specialized 16-byte aligned, as TensorRT's buffers are."""
    from triton.compiler import ASTSource

    sig = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if sig[n].startswith("*")}
    if target is None:
        target = triton.runtime.driver.active.get_current_target()
    return triton.compile(ASTSource(fn, sig, constexprs, attrs), target=target,
                          options={"num_warps": num_warps, "num_stages": num_stages})


def w4a4_linear_types(dtype: str) -> dict[str, str]:
    """Argument types of :func:`w4a4_linear_kernel` for activations of ``dtype`` (fp32 / fp16)."""
    return {"x_ptr": f"*{dtype}", "w_ptr": "*u8", "w_scale_ptr": "*fp32", "bias_ptr": "*fp32", "out_ptr": f"*{dtype}"}


KV_QUANTIZE_TYPES = {"x_ptr": "*fp32", "s_ptr": "*fp32", "z_ptr": "*u8", "codes_ptr": "*u8", "scale_ptr": "*fp32",
                     "zp_ptr": "*u8", "deq_ptr": "*fp32"}
DECODE_ATTENTION_TYPES = {
    "q_ptr": "*fp32", "k_ptr": "*fp32", "v_ptr": "*fp32", "bias_ptr": "*fp32", "pk_ptr": "*u8", "pv_ptr": "*u8",
    "ks_ptr": "*fp32", "vs_ptr": "*fp32", "kz_ptr": "*u8", "vz_ptr": "*u8", "out_ptr": "*fp32", "nk_ptr": "*u8",
    "nv_ptr": "*u8", "nks_ptr": "*fp32", "nvs_ptr": "*fp32", "nkz_ptr": "*u8", "nvz_ptr": "*u8",
}
