"""The three programs that make a deployed VLM: vision, prefill and one decode step.

They are written once over the Hugging Face modules and run in two modes:
- simulation (``QuantizedModel.fake_quant(True)``, the default): the deployed W4A4 operators
  and the quantized KV cache; the KV tensors they take and return are the stored integer
  codes, scales and zero points. This is the PyTorch reference that verification uses.
- full precision (``fake_quant(False)``): the same function without quantizers; KV tensors are
  float. This is what :mod:`quota_compile.capture.trace` exports; the passes then insert the
  quantizers and turn the KV inputs/outputs into the stored form, giving the simulation's
  signature back.

Layouts (B batch, T prompt length, S past length, V visual tokens, Hkv KV heads, D head dim):
- vision: ``pixel_values [B, 3, H, W] -> image_features [B, V, hidden]``.
- prefill: ``input_ids [B, T]`` (right-padded; the image tokens at the fixed span
  ``[visual_start, visual_start + V)``), ``attention_mask [B, T]``, ``image_features`` ->
  ``logits [B, vocab]`` of each sample's last real token, then per layer ``key, value``
  ``[B, Hkv, T_l, D]`` (float) or ``key, key_scale, key_zero_point, value, ...`` (simulation),
  then, per pruning layer l, ``kept [B, k_l]``: the original indices of the visual tokens it
  keeps. With a :class:`PruneSpec`, layer l processes ``k_l`` visual tokens, so
  ``T_l = T - V + k_l``.
- decode: ``input_ids [B, 1]``, ``position_ids [B, 1]``, ``attention_mask [B, S + 1]`` (the
  unpruned prompt plus generated tokens), then the per-layer past in the same layout with
  length ``S - V + k_l`` -> ``logits [B, vocab]`` and the new token's per-layer KV entries
  (length 1). The runtime appends them to the cache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from quota_compile.config import ActivationQuant
from quota_compile.models.llava import VLM
from quota_compile.pruning.methods import ATTENTION_ONLY, pruning_layers, pruning_method
from quota_compile.pruning.recipe import PruningRecipe
from quota_compile.pruning.score import ScoreWeights, duplication_score, token_score, visual_signals
from quota_compile.quant.attention import attend  # (the module also registers torch.ops.quota.decode_attention)
from quota_compile.quant.simulate import QuantizedModel

KV_FLOAT = ("key", "value")
KV_STORED = ("key", "key_scale", "key_zero_point", "value", "value_scale", "value_zero_point")
# per_channel granularity: the scales are static constants of the graph; only codes cross it.
KV_STATIC = ("key", "value")


def kv_stored_names(granularity: str) -> tuple[str, ...]:
    return KV_STATIC if granularity == "per_channel" else KV_STORED


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class _Program(torch.nn.Module):
    def __init__(self, vlm: VLM, qm: QuantizedModel):
        super().__init__()
        self.hf = vlm.model
        self._qm = qm
        self.kv_bits = qm.kv_bits
        self.num_layers = vlm.num_layers
        self.num_heads = vlm.num_heads
        self.num_kv_heads = vlm.num_kv_heads
        self.head_dim = vlm.head_dim
        # Calibration hook: called with (layer, 0 for key / 1 for value, the float tensor)
        # for every KV entry the program stores.
        self.kv_observer: Callable | None = None
        # Verification hook: the same call, without changing what the program computes (the
        # cache stays quantized); the verification reads the rounding margins from it.
        self.kv_tap: Callable | None = None

    @property
    def simulate(self) -> bool:
        return self._qm.simulating

    @property
    def kv_names(self) -> tuple[str, ...]:
        return kv_stored_names(self._qm.kv_granularity) if self.simulate else KV_FLOAT

    # ------------------------------------------------------------------ decoder pieces
    @property
    def lm(self):
        return self.hf.model.language_model

    def _store(self, x: torch.Tensor, layer: int, which: int) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """KV entry as attention reads it back, and as it is stored."""
        if self.kv_observer is not None:
            self.kv_observer(layer, which, x)
        if self.kv_tap is not None:
            self.kv_tap(layer, which, x)
        if not self.simulate or (self._qm.kv_scales is None and self.kv_observer is not None):
            # (the second case: calibrating the per_channel scales, the cache stays float)
            return x, (x,)
        if self._qm.kv_granularity == "per_channel":
            scale = self._qm.kv_scale(layer, which).to(x.device)
            codes = torch.ops.quota.quantize_kv_static(x, scale, self.kv_bits)
            return torch.ops.quota.dequantize_kv_static(codes, scale, self.kv_bits), (codes,)
        codes, scale, zp = torch.ops.quota.quantize_kv(x, self.kv_bits)
        return torch.ops.quota.dequantize_kv(codes, scale, zp, self.kv_bits), (codes, scale, zp)

    def _load(self, stored: tuple[torch.Tensor, ...], layer: int, which: int) -> torch.Tensor:
        if not self.simulate:
            return stored[0]
        if self._qm.kv_granularity == "per_channel":
            return torch.ops.quota.dequantize_kv_static(stored[0], self._qm.kv_scale(layer, which).to(stored[0].device), self.kv_bits)
        return torch.ops.quota.dequantize_kv(stored[0], stored[1], stored[2], self.kv_bits)

    def _layer(self, i: int, h, cos, sin, bias, past: tuple[torch.Tensor, ...] | None):
        layer = self.lm.layers[i]
        attn = layer.self_attn
        b, t, _ = h.shape
        x = layer.input_layernorm(h)
        q = attn.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        rotation = getattr(attn, "qk_rotation", None)  # quantization.online_rotation
        if rotation is not None:
            q, k = rotation(q), rotation(k)
        k_read, k_out = self._store(k, i, 0)
        v_read, v_out = self._store(v, i, 1)
        if past is None:
            o, probs = attend(q, k_read, v_read, bias, attn.scaling)
        else:  # a decode step: one operator, the semantic form every flavour starts from
            n = len(past) // 2
            k_past, v_past = self._load(past[:n], i, 0), self._load(past[n:], i, 1)
            o, probs = torch.ops.quota.decode_attention(q, k_past, k_read, v_past, v_read, bias, attn.scaling), None
        o = o.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)
        h = h + attn.o_proj(o)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        return h, k_out + v_out, probs

    def _rope(self, h: torch.Tensor, position_ids: torch.Tensor):
        cos, sin = self.lm.rotary_emb(h, position_ids)
        return cos[:, None].to(h.dtype), sin[:, None].to(h.dtype)

    def _logits(self, h_last: torch.Tensor) -> torch.Tensor:
        return self.hf.lm_head(self.lm.norm(h_last))


class VisionProgram(_Program):
    """pixel_values -> projected visual embeddings (vision tower + multi-modal projector)."""

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        cfg = self.hf.config
        out = self.hf.model.vision_tower(pixel_values, output_hidden_states=True)
        layers = cfg.vision_feature_layer
        if isinstance(layers, int):
            feats = out.hidden_states[layers]
        else:
            feats = torch.cat([out.hidden_states[i] for i in layers], dim=-1)
        if cfg.vision_feature_select_strategy == "default":
            feats = feats[:, 1:]
        return self.hf.model.multi_modal_projector(feats)


@dataclass(frozen=True)
class PruneSpec:
    """How the prefill drops visual tokens: ``keep[l]`` visual tokens enter decoder layer l.

    Not a decision of its own: the decision is a
    :class:`quota_compile.pruning.recipe.PruningRecipe`, and :func:`prune_spec_from_recipe`
    derives this from it. It stays a type because the programs need what the recipe does not
    hold in that form: the activation quantizer the risk signal uses, the score weights as the
    score function takes them, the fixed scores materialised (``random``), and a hashable value
    (calibration's weight search also builds one per candidate, without a recipe).
    """

    keep: tuple[int, ...]
    weights: ScoreWeights = ScoreWeights()
    query_tokens: int = 32
    act_bits: int = 4
    act_clip: float = 1.0
    # a fixed score per original visual token instead of the signals (``random``: seeded values)
    random_scores: tuple[float, ...] | None = None
    # DART's duplication score with this many pivots instead of the signals (``dart``)
    pivots: int | None = None

    @property
    def pruning_layers(self) -> list[int]:
        """Layers whose input is shortened (never layer 0: its cue is the previous layer's
        attention)."""
        return pruning_layers(list(self.keep))


def prune_spec_from_recipe(pruning: PruningRecipe, activations: ActivationQuant) -> PruneSpec | None:
    """The selection a recipe describes (``None`` for a method that does not prune, ``none``)."""
    method = pruning_method(pruning.method)
    if not method.prunes:
        return None
    w = pruning.weights or ATTENTION_ONLY
    weights = ScoreWeights(w.att, w.mag, w.risk)
    return PruneSpec(
        tuple(pruning.keep), weights, pruning.query_tokens, activations.bits, activations.clip_ratio, method.fixed_scores(pruning), pruning.pivots
    )


def _causal_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    t = mask.shape[1]
    idx = torch.arange(t, device=mask.device)
    allowed = (idx[None, :] <= idx[:, None])[None, None] & mask[:, None, None, :].bool()
    return torch.where(allowed, 0.0, torch.finfo(dtype).min).to(dtype)


class PrefillProgram(_Program):
    """Prompt (text + image features) -> last-token logits, the per-layer KV cache and, at
    each pruning layer, the original indices of the visual tokens it keeps."""

    def __init__(self, vlm: VLM, qm: QuantizedModel, visual_start: int, visual_count: int, prune: PruneSpec | None = None):
        super().__init__(vlm, qm)
        self.visual_start = visual_start
        self.visual_count = visual_count
        self.prune = prune
        if prune is not None and prune.random_scores is not None:
            self.register_buffer("random_scores", torch.tensor(prune.random_scores, dtype=torch.float32), persistent=False)

    @property
    def pruning_layers(self) -> list[int]:
        return self.prune.pruning_layers if self.prune else []

    def _score(self, h, probs, mask, visual_index) -> torch.Tensor:
        p = self.prune
        if p.random_scores is not None:
            return self.random_scores[visual_index]
        if p.pivots is not None:
            return duplication_score(h, self.visual_start, visual_index.shape[1], p.pivots)
        att, mag, risk = visual_signals(
            h, probs, mask, self.visual_start, visual_index.shape[1], p.query_tokens, p.act_bits, p.act_clip
        )
        return token_score(att, mag, risk, p.weights)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_features: torch.Tensor):
        return self.run(input_ids, attention_mask, image_features)

    def run(self, input_ids, attention_mask, image_features, observe: Callable | None = None):
        """The prefill; ``observe(layer, h, probs, mask, visual_index)`` is called at the input of
        every layer after the first (before any pruning there), for calibration."""
        state = self.begin(input_ids, attention_mask, image_features, observe)
        for _ in range(self.num_layers):
            state = self.step(state)
        return self.finish(state)

    # The prefill in pieces, for layer-major calibration (quota_compile.capture.sequential): ``begin``
    # (embeddings), one ``step`` per decoder layer, ``finish`` (final norm and lm_head). ``run``
    # is exactly these, so a pass driven layer by layer computes the same tensors.
    def begin(self, input_ids, attention_mask, image_features, observe: Callable | None = None) -> PrefillState:
        a, v = self.visual_start, self.visual_count
        text = self.lm.embed_tokens(input_ids)
        h = torch.cat([text[:, :a], image_features.to(text.dtype), text[:, a + v :]], dim=1)
        b = h.shape[0]
        mask = attention_mask
        position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
        visual_index = torch.arange(v, device=h.device)[None].expand(b, v)
        cos, sin = self._rope(h, position_ids)
        bias = _causal_bias(mask, h.dtype)
        return PrefillState(0, h, position_ids, mask, visual_index, cos, sin, bias, None, [], [], observe)

    def step(self, s: PrefillState) -> PrefillState:
        """Decoder layer ``s.layer`` (with its pruning point, if any); ``s`` is not changed."""
        i, a = s.layer, self.visual_start
        h, position_ids, mask, visual_index, cos, sin, bias, kept = s.h, s.position_ids, s.mask, s.visual_index, s.cos, s.sin, s.bias, s.kept
        if s.observe is not None and i > 0:
            s.observe(i, h, s.probs, mask, visual_index)
        if i in self.pruning_layers:
            score = self._score(h, s.probs, mask, visual_index)
            h, position_ids, mask, visual_index = torch.ops.quota.prune_point(
                h, position_ids, mask, visual_index, score, self.prune.keep[i], a
            )
            kept = [*kept, visual_index]
            cos, sin = self._rope(h, position_ids)
            bias = _causal_bias(mask, h.dtype)
        h, entries, probs = self._layer(i, h, cos, sin, bias, None)
        return PrefillState(i + 1, h, position_ids, mask, visual_index, cos, sin, bias, probs, [*s.kv, *entries], kept, s.observe)

    def finish(self, s: PrefillState):
        b, h, mask = s.h.shape[0], s.h, s.mask
        last = (mask.sum(-1) - 1).clamp_min(0)
        h_last = torch.gather(h, 1, last[:, None, None].expand(b, 1, h.shape[-1])).squeeze(1)
        return (self._logits(h_last), *s.kv, *s.kept)


@dataclass
class PrefillState:
    """A prefill pass before decoder layer ``layer`` (see :meth:`PrefillProgram.begin`)."""

    layer: int
    h: torch.Tensor
    position_ids: torch.Tensor
    mask: torch.Tensor
    visual_index: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    bias: torch.Tensor
    probs: torch.Tensor | None
    kv: list[torch.Tensor]
    kept: list[torch.Tensor]
    observe: Callable | None = None


class DecodeProgram(_Program):
    """One new token + the per-layer past KV -> logits and the new KV entries. With pruning,
    layer l's past holds ``keep[l]`` of the ``visual_count`` visual tokens; the attention mask
    input covers the unpruned prompt and each layer uses its slice of the visual part."""

    def __init__(self, vlm: VLM, qm: QuantizedModel, visual_start: int, visual_count: int, prune: PruneSpec | None = None):
        super().__init__(vlm, qm)
        self.visual_start = visual_start
        self.visual_count = visual_count
        self.keep = prune.keep if prune else (visual_count,) * vlm.num_layers

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor):
        a, v = self.visual_start, self.visual_count
        h = self.lm.embed_tokens(input_ids)
        cos, sin = self._rope(h, position_ids)
        per = len(self.kv_names)
        kv: list[torch.Tensor] = []
        bias, current = None, None
        for i in range(self.num_layers):
            if self.keep[i] != current:
                current = self.keep[i]
                mask = attention_mask if current == v else torch.cat(
                    [attention_mask[:, : a + current], attention_mask[:, a + v :]], dim=1
                )
                bias = torch.where(mask[:, None, None, :].bool(), 0.0, torch.finfo(h.dtype).min).to(h.dtype)
            h, entries, _ = self._layer(i, h, cos, sin, bias, tuple(past[i * per : (i + 1) * per]))
            kv.extend(entries)
        return (self._logits(h[:, -1]), *kv)


def kv_io_names(prefix: str, num_layers: int, names: tuple[str, ...] = KV_STORED) -> list[str]:
    """``present.0.key``, ``present.0.key_scale``, ... in the programs' order."""
    return [f"{prefix}.{i}.{n}" for i in range(num_layers) for n in names]
