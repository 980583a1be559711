"""QUOTA's in-graph token selection: score, top-k with a static k, gather.

One definition serves the eager simulation, calibration and the exported graphs:

- :func:`visual_signals` computes, for the visual tokens entering a decoder layer, the three
  signals from tensors the graph has: the attention cue (mean over heads and over the last
  ``q`` real text tokens of the previous layer's softmax attention to each visual token,
  computed from the quantized Q and the quantized K cache), the activation magnitude
  ``||h||`` and the low-bit risk ``||Q(h) - h|| / ||h||`` with the per-token quantizer.
- :func:`token_score` normalises each signal by its sum over the visual tokens (per sample and
  layer) and combines them: ``s = w_att * att + w_mag * mag - w_risk * risk``.
- ``quota::prune_point`` marks a pruning layer in a traced program; it runs
  :func:`gather_visual` (select the top ``k`` by score, ties to the lower index, kept indices
  sorted ascending, then gather hidden states, positions and mask so original RoPE positions
  are kept). The pass ``fold_topk_gather`` replaces each marker by that function's operations,
  whose selection is ``quota::select_topk`` (ONNX: a TopK for the selection, a TopK to sort
  the kept indices ascending).

Text tokens are never dropped: only the visual span ``[visual_start, visual_start + V)`` is
gathered; the prefix before it and the text after it pass through.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quota_compile.quant import ops

SIGNAL_EPS = 1e-12


@dataclass(frozen=True)
class ScoreWeights:
    att: float = 1.0
    mag: float = 0.0
    risk: float = 0.0


def visual_signals(
    h: torch.Tensor,
    probs: torch.Tensor,
    attention_mask: torch.Tensor,
    visual_start: int,
    visual_count: int,
    query_tokens: int,
    act_bits: int,
    clip_ratio: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw ``(att, mag, risk)``, each ``[B, visual_count]``.

    ``h``: layer input ``[B, T, D]``; ``probs``: the previous layer's attention ``[B, H, T, T]``;
    ``attention_mask``: ``[B, T]`` in the current (possibly pruned) index space;
    ``act_bits`` / ``clip_ratio``: the deployed per-token activation quantizer (for the risk).
    """
    a, v = visual_start, visual_count
    t = h.shape[1]
    idx = torch.arange(t, device=h.device)
    length = attention_mask.sum(-1, keepdim=True)  # [B, 1]
    # Query rows: real text tokens after the image, the last ``query_tokens`` of them.
    rows = (idx[None, :] >= a + v) & (idx[None, :] >= length - query_tokens) & attention_mask.bool()
    w = rows.to(probs.dtype)
    w = w / w.sum(-1, keepdim=True).clamp_min(1.0)
    to_visual = probs[:, :, :, a : a + v].mean(dim=1)  # [B, T, V]
    att = torch.einsum("bt,btv->bv", w, to_visual)
    hv = h[:, a : a + v]
    norm = hv.norm(dim=-1)
    q, scale = ops.quantize_per_token(hv, act_bits, clip_ratio)
    err = (q.to(hv.dtype) * scale - hv).norm(dim=-1)
    risk = err / norm.clamp_min(SIGNAL_EPS)
    return att, norm, risk


def normalise(x: torch.Tensor) -> torch.Tensor:
    """Divide by the sum over the visual tokens (per sample): signals become shares."""
    return x / x.sum(-1, keepdim=True).clamp_min(SIGNAL_EPS)


def token_score(att: torch.Tensor, mag: torch.Tensor, risk: torch.Tensor, w: ScoreWeights) -> torch.Tensor:
    return w.att * normalise(att) + w.mag * normalise(mag) - w.risk * normalise(risk)


def duplication_score(h: torch.Tensor, visual_start: int, visual_count: int, pivots: int) -> torch.Tensor:
    """DART's score ``[B, visual_count]`` (duplication-aware token reduction): the ``pivots``
    visual tokens with the largest hidden-state norm are pivots and rank first (among them the
    larger norm first); every other token scores minus its largest cosine similarity to a
    pivot, so the tokens that duplicate a pivot go first. The pivot count is static; all of it
    is standard ops (TopK, Gather, MatMul, ReduceMax, Where)."""
    hv = h[:, visual_start : visual_start + visual_count]
    norm = hv.norm(dim=-1)  # [B, V]
    unit = hv / norm.clamp_min(SIGNAL_EPS)[..., None]
    p = min(pivots, visual_count)
    pivot = torch.topk(norm, p, dim=-1).indices  # [B, p]
    pivot_unit = torch.gather(unit, 1, pivot[..., None].expand(-1, -1, unit.shape[-1]))  # [B, p, D]
    duplication = torch.matmul(unit, pivot_unit.transpose(1, 2)).amax(dim=-1)  # [B, V], in [-1, 1]
    index = torch.arange(visual_count, device=h.device)
    is_pivot = (index[None, :, None] == pivot[:, None, :]).to(h.dtype).amax(dim=-1) > 0
    return torch.where(is_pivot, 2.0 + normalise(norm), -duplication)


@torch.library.custom_op("quota::select_topk", mutates_args=())
def select_topk(score: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``[B, k]`` (int64, ascending) of the ``k`` largest scores of each row; among
    equal scores the lower index wins (as ONNX TopK defines)."""
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices[:, :k]
    return torch.sort(order, dim=-1).values


@select_topk.register_fake
def _(score: torch.Tensor, k: int) -> torch.Tensor:
    return score.new_empty((score.shape[0], k), dtype=torch.int64)


def gather_visual(
    h: torch.Tensor,
    position_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    visual_index: torch.Tensor,
    score: torch.Tensor,
    k: int,
    visual_start: int,
):
    """Keep the top-``k`` visual tokens of each sample; returns the shortened ``h``,
    ``position_ids``, ``attention_mask`` and the kept tokens' original visual indices."""
    a, v = visual_start, visual_index.shape[1]
    keep = torch.ops.quota.select_topk(score, k)  # [B, k]

    def span(x: torch.Tensor) -> torch.Tensor:
        ix = keep.reshape(*keep.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
        return torch.cat([x[:, :a], torch.gather(x[:, a : a + v], 1, ix), x[:, a + v :]], dim=1)

    return span(h), span(position_ids), span(attention_mask), torch.gather(visual_index, 1, keep)


@torch.library.custom_op("quota::prune_point", mutates_args=())
def prune_point(
    h: torch.Tensor,
    position_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    visual_index: torch.Tensor,
    score: torch.Tensor,
    k: int,
    visual_start: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A pruning layer in a traced program: computes :func:`gather_visual`. The pass
    ``fold_topk_gather`` replaces it by those operations before lowering."""
    return tuple(t.clone() for t in gather_visual(h, position_ids, attention_mask, visual_index, score, k, visual_start))


@prune_point.register_fake
def _(h, position_ids, attention_mask, visual_index, score, k, visual_start):
    drop = visual_index.shape[1] - k
    b, t = h.shape[0], h.shape[1] - drop
    return (
        h.new_empty((b, t, *h.shape[2:])),
        position_ids.new_empty((b, t)),
        attention_mask.new_empty((b, t)),
        visual_index.new_empty((b, k)),
    )
