"""The TensorRT flavour as a :class:`~quota_compile.flavours.base.Flavour`: plugin nodes for the
W4A4 Linears and the quantized KV cache (:mod:`~quota_compile.flavours.tensorrt.lower`), verified
with the plugins run by their references through onnxruntime-extensions
(:mod:`~quota_compile.flavours.tensorrt.verify`), and engines built and compared where TensorRT
and a GPU are (:mod:`~quota_compile.flavours.tensorrt.engines`)."""

from __future__ import annotations

from pathlib import Path

from quota_compile.bundle.format import graph_bytes, kv_update_of
from quota_compile.bundle.schema import TRT_FOLDER, FlavourEntry
from quota_compile.errors import ConfigError, VerificationFailed
from quota_compile.flavours.base import Flavour, FlavourBuild
from quota_compile.flavours.tensorrt.lower import PLUGIN_NAMESPACE, PLUGIN_VERSION, TRT_INT4_BLOCKS, plugin_counts, to_tensorrt
from quota_compile.verify.gate import CodeProbe, verify


class TensorrtFlavour(Flavour):
    name = "tensorrt"
    folder = TRT_FOLDER
    runtime_rank = None  # plugin nodes: not run by the onnxruntime runner

    def check_config(self, cfg) -> None:
        """INT4 activations (the W4A4 plugin's Triton kernel quantizes to INT4) and
        onnxruntime-extensions (the flavour is verified with it)."""
        if cfg.quantization.activations.bits != 4:
            raise ConfigError(
                "quantization.activations.bits", f"the tensorrt target runs W4A4 Linears as the "
                f"QuotaW4A4Linear plugin, whose kernel quantizes activations to INT4, not INT{cfg.quantization.activations.bits}; "
                "use bits: 4 or remove tensorrt from export.targets."
            )
        try:
            import onnxruntime_extensions  # noqa: F401
        except ImportError:
            raise ConfigError(
                "export.targets", "the tensorrt target is verified through onnxruntime-extensions, "
                "which is not installed; pip install 'quota-compile[tensorrt]' (or onnxruntime-extensions)."
            ) from None

    def check_settled(self, cfg, vlm) -> None:
        """An INT4 embedding table (if any) in blocks TensorRT's weight-only INT4 accepts
        (:data:`TRT_INT4_BLOCKS`); checked once the group size is settled."""
        emb = cfg.quantization.embeddings
        if emb.bits != 4:
            return
        g = emb.group_size or cfg.quantization.weights.group_size
        if g not in TRT_INT4_BLOCKS:
            raise ConfigError(
                "quantization.embeddings.group_size", f"the tensorrt target keeps the INT4 "
                f"embedding table as a blocked DequantizeLinear, which TensorRT accepts with block size 64 or 128 "
                f"only, not {g}; set group_size: 64 or 128 or embeddings.bits: null."
            )

    reads_semantic = True  # translated from the semantic graphs by its own rules

    def lower(self, cfg, models, quantized_kv: bool = True, semantic=None):
        return to_tensorrt(semantic)

    def verify(self, build: FlavourBuild) -> dict:
        """The flavour (plugins run by their references through onnxruntime-extensions) against
        the simulation, as the other flavours are, plus Polygraphy's graph-by-graph comparison
        with the portable graphs on the first sample. The portable graphs define the activation
        quantizers the code comparison looks for (the flavour has none outside its plugins; its
        KV codes and pruning scores are compared all the same)."""
        from quota_compile.flavours.tensorrt.verify import RUNTIME, TensorrtReferenceBackend, describe_arithmetic, polygraphy_compare, session

        trt_models = build.lowered[self.name]
        graphs = polygraphy_compare(build.folder, trt_models, sample=build.samples[0])
        probe = CodeProbe(build.models, trt_models, session=session)
        result = verify(build.reference, TensorrtReferenceBackend(trt_models), build.samples, build.cfg.verify.for_flavour("tensorrt"), graphs, probe)
        result["flavour"] = self.name
        result["runtime"] = RUNTIME
        result["polygraphy_reference"] = "the portable graphs (onnxruntime)"
        result["arithmetic"] = describe_arithmetic()
        result["plugins"] = {g: plugin_counts(m) for g, m in trt_models.items()}
        return result

    def finish(self, build: FlavourBuild) -> None:
        """Engines, where TensorRT and a GPU are, each compared with onnxruntime by Polygraphy;
        otherwise the reason none was built (printed, and kept for the manifest)."""
        from quota_compile.flavours.tensorrt.engines import build_engines

        engines = build_engines(build.folder, min_length=build.span[0] + build.span[1] + 1)
        if isinstance(engines, str):
            build.say(engines)
        else:
            engines["comparison"] = check_engines(build.folder, build.lowered[self.name], build.samples[0], build.report)
        build.results[self.name] = engines

    def manifest_entry(self, build: FlavourBuild) -> dict:
        trt_models = build.lowered[self.name]
        sub = build.folder / self.folder
        engines = build.results.get(self.name)
        return FlavourEntry(
            folder=self.folder,
            graphs=sorted(trt_models),
            bytes={g: graph_bytes(sub, g) for g in sorted(trt_models)},
            plugins={g: plugin_counts(m) for g, m in trt_models.items()},
            plugin_namespace=PLUGIN_NAMESPACE,
            plugin_version=PLUGIN_VERSION,
            plugin_definitions="quota_compile.flavours.tensorrt.engines.register_plugins (tensorrt.plugin; AOT Triton kernels of quota_compile.kernels.trt_aot)",
            kv_update=kv_update_of(trt_models["decode"]),
            verified_with="onnxruntime with the plugins as onnxruntime-extensions Python custom ops (quota_compile.flavours.tensorrt.verify); TensorRT itself only where engines were built",
            engines=engines if isinstance(engines, dict) else {"built": False, "reason": engines},
            used_by_runtime=False,
        ).model_dump(mode="json")


def check_engines(folder: Path, trt_models: dict, sample, report: dict) -> dict:
    """Polygraphy ``--trt`` against ``--onnxrt`` for freshly built engines
    (:func:`quota_compile.flavours.tensorrt.engines.compare_engines`), recorded into the report
    (verify.json's ``flavours.tensorrt.engines``; the compile writes verify.json afterwards); a
    graph that disagrees fails the compile like any other verification failure."""
    from quota_compile.flavours.tensorrt.engines import compare_engines

    comparison = compare_engines(folder, trt_models, sample)
    report["flavours"]["tensorrt"]["engines"] = comparison
    failed = sorted(g for g, r in comparison.items() if not r["passed"])
    if failed:
        raise VerificationFailed(f"tensorrt engines: Polygraphy --trt against --onnxrt disagrees on {', '.join(failed)}")
    return comparison
