"""The portable flavour: standard ONNX ops only, in the bundle's top folder. Every bundle has it;
the other flavours are derived from its graphs, and its verification is the report the others
are added to."""

from __future__ import annotations

from quota_compile.bundle.schema import PORTABLE_FOLDER, FlavourEntry
from quota_compile.flavours.base import Flavour, FlavourBuild
from quota_compile.runtime.ort import OrtBackend
from quota_compile.verify.gate import CodeProbe, polygraphy_compare, verify


class PortableFlavour(Flavour):
    name = "portable"
    folder = PORTABLE_FOLDER
    derived = False
    runtime_rank = 0

    def verify(self, build: FlavourBuild) -> dict:
        build.note("portable graphs ...")
        graphs = polygraphy_compare(build.programs, build.folder, build.samples[0], build.reference)
        # the observation copies' sessions hold the weights again: opened here, like the other
        # flavours', and released when this flavour's verification returns
        report = verify(build.reference, OrtBackend(build.folder, arena=False), build.samples, build.cfg.verify, graphs,
                        CodeProbe(build.models, folder=build.folder))
        report["flavour"] = "portable"
        report["flavours"] = {}
        return report

    def manifest_entry(self, build: FlavourBuild) -> dict:
        return FlavourEntry(folder=self.folder, graphs=sorted(build.models), ops="standard ONNX (opset %d)" % build.cfg.export.opset,
                            user_passes=list(build.cfg.export.passes)).model_dump(mode="json")

