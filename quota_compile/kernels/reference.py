"""The kernels' arithmetic in PyTorch, without triton: the W4A4 Linear's integer product, the
K-major INT4 weight layout of :mod:`quota_compile.kernels.w4a4_kmajor`, the
reference of the Triton kernel (:mod:`quota_compile.kernels.w4a4_linear`, which re-exports it)
and of the TensorRT plugin (:mod:`quota_compile.flavours.tensorrt.verify`, which must not import triton: the
test suite imports triton in its interpreter mode first); the KV cache's dequantizer, for the
decode-attention reference (:mod:`quota_compile.kernels.kv_attention`) and the CPU fallback of
``quota.kv_decode_attention`` (:mod:`quota_compile.kernels.ops`)."""

from __future__ import annotations

import torch

from quota_compile.quant import ops


def w4a4_matmul_reference(codes: torch.Tensor, scale: torch.Tensor, w_packed: torch.Tensor,
                          w_scale: torch.Tensor, group_size: int,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """float32 ``[M, N]`` from activation codes ``[M, K]`` (int8) and row scales ``[M, 1]``, in
    the kernel's order of float operations: per group an exact integer dot, times the weight
    scale, the groups summed in order; then times the row scale, plus bias. Any device."""
    k, n = codes.shape[-1], w_scale.shape[-1]
    w_codes = ops.unpack_int4(w_packed, (k, n)).to(torch.float64)
    xq = codes.to(torch.float64)
    acc = torch.zeros((codes.shape[0], n), dtype=torch.float32, device=codes.device)
    for g in range(k // group_size):
        rows = slice(g * group_size, (g + 1) * group_size)
        exact = (xq[:, rows] @ w_codes[rows]).to(torch.float32)  # integers below 2**24: exact
        acc = acc + exact * w_scale[g]
    out = acc * scale
    return out if bias is None else out + bias.to(torch.float32)


def dequantize_cache(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                     bits: int, granularity: str) -> torch.Tensor:
    """Float32 K or V ``[B, Hkv, T, D]`` through ``quant.ops`` (``per_token``: codes, scales, zero
    points; ``per_channel``: codes and the static scales)."""
    if granularity == "per_token":
        return ops.dequantize_kv(codes, scale, zero_point, bits)
    return ops.dequantize_kv_static(codes, scale, bits)


def pack_int4_kmajor(codes: torch.Tensor) -> torch.Tensor:
    """``uint8 [N, K/2]`` from signed INT4 codes ``[K, N]`` (int8 in ``[-8, 7]``): byte
    ``(n, j)`` holds ``codes[j, n]`` in its low nibble and ``codes[j + K/2, n]`` in its high
    nibble."""
    k, n = codes.shape
    if k % 2:
        raise ValueError(f"the K-major INT4 layout needs an even K, got {k}")
    if codes.dtype != torch.int8 or (codes.numel() and (codes.min() < -8 or codes.max() > 7)):
        raise ValueError("codes must be int8 in [-8, 7]")
    t = codes.t().to(torch.int16) & 0xF  # [N, K]
    return (t[:, : k // 2] | (t[:, k // 2:] << 4)).to(torch.uint8).contiguous()


def unpack_int4_kmajor(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4_kmajor`: the codes ``[K, N]`` (int8)."""
    p = packed.to(torch.int16)
    low, high = p & 0xF, (p >> 4) & 0xF
    nibbles = torch.cat([low, high], dim=1)[:, :k]  # [N, K]
    return torch.where(nibbles >= 8, nibbles - 16, nibbles).to(torch.int8).t().contiguous()
