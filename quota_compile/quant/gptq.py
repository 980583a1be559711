"""GPTQ (Frantar et al., 2022): INT4 weights chosen column by column so that the error each
rounding leaves is compensated by the columns not yet quantized, using the inverse Hessian
of the layer's reconstruction error on calibration inputs.

For a Linear ``y = x W^T`` (``W [N, K]``) and calibration inputs ``X [n, K]``, the Hessian
of ``||X W^T - X Q^T||^2`` with respect to each row of ``W`` is ``H = 2 X^T X / n``. The
codes and scales come out in the same layout and grid as
:func:`quota_compile.quant.ops.quantize_weight_rtn` (symmetric, ``scale = max|w_group| / 7``,
codes clamped to [-8, 7], groups of ``group_size`` along K), so everything downstream (the
simulation, the passes, both ONNX flavours) takes them unchanged.

Choices (all deterministic: no randomness, float64 throughout):
- damping: ``damp * mean(diag(H))`` is added to the diagonal (``damp`` default 0.01);
- dead inputs (``H[i, i] == 0``: an input that is always zero on the calibration set) get
  weight 0 and ``H[i, i] = 1``;
- group scales are computed when the sweep reaches a group's first column, from the weights as
  updated so far (the original GPTQ); with ``act_order`` the columns are visited by decreasing
  ``H[i, i]`` and the group scales are computed up front from the original weights ("static
  groups"), so that a group's columns need not be contiguous in the visiting order;
- the sweep runs in blocks of 128 columns (lazy batch updates), which only changes speed.
"""

from __future__ import annotations

import torch

from quota_compile.quant.ops import SCALE_EPS, signed_range

BLOCK = 128


class HessianAccumulator:
    """Running ``2 X^T X / n`` over the rows of the inputs seen (any leading shape)."""

    def __init__(self, k: int):
        self.h = torch.zeros(k, k, dtype=torch.float64)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(self.h.device, torch.float64)
        m = x.shape[0]
        self.h *= self.n / (self.n + m)
        self.n += m
        self.h += (2.0 / self.n) * (x.T @ x)


def _scale(w: torch.Tensor, qmax: int) -> torch.Tensor:
    """Per-row scale of a ``[N, g]`` slice."""
    return torch.clamp_min(w.abs().amax(dim=1) / float(qmax), SCALE_EPS)


def gptq_quantize(
    weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int, damp: float = 0.01, act_order: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes ``[K, N]`` (int8) and scales ``[K // group_size, N]`` (float32) of ``weight [N, K]``."""
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"group size {group_size} does not divide the input dimension {k}")
    qmin, qmax = signed_range(bits)
    w = weight.detach().to(torch.float64).clone()
    h = hessian.to(torch.float64).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    groups = k // group_size
    scales = torch.zeros(groups, n, dtype=torch.float64)
    if act_order:
        for g in range(groups):
            scales[g] = _scale(w[:, g * group_size : (g + 1) * group_size], qmax)
        perm = torch.argsort(torch.diag(h), descending=True, stable=True)
    else:
        perm = torch.arange(k)
    w, h = w[:, perm], h[perm][:, perm]
    h += damp * torch.mean(torch.diag(h)) * torch.eye(k, dtype=torch.float64)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    codes = torch.zeros(n, k, dtype=torch.float64)
    for i1 in range(0, k, BLOCK):
        i2 = min(i1 + BLOCK, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            g = col // group_size
            if not act_order and col % group_size == 0:
                # the group's columns are i1 + i ... + group_size in this order (no permutation)
                scales[g] = _scale(torch.cat([w1[:, i:], w[:, i2:]], dim=1)[:, :group_size], qmax)
            s = scales[g]
            q = torch.clamp(torch.round(w1[:, i] / s), qmin, qmax)
            codes[:, i1 + i] = q
            err = (w1[:, i] - q * s) / hinv1[i, i]
            w1[:, i:] -= err[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    out = torch.empty_like(codes)
    out[:, perm] = codes
    return out.T.contiguous().to(torch.int8), scales.to(torch.float32)
