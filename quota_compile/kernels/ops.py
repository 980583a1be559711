"""``torch.ops.quota.w4a4_linear``: the W4A4 Linear as one operator, for the PyTorch execution
path (:mod:`quota_compile.kernels.torch_path`).

``w4a4_linear(x, packed, scale, k, n, group_size, clip_ratio) = qdq_per_token(x, 4,
clip_ratio) @ dequantize_int4(packed, scale, k, n, group_size)``: the same codes, the product
computed as integers per weight group (``quota_compile.kernels.w4a4_linear``).

- CUDA tensors: the Triton kernel.
- CPU tensors: the Triton kernel too when triton runs in its interpreter
  (``TRITON_INTERPRET=1`` before triton is first imported: how the tests check the kernel
  path on a machine without a GPU); otherwise the simulation's own arithmetic (the two
  quota ops above), so a CPU run needs no triton.
"""

from __future__ import annotations

import os

import torch

from ..quant import ops  # noqa: F401  (registers torch.ops.quota.*, used below)


def _kernel_module():
    from . import w4a4_linear as mod

    return mod


def _cpu_uses_kernel() -> bool:
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    from . import available, is_interpreted

    return available() and is_interpreted(_kernel_module()._w4a4_gemm_kernel)


@torch.library.custom_op("quota::w4a4_linear", mutates_args=())
def w4a4_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, k: int, n: int, group_size: int, clip_ratio: float) -> torch.Tensor:
    """``[..., K] -> [..., N]``: INT4 per-token activations x INT4 group-wise weights."""
    if x.is_cuda or _cpu_uses_kernel():
        return _kernel_module().w4a4_linear(x, packed, scale, group_size, clip_ratio)
    w = torch.ops.quota.dequantize_int4(packed, scale, k, n, group_size)
    return torch.ops.quota.qdq_per_token(x, 4, clip_ratio) @ w


@w4a4_linear.register_fake
def _(x, packed, scale, k, n, group_size, clip_ratio):
    return x.new_empty((*x.shape[:-1], n))

