"""W4A4 linear layer: INT4 per-token activations x INT4 group-wise weights, int32 accumulation.

Integer conventions (``quota_compile.quant.ops``)
- Activations ``x [M, K]`` (float16, bfloat16 or float32) are first converted to float32
  (exact); every step below is float32 arithmetic, in this order, for each row:
  ``amax = max|x_row|``, ``scale = max((amax * clip_ratio) / 7, 1e-8)``,
  ``q = clamp(round_half_even(x / scale), -8, 7)``. The codes and scales are bit-identical to
  ``ops.quantize_per_token(x.float(), 4, clip_ratio)`` (multiplying by ``clip_ratio == 1.0``
  is exact, so always multiplying changes nothing).
- Weights: signed INT4 codes of the ``[K, N]`` (MatMul-layout) matrix packed by
  ``ops.pack_int4``: flat row-major index ``k * N + n``, two codes per byte, the even flat
  index in the low nibble. With ``N`` even, byte ``k * N/2 + j`` holds columns ``2j`` (low)
  and ``2j + 1`` (high) of row ``k``. Scales ``[K / group_size, N]`` float32;
  ``group_size == K`` is per output channel.
- Output: per group ``g`` the integer dot ``sum_k q[m, k] * w[k, n]`` over the group's ``k``
  is accumulated in int32 (exact; ``|sum| <= 64 * K``), converted to float32, multiplied by
  ``w_scale[g, n]``; the groups are summed in order, the sum multiplied by the row's scale,
  the bias added; the result is cast to ``out_dtype`` (default: ``x``'s dtype).

Exactness of the quantizer on every backend
- Division: ``tl.math.div_rn`` (IEEE round-to-nearest division: ``div.rn.f32`` on NVIDIA;
  ``np.divide`` on float32 in the interpreter). Triton's ``/`` on float32 lowers to an
  approximate division on NVIDIA and is not used. The division by 7 uses it too.
- Rounding: :func:`round_half_even` uses only ``floor``, a subtraction that is exact for
  ``|v| < 2**23`` and comparisons, so it is exact in the interpreter and on the GPU without
  relying on the FP rounding mode, on libdevice (``rint`` is an extern call the interpreter
  cannot run) or on the compiler keeping a magic-number ``(v + 1.5 * 2**23) - 1.5 * 2**23``.
  ``x / scale`` is clamped to ``[-8, 7]`` first, which commutes with rounding.
- Inputs must be finite (as for ``ops``: an infinite or NaN row has no defined codes).
- Flush-to-zero cannot change a code or a scale: a subnormal ``x`` gives code 0 either way
  and a subnormal row maximum the floor scale ``1e-8`` either way. (In the sm_90 PTX, which
  ``benchmarks/gpu_kernels.py --compile-only`` builds without a GPU, ``floor`` is
  ``cvt.rmi.ftz.f32``, the divisions ``div.rn.f32``, ``mul``/``sub`` plain round-to-nearest;
  FMA contraction only touches the epilogue, never the quantizer.)

Kernels: ``_quantize_rows_kernel`` (codes + scales, exposed by :func:`quantize_activations`)
and ``w4a4_gemm_kernel``, which either reads those codes or, with ``FUSED``, recomputes the
row scales and the codes itself (one launch; the better choice for small ``M``, where
re-reading ``x`` per column block is cheap).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from quota_compile.kernels import is_interpreted
from quota_compile.kernels.reference import w4a4_matmul_reference
from quota_compile.quant import ops

ACT_BITS = 4
FUSED_MAX_M = 64  # default: quantize inside the GEMM for at most this many rows
GROUP_M = 8  # tile swizzle: column blocks of GROUP_M row blocks share the weight tiles in L2
_INTERPRET_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16}  # small fixed tiles keep the interpreter fast
_QUANT_BLOCK_M = 4


# ---------------------------------------------------------------------------- jit helpers


@triton.jit
def round_half_even(v):
    """Nearest integer of float32 ``v`` (``|v| < 2**22``), ties to even, as int32.

    For ``a = |v|``: ``floor(a)`` is exact and so is ``a - floor(a)`` (both operands share
    ``a``'s quantum), hence the tie test ``d == 0.5`` is exact.
    """
    a = tl.abs(v)
    r = tl.floor(a)
    d = a - r
    ri = r.to(tl.int32)
    up = (d > 0.5) | ((d == 0.5) & ((ri & 1) == 1))
    ri = ri + up.to(tl.int32)
    return tl.where(v < 0, -ri, ri)


@triton.jit
def quantize_codes(x, scale):
    """INT4 codes (int8) of float32 ``x`` with the broadcastable float32 ``scale``."""
    v = tl.math.div_rn(x, scale)
    v = tl.minimum(tl.maximum(v, -8.0), 7.0)
    return round_half_even(v).to(tl.int8)


@triton.jit
def row_scale(amax, clip):
    """``max((amax * clip) / 7, 1e-8)`` in float32, the division correctly rounded."""
    return tl.maximum(tl.math.div_rn(amax * clip, 7.0), 1e-8)


@triton.jit
def rows_absmax(x_ptr, offs_m, m_mask, K, stride_xm, BLOCK_K: tl.constexpr):
    """float32 ``max |x|`` of the rows ``offs_m`` (masked rows give 0)."""
    amax = tl.zeros_like(offs_m).to(tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = m_mask[:, None] & (offs_k < K)[None, :]
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask, other=0.0)
        amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), axis=1))
    return amax


@triton.jit
def _load_int4_halves(w_ptr, offs_k, k_mask, offs_j, half_n):
    """Signed INT4 weights of rows ``offs_k`` and packed columns ``offs_j`` as two int8 tiles
    ``[BLOCK_K, BLOCK_J]``: byte ``j`` of a row holds column ``2j`` (low nibble, first tile)
    and column ``2j + 1`` (high nibble, second tile)."""
    mask = k_mask[:, None] & (offs_j < half_n)[None, :]
    packed = tl.load(w_ptr + offs_k[:, None] * half_n + offs_j[None, :], mask=mask, other=0)
    s = packed.to(tl.int8, bitcast=True)
    return (s << 4) >> 4, s >> 4  # arithmetic shifts sign-extend the nibbles


@triton.jit
def tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row block, column block) of this program, row blocks grouped by ``GROUP_M``."""
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * grid_n
    first_m = (pid // per_group) * GROUP_M
    rows = tl.minimum(grid_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % rows, (pid % per_group) // rows


# ---------------------------------------------------------------------------- kernels


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, clip,
                          BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Codes ``q [M, K]`` (int8, contiguous) and scales ``s [M]`` (float32) of ``x``."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    scale = row_scale(rows_absmax(x_ptr, offs_m, m_mask, K, stride_xm, BLOCK_K), clip)
    tl.store(s_ptr + offs_m, scale, mask=m_mask)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = m_mask[:, None] & (offs_k < K)[None, :]
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask, other=0.0)
        q = quantize_codes(x.to(tl.float32), scale[:, None])
        tl.store(q_ptr + offs_m[:, None] * K + offs_k[None, :], q, mask=mask)


@triton.jit
def _load_operands(a_ptr, w_ptr, offs_m, m_mask, offs_j, offs_k, k_mask, a_scale, stride_am, N,
                   FUSED: tl.constexpr):
    """Activation codes ``[BLOCK_M, BLOCK_K]`` (int8; quantized here when ``FUSED``) and the
    even- and odd-column weight tiles of the rows ``offs_k``."""
    a_mask = m_mask[:, None] & k_mask[None, :]
    a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :], mask=a_mask, other=0)
    if FUSED:
        a = quantize_codes(a.to(tl.float32), a_scale[:, None])
    w_even, w_odd = _load_int4_halves(w_ptr, offs_k, k_mask, offs_j, N // 2)
    return a, w_even, w_odd


@triton.jit
def _add_group(acc, dots, w_scale_ptr, group, N, cols, col_mask):
    """``acc + float(dots) * w_scale[group, cols]`` (one group's integer sums, scaled)."""
    w_scale = tl.load(w_scale_ptr + group * N + cols, mask=col_mask, other=0.0)
    return acc + dots.to(tl.float32) * w_scale[None, :]


@triton.jit
def w4a4_gemm_kernel(a_ptr, a_scale_ptr, w_ptr, w_scale_ptr, bias_ptr, out_ptr,
                      M, N, K, group_size, clip, stride_am, stride_om,
                      FUSED: tl.constexpr, HAS_BIAS: tl.constexpr, TILE_GROUPS: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_M: tl.constexpr):
    """``out [M, N]`` of the W4A4 linear; ``a`` is float ``x`` when ``FUSED`` (codes and row
    scales computed here), else its int8 codes with float32 row scales ``a_scale [M]``.

    The even and odd output columns (low and high nibbles) are two dots of ``BLOCK_N / 2``
    columns, interleaved only in the epilogue: feeding an interleaved (reshaped) weight tile
    to the dot breaks Triton 3.8's Hopper (wgmma) shared-layout pass. When a group is one
    ``BLOCK_K`` tile the K loop is flat (software-pipelined); larger groups (per channel) nest
    a pipelined loop over the group's tiles. ``TILE_GROUPS``: ``group_size == BLOCK_K``.
    """
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_j = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
    m_mask = offs_m < M
    j_mask = offs_j < N // 2
    if FUSED:
        a_scale = row_scale(rows_absmax(a_ptr, offs_m, m_mask, K, stride_am, BLOCK_K), clip)
    else:
        a_scale = tl.load(a_scale_ptr + offs_m, mask=m_mask, other=1.0)
    acc_even = tl.zeros((BLOCK_M, BLOCK_N // 2), dtype=tl.float32)
    acc_odd = tl.zeros((BLOCK_M, BLOCK_N // 2), dtype=tl.float32)
    if TILE_GROUPS:
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            a, w_even, w_odd = _load_operands(a_ptr, w_ptr, offs_m, m_mask, offs_j, offs_k, offs_k < K,
                                              a_scale, stride_am, N, FUSED)
            acc_even = _add_group(acc_even, tl.dot(a, w_even, out_dtype=tl.int32), w_scale_ptr,
                                  k0 // BLOCK_K, N, 2 * offs_j, j_mask)
            acc_odd = _add_group(acc_odd, tl.dot(a, w_odd, out_dtype=tl.int32), w_scale_ptr,
                                 k0 // BLOCK_K, N, 2 * offs_j + 1, j_mask)
    else:
        for g0 in range(0, K, group_size):
            dot_even = tl.zeros((BLOCK_M, BLOCK_N // 2), dtype=tl.int32)
            dot_odd = tl.zeros((BLOCK_M, BLOCK_N // 2), dtype=tl.int32)
            for kk in range(0, group_size, BLOCK_K):
                offs_g = kk + tl.arange(0, BLOCK_K)
                a, w_even, w_odd = _load_operands(a_ptr, w_ptr, offs_m, m_mask, offs_j, g0 + offs_g,
                                                  offs_g < group_size, a_scale, stride_am, N, FUSED)
                dot_even = tl.dot(a, w_even, dot_even, out_dtype=tl.int32)
                dot_odd = tl.dot(a, w_odd, dot_odd, out_dtype=tl.int32)
            acc_even = _add_group(acc_even, dot_even, w_scale_ptr, g0 // group_size, N, 2 * offs_j, j_mask)
            acc_odd = _add_group(acc_odd, dot_odd, w_scale_ptr, g0 // group_size, N, 2 * offs_j + 1, j_mask)
    out = tl.interleave(acc_even, acc_odd) * a_scale[:, None]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :],
             out.to(out_ptr.dtype.element_ty), mask=out_mask)


def _gemm_configs() -> list[triton.Config]:
    """A small autotuning list for GPUs: thin tiles for decode-sized M, wide ones for prefill."""
    tiles = [(16, 32, 4, 4), (16, 64, 4, 4), (16, 128, 4, 4), (32, 128, 4, 4),
             (64, 128, 4, 4), (64, 256, 8, 3), (128, 128, 8, 3), (128, 256, 8, 3)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in tiles]


def _prune_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop row tiles more than twice the (power-of-two rounded) row count."""
    limit = max(16, 2 * triton.next_power_of_2(int(named_args["M"])))
    return [c for c in configs if c.kwargs["BLOCK_M"] <= limit]


_w4a4_gemm_tuned = triton.autotune(
    configs=_gemm_configs(), key=["M", "N", "K", "group_size", "FUSED", "TILE_GROUPS"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(w4a4_gemm_kernel)


# ---------------------------------------------------------------------------- host side


def _block_k(group_size: int) -> int:
    """The largest of 128, 64, 32 dividing ``group_size`` (32, masked, when none does)."""
    return next((b for b in (128, 64, 32) if group_size % b == 0), 32)


def check_device(t: torch.Tensor) -> None:
    if not t.is_cuda and not is_interpreted(w4a4_gemm_kernel):
        raise RuntimeError("the Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 set before "
                           "triton is first imported (CPU interpreter)")


def check_linear_args(x: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor,
                       group_size: int, bias: torch.Tensor | None) -> tuple[int, int]:
    """``(K, N)`` of a valid call; raises ``ValueError`` naming the first inconsistency."""
    k, n = x.shape[-1], w_scale.shape[-1]
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x must be float16, bfloat16 or float32, not {x.dtype}")
    if group_size <= 0 or k % group_size:
        raise ValueError(f"group size {group_size} does not divide K = {k}")
    if n % 2:
        raise ValueError(f"N = {n} must be even (INT4 pairs are adjacent along N)")
    if w_scale.shape != (k // group_size, n) or w_scale.dtype != torch.float32:
        raise ValueError(f"w_scale must be float32 [{k // group_size}, {n}], got {w_scale.dtype} "
                         f"{list(w_scale.shape)}")
    if w_packed.dtype != torch.uint8 or w_packed.numel() != k * n // 2:
        raise ValueError(f"w_packed must be uint8 with K*N/2 = {k * n // 2} bytes")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must have shape [{n}], got {list(bias.shape)}")
    if max(k * n // 2, x.numel(), x.numel() // k * n) >= 2**31:
        raise ValueError("tensor too large for the kernels' int32 offsets")
    return k, n


def quantize_activations(x: torch.Tensor, clip_ratio: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton per-token INT4 quantization of ``x [..., K]``: codes (int8, ``x``'s shape) and
    float32 scales ``[..., 1]``, bit-identical to ``ops.quantize_per_token(x.float(), 4, clip)``."""
    check_device(x)
    k = x.shape[-1]
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    codes = torch.empty((m, k), dtype=torch.int8, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m and k:
        grid = (triton.cdiv(m, _QUANT_BLOCK_M),)
        _quantize_rows_kernel[grid](x2, codes, scale, m, k, x2.stride(0), float(clip_ratio),
                                    BLOCK_M=_QUANT_BLOCK_M, BLOCK_K=128)
    return codes.reshape(x.shape), scale.reshape(*x.shape[:-1], 1)


def quantize_activations_reference(x: torch.Tensor, clip_ratio: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """What :func:`quantize_activations` must return: ``ops.quantize_per_token`` in float32."""
    return ops.quantize_per_token(x.to(torch.float32), ACT_BITS, clip_ratio)


def _launch_gemm(a: torch.Tensor, a_scale: torch.Tensor, w_packed: torch.Tensor,
                 w_scale: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
                 group_size: int, clip_ratio: float, fused: bool) -> None:
    m, k = a.shape
    n = out.shape[1]
    args = (a, a_scale, w_packed, w_scale, w_scale if bias is None else bias, out,
            m, n, k, group_size, float(clip_ratio), a.stride(0), out.stride(0))
    block_k = _block_k(group_size)
    flags = {"FUSED": fused, "HAS_BIAS": bias is not None, "TILE_GROUPS": block_k == group_size,
             "BLOCK_K": block_k, "GROUP_M": GROUP_M}
    if is_interpreted(w4a4_gemm_kernel):
        bm, bn = _INTERPRET_BLOCKS["BLOCK_M"], _INTERPRET_BLOCKS["BLOCK_N"]
        grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
        w4a4_gemm_kernel[grid](*args, **flags, BLOCK_M=bm, BLOCK_N=bn)
        return

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    _w4a4_gemm_tuned[grid](*args, **flags)


def w4a4_linear(x: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor, group_size: int,
                clip_ratio: float = 1.0, bias: torch.Tensor | None = None, *,
                out_dtype: torch.dtype | None = None, fused: bool | None = None) -> torch.Tensor:
    """``x [..., K] -> [..., N]``: the W4A4 linear (module docstring), one Triton GEMM.

    ``w_packed``: ``ops.pack_int4`` of the ``[K, N]`` codes; ``w_scale [K/group_size, N]``
    float32; ``bias [N]`` optional. ``out_dtype`` defaults to ``x``'s dtype. ``fused`` (launch
    option): quantize inside the GEMM instead of a separate pass; default ``M <= 64``.
    """
    check_device(x)
    k, n = check_linear_args(x, w_packed, w_scale, group_size, bias)
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    out = torch.empty((m, n), dtype=out_dtype or x.dtype, device=x.device)
    if m:
        fused = m <= FUSED_MAX_M if fused is None else fused
        if fused:
            a, a_scale = x2, w_scale  # a_scale unused by the fused kernel
        else:
            a, a_scale = quantize_activations(x2, clip_ratio)
        _launch_gemm(a, a_scale, w_packed.reshape(-1), w_scale.contiguous(),
                     None if bias is None else bias.contiguous(), out, group_size, clip_ratio, fused)
    return out.reshape(*x.shape[:-1], n)


def w4a4_linear_reference(x: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor,
                          group_size: int, clip_ratio: float = 1.0, bias: torch.Tensor | None = None,
                          *, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """PyTorch reference of :func:`w4a4_linear`, same arguments (less the launch option):
    :func:`quantize_activations_reference`, then :func:`w4a4_matmul_reference`.

    On CUDA tensors ``ops.quantize_per_token`` runs torch's CUDA kernels, whose division by the
    Python scalar 7 may be a multiplication by its reciprocal (not correctly rounded); the CPU
    is the definition (and what ONNX Runtime computes), so quantize on the CPU to compare codes
    bit for bit, as ``benchmarks/gpu_kernels.py`` does.
    """
    k, n = check_linear_args(x, w_packed, w_scale, group_size, bias)
    codes, scale = quantize_activations_reference(x.reshape(-1, k), clip_ratio)
    out = w4a4_matmul_reference(codes, scale, w_packed, w_scale, group_size, bias)
    return out.to(out_dtype or x.dtype).reshape(*x.shape[:-1], n)
