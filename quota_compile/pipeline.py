"""``quota-compile model.yaml``: config -> model -> quantized model -> programs -> ONNX ->
verified bundle. Each stage is a plain function of the previous stage's result; this module
only sequences them, reports progress and writes the bundle atomically."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from . import __version__
from .bundle import (
    atomic_folder,
    check_destination,
    file_hashes,
    graph_io,
    report_markdown,
    versions,
    write_json,
)
from .config import bundle_name, load_config
from .errors import UserError, VerificationFailed
from .lower import export_onnx, save_onnx
from .models import load_model
from .programs import KV_STORED
from .quant.ops import kv_packed_dim
from .quant.simulate import quantizable_linears, quantize
from .recipe import ModelIdentity, Recipe
from .runtime import OrtBackend
from .trace import build_programs, trace_programs
from .verify import TorchBackend, held_out_samples, polygraphy_compare, verify

STAGES = ("config", "load", "quantize", "trace", "lower", "verify", "bundle")


@dataclass
class CompileResult:
    bundle: Path
    manifest: dict
    verify: dict
    seconds: float


class Progress:
    """One line per stage on stderr with its elapsed time."""

    def __init__(self, console: Console):
        self.console = console
        self.start = time.perf_counter()

    @contextlib.contextmanager
    def stage(self, name: str, what: str) -> Iterator[None]:
        i = STAGES.index(name) + 1
        t0 = time.perf_counter()
        self.console.print(f"[{i}/{len(STAGES)}] {name:<9} {what} ...", highlight=False)
        yield
        self.console.print(f"      {'':<9} done in {time.perf_counter() - t0:.1f} s", style="dim", highlight=False)


def check_group_size(model, cfg, config_file: Path) -> None:
    g = cfg.quantization.weights.group_size
    for name, lin in quantizable_linears(model, cfg.quantization.ignore).items():
        if lin.in_features % g:
            raise UserError(
                f"{config_file}: key 'quantization.weights.group_size': {g} does not divide the input size "
                f"{lin.in_features} of {name}; choose a divisor of every quantized Linear's input size."
            )


def compile_model(config_path: str | Path, force: bool = False, console: Console | None = None) -> CompileResult:
    console = console or Console(stderr=True)
    progress = Progress(console)
    config_file = Path(config_path)

    with progress.stage("config", str(config_file)):
        cfg = load_config(config_file)
        name = bundle_name(cfg, config_file)
        final = Path(cfg.output.dir) / name
        check_destination(final, force, config_file)

    with contextlib.ExitStack() as stack:
        with progress.stage("load", cfg.model.source):
            vlm = load_model(cfg, config_file, stack)
            check_group_size(vlm.model, cfg, config_file)
            if cfg.quantization.kv_cache.bits == 4 and vlm.head_dim % 2:
                raise UserError(f"{config_file}: key 'quantization.kv_cache.bits': INT4 packing needs an even head size, the model has {vlm.head_dim}.")
            model_hash = vlm.weights_sha256()

        with progress.stage("quantize", "W4A4 RTN weights, per-token activations, quantized KV cache"):
            qm = quantize(vlm.model, cfg.quantization)

        with progress.stage("trace", "torch.export of vision, prefill, decode + passes"):
            programs = build_programs(vlm, qm)
            traced = trace_programs(vlm, qm, programs)

        with progress.stage("lower", f"ONNX opset {cfg.export.opset} (portable)"):
            models = {
                g: export_onnx(t.module, t.args, t.input_names, t.output_names, t.dynamic_shapes, cfg.export.opset, t.axis_names)
                for g, t in traced.items()
            }

        with atomic_folder(final, force) as tmp:
            for g, m in models.items():
                save_onnx(m, tmp / f"{g}.onnx")
            vlm.processor.save_pretrained(tmp / "tokenizer")

            with progress.stage("verify", f"onnxruntime vs PyTorch on {cfg.verify.samples} held-out samples"):
                span = (programs.prefill.visual_start, programs.prefill.visual_count)
                reference = TorchBackend(programs)
                samples = held_out_samples(vlm, cfg.verify, span)
                graphs = polygraphy_compare(programs, tmp, samples[0], reference)
                report = verify(reference, OrtBackend(tmp), samples, cfg.verify, graphs)
                if not report["passed"]:
                    raise VerificationFailed("; ".join(report["failures"]))
                write_json(tmp / "verify.json", report)

            with progress.stage("bundle", str(final)):
                recipe = Recipe(
                    tool_version=__version__,
                    model=ModelIdentity(source=cfg.model.source, sha256=model_hash, num_layers=vlm.num_layers, visual_tokens=span[1]),
                    quantization=cfg.quantization,
                    pruning=cfg.pruning,
                    calibration=cfg.calibration,
                )
                recipe.dump(tmp / "recipe.yaml")
                manifest = build_manifest(cfg, vlm, model_hash, span, models, tmp)
                passes = {g: t.passes for g, t in traced.items()}
                (tmp / "report.md").write_text(report_markdown(name, manifest, report, passes), encoding="utf-8")
                manifest["files"] = file_hashes(tmp)
                write_json(tmp / "manifest.json", manifest)

    return CompileResult(final, manifest, report, time.perf_counter() - progress.start)


def build_manifest(cfg, vlm, model_hash: str, span: tuple[int, int], models: dict, folder: Path) -> dict:
    bits = cfg.quantization.kv_cache.bits
    graphs = {}
    for g, m in models.items():
        files = sorted(p.name for p in folder.glob(f"{g}.onnx*"))
        graphs[g] = {"file": f"{g}.onnx", "files": files, "bytes": sum((folder / f).stat().st_size for f in files), **graph_io(m)}
    kv_layer = {
        "num_kv_heads": vlm.num_kv_heads,
        "head_dim": vlm.head_dim,
        "bits": bits,
        "granularity": cfg.quantization.kv_cache.granularity,
        "symmetric": False,
        "tensors": list(KV_STORED),
        "codes": {"dtype": "uint8", "shape": ["batch", vlm.num_kv_heads, "length", kv_packed_dim(vlm.head_dim, bits)], "packing": "two INT4 codes per byte, even channel in the low nibble" if bits == 4 else "one code per byte"},
        "scale": {"dtype": "float32", "shape": ["batch", vlm.num_kv_heads, "length", 1]},
        "zero_point": {"dtype": "uint8", "shape": ["batch", vlm.num_kv_heads, "length", 1]},
        "dequantize": "(code - zero_point) * scale",
        "length": "prompt length (padded) + generated tokens",
    }
    return {
        "format": "quota-compile bundle",
        "format_version": 1,
        "model": {
            "source": cfg.model.source,
            "family": cfg.model.family,
            "sha256": model_hash,
            "num_layers": vlm.num_layers,
            "hidden_size": vlm.hidden_size,
            "vocab_size": vlm.vocab_size,
            "image_size": vlm.image_size,
            "visual_start": span[0],
            "visual_tokens": span[1],
            "image_token_id": vlm.image_token_id,
            "eos_token_id": vlm.eos_token_id,
            "prompt_template": vlm.prompt_template,
            "padding_side": "right",
        },
        "quantization": cfg.quantization.model_dump(mode="json"),
        "pruning": cfg.pruning.model_dump(mode="json"),
        "graphs": graphs,
        "kv_cache": [{"layer": i, **kv_layer} for i in range(vlm.num_layers)],
        "versions": versions(),
    }
