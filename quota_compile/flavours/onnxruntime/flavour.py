"""The onnxruntime flavour as a :class:`~quota_compile.flavours.base.Flavour`: lowered by
:mod:`quota_compile.flavours.onnxruntime.lower`, verified like the portable graphs with its own
tolerances, and the flavour ``quota-compile run`` uses when a bundle has it."""

from __future__ import annotations

from quota_compile.bundle.format import graph_bytes, kv_update_of
from quota_compile.bundle.schema import ORT_FOLDER, FlavourEntry
from quota_compile.flavours.base import Flavour, FlavourBuild
from quota_compile.flavours.onnxruntime.lower import describe_arithmetic, lower_flavour, uses_group_query_attention
from quota_compile.runtime.ort import OrtBackend
from quota_compile.verify.gate import CodeProbe, verify

# The com.microsoft ops the manifest lists as the flavour's own.
ORT_OPS = ("MatMulNBits", "MatMulIntegerToFloat", "GatherBlockQuantized", "GroupQueryAttention")


class OnnxruntimeFlavour(Flavour):
    name = "onnxruntime"
    folder = ORT_FOLDER
    runtime_rank = 1  # faster than the portable graphs on onnxruntime's CPU provider
    verifies_from_folder = True  # its CodeProbe opens the copies from its folder

    reads_semantic = True  # translated from the semantic graphs by its own rules

    def lower(self, cfg, models, quantized_kv: bool = True, semantic=None):
        return lower_flavour(semantic, cfg.export.onnxruntime, uses_group_query_attention(cfg, quantized_kv))

    def verify(self, build: FlavourBuild) -> dict:
        cfg = build.cfg
        lowered = build.lowered[self.name]
        tolerances = cfg.verify.for_flavour("onnxruntime", cfg.export.onnxruntime.accuracy_level)
        result = verify(build.reference, OrtBackend(build.folder / self.folder, arena=False), build.samples, tolerances,
                        probe=CodeProbe(build.models, lowered, folder=build.folder / self.folder))
        result["flavour"] = self.name
        result["arithmetic"] = describe_arithmetic(cfg)
        return result

    def manifest_entry(self, build: FlavourBuild) -> dict:
        cfg = build.cfg
        lowered = build.lowered[self.name]
        sub = build.folder / self.folder
        return FlavourEntry(
            folder=self.folder,
            graphs=sorted(p.stem for p in sub.glob("*.onnx")),
            bytes={p.stem: graph_bytes(sub, p.stem) for p in sorted(sub.glob("*.onnx"))},
            ops=sorted({n.op_type for m in lowered.values() for n in m.graph.node if n.op_type in ORT_OPS}),
            kv_update=kv_update_of(lowered["decode"]),
            accuracy_level=cfg.export.onnxruntime.accuracy_level,
            arithmetic=describe_arithmetic(cfg),
            used_by_runtime=True,
        ).model_dump(mode="json")
