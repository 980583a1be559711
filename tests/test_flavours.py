"""Flavours as plug-ins: a new export target is one Flavour subclass, registered.

The toy flavour below is written the way a user would write one: it derives its graphs from
the portable ones (a copy, tagged in the model metadata), verifies them with the same gate as
the built-in flavours, and leaves a manifest entry. A compile with ``export.targets: [portable,
toy]`` must carry it through every stage; a toy flavour whose lowering changes what a graph
computes must be refused by its own verification (exit 1, nothing written).
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from onnx import helper

from quota_compile.cli import main
from quota_compile.config import parse_config
from quota_compile.errors import UserError
from quota_compile.flavours.base import Flavour, FlavourBuild
from quota_compile.flavours.registry import flavours_for, get_flavour, register_flavour, runtime_flavour, unregister_flavour
from quota_compile.runtime.ort import OrtBackend
from quota_compile.verify.gate import CodeProbe, verify

from .conftest import write_config

VERIFY = {"samples": 1, "new_tokens": 4}
TAG = "toy.lowered"


class ToyFlavour(Flavour):
    """The portable graphs again, tagged, in ``toy/``; optionally with the decode graph's
    logits scaled by 1.5 (a lowering bug its verification must catch)."""

    name = "toy"
    folder = "toy"

    def __init__(self, broken: bool = False):
        self.broken = broken
        self.calls: list[str] = []

    def check_config(self, cfg):
        self.calls.append("check_config")

    def check_settled(self, cfg, vlm):
        self.calls.append("check_settled")

    def lower(self, cfg, models, quantized_kv=True):
        self.calls.append("lower")
        out = {}
        for g, m in models.items():
            copy = onnx.ModelProto()
            copy.CopyFrom(m)
            copy.metadata_props.add(key=TAG, value="1")
            if self.broken and g == "decode":
                logits = copy.graph.output[0].name
                for n in copy.graph.node:
                    n.output[:] = [f"{o}.toy" if o == logits else o for o in n.output]
                copy.graph.initializer.append(onnx.numpy_helper.from_array(__import__("numpy").array(1.5, "float32"), "toy.scale"))
                copy.graph.node.append(helper.make_node("Mul", [f"{logits}.toy", "toy.scale"], [logits]))
            out[g] = copy
        return out

    def verify(self, build: FlavourBuild) -> dict:
        self.calls.append("verify")
        result = verify(build.reference, OrtBackend(build.folder / self.folder), build.samples, build.cfg.verify,
                        probe=CodeProbe(build.models, build.lowered[self.name]))
        result["flavour"] = self.name
        return result

    def finish(self, build: FlavourBuild) -> None:
        self.calls.append("finish")

    def manifest_entry(self, build: FlavourBuild) -> dict:
        self.calls.append("manifest_entry")
        return super().manifest_entry(build) | {"tag": TAG}


@pytest.fixture
def toy():
    flavour = register_flavour(ToyFlavour())
    yield flavour
    unregister_flavour("toy")


@pytest.fixture
def broken_toy():
    flavour = register_flavour(ToyFlavour(broken=True))
    yield flavour
    unregister_flavour("toy")


def _config(tmp_path: Path, folder: Path, targets: list[str]) -> Path:
    return write_config(tmp_path / "m.yaml", str(folder), tmp_path / "out", verify=VERIFY, export={"targets": targets})


def test_a_registered_flavour_is_compiled_verified_and_listed(tmp_path: Path, small_folder: Path, toy: ToyFlavour, capsys):
    code = main([_config(tmp_path, small_folder, ["portable", "toy"]).as_posix()])
    err = capsys.readouterr().err
    assert code == 0, err
    bundle = tmp_path / "out" / "m"
    assert toy.calls == ["check_config", "check_settled", "lower", "verify", "finish", "manifest_entry"]
    for g in ("vision", "prefill", "decode"):
        m = onnx.load(bundle / "toy" / f"{g}.onnx")
        assert {p.key: p.value for p in m.metadata_props}[TAG] == "1"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["flavours"]["toy"]["folder"] == "toy" and manifest["flavours"]["toy"]["tag"] == TAG
    assert manifest["flavours"]["toy"]["graphs"] == ["decode", "prefill", "vision"]
    report = json.loads((bundle / "verify.json").read_text())
    assert report["flavours"]["toy"]["passed"] is True and report["passed"] is True
    assert "the toy flavour ..." in err
    # quota-compile run checks the bundle (every file listed, hashes) and runs the portable
    # graphs: the toy entry does not claim the runtime
    assert main(["run", str(bundle), "--image", str(Path(__file__).parents[1] / "examples" / "shapes.png"),
                 "--prompt", "What is in the image?", "--max-new-tokens", "2"]) == 0


def test_a_flavour_whose_lowering_is_wrong_is_refused_by_its_verification(tmp_path: Path, small_folder: Path, broken_toy, capsys):
    code = main([_config(tmp_path, small_folder, ["portable", "toy"]).as_posix()])
    err = capsys.readouterr().err
    assert code == 1
    assert "toy flavour:" in err and "verification failed" in err
    assert not (tmp_path / "out" / "m").exists()
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())  # no work folder left


def test_an_unknown_target_is_refused_naming_the_key(tmp_path: Path, small_folder: Path, capsys):
    code = main([_config(tmp_path, small_folder, ["portable", "toy"]).as_posix()])
    err = capsys.readouterr().err
    assert code == 2
    assert "export.targets" in err and "'toy' is not a flavour" in err and "'onnxruntime'" in err
    assert "Traceback" not in err


def test_registration_rules(toy):
    with pytest.raises(ValueError, match="registered already"):
        register_flavour(ToyFlavour())
    with pytest.raises(ValueError, match="cannot be removed"):
        unregister_flavour("onnxruntime")

    class SameFolder(Flavour):
        name = "other"
        folder = "onnxruntime"

    with pytest.raises(ValueError, match="new plain folder name"):
        register_flavour(SameFolder())

    class BadName(Flavour):
        name = "Bad Name"
        folder = "bad"

    with pytest.raises(ValueError, match="lowercase"):
        register_flavour(BadName())
    cfg = parse_config({"version": 1, "model": {"source": "builtin:tiny-llava"}, "export": {"targets": ["toy", "portable"]}}, "m.yaml")
    assert [f.name for f in flavours_for(cfg.export.targets)] == ["portable", "toy"]  # registration order
    assert get_flavour("toy") is toy


def test_the_runtime_flavour_is_the_highest_ranked_target():
    """A bundle runs in the onnxruntime flavour when it has one (faster on the CPU), else in the
    portable graphs; the TensorRT flavour (plugin nodes) is never the runtime's."""
    assert runtime_flavour(["portable"]) == "portable"
    assert runtime_flavour(["portable", "onnxruntime"]) == "onnxruntime"
    assert runtime_flavour(["portable", "tensorrt"]) == "portable"
    assert runtime_flavour(["portable", "tensorrt", "onnxruntime"]) == "onnxruntime"


def test_after_unregistering_the_name_is_refused_again(tmp_path: Path):
    flavour = register_flavour(ToyFlavour())
    unregister_flavour(flavour.name)
    with pytest.raises(UserError, match="'toy' is not a flavour"):
        parse_config({"version": 1, "model": {"source": "builtin:tiny-llava"}, "export": {"targets": ["portable", "toy"]}}, tmp_path / "m.yaml")
