"""``torch.ops.quota.w4a4_linear`` and ``torch.ops.quota.kv_decode_attention``: the W4A4 Linear
and the decode attention over the quantized KV cache as one operator each, for the PyTorch
execution path (:mod:`quota_compile.flavours.torch_path`).

``w4a4_linear(x, packed, scale, k, n, group_size, clip_ratio) = qdq_per_token(x, 4,
clip_ratio) @ dequantize_int4(packed, scale, k, n, group_size)``: the same codes, the product
computed as integers per weight group (``quota_compile.kernels.w4a4_linear``).
``w4a4_linear_kmajor(x, w_kmajor, scale, k, n, group_size, clip_ratio)``: the same over the
weight in the K-major layout (``quota_compile.kernels.w4a4_kmajor``), which the PyTorch path
uses with ``weight_layout="kmajor"`` (``passes/use_kmajor_weights.py``).

``kv_decode_attention(q, k_codes, v_codes, k_scale, v_scale, k_zero_point, v_zero_point,
k_new, v_new, bias, sm_scale, bits, granularity)``: one decode layer's attention as the decode
program builds it (``programs._Program._layer``): the past cache as stored (``per_token``:
codes, scales, zero points; ``per_channel``: codes and the static ``[Hkv, 1, D]`` scales, no
zero points), the new token's dequantized key and value ``[B, Hkv, 1, D]`` appended after it,
the KV heads repeated for the ``H`` query heads of ``q [B, H, 1, D]``, scores times
``sm_scale`` plus the additive mask ``bias [B, 1, 1, T + 1]``, float32 softmax, times the
values: ``[B, H, 1, D]`` in ``q``'s dtype (where the graph's last attention matmul was). The
kernel (``quota_compile.kernels.kv_attention.kv_decode_attention``) reads the cache in place:
no concatenation, no dequantized copy.

Each runs
- on CUDA tensors: the Triton kernel;
- on CPU tensors: the Triton kernel too when triton runs in its interpreter
  (``TRITON_INTERPRET=1`` before triton is first imported: how the tests check the kernel
  path on a machine without a GPU), unless held to the simulation by :func:`simulated_on_cpu`;
  otherwise the simulation's own arithmetic (the quota ops and PyTorch operations the traced
  graph had), so a CPU run needs no triton. :func:`cpu_uses_kernel` says which applies.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from quota_compile.quant import ops  # noqa: F401  (registers torch.ops.quota.*, used below)
from quota_compile.kernels.reference import dequantize_cache, unpack_int4_kmajor
from quota_compile.quant.attention import decode_attention_reference


def _kernel_module():
    from quota_compile.kernels import w4a4_linear as mod

    return mod


def _kmajor_module():
    from quota_compile.kernels import w4a4_kmajor as mod

    return mod


def _attention_module():
    from quota_compile.kernels import kv_attention as mod

    return mod


def _interpreted(kernel_of) -> bool:
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    from quota_compile.kernels import available, is_interpreted

    return available() and is_interpreted(kernel_of())


OPERATORS = ("w4a4_linear", "w4a4_linear_kmajor", "kv_decode_attention")
_SIMULATED: set[str] = set()  # operators held to the simulation's arithmetic (simulated_on_cpu)


@contextlib.contextmanager
def simulated_on_cpu(*operators: str) -> Iterator[None]:
    """Within the block, the named operators (of :data:`OPERATORS`) compute on CPU tensors with
    the simulation's own arithmetic even where triton runs in its interpreter (where it does
    not, they do so anyway): to check one operator's kernel at a time, or to spare the
    interpreter's time. CUDA tensors still run the kernels."""
    unknown = set(operators) - set(OPERATORS)
    if unknown:
        raise ValueError(f"simulated_on_cpu: unknown operators {sorted(unknown)}; known: {OPERATORS}")
    added = set(operators) - _SIMULATED
    _SIMULATED.update(added)
    try:
        yield
    finally:
        _SIMULATED.difference_update(added)


def cpu_uses_kernel(operator: str) -> bool:
    """Whether ``quota.<operator>`` runs its Triton kernel (interpreted) on CPU tensors here."""
    if operator not in OPERATORS:
        raise ValueError(f"cpu_uses_kernel: unknown operator {operator!r}; known: {OPERATORS}")
    if operator in _SIMULATED:
        return False
    if operator == "w4a4_linear":
        return _interpreted(lambda: _kernel_module().w4a4_gemm_kernel)
    if operator == "w4a4_linear_kmajor":
        return _interpreted(lambda: _kmajor_module().w4a4_gemm_kmajor_kernel)
    return _interpreted(lambda: _attention_module()._decode_split_kernel)


def _cpu_uses_kernel() -> bool:
    return cpu_uses_kernel("w4a4_linear")


def _cpu_uses_attention_kernel() -> bool:
    return cpu_uses_kernel("kv_decode_attention")


@torch.library.custom_op("quota::w4a4_linear", mutates_args=())
def w4a4_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, k: int, n: int, group_size: int, clip_ratio: float) -> torch.Tensor:
    """``[..., K] -> [..., N]``: INT4 per-token activations x INT4 group-wise weights."""
    if x.is_cuda or _cpu_uses_kernel():
        return _kernel_module().w4a4_linear(x, packed, scale, group_size, clip_ratio)
    w = torch.ops.quota.dequantize_int4(packed, scale, k, n, group_size)
    return torch.ops.quota.qdq_per_token(x, 4, clip_ratio) @ w


@torch.library.custom_op("quota::w4a4_linear_kmajor", mutates_args=())
def w4a4_linear_kmajor(x: torch.Tensor, w_kmajor: torch.Tensor, scale: torch.Tensor, k: int, n: int, group_size: int,
                       clip_ratio: float) -> torch.Tensor:
    """``quota.w4a4_linear`` over the K-major weight (``uint8 [N, K/2]``,
    :func:`~quota_compile.kernels.reference.pack_int4_kmajor`): the same codes, so the same
    values on the CPU; the K-major Triton kernel on CUDA."""
    if x.is_cuda or cpu_uses_kernel("w4a4_linear_kmajor"):
        return _kmajor_module().w4a4_linear_kmajor(x, w_kmajor, scale, group_size, clip_ratio)
    w = ops.dequantize_weight(unpack_int4_kmajor(w_kmajor, k), scale, group_size).to(scale.dtype)
    return torch.ops.quota.qdq_per_token(x, 4, clip_ratio) @ w


def _check_decode_attention(q, k_codes, v_codes, k_zero_point, v_zero_point, k_new, v_new, bias, granularity) -> tuple[int, int, int, int, int]:
    """``(B, H, Hkv, T, D)``; raises ``ValueError`` where the graph-level shapes disagree (the
    kernel checks the cache layouts itself)."""
    if q.dim() != 4 or q.shape[2] != 1:
        raise ValueError(f"kv_decode_attention: the query must be [B, H, 1, D] (one new token), got {list(q.shape)}")
    b, h, _, d = q.shape
    if k_codes.dim() != 4 or v_codes.shape != k_codes.shape:
        raise ValueError(f"kv_decode_attention: past codes must be [B, Hkv, T, D or D/2], got {list(k_codes.shape)}, {list(v_codes.shape)}")
    hkv, t = k_codes.shape[1], k_codes.shape[2]
    for name, x in (("k_new", k_new), ("v_new", v_new)):
        if x.shape != (b, hkv, 1, d):
            raise ValueError(f"kv_decode_attention: {name} must be [B={b}, Hkv={hkv}, 1, D={d}], got {list(x.shape)}")
    if bias.dim() != 4 or bias.shape[1:3] != (1, 1) or bias.shape[0] not in (1, b) or bias.shape[3] != t + 1:
        raise ValueError(f"kv_decode_attention: bias must be [B={b} or 1, 1, 1, T+1={t + 1}], got {list(bias.shape)}")
    if (k_zero_point is None or v_zero_point is None) and granularity == "per_token":
        raise ValueError("kv_decode_attention: the per_token cache needs its zero points")
    return b, h, hkv, t, d


@torch.library.custom_op("quota::kv_decode_attention", mutates_args=())
def kv_decode_attention(q: torch.Tensor, k_codes: torch.Tensor, v_codes: torch.Tensor, k_scale: torch.Tensor,
                        v_scale: torch.Tensor, k_zero_point: torch.Tensor | None, v_zero_point: torch.Tensor | None,
                        k_new: torch.Tensor, v_new: torch.Tensor, bias: torch.Tensor, sm_scale: float, bits: int,
                        granularity: str) -> torch.Tensor:
    """``[B, H, 1, D]``: one decode step's attention over the stored past and the new entry."""
    b, h, hkv, t, d = _check_decode_attention(q, k_codes, v_codes, k_zero_point, v_zero_point, k_new, v_new, bias, granularity)
    if q.is_cuda or _cpu_uses_attention_kernel():
        out = _attention_module().kv_decode_attention(
            q.reshape(b, h, d), k_codes, v_codes, k_scale, v_scale,
            torch.full((b,), t, dtype=torch.int32, device=q.device), bits=bits, granularity=granularity,
            k_zero_point=k_zero_point, v_zero_point=v_zero_point, sm_scale=sm_scale, out_dtype=q.dtype,
            bias=bias.to(torch.float32).expand(b, 1, 1, t + 1).reshape(b, t + 1),
            k_new=k_new.reshape(b, hkv, d), v_new=v_new.reshape(b, hkv, d))
        return out.reshape(b, h, 1, d)
    # the definition of quota::decode_attention over the dequantized cache: what the decode
    # graph computes
    k_past = dequantize_cache(k_codes, k_scale, k_zero_point, bits, granularity).to(q.dtype)
    v_past = dequantize_cache(v_codes, v_scale, v_zero_point, bits, granularity).to(q.dtype)
    return decode_attention_reference(q, k_past, k_new.to(q.dtype), v_past, v_new.to(q.dtype), bias, sm_scale)


@w4a4_linear.register_fake
def _(x, packed, scale, k, n, group_size, clip_ratio):
    return x.new_empty((*x.shape[:-1], n))


@w4a4_linear_kmajor.register_fake
def _(x, w_kmajor, scale, k, n, group_size, clip_ratio):
    return x.new_empty((*x.shape[:-1], n))


@kv_decode_attention.register_fake
def _(q, k_codes, v_codes, k_scale, v_scale, k_zero_point, v_zero_point, k_new, v_new, bias, sm_scale, bits, granularity):
    return q.new_empty(q.shape)
