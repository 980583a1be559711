"""W4A4 linear over a K-major INT4 weight: the tensor-core layout (a candidate, timed only on a GPU).

The kernel of :mod:`quota_compile.kernels.w4a4_linear` reads the weight in the graph's packing
(``ops.pack_int4`` of the ``[K, N]`` matrix: two adjacent *columns* per byte, so the weight
tile is N-major) and keeps two products per tile, one per nibble. This module computes the
same W4A4 linear (the same activation codes and scales; the same integer dot per weight
group; ``float(dot) * w_scale`` per group, times the row scale, plus bias) from a weight laid
out for the int8 tensor cores:

- **Layout** (:func:`pack_int4_kmajor`): ``uint8 [N, K/2]``, row ``n`` holding output channel
  ``n``'s codes along K (K-major, as Hopper's ``wgmma`` wants both int8 operands). Byte ``j``
  of a row holds ``k = j`` in its low nibble and ``k = j + K/2`` in its high nibble. A tile of
  ``H`` bytes along a row is therefore two int8 operands of ``H`` values each, along K, for
  the A tiles at ``j`` and ``j + K/2``: the low one is ``(b << 4) >> 4`` and the high one
  ``b >> 4`` (arithmetic shifts on the signed byte sign-extend the nibbles): two and one
  integer operations, no interleaving, no reshape. The layout does not depend on the tile size.
- **Per output channel** (``group_size == K``, the fast path): one int32 accumulator over the
  whole of K, converted and scaled once at the end (``|dot| <= 64 K``, exact in int32 and in
  float32 below ``K = 2**18``).
- **Groups** (an even number of groups, i.e. ``K/2`` a multiple of ``group_size``): each
  group of the low half and its partner ``K/2`` further on are accumulated in int32 over the
  group's tiles, then rescaled once per group: the sum of the groups is formed in another
  order than :func:`~quota_compile.kernels.reference.w4a4_matmul_reference`'s (float
  summation order only; the integers are the same).
- Activations: quantized per token inside the GEMM (``FUSED``, as the other kernel does for
  small ``M``) or read as codes from ``w4a4_linear.quantize_activations``.
- **Split K** (per output channel, at most :data:`SPLIT_K_MAX_M` rows, the decode-sized
  products that the weight's bytes bound): the K range is split over programs so that every
  SM has work; each adds its int32 partial dots to an int32 workspace with ``atomic_add``
  (exact and order-independent: deterministic), and :func:`_scale_kernel` scales the sums.

Status: correct in Triton's interpreter (``tests/test_kernels.py``) and compiled for sm_90 and
sm_87 without a GPU (``benchmarks/gpu_kernels.py --compile-only``, which also reports the
registers and stack each variant needs). It is not used by the PyTorch path or the TensorRT
plugins, whose weights stay in the graph's packing, until ``benchmarks/gpu_kernels.py`` has
timed it on a GPU against cuBLAS FP16 and the other kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from quota_compile.kernels import is_interpreted
from quota_compile.kernels.w4a4_linear import (
    GROUP_M, FUSED_MAX_M, check_device, check_linear_args, quantize_codes, row_scale, rows_absmax, tile_ids,
    quantize_activations,
)
from quota_compile.kernels.reference import pack_int4_kmajor, unpack_int4_kmajor  # noqa: F401  (this module's API)
from quota_compile.quant import ops

_INTERPRET_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_H": 16}


def kmajor_from_graph_packing(w_packed: torch.Tensor, k: int, n: int) -> torch.Tensor:
    """The K-major weight of a weight in the graph's packing (``ops.pack_int4`` of ``[K, N]``):
    what a loader converting a bundle's weights once would compute."""
    return pack_int4_kmajor(ops.unpack_int4(w_packed, (k, n)))


@triton.jit
def _halves(w_ptr, offs_n, n_mask, offs_h, h_mask, HALF):
    """The weight tile's two int8 operands ``[BLOCK_N, BLOCK_H]``: codes at ``k = offs_h``
    (low nibbles) and at ``k = offs_h + K/2`` (high nibbles)."""
    mask = n_mask[:, None] & h_mask[None, :]
    packed = tl.load(w_ptr + offs_n[:, None] * HALF + offs_h[None, :], mask=mask, other=0)
    s = packed.to(tl.int8, bitcast=True)
    return (s << 4) >> 4, s >> 4


@triton.jit
def _activations(a_ptr, offs_m, m_mask, offs_h, h_mask, HALF, a_scale, stride_am, FUSED: tl.constexpr):
    """Activation codes ``[BLOCK_M, BLOCK_H]`` at ``k = offs_h`` and at ``k = offs_h + K/2``."""
    mask = m_mask[:, None] & h_mask[None, :]
    rows = a_ptr + offs_m[:, None] * stride_am
    a_lo = tl.load(rows + offs_h[None, :], mask=mask, other=0)
    a_hi = tl.load(rows + HALF + offs_h[None, :], mask=mask, other=0)
    if FUSED:
        a_lo = quantize_codes(a_lo.to(tl.float32), a_scale[:, None])
        a_hi = quantize_codes(a_hi.to(tl.float32), a_scale[:, None])
    return a_lo, a_hi


@triton.jit
def w4a4_gemm_kmajor_kernel(a_ptr, a_scale_ptr, w_ptr, w_scale_ptr, bias_ptr, out_ptr,
                            M, N, K, group_size, clip, stride_am, stride_om,
                            FUSED: tl.constexpr, HAS_BIAS: tl.constexpr, PER_CHANNEL: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
                            GROUP_M: tl.constexpr):
    """``out [M, N]`` of the W4A4 linear over the K-major weight ``w [N, K/2]`` (module
    docstring); ``a`` is float ``x`` when ``FUSED``, else its int8 codes with float32 row
    scales ``a_scale [M]``. Each step multiplies ``BLOCK_H`` values of each half of K."""
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    HALF = K // 2
    if FUSED:
        a_scale = row_scale(rows_absmax(a_ptr, offs_m, m_mask, K, stride_am, 2 * BLOCK_H), clip)
    else:
        a_scale = tl.load(a_scale_ptr + offs_m, mask=m_mask, other=1.0)
    if PER_CHANNEL:
        dots = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for j0 in range(0, HALF, BLOCK_H):
            offs_h = j0 + tl.arange(0, BLOCK_H)
            h_mask = offs_h < HALF
            a_lo, a_hi = _activations(a_ptr, offs_m, m_mask, offs_h, h_mask, HALF, a_scale, stride_am, FUSED)
            w_lo, w_hi = _halves(w_ptr, offs_n, n_mask, offs_h, h_mask, HALF)
            dots = tl.dot(a_lo, tl.trans(w_lo), dots, out_dtype=tl.int32)
            dots = tl.dot(a_hi, tl.trans(w_hi), dots, out_dtype=tl.int32)
        w_scale = tl.load(w_scale_ptr + offs_n, mask=n_mask, other=0.0)
        acc = dots.to(tl.float32) * w_scale[None, :]
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        groups_half = HALF // group_size
        for g0 in range(0, HALF, group_size):
            dots_lo = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
            dots_hi = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
            for kk in range(0, group_size, BLOCK_H):
                in_group = kk + tl.arange(0, BLOCK_H)
                h_mask = in_group < group_size
                offs_h = g0 + in_group
                a_lo, a_hi = _activations(a_ptr, offs_m, m_mask, offs_h, h_mask, HALF, a_scale, stride_am, FUSED)
                w_lo, w_hi = _halves(w_ptr, offs_n, n_mask, offs_h, h_mask, HALF)
                dots_lo = tl.dot(a_lo, tl.trans(w_lo), dots_lo, out_dtype=tl.int32)
                dots_hi = tl.dot(a_hi, tl.trans(w_hi), dots_hi, out_dtype=tl.int32)
            g = g0 // group_size
            s_lo = tl.load(w_scale_ptr + g * N + offs_n, mask=n_mask, other=0.0)
            s_hi = tl.load(w_scale_ptr + (g + groups_half) * N + offs_n, mask=n_mask, other=0.0)
            acc += dots_lo.to(tl.float32) * s_lo[None, :] + dots_hi.to(tl.float32) * s_hi[None, :]
    out = acc * a_scale[:, None]
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], out.to(out_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def w4a4_gemm_kmajor_splitk_kernel(a_ptr, w_ptr, acc_ptr, M, N, K, stride_am, chunk,
                                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr):
    """Split K, per output channel: program ``(tile, s)`` adds the int32 dots of the activation
    codes ``a`` (int8) and the K-major weight over the bytes ``[s * chunk, (s + 1) * chunk)`` of
    each half of K into ``acc [M, N]`` (int32, zeroed), atomically. Integer addition is exact
    and associative, so the sum is the same in any order (deterministic)."""
    pid = tl.program_id(0)
    grid_n = tl.cdiv(N, BLOCK_N)
    offs_m = (pid // grid_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (pid % grid_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    HALF = K // 2
    start = tl.program_id(1) * chunk
    end = tl.minimum(start + chunk, HALF)
    dots = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for j0 in range(start, end, BLOCK_H):
        offs_h = j0 + tl.arange(0, BLOCK_H)
        h_mask = offs_h < end
        a_lo, a_hi = _activations(a_ptr, offs_m, m_mask, offs_h, h_mask, HALF, offs_m, stride_am, False)
        w_lo, w_hi = _halves(w_ptr, offs_n, n_mask, offs_h, h_mask, HALF)
        dots = tl.dot(a_lo, tl.trans(w_lo), dots, out_dtype=tl.int32)
        dots = tl.dot(a_hi, tl.trans(w_hi), dots, out_dtype=tl.int32)
    tl.atomic_add(acc_ptr + offs_m[:, None] * N + offs_n[None, :], dots, mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _scale_kernel(acc_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, out_ptr, M, N, stride_om,
                  HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``out = float(acc) * w_scale[n] * a_scale[m] (+ bias[n])``: the per-channel epilogue,
    in the order of the one-pass kernel."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    mask = m_mask[:, None] & n_mask[None, :]
    acc = tl.load(acc_ptr + offs_m[:, None] * N + offs_n[None, :], mask=mask, other=0)
    w_scale = tl.load(w_scale_ptr + offs_n, mask=n_mask, other=0.0)
    a_scale = tl.load(a_scale_ptr + offs_m, mask=m_mask, other=1.0)
    out = (acc.to(tl.float32) * w_scale[None, :]) * a_scale[:, None]
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


# Split-K (per output channel, M <= SPLIT_K_MAX_M): small-M products are bound by the weight's
# bytes, and one program per column tile leaves most SMs idle (N = 4096 in tiles of 64: 64
# programs on an H100's 132 SMs). The splits give every SM about two programs.
SPLIT_K_MAX_M = 64
SPLIT_K_TILE = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_H": 64}


def split_k_for(m: int, n: int, k: int, device: torch.device) -> int:
    """How many K splits the per-channel kernel uses by default: 1 on the CPU and above
    :data:`SPLIT_K_MAX_M` rows; on a GPU enough for about two programs per SM, each split at
    least two ``BLOCK_H`` steps."""
    if device.type != "cuda" or m > SPLIT_K_MAX_M:
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    tiles = triton.cdiv(m, SPLIT_K_TILE["BLOCK_M"]) * triton.cdiv(n, SPLIT_K_TILE["BLOCK_N"])
    most = max(1, (k // 2) // (2 * SPLIT_K_TILE["BLOCK_H"]))
    return max(1, min(most, triton.cdiv(2 * sms, tiles)))


def gemm_kmajor_configs() -> list[triton.Config]:
    """Tiles for GPUs (``BLOCK_H`` bytes per row and step: ``2 * BLOCK_H`` values of K). Chosen
    by what ptxas reports without a GPU (``benchmarks/gpu_kernels.py --compile-only``): with
    ``BLOCK_H`` 64 or 3 stages, the 64- and 128-row tiles spill (255 registers, 0.5-2.8 KB of
    stack per thread on sm_90); these do not, or little (the fused 128-row tile: 128 bytes).
    Not timed yet."""
    tiles = [(16, 64, 32, 4, 2), (16, 128, 32, 4, 3), (64, 128, 32, 4, 2), (128, 128, 32, 8, 2)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_H": bh}, num_warps=w, num_stages=s)
            for bm, bn, bh, w, s in tiles]


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    limit = max(16, 2 * triton.next_power_of_2(int(named_args["M"])))
    return [c for c in configs if c.kwargs["BLOCK_M"] <= limit]


_tuned = triton.autotune(configs=gemm_kmajor_configs(), key=["M", "N", "K", "group_size", "FUSED", "PER_CHANNEL"],
                         prune_configs_by={"early_config_prune": _prune})(w4a4_gemm_kmajor_kernel)


def _check_kmajor(w_kmajor: torch.Tensor, k: int, n: int, group_size: int) -> bool:
    """Whether the weight is per output channel; ``ValueError`` where the layout or the groups
    do not fit this kernel."""
    if w_kmajor.dtype != torch.uint8 or tuple(w_kmajor.shape) != (n, k // 2):
        raise ValueError(f"w_kmajor must be uint8 [N={n}, K/2={k // 2}], got {w_kmajor.dtype} {list(w_kmajor.shape)}")
    per_channel = group_size == k
    if not per_channel and (k // 2) % group_size:
        raise ValueError(f"the K-major kernel needs per-channel scales or an even number of groups "
                         f"(K/2 = {k // 2} a multiple of the group size {group_size})")
    return per_channel


def _split_k_linear(x2: torch.Tensor, w_kmajor: torch.Tensor, w_scale: torch.Tensor, bias, out: torch.Tensor,
                    clip_ratio: float, splits: int) -> None:
    """The per-channel product in ``splits`` K ranges: activation codes, the int32 split-K
    kernel into a zeroed workspace, then the epilogue."""
    m, k = x2.shape
    n = out.shape[1]
    codes, a_scale = quantize_activations(x2, clip_ratio)
    acc = torch.zeros((m, n), dtype=torch.int32, device=x2.device)
    t = SPLIT_K_TILE if not is_interpreted(w4a4_gemm_kmajor_splitk_kernel) else _INTERPRET_BLOCKS
    step = t["BLOCK_H"]
    chunk = triton.cdiv(triton.cdiv(k // 2, splits), step) * step  # whole BLOCK_H steps per split
    splits = triton.cdiv(k // 2, chunk)
    tiles = triton.cdiv(m, t["BLOCK_M"]) * triton.cdiv(n, t["BLOCK_N"])
    w4a4_gemm_kmajor_splitk_kernel[(tiles, splits)](codes, w_kmajor, acc, m, n, k, codes.stride(0), chunk, **t)
    grid = (triton.cdiv(m, t["BLOCK_M"]), triton.cdiv(n, t["BLOCK_N"]))
    _scale_kernel[grid](acc, a_scale, w_scale, w_scale if bias is None else bias, out, m, n, out.stride(0),
                        HAS_BIAS=bias is not None, BLOCK_M=t["BLOCK_M"], BLOCK_N=t["BLOCK_N"])


def w4a4_linear_kmajor(x: torch.Tensor, w_kmajor: torch.Tensor, w_scale: torch.Tensor, group_size: int,
                       clip_ratio: float = 1.0, bias: torch.Tensor | None = None, *,
                       out_dtype: torch.dtype | None = None, fused: bool | None = None,
                       split_k: int | None = None) -> torch.Tensor:
    """``x [..., K] -> [..., N]``: the W4A4 linear of ``w4a4_linear.w4a4_linear`` over the
    weight :func:`pack_int4_kmajor` laid out; the other arguments are that function's.
    ``split_k`` (per-channel weights only; launch option): the K ranges the product is split
    into (:func:`split_k_for` by default; ``fused`` does not apply then: the rows are
    quantized first)."""
    check_device(x)
    k, n = x.shape[-1], w_scale.shape[-1]
    if k % 2:
        raise ValueError(f"K = {k} must be even")
    # the graph-packing checks on a same-sized stand-in (the byte count is K*N/2 in both layouts)
    check_linear_args(x, w_kmajor.reshape(-1), w_scale, group_size, bias)
    per_channel = _check_kmajor(w_kmajor, k, n, group_size)
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    out = torch.empty((m, n), dtype=out_dtype or x.dtype, device=x.device)
    if split_k is not None and (split_k < 1 or (split_k > 1 and not per_channel)):
        raise ValueError(f"split_k {split_k}: at least 1, and more only with per-channel scales")
    splits = (split_k_for(m, n, k, x.device) if per_channel else 1) if split_k is None else split_k
    if m and splits > 1:
        _split_k_linear(x2, w_kmajor.contiguous(), w_scale.contiguous(), None if bias is None else bias.contiguous(), out,
                        clip_ratio, splits)
    elif m:
        fused = m <= FUSED_MAX_M if fused is None else fused
        a, a_scale = (x2, w_scale) if fused else quantize_activations(x2, clip_ratio)
        w_scale = w_scale.contiguous()
        args = (a, a_scale.reshape(-1) if not fused else a_scale, w_kmajor.contiguous(), w_scale,
                w_scale if bias is None else bias.contiguous(), out, m, n, k, group_size, float(clip_ratio),
                a.stride(0), out.stride(0))
        flags = {"FUSED": fused, "HAS_BIAS": bias is not None, "PER_CHANNEL": per_channel, "GROUP_M": GROUP_M}
        if is_interpreted(w4a4_gemm_kmajor_kernel):
            b = _INTERPRET_BLOCKS
            grid = (triton.cdiv(m, b["BLOCK_M"]) * triton.cdiv(n, b["BLOCK_N"]),)
            w4a4_gemm_kmajor_kernel[grid](*args, **flags, **b)
        else:
            _tuned[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)](*args, **flags)
    return out.reshape(*x.shape[:-1], n)
