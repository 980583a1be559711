"""``quota-compile model.yaml``: config -> model -> quantized model -> programs -> ONNX ->
verified bundle. Each stage is a plain function of the previous stage's result; this module
only sequences them, reports progress and writes the bundle atomically."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import onnx
from rich.console import Console

from quota_compile import __version__
from quota_compile.bundle.format import (
    atomic_folder,
    check_destination,
    external_tensors,
    graph_bytes,
    graph_io,
    human_size,
    report_markdown,
    versions,
    write_manifest,
    weights_table,
    write_verify,
)
from quota_compile.bundle.schema import (
    FORMAT,
    FORMAT_VERSION,
    FlavourVerification,
    GraphEntry,
    KV_SCALES,
    RECIPE,
    REPORT,
    TOKENIZER,
    WEIGHTS,
    KVCodes,
    KVLayer,
    KVScale,
    KVTensor,
    Manifest,
    ModelFacts,
    PruningFacts,
)
from quota_compile.config import bundle_name, load_config
from quota_compile.core.decisions import check_recipe, read_recipe
from quota_compile.core.variants import kv_cache_bytes
from quota_compile.core.workbench import Workbench
from quota_compile.errors import ConfigError, GraphRunError, UserError, VerificationFailed, errors_in
from quota_compile.export.onnx import load_structure
from quota_compile.export.user_passes import load_passes
from quota_compile.flavours.base import FlavourBuild
from quota_compile.flavours.registry import flavours_for, get_flavour
from quota_compile.models import load_model
from quota_compile.capture.programs import KV_STATIC, KV_STORED
from quota_compile.quant.ops import kv_packed_dim
from quota_compile.quant.simulate import GROUP_SIZES
from quota_compile.calibration.calibrate import quantize_model, settle_quantization
from quota_compile.pruning.recipe import ModelIdentity, Recipe
from quota_compile.verify.gate import TorchBackend, held_out_samples

STAGES = ("config", "load", "quantize", "calibrate", "trace", "lower", "verify", "bundle")


@dataclass
class CompileResult:
    bundle: Path
    manifest: dict
    verify: dict
    seconds: float


class PeakMemory:
    """The largest resident set size (RSS) of this process while it is open, sampled every
    ``interval`` seconds by a thread (a peak shorter than that can be missed), in bytes."""

    def __init__(self, interval: float = 0.05):
        import psutil

        self._process = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self.peak = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, name="quota-compile peak memory", daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self._interval):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


class Progress:
    """One line per stage on stderr with its elapsed time and its peak memory; :attr:`stages`
    keeps ``(stage, seconds, peak RSS bytes)`` of each finished stage. (Not in report.md: the
    bundle's files are hashed and must be the same for the same inputs.)"""

    def __init__(self, console: Console):
        self.console = console
        self.start = time.perf_counter()
        self.stages: list[tuple[str, float, int]] = []

    @contextlib.contextmanager
    def stage(self, name: str, what: str) -> Iterator[None]:
        i = STAGES.index(name) + 1
        t0 = time.perf_counter()
        self.console.print(f"[{i}/{len(STAGES)}] {name:<9} {what} ...", highlight=False)
        with PeakMemory() as memory:
            yield
        seconds = time.perf_counter() - t0
        self.stages.append((name, seconds, memory.peak))
        self.console.print(f"      {'':<9} done in {seconds:.1f} s, peak memory {human_size(memory.peak)}", style="dim", highlight=False)

    def note(self, what: str) -> None:
        """A line inside a long stage: which graph or flavour it is at."""
        self.console.print(f"      {'':<9} {what}", style="dim", highlight=False)


def check_calibration_device(cfg) -> None:
    """``calibration.device: cuda`` needs a GPU that this torch can use."""
    import torch

    device = cfg.calibration.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("calibration.device", f"{device!r} needs a CUDA GPU, and torch {torch.__version__} sees none; use cpu.")


def describe_quantization(q, given_group: bool = True) -> str:
    """The quantize stage's progress line, e.g. ``W4A4 RTN weights (group 32, chosen: ...)``."""
    w = q.weights
    if w.granularity == "per_channel":
        group = "per output channel"
    elif given_group:
        group = f"group {w.group_size}"
    else:
        group = f"group {w.group_size}, the largest of {'/'.join(map(str, GROUP_SIZES))} dividing every quantized input size"
    rotated = ", Hadamard-rotated" if q.rotation == "hadamard" else ""
    return (f"W{w.bits}A{q.activations.bits} {w.method.upper()} weights ({group}){rotated}, per-token activations, "
            f"INT{q.kv_cache.bits} KV cache ({q.kv_cache.granularity})")


def compile_model(
    config_path: str | Path, force: bool = False, console: Console | None = None, recipe_path: str | Path | None = None
) -> CompileResult:
    config_file = Path(config_path)
    with errors_in(config_file):
        return _compile(config_file, force, console or Console(stderr=True), recipe_path)


def _compile(config_file: Path, force: bool, console: Console, recipe_path: str | Path | None) -> CompileResult:
    progress = Progress(console)

    with progress.stage("config", str(config_file)):
        cfg = load_config(config_file)
        check_calibration_device(cfg)
        targets = flavours_for(cfg.export.targets)
        for flavour in targets:
            flavour.check_config(cfg)
        name = bundle_name(cfg, config_file)
        final = Path(cfg.output.dir) / name
        check_destination(final, force)
        recipe_file = read_recipe(Path(recipe_path)) if recipe_path else None
        user_passes = load_passes(cfg.export.passes, config_file.resolve().parent)

    given_group = cfg.quantization.weights.group_size is not None
    with contextlib.ExitStack() as stack:
        with progress.stage("load", cfg.model.source):
            vlm = load_model(cfg, stack, config_file.parent)
            cfg = settle_quantization(cfg, vlm)
            for flavour in targets:
                flavour.check_settled(cfg, vlm)
            if cfg.quantization.kv_cache.bits == 4 and vlm.head_dim % 2:
                raise ConfigError("quantization.kv_cache.bits", f"INT4 packing needs an even head size, the model has {vlm.head_dim}.")
            model_hash = vlm.weights_sha256()
            span = vlm.visual_span()
            given = check_recipe(recipe_file, Path(recipe_path), cfg, vlm, span, config_file) if recipe_file else None

        with progress.stage("quantize", describe_quantization(cfg.quantization, given_group)):
            qm = quantize_model(vlm, cfg, span)
        workbench = Workbench(cfg, vlm, qm, span)

        if given is not None and given.model.sha256 != model_hash:
            console.print(
                f"note: {recipe_path} was made for a checkpoint with another hash; its layer and token counts fit, so it is used.",
                highlight=False,
            )
        if given is not None and cfg.pruning.method != "none" and cfg.pruning.method != given.pruning.method:
            console.print(f"note: the recipe's pruning ({given.pruning.method}) replaces the pruning section of {config_file}.", highlight=False)
        # the calibrate, trace and lower stages
        what = None
        if given is not None:
            what = "no token pruning" if given.pruning.method == "none" else f"from {recipe_path}"
        built = workbench.build(None, targets, given=given, passes=user_passes, progress=progress, calibrate_what=what)
        pruning, provenance = built.decision.pruning, built.decision.provenance
        programs, traced, models = built.programs, built.traced, built.models
        build = FlavourBuild(cfg, vlm, span, models, lowered=built.lowered, note=progress.note,
                             say=lambda text: console.print(text, highlight=False, soft_wrap=True, markup=False))

        with atomic_folder(final, force) as tmp:
            build.folder = tmp
            built.save(tmp)
            for flavour in targets:
                if flavour.derived:
                    (tmp / flavour.folder).mkdir()
                    built.save(tmp / flavour.folder, flavour.name)
            # The graphs are on disk: from here on the compile keeps only their structure, and
            # verification opens them from the files, so that no protobuf holds the weights beside
            # the sessions that run them (large models: docs/scale.md).
            models.update(load_structure(tmp, list(models)))
            for flavour in targets:
                if flavour.derived and flavour.verifies_from_folder:
                    graphs = build.lowered[flavour.name]
                    graphs.update(load_structure(tmp / flavour.folder, list(graphs)))
            # Nothing is traced any more: the float weights of the quantized Linears go (the
            # simulation reads their codes), and so do the traced programs unless a flavour's
            # verification reads them.
            qm.release_float_weights()
            passes = {g: t.passes for g, t in traced.items()}
            if not any(flavour.reads_traced_programs for flavour in targets):
                traced = built.traced = None
            vlm.processor.save_pretrained(tmp / TOKENIZER)
            if qm.kv_scales is not None:
                import numpy as np

                np.save(tmp / KV_SCALES, qm.kv_scales.numpy())

            with progress.stage("verify", f"onnxruntime vs PyTorch on {cfg.verify.samples} held-out samples"):
                try:
                    build.programs, build.traced = programs, traced
                    build.reference = reference = TorchBackend(programs)
                    build.samples = samples = held_out_samples(vlm, cfg.verify, span, cfg.calibration.dataset)
                    report = get_flavour("portable").verify(build)
                    for flavour in targets:
                        if flavour.derived:
                            progress.note(f"the {flavour.name} flavour ...")
                            add_flavour(report, flavour.verify(build))
                    build.report = report
                    if not report["passed"]:
                        raise VerificationFailed("; ".join(report["failures"]))
                except GraphRunError as e:  # a graph that does not even run is refused like a wrong one
                    raise VerificationFailed(str(e)) from None

            with progress.stage("bundle", str(final)):
                for flavour in targets:
                    flavour.finish(build)
                write_verify(tmp, report)  # once, every flavour's verification (engine checks included) recorded
                recipe = Recipe(
                    tool_version=__version__,
                    model=ModelIdentity(source=cfg.model.source, sha256=model_hash, num_layers=vlm.num_layers, visual_tokens=span[1]),
                    quantization=cfg.quantization,
                    pruning=pruning,
                    calibration=provenance,
                )
                recipe.dump(tmp / RECIPE)
                manifest = build_manifest(cfg, vlm, model_hash, span, models, tmp, pruning, report, build, targets)
                figures = draw_figures(tmp, vlm, span, pruning, cfg.pruning, samples, reference)
                (tmp / REPORT).write_text(report_markdown(name, manifest, report, passes, recipe, figures), encoding="utf-8")
                manifest = write_manifest(tmp, manifest)

    return CompileResult(final, manifest, report, time.perf_counter() - progress.start)


def add_flavour(report: dict, result: dict) -> None:
    """A derived flavour's verification into the portable graphs' report: under
    ``flavours.<name>`` (checked as a :class:`~quota_compile.bundle.schema.FlavourVerification`),
    its failures prefixed with the flavour, the verdict the conjunction."""
    name = FlavourVerification.model_validate(result).flavour
    report["flavours"][name] = result
    report["failures"] += [f"{name} flavour: {f}" for f in result["failures"]]
    report["passed"] = report["passed"] and result["passed"]


def build_manifest(cfg, vlm, model_hash: str, span: tuple[int, int], models: dict, folder: Path, pruning, report: dict,
                   build: FlavourBuild, targets: list) -> Manifest:
    """manifest.json without ``files`` and ``key_sha256`` (:func:`~quota_compile.bundle.format.write_manifest`
    adds them). The flavours' entries are their :meth:`~quota_compile.flavours.base.Flavour.manifest_entry`
    dicts, validated here as :class:`~quota_compile.bundle.schema.FlavourEntry`."""
    bits = cfg.quantization.kv_cache.bits
    graphs = {}
    for g, m in models.items():
        reads_weights = bool(external_tensors(onnx.load(str(folder / f"{g}.onnx"), load_external_data=False)))
        files = [f"{g}.onnx"] + ([WEIGHTS] if reads_weights else [])
        graphs[g] = GraphEntry(file=f"{g}.onnx", files=files, bytes=graph_bytes(folder, g), **graph_io(m))
    flavours = {flavour.name: flavour.manifest_entry(build) for flavour in targets}
    weights = {}
    for entry in flavours.values():
        table = weights_table(folder / entry["folder"], entry["graphs"])
        if table is not None:
            weights[entry["folder"]] = table
    v = span[1]
    granularity = cfg.quantization.kv_cache.granularity
    codes = KVCodes(dtype="uint8", shape=["batch", vlm.num_kv_heads, "length", kv_packed_dim(vlm.head_dim, bits)],
                    packing="two INT4 codes per byte, even channel in the low nibble" if bits == 4 else "one code per byte")
    if granularity == "per_channel":
        kv_layer = {
            "num_kv_heads": vlm.num_kv_heads,
            "head_dim": vlm.head_dim,
            "bits": bits,
            "granularity": granularity,
            "symmetric": True,
            "tensors": list(KV_STATIC),
            "codes": codes,
            "scale": KVScale(dtype="float32", shape=[vlm.num_kv_heads, 1, vlm.head_dim],
                             where="constant in the graphs, static (calibrated); also kv_scales.npy [layer, key/value, head, 1, channel]"),
            "dequantize": f"(code - {2 ** (bits - 1)}) * scale",
        }
    else:
        kv_layer = {
            "num_kv_heads": vlm.num_kv_heads,
            "head_dim": vlm.head_dim,
            "bits": bits,
            "granularity": granularity,
            "symmetric": False,
            "tensors": list(KV_STORED),
            "codes": codes,
            "scale": KVScale(dtype="float32", shape=["batch", vlm.num_kv_heads, "length", 1]),
            "zero_point": KVTensor(dtype="uint8", shape=["batch", vlm.num_kv_heads, "length", 1]),
            "dequantize": "(code - zero_point) * scale",
        }
    layers = [
        KVLayer(
            layer=i,
            visual_tokens=k,
            length="prompt length (padded) + generated tokens" if k == v else f"prompt length (padded) - {v - k} + generated tokens",
            **kv_layer,
        )
        for i, k in enumerate(pruning.keep)
    ]
    prompt_len = int(report["per_sample"][0]["prompt_length"])
    return Manifest(
        format=FORMAT,
        format_version=FORMAT_VERSION,
        model=ModelFacts(
            source=cfg.model.source,
            family=cfg.model.family,
            sha256=model_hash,
            num_layers=vlm.num_layers,
            hidden_size=vlm.hidden_size,
            vocab_size=vlm.vocab_size,
            image_size=vlm.image_size,
            visual_start=span[0],
            visual_tokens=v,
            image_token_id=vlm.image_token_id,
            eos_token_id=vlm.eos_token_id,
            prompt_template=vlm.prompt_template,
            padding_side="right",
        ),
        quantization=cfg.quantization.model_dump(mode="json"),
        pruning=PruningFacts(
            method=pruning.method,
            signals=pruning.signals,
            keep_ratio=pruning.keep_ratio,
            visual_tokens_per_layer=list(pruning.keep),
            pruning_layers=list(pruning.pruning_layers),
            average_fraction=sum(pruning.keep) / (len(pruning.keep) * v),
        ),
        graphs=graphs,
        flavours=flavours,
        weights=weights,
        kv_cache=layers,
        kv_cache_bytes_per_sequence=kv_cache_bytes(vlm, bits, list(pruning.keep), prompt_len, report["new_tokens"], cfg.quantization.kv_cache.granularity),
        versions=versions(),
    )


def draw_figures(folder: Path, vlm, span: tuple[int, int], pruning, options, samples, reference, count: int = 2) -> list[str]:
    """schedule.png and, for ``count`` verification samples, the kept patches per pruning layer."""
    from quota_compile.pruning.methods import pruning_method, registered_methods
    from quota_compile.bundle.figures import kept_patches_overlay, schedule_chart

    if not pruning_method(pruning.method).prunes:
        return []
    v, layers = span[1], vlm.num_layers
    others = {}
    # The methods that draw a figure label (the baselines fastv and pdrop) at the same budget,
    # with the config's fastv_layer / stages / first layers.
    for method in registered_methods():
        label = method.figure_label(options)
        if label is None:
            continue
        try:
            others[label] = method.keep_schedule(options, layers, v, pruning.keep_ratio)
        except UserError:
            pass  # that baseline cannot meet this budget on this depth
    others = {label: keep for label, keep in others.items() if keep != list(pruning.keep)}
    made = [schedule_chart(list(pruning.keep), v, folder / "schedule.png", f"visual tokens per layer ({pruning.method})", pruning.keep_ratio, others or None)]
    cfg = vlm.config.vision_config
    side = cfg.image_size // cfg.patch_size
    offset = v - side * side  # a CLS token kept by the 'full' strategy has no patch
    for i, s in enumerate(samples[:count]):
        _, _, kept = reference.prefill(s.batch.input_ids, s.batch.attention_mask, reference.vision(s.batch.pixel_values))
        panels = {layer: [int(j) - offset for j in k[0] if j >= offset] for layer, k in zip(pruning.pruning_layers, kept)}
        image = s.image.resize((cfg.image_size, cfg.image_size))
        made.append(kept_patches_overlay(image, (side, side), panels, folder / f"kept_patches_{i}.png", f"sample {i}: {s.question}"))
    return [p.name for p in made]
