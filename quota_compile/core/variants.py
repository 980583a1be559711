"""Deployment variants (full precision, quantized, quantized and pruned by one method at one
budget), which ``eval`` and ``bench`` build on the workbench
(:meth:`quota_compile.core.workbench.Workbench.build_into`); and the KV-cache size of a
schedule, shared by the manifest and ``bench``."""

from __future__ import annotations

from dataclasses import dataclass

from quota_compile.flavours.registry import runtime_flavour
from quota_compile.quant.ops import kv_packed_dim


@dataclass(frozen=True)
class Variant:
    name: str
    method: str  # a registered pruning method (quota_compile.pruning.methods): none, quota, quota-fp, fastv, pdrop, random, ...
    keep_ratio: float | None
    quantized: bool
    weight_only: bool = False  # INT4 weights only: float activations and KV cache (bench baseline)

    @property
    def label(self) -> str:
        if self.method == "none":
            return "FP32, all tokens" if not self.quantized else f"{self.name.upper()}, all tokens"
        return f"{self.method} @ {self.keep_ratio:g}"


def variants(cfg) -> list[Variant]:
    ev = cfg.eval
    out = [Variant("fp", "none", None, False), Variant(quant_name(cfg), "none", None, True)]
    for r in ev.keep_ratios:
        for m in ev.methods:
            out.append(Variant(f"{m}@{r:g}", m, r, True))
    return out


def quant_name(cfg) -> str:
    """``w4a4kv4`` and the like, from the quantization section."""
    q = cfg.quantization
    return f"w{q.weights.bits}a{q.activations.bits}kv{q.kv_cache.bits}"


def flavour_of(cfg) -> str:
    """The flavour a bundle of this config runs in (what the runtime picks)."""
    return runtime_flavour(cfg.export.targets)


def kv_cache_bytes(vlm, bits: int, keep: list[int], prompt_len: int, generated: int, granularity: str = "per_token") -> dict:
    """Bytes of one sequence's KV cache: this bundle's (codes + scales + zero points, pruned)
    against an FP16 cache of the unpruned model, at the given prompt and generated lengths.
    ``per_channel`` caches hold codes only (their static scales are constants of the graph)."""
    v = keep[0]
    stats = 4 + 1 if granularity == "per_token" else 0  # fp32 scale + u8 zero point per token and head
    per_token = vlm.num_kv_heads * (kv_packed_dim(vlm.head_dim, bits) + stats)
    lengths = [prompt_len - (v - k) + generated for k in keep]
    ours = sum(2 * per_token * n for n in lengths)
    fp16 = vlm.num_layers * 2 * vlm.num_kv_heads * vlm.head_dim * 2 * (prompt_len + generated)
    return {"prompt_length": prompt_len, "generated": generated, "bundle": ours, "fp16_unpruned": fp16, "ratio": fp16 / ours}
