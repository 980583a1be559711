"""Deployment variants (full precision, quantized, quantized and pruned by one method at one
budget) and the build of one variant's graphs, shared by ``eval`` and ``bench``; and the KV-cache
size of a schedule, shared by the manifest and ``bench``."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from quota_compile.capture.trace import build_programs, trace_programs
from quota_compile.core.decisions import decide_pruning
from quota_compile.flavours.registry import get_flavour, runtime_flavour
from quota_compile.export.onnx import export_onnx, save_onnx
from quota_compile.quant.ops import kv_packed_dim
from quota_compile.pruning.methods import pruning_method


@dataclass(frozen=True)
class Variant:
    name: str
    method: str  # a registered pruning method (quota_compile.pruning.methods): none, fastv, pdrop, quota, random, ...
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


def variant_pruning(cfg, vlm, qm, span, v: Variant, config_file: Path):
    """``(PruneSpec | None, keep schedule, recipe dict | None)`` for a variant, decided as a
    compile decides it, from the config with the variant's method and budget."""
    signals = pruning_method(v.method).signals
    update = {"method": v.method, "signals": signals} | ({"keep_ratio": v.keep_ratio} if v.keep_ratio is not None else {})
    variant_cfg = cfg.model_copy(update={"pruning": cfg.pruning.model_copy(update=update)})
    pruning, _, spec = decide_pruning(variant_cfg, vlm, qm, span, None, config_file)
    return spec, list(pruning.keep), (pruning.model_dump(mode="json") if v.method != "none" else None)


@dataclass
class BuiltVariant:
    folder: Path  # vision.onnx, prefill.onnx, decode.onnx
    programs: object  # trace.Programs: the eager reference of the same variant
    keep: list[int]
    recipe: dict | None
    seconds_calibrate: float
    seconds_build: float


def flavour_of(cfg) -> str:
    """The flavour a bundle of this config runs in (what the runtime picks)."""
    return runtime_flavour(cfg.export.targets)


def build_variant(cfg, vlm, qm, span, v: Variant, work: Path, config_file: Path, flavour: str | None = None) -> BuiltVariant:
    """Calibrate (where the method does), trace and lower one variant's graphs into a folder
    under ``work``, in ``flavour`` (default: the one the config's bundle runs)."""
    flavour = flavour or flavour_of(cfg)
    t0 = time.perf_counter()
    spec, keep, recipe = variant_pruning(cfg, vlm, qm, span, v, config_file)
    t_cal = time.perf_counter() - t0
    programs = build_programs(vlm, qm, spec)
    traced = trace_programs(vlm, qm, programs, quantized=v.quantized, weight_only=v.weight_only)
    folder = work / v.name.replace("@", "_")
    folder.mkdir(parents=True, exist_ok=True)
    models = {
        g: export_onnx(t.module, t.args, t.input_names, t.output_names, t.dynamic_shapes, cfg.export.opset, t.axis_names)
        for g, t in traced.items()
    }
    lowering = get_flavour(flavour)
    if lowering.derived:
        models = lowering.lower(cfg, models, quantized_kv=v.quantized and not v.weight_only)
    for g, m in models.items():
        save_onnx(m, folder / f"{g}.onnx")
    return BuiltVariant(folder, programs, keep, recipe, t_cal, time.perf_counter() - t0 - t_cal)


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
