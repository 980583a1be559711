"""The deployed quantizers (docs/quantization.md), as PyTorch custom ops.

One definition serves the eager simulation (calibration, the verification reference) and the
exported graph: the pass ``insert_qdq`` puts these very ops into the traced program, and
``quota_compile.export.onnx_translation`` lowers each to standard ONNX QuantizeLinear /
DequantizeLinear with the same arithmetic, in the same order of floating-point operations, so
that PyTorch and onnxruntime produce the same integers (round half to even, saturation).

Integer conventions
- activations: signed, symmetric, per token: ``scale = max(clip_ratio * max|x| / qmax, eps)``;
  ``q = clamp(round(x / scale), -qmax - 1, qmax)``.
- weights: signed INT4, symmetric, per output channel in groups of ``group_size`` along the
  input dimension; stored transposed ``[K, N]`` (the MatMul layout), two values per byte, the
  even flat index in the low nibble (the ONNX INT4 layout).
- KV cache: unsigned, asymmetric, per token and head (the group is ``head_dim``):
  ``lo = min(min x, 0)``, ``hi = max(max x, 0)``, ``scale = max((hi - lo) / (2**bits - 1), eps)``,
  ``zero_point = clamp(round(-lo / scale), 0, 2**bits - 1)``,
  ``q = clamp(round(x / scale) + zero_point, 0, 2**bits - 1)``. INT4 codes are packed two per
  byte along ``head_dim`` (even channel in the low nibble); scales are float32 and zero points
  uint8, both ``[..., 1]``. This is the ``per_token`` granularity.
- KV cache, ``per_channel`` granularity: signed, symmetric, one static scale per KV head and
  channel, calibrated (``scale [Hkv, 1, D]`` float32, a constant of the graph):
  ``q = clamp(round(x / scale), -2**(bits-1), 2**(bits-1) - 1)``, stored as the unsigned code
  ``q + 2**(bits-1)`` (``uint8``; INT4 packed two per byte along ``head_dim``, even channel in
  the low nibble). For INT4 that is exactly the cache layout of onnxruntime's
  GroupQueryAttention (nibble = q + 8); its INT8 cache is ``int8`` q, i.e. our code - 128.
"""

from __future__ import annotations

import torch

# Floor for every scale: keeps all-zero rows finite (they quantize to 0 and dequantize to 0).
SCALE_EPS = 1e-8


def signed_range(bits: int) -> tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


# ---------------------------------------------------------------- rounding margins (verification)


def rounding_margin(v: torch.Tensor, lo: float | torch.Tensor, hi: float | torch.Tensor) -> torch.Tensor:
    """Distance, in code steps, of each value ``v`` about to be rounded (``x / scale``) from the
    nearest rounding boundary that can change its code once clamped to ``[lo, hi]``: the
    half-integers ``n + 0.5`` for ``lo <= n < hi`` (beyond them the clamp gives the same code
    either way). A value this close to a boundary can round either way under float
    reassociation of the arithmetic that produced it (verification:
    ``verify.rounding_tie_tolerance``)."""
    n = torch.minimum(torch.maximum(torch.floor(v), torch.as_tensor(lo, dtype=v.dtype)), torch.as_tensor(hi, dtype=v.dtype) - 1)
    return (v - n - 0.5).abs()


def per_token_margins(x: torch.Tensor, bits: int, clip_ratio: float) -> torch.Tensor:
    """:func:`rounding_margin` of each value :func:`quantize_per_token` rounds (same shape as ``x``)."""
    qmin, qmax = signed_range(bits)
    return rounding_margin(x / per_token_scale(x, bits, clip_ratio), qmin, qmax)


# ---------------------------------------------------------------- activations (per token)


def per_token_scale(x: torch.Tensor, bits: int, clip_ratio: float) -> torch.Tensor:
    """Dynamic symmetric scale per row of the last dimension, float32, shape ``[..., 1]``."""
    _, qmax = signed_range(bits)
    amax = x.abs().amax(dim=-1, keepdim=True)
    if clip_ratio != 1.0:
        amax = amax * clip_ratio
    return torch.clamp_min(amax / float(qmax), SCALE_EPS)


def quantize_per_token(x: torch.Tensor, bits: int, clip_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer codes (int8 holding ``bits``-bit values) and scales of ``x``."""
    qmin, qmax = signed_range(bits)
    scale = per_token_scale(x, bits, clip_ratio)
    q = torch.clamp(torch.round(x / scale), qmin, qmax).to(torch.int8)
    return q, scale


@torch.library.custom_op("quota::qdq_per_token", mutates_args=())
def qdq_per_token(x: torch.Tensor, bits: int, clip_ratio: float) -> torch.Tensor:
    """Quantize-dequantize of an activation, per token (row of the last dimension)."""
    q, scale = quantize_per_token(x, bits, clip_ratio)
    return q.to(x.dtype) * scale


@qdq_per_token.register_fake
def _(x: torch.Tensor, bits: int, clip_ratio: float) -> torch.Tensor:
    return torch.empty_like(x)


# ---------------------------------------------------------------- weights (group-wise INT4)


def quantize_weight_rtn(weight: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest symmetric group-wise quantization of a Linear weight ``[N, K]``.

    Returns the codes transposed to ``[K, N]`` (int8) and the scales ``[K // group_size, N]``
    (float32): the layout of a blocked DequantizeLinear with ``axis=0``.
    """
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"group size {group_size} does not divide the input dimension {k}")
    qmin, qmax = signed_range(bits)
    w = weight.detach().to(torch.float32).t().reshape(k // group_size, group_size, n)
    scale = torch.clamp_min(w.abs().amax(dim=1) / float(qmax), SCALE_EPS)  # [K/g, N]
    q = torch.clamp(torch.round(w / scale[:, None, :]), qmin, qmax)
    return q.reshape(k, n).to(torch.int8), scale


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[K, N]`` float32 weight from codes ``[K, N]`` and scales ``[K // group_size, N]``."""
    k, n = q.shape
    # each group's scale broadcast over its rows: one float32 product per element, the same
    # values as repeating the scales row by row, without materialising the repeated scales
    return (q.reshape(k // group_size, group_size, n).to(torch.float32) * scale[:, None, :]).reshape(k, n)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack int8 codes in [-8, 7] two per byte along the flattened tensor (even index low)."""
    flat = q.reshape(-1).to(torch.int16) & 0xF
    if flat.numel() % 2:
        raise ValueError("INT4 packing needs an even number of elements")
    return (flat[0::2] | (flat[1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor, shape: tuple[int, ...] | list[int]) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: signed int8 codes of the given shape."""
    p = packed.reshape(-1).to(torch.int16)
    nibbles = torch.stack([p & 0xF, (p >> 4) & 0xF], dim=-1).reshape(-1)
    signed = torch.where(nibbles >= 8, nibbles - 16, nibbles)
    return signed.to(torch.int8).reshape(tuple(shape))


@torch.library.custom_op("quota::qdq_weight", mutates_args=())
def qdq_weight(weight: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Fake-quantized Linear weight, returned in the MatMul layout ``[K, N]``."""
    q, scale = quantize_weight_rtn(weight, bits, group_size)
    return dequantize_weight(q, scale, group_size).to(weight.dtype)


@qdq_weight.register_fake
def _(weight: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    return weight.new_empty((weight.shape[1], weight.shape[0]))


@torch.library.custom_op("quota::dequantize_int4", mutates_args=())
def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, k: int, n: int, group_size: int) -> torch.Tensor:
    """``[K, N]`` float weight from packed INT4 codes (``uint8[K*N/2]``) and scales ``[K/g, N]``."""
    return dequantize_weight(unpack_int4(packed, (k, n)), scale, group_size).to(scale.dtype)


@dequantize_int4.register_fake
def _(packed: torch.Tensor, scale: torch.Tensor, k: int, n: int, group_size: int) -> torch.Tensor:
    return scale.new_empty((k, n))


def quantize_rows_rtn(table: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """RTN symmetric quantization of an embedding table ``[V, D]`` in groups along D: codes
    ``[V, D]`` (int8) and scales ``[V, D // group_size]`` (float32)."""
    codes, scale = quantize_weight_rtn(table, bits, group_size)  # as a Linear [N=V, K=D]
    return codes.t().contiguous(), scale.t().contiguous()


@torch.library.custom_op("quota::dequantize_int4_rows", mutates_args=())
def dequantize_int4_rows(packed: torch.Tensor, scale: torch.Tensor, v: int, d: int, group_size: int) -> torch.Tensor:
    """``[V, D]`` float table from packed INT4 codes (``uint8[V*D/2]``, row-major) and scales
    ``[V, D/g]``."""
    codes = unpack_int4(packed, (v, d)).to(torch.float32)
    return (codes * scale.repeat_interleave(group_size, dim=1)).to(scale.dtype)


@dequantize_int4_rows.register_fake
def _(packed: torch.Tensor, scale: torch.Tensor, v: int, d: int, group_size: int) -> torch.Tensor:
    return scale.new_empty((v, d))


# ---------------------------------------------------------------- KV cache (per token and head)


def _pack_pairs(q: torch.Tensor) -> torch.Tensor:
    """uint8 codes ``[..., D]`` -> ``[..., D/2]``, even channel in the low nibble."""
    pairs = q.reshape(*q.shape[:-1], q.shape[-1] // 2, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def kv_packed_dim(head_dim: int, bits: int) -> int:
    """Last dimension of a stored KV tensor: INT4 codes are packed two per byte."""
    return head_dim // 2 if bits == 4 else head_dim


def _kv_range(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(lo, scale, zero_point)`` of :func:`quantize_kv`, per token and head (``[..., 1]``,
    float32 zero point before its cast)."""
    qmax = float(2**bits - 1)
    lo = torch.clamp(x.amin(dim=-1, keepdim=True), max=0.0)
    hi = torch.clamp(x.amax(dim=-1, keepdim=True), min=0.0)
    scale = torch.clamp_min((hi - lo) / qmax, SCALE_EPS)
    return lo, scale, torch.clamp(torch.round(-lo / scale), 0.0, qmax)


@torch.library.custom_op("quota::quantize_kv", mutates_args=())
def quantize_kv(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric per-token-per-head quantization of K or V ``[B, H, T, D]``.

    Returns ``(codes uint8 [B, H, T, D or D/2], scale float32 [B, H, T, 1], zero_point uint8
    [B, H, T, 1])``.
    """
    qmax = float(2**bits - 1)
    lo, scale, zero_point = _kv_range(x, bits)
    q = torch.clamp(torch.round(x / scale) + zero_point, 0.0, qmax).to(torch.uint8)
    if bits == 4:
        q = _pack_pairs(q)
    return q, scale.to(torch.float32), zero_point.to(torch.uint8)


@quantize_kv.register_fake
def _(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    stat = (*x.shape[:-1], 1)
    codes = (*x.shape[:-1], kv_packed_dim(x.shape[-1], bits))
    return (
        x.new_empty(codes, dtype=torch.uint8),
        x.new_empty(stat, dtype=torch.float32),
        x.new_empty(stat, dtype=torch.uint8),
    )


def unpack_kv_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes ``[..., D]`` from stored KV codes (unpacks INT4 nibbles)."""
    if bits == 8:
        return codes
    return torch.stack([codes & 0xF, codes >> 4], dim=-1).reshape(*codes.shape[:-1], codes.shape[-1] * 2)


@torch.library.custom_op("quota::dequantize_kv", mutates_args=())
def dequantize_kv(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """Float32 K or V ``[B, H, T, D]`` from the stored codes, scales and zero points."""
    q = unpack_kv_codes(codes, bits).to(torch.float32)
    return (q - zero_point.to(torch.float32)) * scale


@dequantize_kv.register_fake
def _(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    # Codes, scales and zero points describe the same tokens: tell the tracer, so their
    # dynamic lengths are one symbol.
    for i in range(codes.dim() - 1):
        torch._check(scale.shape[i] == codes.shape[i])
        torch._check(zero_point.shape[i] == codes.shape[i])
    d = codes.shape[-1] * 2 if bits == 4 else codes.shape[-1]
    return scale.new_empty((*codes.shape[:-1], d))


def qdq_kv(x: torch.Tensor, bits: int) -> torch.Tensor:
    """What attention reads back from a quantized cache entry."""
    codes, scale, zp = torch.ops.quota.quantize_kv(x, bits)
    return torch.ops.quota.dequantize_kv(codes, scale, zp, bits).to(x.dtype)


def kv_margins(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`rounding_margin` of each value :func:`quantize_kv` rounds: the codes' ``x / scale``
    (``[B, H, T, D]``, clamped to ``[-zero_point, qmax - zero_point]``) and the zero points'
    ``-lo / scale`` (``[B, H, T, 1]``)."""
    qmax = float(2**bits - 1)
    lo, scale, zero_point = _kv_range(x, bits)
    return rounding_margin(x / scale, -zero_point, qmax - zero_point), rounding_margin(-lo / scale, 0.0, qmax)


# ---------------------------------------------------------------- KV cache, static per channel


def kv_static_range(bits: int) -> tuple[int, int]:
    """Signed code range of the ``per_channel`` cache; the stored code adds ``-qmin``."""
    return signed_range(bits)


def kv_static_scale(amax: torch.Tensor, bits: int) -> torch.Tensor:
    """Static symmetric scale from a calibrated ``max |x|``: ``max(amax / qmax, eps)``."""
    _, qmax = signed_range(bits)
    return torch.clamp_min(amax.to(torch.float32) / float(qmax), SCALE_EPS)


@torch.library.custom_op("quota::quantize_kv_static", mutates_args=())
def quantize_kv_static(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Stored codes ``uint8 [B, H, T, D or D/2]`` of K or V ``[B, H, T, D]`` with a static
    per-head, per-channel ``scale [H, 1, D]``."""
    qmin, qmax = signed_range(bits)
    q = torch.clamp(torch.round(x.to(torch.float32) / scale), float(qmin), float(qmax)) - float(qmin)
    q = q.to(torch.uint8)
    return _pack_pairs(q) if bits == 4 else q


@quantize_kv_static.register_fake
def _(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], kv_packed_dim(x.shape[-1], bits)), dtype=torch.uint8)


@torch.library.custom_op("quota::dequantize_kv_static", mutates_args=())
def dequantize_kv_static(codes: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Float32 K or V ``[B, H, T, D]`` from ``per_channel`` codes and their static scale."""
    qmin, _ = signed_range(bits)
    q = unpack_kv_codes(codes, bits).to(torch.float32)
    return (q + float(qmin)) * scale


@dequantize_kv_static.register_fake
def _(codes: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    d = codes.shape[-1] * 2 if bits == 4 else codes.shape[-1]
    return scale.new_empty((*codes.shape[:-1], d))


def kv_static_margins(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`rounding_margin` of each value :func:`quantize_kv_static` rounds."""
    qmin, qmax = signed_range(bits)
    return rounding_margin(x.to(torch.float32) / scale, qmin, qmax)
