"""Trace the three programs with ``torch.export`` and run the graph passes on them.

The programs are traced in full precision (``fake_quant(False)``); the passes then insert the
deployed quantizers, so the result computes what the simulation computes. The returned
:class:`TracedProgram` holds the pass-processed graph module with example inputs in their
deployed form, the I/O names and the dynamic shapes that lowering needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx
from torch.export import Dim

from quota_compile.passes import plain_signature, remove_unused_attributes
from quota_compile.passes.fold_topk_gather import FoldTopKGather
from quota_compile.passes.fuse_w4a4_linear import FuseW4A4Linear
from quota_compile.passes.insert_qdq import InsertQDQ, LinearQuantSpec
from quota_compile.passes.pack_int4_weights import PackInt4Weights
from quota_compile.passes.quantize_embedding import QuantizeEmbedding
from quota_compile.passes.quantize_kv_io import QuantizeKVIO
from quota_compile.passes.strip_runtime_asserts import StripRuntimeAsserts

from quota_compile.models.llava import VLM
from quota_compile.capture.programs import KV_FLOAT, DecodeProgram, PrefillProgram, PruneSpec, VisionProgram, kv_io_names, kv_stored_names
from quota_compile.quant import ops  # noqa: F401  (registers torch.ops.quota)
from quota_compile.quant.simulate import QuantizedModel

# Example sizes used for tracing; batch 2 so that the batch dimension is not specialised.
_BATCH = 2
_EXTRA_TEXT = 8


@dataclass
class TracedProgram:
    name: str
    module: fx.GraphModule
    args: tuple
    input_names: list[str]
    output_names: list[str]
    dynamic_shapes: tuple
    passes: list[tuple[str, bool]] = field(default_factory=list)
    axis_names: dict[str, dict[int, str]] = field(default_factory=dict)


@dataclass
class Programs:
    """The eager programs (simulation reference) for one quantized model."""

    vision: VisionProgram
    prefill: PrefillProgram
    decode: DecodeProgram


def build_programs(vlm: VLM, qm: QuantizedModel, prune: PruneSpec | None = None) -> Programs:
    start, count = vlm.visual_span()
    return Programs(
        VisionProgram(vlm, qm),
        PrefillProgram(vlm, qm, start, count, prune),
        DecodeProgram(vlm, qm, start, count, prune),
    )


def _annotate(gm: fx.GraphModule, qm: QuantizedModel) -> dict[str, str]:
    """Which weights of this graph get quantized: ``get_attr`` target -> module name."""
    read = {
        n.args[1].target
        for n in gm.graph.nodes
        if n.op == "call_function" and n.target == torch.ops.aten.linear.default and n.args[1].op == "get_attr"
    }
    return {f"hf.{name}.weight": name for name in qm.weights if f"hf.{name}.weight" in read}


def _kv_scales(qm: QuantizedModel, positions, first: int) -> list[torch.Tensor] | None:
    """Static scales of the KV tensors at ``positions`` (layer-major, key then value from
    position ``first``), or None for the per_token granularity."""
    if qm.kv_granularity != "per_channel":
        return None
    return [qm.kv_scale((p - first) // 2, (p - first) % 2) for p in positions]


def _run_passes(gm: fx.GraphModule, qm: QuantizedModel, kv_inputs=(), kv_outputs=(), quantized: bool = True, weight_only: bool = False) -> list[tuple[str, bool]]:
    spec = qm.spec
    act_bits = None if weight_only else spec.activations.bits
    targets = _annotate(gm, qm)
    lin = {t: LinearQuantSpec(spec.weights.bits, qm.weights[name].group_size, act_bits, spec.activations.clip_ratio) for t, name in targets.items()}
    pipeline = [StripRuntimeAsserts(), FoldTopKGather()]
    if quantized:
        pipeline.append(InsertQDQ(lin))
        if not weight_only:
            kv_in, kv_out = list(kv_inputs), list(kv_outputs)
            ins = _kv_scales(qm, kv_in, kv_in[0]) if kv_in else ([] if qm.kv_granularity == "per_channel" else None)
            outs = _kv_scales(qm, kv_out, kv_out[0]) if kv_out else ([] if qm.kv_granularity == "per_channel" else None)
            pipeline.append(QuantizeKVIO(qm.kv_bits, kv_in, kv_out, ins, outs))
        pipeline.append(PackInt4Weights({t: qm.weights[name] for t, name in targets.items()}))
        pipeline.append(FuseW4A4Linear())
        tables = {f"hf.{name}.weight": (e.codes, e.scale, e.group_size) for name, e in qm.embeddings.items()}
        read = {n.args[0].target for n in gm.graph.nodes if n.op == "call_function" and n.target == torch.ops.aten.embedding.default and n.args[0].op == "get_attr"}
        tables = {t: v for t, v in tables.items() if t in read}
        if tables:
            pipeline.append(QuantizeEmbedding(tables))
    log = []
    for p in pipeline:
        log.append((p.name, p(gm).modified))
    remove_unused_attributes(gm)
    return log


def _export(module: torch.nn.Module, args: tuple, dynamic_shapes: tuple) -> fx.GraphModule:
    """``module`` exported, with plain positional I/O for the passes (:func:`plain_signature`)."""
    with torch.no_grad():
        ep = torch.export.export(module, args, dynamic_shapes=dynamic_shapes, strict=False)
    return plain_signature(ep.module())


def _stored(x: torch.Tensor, qm: QuantizedModel, layer: int, which: int) -> tuple[torch.Tensor, ...]:
    if qm.kv_granularity == "per_channel":
        return (torch.ops.quota.quantize_kv_static(x, qm.kv_scale(layer, which), qm.kv_bits),)
    return tuple(torch.ops.quota.quantize_kv(x, qm.kv_bits))


def trace_programs(vlm: VLM, qm: QuantizedModel, programs: Programs, quantized: bool = True, weight_only: bool = False) -> dict[str, TracedProgram]:
    """Export vision, prefill and decode in full precision, then apply the passes.
    ``quantized=False`` leaves out the quantization passes: full-precision graphs with a float
    KV cache (``past.{i}.key`` / ``.value``), the reference of ``quota-compile eval``.
    ``weight_only=True`` quantizes the weights only (INT4, as configured): full-precision
    activations and a float KV cache, the weight-only baseline of ``quota-compile bench``."""
    kv_quant = quantized and not weight_only
    kv_names = kv_stored_names(qm.kv_granularity) if kv_quant else KV_FLOAT
    gen = torch.Generator().manual_seed(0)
    n_layers = vlm.num_layers
    start, count = programs.prefill.visual_start, programs.prefill.visual_count
    max_pos = int(getattr(vlm.text_config, "max_position_embeddings", 4096))
    batch = Dim("batch", min=1, max=4096)
    # The text after the image is at least 2 tokens (a size-1 slice would be specialised).
    seq = Dim("seq", min=start + count + 2, max=max_pos)
    # Each layer's past has a length of its own (a pruned layer holds fewer visual tokens), so
    # each is left to the exporter (Dim.DYNAMIC) rather than tied to one named dimension.
    past = Dim.DYNAMIC
    size = vlm.image_size
    out: dict[str, TracedProgram] = {}

    with qm.fake_quant(False):
        # vision
        pixels = torch.randn(_BATCH, 3, size, size, generator=gen)
        gm = _export(programs.vision, (pixels,), ({0: batch},))
        log = _run_passes(gm, qm, quantized=quantized, weight_only=weight_only)
        out["vision"] = TracedProgram("vision", gm, (pixels,), ["pixel_values"], ["image_features"], ({0: batch},), log)

        # prefill
        t = start + count + _EXTRA_TEXT
        ids = torch.randint(0, vlm.vocab_size, (_BATCH, t), generator=gen)
        ids[:, start : start + count] = vlm.image_token_id
        mask = torch.ones(_BATCH, t, dtype=torch.long)
        mask[1, -3:] = 0
        feats = torch.randn(_BATCH, count, vlm.hidden_size, generator=gen)
        shapes = ({0: batch, 1: seq}, {0: batch, 1: seq}, {0: batch})
        gm = _export(programs.prefill, (ids, mask, feats), shapes)
        kv_out = list(range(1, 1 + 2 * n_layers))
        log = _run_passes(gm, qm, kv_outputs=kv_out, quantized=quantized, weight_only=weight_only)
        kept_names = [f"kept.{i}" for i in programs.prefill.pruning_layers]
        out["prefill"] = TracedProgram(
            "prefill",
            gm,
            (ids, mask, feats),
            ["input_ids", "attention_mask", "image_features"],
            ["logits", *kv_io_names("present", n_layers, kv_names), *kept_names],
            shapes,
            log,
        )

        # decode: the past of layer l holds keep[l] of the visual tokens
        s_full = start + count + _EXTRA_TEXT
        keep = programs.decode.keep
        step = torch.randint(0, vlm.vocab_size, (_BATCH, 1), generator=gen)
        pos = torch.full((_BATCH, 1), s_full, dtype=torch.long)
        dmask = torch.ones(_BATCH, s_full + 1, dtype=torch.long)
        lengths = [s_full - count + keep[i] for i in range(n_layers) for _ in range(2)]
        floats = [torch.randn(_BATCH, vlm.num_kv_heads, n, vlm.head_dim, generator=gen) for n in lengths]
        head = ({0: batch}, {0: batch}, {0: batch, 1: past})
        # ``*past`` is one pytree input (a tuple) to torch.export.
        gm = _export(programs.decode, (step, pos, dmask, *floats), head + (tuple({0: batch, 2: past} for _ in floats),))
        kv_in = list(range(3, 3 + 2 * n_layers))
        log = _run_passes(gm, qm, kv_inputs=kv_in, kv_outputs=list(range(1, 1 + 2 * n_layers)), quantized=quantized, weight_only=weight_only)
        stored = [s for j, f in enumerate(floats) for s in _stored(f, qm, j // 2, j % 2)] if kv_quant else floats
        past_axes = {
            f"past.{i}.{n}": {2: "past" if keep[i] == count else f"past_{i}"} for i in range(n_layers) for n in kv_names
        }
        out["decode"] = TracedProgram(
            "decode",
            gm,
            (step, pos, dmask, *stored),
            ["input_ids", "position_ids", "attention_mask", *kv_io_names("past", n_layers, kv_names)],
            ["logits", *kv_io_names("present", n_layers, kv_names)],
            head + tuple({0: batch, 2: past} for _ in stored),
            log,
            axis_names=past_axes,
        )
    return out

