"""``quota-compile bench model.yaml``: speed of the deployment variants on the same prompts.

Variants (float32 arithmetic where not quantized, unless said):

- ``pytorch-fp32``: the Hugging Face model in eager PyTorch with its own KV cache, what users
  run today (timed before anything is quantized; the model object is the checkpoint's). On a
  CUDA ``bench.device`` a copy of it in ``bench.dtype`` runs there instead (``pytorch-fp16``,
  ``pytorch-bf16``);

with ``onnxruntime`` in ``bench.paths`` (the default), on the CPU:

- ``ort-fp32``: full-precision ONNX graphs of the same programs (float KV cache) in onnxruntime;
- ``ort-w4``, a weight-only INT4 variant (MatMulNBits, FP activations and KV cache), always
  in the onnxruntime flavour;
- ``ort-<quant>`` (e.g. ``ort-w4a4kv4``): the configured quantization, all visual tokens;
- ``<method>@<keep>`` (e.g. ``quota@0.3``): the bundle: the configured quantization plus the
  configured pruning (``pruning.method``; ``quota`` when the YAML says ``none``) at
  ``pruning.keep_ratio``; the quantized variants run in the flavour the bundle runs;

with ``torch`` in ``bench.paths``, on ``bench.device``:

- ``torch-<quant>`` and ``torch-<method>@<keep>``: the same two builds' traced programs through
  the PyTorch path (:class:`~quota_compile.flavours.torch_path.KernelBackend`: every W4A4
  Linear and every decode attention over the quantized cache one operator, the Triton kernels
  on CUDA, their PyTorch definitions on the CPU). What the ``torch`` flavour of a bundle runs.
  With ``kmajor`` in ``bench.torch_weight_layouts`` each is also timed with its INT4 weights in
  the K-major layout (``<variant> kmajor``: :mod:`quota_compile.kernels.w4a4_kmajor`).

Every variant is timed at each of ``bench.batch_sizes`` (the bench prompt repeated); a row of
batch ``B > 1`` is named ``<variant> xB``, and ratios compare rows of the same batch size.

For every variant and repetition, on one prompt (the image plus about ``bench.prompt_tokens``
text tokens): ``prefill_s`` is the time from pixels and token ids to the first logits (vision
tower + prefill, KV cache built); ``decode_s`` the time of ``bench.new_tokens`` greedy decode
steps after it (EOS ignored, the KV cache growing as the runtime grows it). After
``bench.warmup`` untimed repetitions, ``bench.repeats`` timed ones; medians are reported, every
repetition is kept in ``bench.json``. Ratios are between variants of the same run.

Also reported per variant: KV-cache bytes of one sequence at the final length, against an
FP16 cache of the unpruned model; graph / checkpoint bytes on disk; and the floor: the prefill
FLOPs (2 per multiply-add of every decoder, projector and vision Linear on the tokens that
reach it, plus attention scores and weighted sums) and the decode bytes per token (weights as
stored plus the KV cache read once), with the rate the measured time implies.
"""

from __future__ import annotations

import contextlib
import copy
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from quota_compile.bundle.format import atomic_folder, check_destination, graph_bytes, versions, write_json
from quota_compile.config import bundle_name, load_config
from quota_compile.core.variants import Variant, flavour_of, kv_cache_bytes, quant_name
from quota_compile.core.workbench import Workbench
from quota_compile.errors import ConfigError, errors_in
from quota_compile.models import load_model
from quota_compile.calibration.calibrate import quantize_model, settle_quantization
from quota_compile.quant.simulate import QuantEmbedding, QuantLinear
from quota_compile.runtime.ort import OrtBackend, greedy_generate, make_batch

FILLER = "Describe the image in detail: the shapes, their colours, their sizes and where they are."


def bench_prompt(vlm, span, tokens: int, batch_size: int = 1):
    """One (image, question) prompt whose text part has at least ``tokens`` tokens, repeated
    ``batch_size`` times."""
    from PIL import Image

    words = FILLER.split()
    text = FILLER
    while len(vlm.tokenizer(text, add_special_tokens=False)["input_ids"]) < tokens:
        text = f"{text} {words[len(text.split()) % len(words)]}"
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (vlm.image_size, vlm.image_size, 3), dtype=np.uint8))
    return make_batch(vlm.processor, vlm.prompt_template, [image] * batch_size, [text] * batch_size, span, vlm.image_token_id)


class _PrefillClock:
    """A backend wrapper that notes when the prefill returns, so the runtime's own greedy loop
    (:func:`quota_compile.runtime.ort.greedy_generate`) is what gets timed."""

    def __init__(self, backend):
        self.backend = backend
        self.prefill_done = 0.0

    def vision(self, pixel_values):
        return self.backend.vision(pixel_values)

    def prefill(self, input_ids, attention_mask, image_features):
        out = self.backend.prefill(input_ids, attention_mask, image_features)
        self.prefill_done = time.perf_counter()
        return out

    def decode(self, input_ids, position_ids, attention_mask, past):
        return self.backend.decode(input_ids, position_ids, attention_mask, past)


def _time_runtime(backend, batch, new_tokens: int) -> dict:
    """A runtime backend (onnxruntime sessions, or the PyTorch path's programs: numpy in and
    out, so a CUDA program has finished when its outputs are back) through the runtime's greedy
    loop."""
    clock = _PrefillClock(backend)
    t0 = time.perf_counter()
    # new_tokens + 1 greedy steps: the first token comes from the prefill, then new_tokens decodes
    greedy_generate(clock, batch, new_tokens + 1, eos_token_id=None)
    t2 = time.perf_counter()
    return {"prefill_s": clock.prefill_done - t0, "decode_s": t2 - clock.prefill_done}


@torch.no_grad()
def _time_torch(model, batch, new_tokens: int, device: torch.device = torch.device("cpu")) -> dict:
    """The Hugging Face model with its own KV cache (on ``device``, in its parameters' dtype)."""
    dtype = next(model.parameters()).dtype
    ids, mask = torch.from_numpy(batch.input_ids).to(device), torch.from_numpy(batch.attention_mask).to(device)
    pixels = torch.from_numpy(batch.pixel_values).to(device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, use_cache=True, logits_to_keep=1)
    sync()
    t1 = time.perf_counter()
    past = out.past_key_values
    for _ in range(new_tokens):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones(mask.shape[0], 1, dtype=mask.dtype, device=device)], dim=1)
        out = model(input_ids=nxt, attention_mask=mask, past_key_values=past, use_cache=True)
        past = out.past_key_values
    sync()
    t2 = time.perf_counter()
    return {"prefill_s": t1 - t0, "decode_s": t2 - t1}


def _repeat(fn, warmup: int, repeats: int) -> list[dict]:
    for _ in range(warmup):
        fn()
    return [fn() for _ in range(repeats)]


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def floors(vlm, cfg, keep: list[int], prompt_len: int, new_tokens: int, mode: str, float_bytes: int = 4) -> dict:
    """Prefill FLOPs and decode bytes per token that a variant must at least spend. ``mode``:
    ``none`` (float weights and KV cache), ``weights`` (INT4 weights, float KV cache) or
    ``full`` (the configured quantization); ``float_bytes``: the size of a float weight or
    cache entry (4: float32, 2: the Hugging Face model in fp16 / bf16)."""
    model = vlm.model
    v = keep[0]
    vis_cfg = vlm.config.vision_config
    patches = (vis_cfg.image_size // vis_cfg.patch_size) ** 2 + 1
    flops = 0.0
    for name, lin in ((n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)):
        macs = lin.in_features * lin.out_features
        if "vision_tower" in name:
            flops += 2 * macs * patches
        elif "multi_modal_projector" in name:
            flops += 2 * macs * v
        elif "layers." in name:
            layer = int(name.split("layers.")[1].split(".")[0])
            flops += 2 * macs * (prompt_len - v + keep[layer])
        elif name.endswith("lm_head"):
            flops += 2 * macs  # logits of the last position
    hidden = vlm.head_dim * vlm.num_heads
    for k in keep:  # QK^T and the weighted sum over the causal prefix, per layer
        t = prompt_len - v + k
        flops += 2 * 2 * hidden * t * (t + 1) / 2
    # Weights as stored: INT4 codes + fp32 group scales for the quantized Linears (mode
    # weights / full), fp32 otherwise; of an embedding table only the one row a token reads.
    quant = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)} if mode != "none" else set()
    weight_bytes = 0
    for name, module in model.named_modules():
        if "vision_tower" in name or "projector" in name:
            continue
        for pname, p in module.named_parameters(recurse=False):
            if isinstance(module, torch.nn.Embedding):
                row = p.shape[1]
                if isinstance(module, QuantEmbedding) and mode != "none":
                    weight_bytes += row // 2 + 4 * row // module.group_size
                else:
                    weight_bytes += float_bytes * row
            elif name in quant and pname == "weight":
                weight_bytes += p.numel() // 2 + 4 * p.numel() // module.qweight.group_size
            else:
                weight_bytes += float_bytes * p.numel()
    final = prompt_len + new_tokens
    if mode == "full":
        kv = kv_cache_bytes(vlm, cfg.quantization.kv_cache.bits, keep, prompt_len, new_tokens, cfg.quantization.kv_cache.granularity)["bundle"]
    else:
        kv = vlm.num_layers * 2 * vlm.num_kv_heads * vlm.head_dim * float_bytes * final
    return {"prefill_flops": flops, "decode_bytes_per_token": weight_bytes + kv, "decode_weight_bytes": weight_bytes, "kv_bytes_at_end": kv}


def prepared(cfg, config_file, stack: contextlib.ExitStack) -> tuple[Workbench, object]:
    """What the benchmark scripts start from, as ``quota-compile bench`` builds it: ``(the
    workbench, the bench prompt)``. The quantized simulation replaces the model's Linears in
    place, so anything that times the Hugging Face model itself must run before this (as
    :func:`run_bench` does)."""
    config_file = Path(config_file)
    with errors_in(config_file):
        vlm = load_model(cfg, stack, config_file.parent)
        cfg = settle_quantization(cfg, vlm)
        span = vlm.visual_span()
        batch = bench_prompt(vlm, span, cfg.bench.prompt_tokens)
        return Workbench(cfg, vlm, quantize_model(vlm, cfg, span), span), batch


def bench_variants(cfg) -> list[tuple[Variant, str, str, str]]:
    """The onnxruntime variants of a bench, in order: ``(variant, name, description, flavour)``."""
    method = cfg.pruning.method if cfg.pruning.method != "none" else "quota"
    qname = quant_name(cfg)
    flavour = flavour_of(cfg)
    w = cfg.quantization.weights
    g = "per output channel" if w.granularity == "per_channel" else f"group {w.group_size}"
    keep = cfg.pruning.keep_ratio
    return [
        (Variant("fp", "none", None, False), "ort-fp32", "onnxruntime, fp32 graphs, fp32 KV cache", "portable"),
        (Variant("w4", "none", None, True, weight_only=True), "ort-w4",
         f"onnxruntime, INT4 weight-only (MatMulNBits, {g}), fp32 activations and KV cache", "onnxruntime"),
        (Variant(qname, "none", None, True), f"ort-{qname}", f"onnxruntime ({flavour} flavour), the configured quantization, all visual tokens", flavour),
        (Variant(f"{method}@{keep:g}", method, keep, True), f"{method}@{keep:g}",
         f"onnxruntime ({flavour} flavour), the configured quantization + {method} at keep ratio {keep:g} (the bundle)", flavour),
    ]


def torch_path_variants(cfg) -> list[tuple[Variant, str, str]]:
    """The PyTorch-path variants of a bench: ``(variant, name, description)``."""
    method = cfg.pruning.method if cfg.pruning.method != "none" else "quota"
    qname = quant_name(cfg)
    keep = cfg.pruning.keep_ratio
    return [
        (Variant(qname, "none", None, True), f"torch-{qname}", "the PyTorch path (Triton kernels on CUDA), the configured quantization, all visual tokens"),
        (Variant(f"{method}@{keep:g}", method, keep, True), f"torch-{method}@{keep:g}",
         f"the PyTorch path (Triton kernels on CUDA), the configured quantization + {method} at keep ratio {keep:g} (the bundle)"),
    ]


DTYPES = {"float16": (torch.float16, "fp16"), "bfloat16": (torch.bfloat16, "bf16"), "float32": (torch.float32, "fp32")}


def check_bench_device(cfg) -> torch.device:
    """``bench.device``, refused (exit 2) where it names a GPU this torch cannot use."""
    device = torch.device(cfg.bench.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("bench.device", f"{cfg.bench.device!r} needs a CUDA GPU, and torch {torch.__version__} sees none; use cpu.")
    return device


def _batch_name(name: str, batch_size: int) -> str:
    return name if batch_size == 1 else f"{name} x{batch_size}"


def run_bench(config_path, force: bool = False, console: Console | None = None) -> tuple[Path, dict]:
    config_file = Path(config_path)
    with errors_in(config_file):
        return _bench(config_file, force, console or Console(stderr=True))


def _bench(config_file: Path, force: bool, console: Console) -> tuple[Path, dict]:
    cfg = load_config(config_file)
    b = cfg.bench
    device = check_bench_device(cfg)
    final = Path(cfg.output.dir) / f"{bundle_name(cfg, config_file)}-bench"
    check_destination(final, force)
    threads = b.threads or torch.get_num_threads()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    start = time.perf_counter()
    rows = []
    try:
        with contextlib.ExitStack() as stack:
            vlm = load_model(cfg, stack, config_file.parent)
            cfg = settle_quantization(cfg, vlm)
            span = vlm.visual_span()
            batches = {bs: bench_prompt(vlm, span, b.prompt_tokens, bs) for bs in b.batch_sizes}
            prompt_len = int(batches[b.batch_sizes[0]].attention_mask[0].sum())
            source_bytes = sum(p.stat().st_size for p in Path(vlm.path).glob("*.safetensors"))
            console.print(f"prompt: {span[1]} visual + {prompt_len - span[1]} text tokens; {b.new_tokens} new tokens; "
                          f"batch {', '.join(map(str, b.batch_sizes))}; {threads} threads; PyTorch on {device}", highlight=False)
            all_tokens = [span[1]] * vlm.num_layers
            ort = bench_variants(cfg) if "onnxruntime" in b.paths else []
            on_torch = torch_path_variants(cfg) if "torch" in b.paths else []
            n = 1 + len(ort) + len(on_torch)

            hf_bytes = 4
            if device.type == "cpu":
                hf_model, hf_name, hf_what = vlm.model, "pytorch-fp32", "Hugging Face model, eager PyTorch, fp32 KV cache"
            else:
                dtype, short = DTYPES[b.dtype]
                hf_bytes = torch.finfo(dtype).bits // 8
                hf_name, hf_what = f"pytorch-{short}", f"Hugging Face model, eager PyTorch on {device} in {b.dtype}, {short} KV cache"
                console.print(f"[1/{n}] {hf_name}: copying the model to {device} ...", highlight=False)
                hf_model = copy.deepcopy(vlm.model).to(device=device, dtype=dtype)  # vlm.model itself stays float32 on the CPU
            console.print(f"[1/{n}] {hf_name} (Hugging Face eager) ...", highlight=False)
            for bs, batch in batches.items():
                reps = _repeat(lambda: _time_torch(hf_model, batch, b.new_tokens, device), b.warmup, b.repeats)
                rows.append(_row(_batch_name(hf_name, bs), hf_what, reps, b, vlm, cfg, all_tokens, prompt_len, "none", source_bytes, "pytorch",
                                 batch_size=bs, float_bytes=hf_bytes))
            hf_model = None  # (the CUDA copy goes)
            if device.type == "cuda":
                torch.cuda.empty_cache()

            workbench = Workbench(cfg, vlm, quantize_model(vlm, cfg, span), span)
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="quota-bench-")))
            for i, (v, name, what, flav) in enumerate(ort, 2):
                console.print(f"[{i}/{n}] {name}: building graphs ...", highlight=False)
                built = workbench.build_into(v, work, flavour=flav)
                backend = OrtBackend(built.folder, threads=threads)
                console.print("      timing ...", highlight=False)
                mode = "weights" if v.weight_only else ("full" if v.quantized else "none")
                for bs, batch in batches.items():
                    reps = _repeat(lambda: _time_runtime(backend, batch, b.new_tokens), b.warmup, b.repeats)
                    rows.append(_row(_batch_name(name, bs), what, reps, b, vlm, cfg, built.keep, prompt_len, mode, _folder_bytes(built.folder),
                                     flav, built.folder / "decode.onnx", batch_size=bs))
                backend = None
            for i, (v, name, what) in enumerate(on_torch, 2 + len(ort)):
                from quota_compile.flavours.torch_path import KernelBackend

                console.print(f"[{i}/{n}] {name}: tracing the programs ...", highlight=False)
                built = workbench.build(v, onnx=False)
                for layout in b.torch_weight_layouts:
                    backend = KernelBackend(built.traced, device, layout)
                    label = name if layout == "graph" else f"{name} {layout}"
                    console.print(f"      timing on {device}" + ("" if layout == "graph" else f", {layout} weights") + " ...", highlight=False)
                    for bs, batch in batches.items():
                        reps = _repeat(lambda: _time_runtime(backend, batch, b.new_tokens), b.warmup, b.repeats)
                        rows.append(_row(_batch_name(label, bs), what + ("" if layout == "graph" else f"; {layout} INT4 weights"), reps, b,
                                         vlm, cfg, built.keep, prompt_len, "full", None, "torch", batch_size=bs))
                    backend = None
                built = None
    finally:
        torch.set_num_threads(old_threads)
    for r in rows:
        r["ratios"] = {
            other["name"]: {
                "prefill_speedup": other["prefill_s"] / r["prefill_s"],
                "decode_speedup": r["decode_tokens_per_s"] / other["decode_tokens_per_s"],
                "kv_bytes_reduction": other["kv_bytes_per_sequence"] / r["kv_bytes_per_sequence"],
            }
            for other in rows if other["batch_size"] == r["batch_size"]
        }
    doc = {
        "format": "quota-compile bench",
        "config": str(config_file),
        "model": cfg.model.source,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": _cpus()},
        "threads": threads,
        "prompt": {"visual_tokens": span[1], "prompt_tokens": prompt_len, "new_tokens": b.new_tokens},
        "device": str(device),
        "batch_sizes": list(b.batch_sizes),
        "repeats": b.repeats,
        "warmup": b.warmup,
        "variants": rows,
        "seconds": round(time.perf_counter() - start, 1),
        "versions": versions(),
    }
    with atomic_folder(final, force) as tmp:
        write_json(tmp / "bench.json", doc)
    return final, doc


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 0)


def decoder_fp16_bytes(vlm) -> int:
    """The decoder's weights (embedding, layers, final norm, lm_head) stored as FP16."""
    return 2 * sum(p.numel() for n, p in vlm.model.named_parameters() if "vision_tower" not in n and "projector" not in n)


def _row(name, what, reps, b, vlm, cfg, keep, prompt_len, quantized, disk_bytes, flavour, decode_graph: Path | None = None,
         batch_size: int = 1, float_bytes: int = 4) -> dict:
    """One variant at one batch size. Figures per sequence (KV bytes, floors) are of one
    sequence; ``decode_tokens_per_s`` counts the tokens of every sequence of the batch."""
    prefill = statistics.median(r["prefill_s"] for r in reps)
    decode = statistics.median(r["decode_s"] for r in reps)
    floor = floors(vlm, cfg, keep, prompt_len, b.new_tokens, quantized, float_bytes)
    fp16 = kv_cache_bytes(vlm, cfg.quantization.kv_cache.bits, keep, prompt_len, b.new_tokens)["fp16_unpruned"]
    tps = batch_size * b.new_tokens / decode
    return {
        "name": name,
        "what": what,
        "batch_size": batch_size,
        "visual_tokens_per_layer": keep,
        "prefill_s": prefill,
        "decode_tokens_per_s": tps,
        "kv_bytes_per_sequence": floor["kv_bytes_at_end"],
        "kv_fp16_unpruned_bytes": fp16,
        "disk_bytes": disk_bytes,  # None: the PyTorch path's programs (in memory; the torch flavour saves them)
        "flavour": flavour,
        # Every decoder weight is an initializer of the decode graph: the graph's file and the
        # bytes it reads from weights.bin are what the decoder's weights take as stored.
        "decoder_graph_bytes": graph_bytes(decode_graph.parent, decode_graph.stem) if decode_graph else None,
        "decoder_fp16_bytes": decoder_fp16_bytes(vlm),
        "floor": {
            **floor,
            "prefill_gflops_per_s": floor["prefill_flops"] / prefill / 1e9,
            # each step reads the weights once and every sequence's cache
            "decode_gb_per_s": (floor["decode_weight_bytes"] + batch_size * floor["kv_bytes_at_end"]) * tps / batch_size / 1e9,
        },
        "repetitions": reps,
    }
