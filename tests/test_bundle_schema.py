"""The typed bundle format (quota_compile/bundle/schema.py): the compiled bundle's manifest.json
and verify.json are its models' JSON, byte for byte; a manifest with an unknown, missing or
mistyped key is refused naming the key; verify.json is written once, by the compile."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest

from quota_compile.bundle import schema
from quota_compile.bundle.format import check_bundle, key_hashes, open_bundle, write_verify
from quota_compile.bundle.schema import FlavourEntry, Manifest, QuantizationFacts, VerifyReport
from quota_compile.cli import main
from quota_compile.config import QuantizationSection
from quota_compile.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def _json_text(doc: dict) -> str:
    """How the compiler writes its JSON documents (bundle.format.write_json)."""
    return json.dumps(doc, indent=2, sort_keys=False) + "\n"


@pytest.fixture
def bundle(tiny_bundle: Path, tmp_path: Path) -> Path:
    """A private copy of the session's tiny bundle, to edit."""
    return Path(shutil.copytree(tiny_bundle, tmp_path / "b" / "tiny"))


def test_the_compiled_manifest_is_a_manifest_and_round_trips(tiny_bundle: Path):
    text = (tiny_bundle / "manifest.json").read_text()
    manifest = Manifest.model_validate(json.loads(text))
    assert _json_text(manifest.model_dump(mode="json")) == text
    assert manifest.files is not None and manifest.key_sha256 == key_hashes(json.loads(text))
    assert manifest.format == schema.FORMAT and manifest.format_version == schema.FORMAT_VERSION == 3
    assert [g for g in manifest.graphs] == list(schema.GRAPHS)
    assert len(manifest.kv_cache) == manifest.model.num_layers
    # what the readers get: the same document, typed (open_bundle) or as JSON (check_bundle)
    assert open_bundle(tiny_bundle).doc() == check_bundle(tiny_bundle) == json.loads(text)


def test_the_compiled_verify_json_is_a_verify_report_and_round_trips(tiny_bundle: Path):
    text = (tiny_bundle / "verify.json").read_text()
    report = VerifyReport.model_validate(json.loads(text))
    assert _json_text(report.model_dump(mode="json")) == text
    assert report.passed and report.flavour == "portable" and report.samples == 4


def test_a_model_dumps_the_keys_it_was_given_in_their_order():
    """Optional keys not given are not written (the portable flavour's entry has no
    ``used_by_runtime``), and keys come out in the order given, whatever the declaration order."""
    entry = FlavourEntry(folder=".", graphs=["decode"], ops="standard ONNX (opset 21)", user_passes=[])
    assert list(entry.model_dump(mode="json")) == ["folder", "graphs", "ops", "user_passes"]
    assert entry.used_by_runtime is False
    given = {"graphs": ["vision"], "used_by_runtime": True, "folder": "x", "tag": "mine", "kv_update": "append"}
    assert list(FlavourEntry.model_validate(given).model_dump(mode="json")) == list(given)


def test_the_quantization_facts_have_the_config_sections_keys():
    """manifest.json's ``quantization`` is model.yaml's section: a key added to one must be added
    to the other (and the format considered)."""

    def keys(model) -> dict:
        out = {}
        for name, field in model.model_fields.items():
            sub = field.annotation
            out[name] = keys(sub) if isinstance(sub, type) and hasattr(sub, "model_fields") else None
        return out

    assert keys(QuantizationFacts) == keys(QuantizationSection)


def _edit_manifest(bundle: Path, edit) -> None:
    """Edit manifest.json and rehash its keys, so that only the model's validation refuses it."""
    path = bundle / "manifest.json"
    m = json.loads(path.read_text())
    edit(m)
    if "key_sha256" in m:
        m["key_sha256"] = key_hashes(m)
    path.write_text(json.dumps(m, indent=2))


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda m: m.update(compiled_by="someone"), ["key 'compiled_by'", "is not a known key"]),
        (lambda m: m["model"].update(colour="red"), ["key 'model.colour'", "is not a known key"]),
        (lambda m: m["kv_cache"][3]["scale"].update(unit="x"), ["key 'kv_cache[3].scale.unit'", "is not a known key"]),
        (lambda m: m.pop("versions"), ["key 'versions'", "is required but missing"]),
        (lambda m: m.pop("kv_cache_bytes_per_sequence"), ["key 'kv_cache_bytes_per_sequence'", "is required but missing"]),
        (lambda m: m.pop("key_sha256"), ["key 'key_sha256'", "is required but missing"]),
        (lambda m: m["quantization"]["weights"].pop("bits"), ["key 'quantization.weights.bits'", "is required but missing"]),
        (lambda m: m["pruning"].update(keep_ratio="half"), ["key 'pruning.keep_ratio'", "must be a number", "'half'"]),
        (lambda m: m["model"].update(eos_token_id=2.0), ["key 'model.eos_token_id'", "must be an integer"]),
        (lambda m: m["kv_cache"][0].update(symmetric="no"), ["key 'kv_cache[0].symmetric'"]),
        (lambda m: m["graphs"]["decode"]["inputs"][0].update(shape=["batch", None]), ["key 'graphs.decode.inputs[0].shape[1]'", "integer or a string"]),
        (lambda m: m["flavours"]["portable"].update(used_by_runtime="yes"), ["key 'flavours.portable.used_by_runtime'"]),
    ],
    ids=["unknown-top-level", "unknown-nested", "unknown-deep", "missing-versions", "missing-kv-bytes", "missing-key-hashes",
         "missing-nested", "string-for-number", "float-for-int", "string-for-bool", "null-dimension", "flavour-entry-type"],
)
def test_a_manifest_that_is_not_the_model_is_refused(bundle: Path, tmp_path: Path, capsys, edit, words):
    _edit_manifest(bundle, edit)
    with pytest.raises(UserError) as e:
        check_bundle(bundle)
    message = str(e.value)
    assert message.startswith(f"{bundle}/manifest.json: ") and "damaged or was edited" in message
    for w in words:
        assert w in message, f"{w!r} not in {message!r}"
    # and ``quota-compile run`` refuses it: exit 2, the same one line
    image = tmp_path / "img.png"
    from PIL import Image

    Image.new("RGB", (16, 16), (10, 200, 10)).save(image)
    assert main(["run", str(bundle), "--image", str(image), "--prompt", "What colour is it?", "--max-new-tokens", "2"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err and message in err


def test_write_verify_refuses_a_report_that_is_not_a_verify_report(tiny_bundle: Path, tmp_path: Path):
    doc = json.loads((tiny_bundle / "verify.json").read_text())
    assert _json_text(write_verify(tmp_path, doc)) == (tmp_path / "verify.json").read_text() == (tiny_bundle / "verify.json").read_text()
    from pydantic import ValidationError

    for bad in ({k: v for k, v in doc.items() if k != "thresholds"}, {**doc, "verdict": "fine"}, {**doc, "flavours": {"x": {"passed": True}}}):
        with pytest.raises(ValidationError):
            write_verify(tmp_path / "nowhere", bad)


def test_verify_json_is_the_report_the_compile_returned(tmp_path: Path, small_folder: Path):
    """One write, in the bundle stage, after every flavour: the file is the report the
    compile's verification ended with, byte for byte."""
    from quota_compile.commands.compile import compile_model

    from .conftest import write_config

    cfg = write_config(tmp_path / "s.yaml", str(small_folder), tmp_path / "out", verify={"samples": 1, "new_tokens": 2})
    result = compile_model(cfg)
    assert (result.bundle / "verify.json").read_text() == _json_text(VerifyReport.model_validate(result.verify).doc())
    assert (result.bundle / "verify.json").read_text() == _json_text(result.verify)
    assert json.loads((result.bundle / "manifest.json").read_text()) == result.manifest


def _writes(path: Path) -> list[str]:
    """Calls in a module's source that write files: ``write_json``/``write_text``/``write_bytes``/``open(..., "w")``/``json.dump``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if name in ("write_json", "write_text", "write_bytes", "write_verify", "dump"):
                found.append(f"{path.name}:{node.lineno} {name}")
    return found


def test_only_the_bundle_package_writes_verify_json():
    """The flavours record into the report (e.g. the tensorrt engine check); none writes
    verify.json (or any JSON document of the bundle) itself."""
    flavours = sorted((ROOT / "quota_compile" / "flavours").rglob("*.py"))
    assert flavours
    assert [w for p in flavours if p.name == "flavour.py" or p.parent.name == "flavours" for w in _writes(p)] == []
    assert not any('"verify.json"' in p.read_text() for p in sorted((ROOT / "quota_compile").rglob("*.py")) if p.name != "schema.py")


def test_schema_imports_nothing_of_quota_compile():
    tree = ast.parse((ROOT / "quota_compile" / "bundle" / "schema.py").read_text())
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)] + [
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
    ]
    assert not [m for m in imported if m and m.startswith("quota_compile")]
