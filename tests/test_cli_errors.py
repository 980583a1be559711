"""Bad input: exit code 2, one sentence naming the file and the key, no traceback, no output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from quota_compile.cli import main

GOOD = """\
version: 1
model:
  source: {source}
quantization:
  weights:
    group_size: 16
output:
  dir: {out}
"""

# (case id, YAML text (or None: see the test), words the message must contain)
CASES = [
    ("malformed-yaml", "version: 1\nmodel: [source: x\n", ["malformed YAML", "line"]),
    ("not-a-mapping", "- version\n- 1\n", ["expected a mapping"]),
    ("unknown-top-key", GOOD + "pruning_typo: {}\n", ["'pruning_typo'", "not a known key"]),
    ("unknown-nested-key", GOOD.replace("group_size: 16", "gruop_size: 16"), ["'quantization.weights.gruop_size'", "not a known key"]),
    ("wrong-type", GOOD.replace("group_size: 16", "group_size: sixteen"), ["'quantization.weights.group_size'", "integer", "'sixteen'"]),
    ("negative-group", GOOD.replace("group_size: 16", "group_size: -4"), ["'quantization.weights.group_size'", "greater than 0"]),
    ("gptq-option-without-gptq", GOOD.replace("group_size: 16", "group_size: 16\n    act_order: true"), ["'quantization.weights'", "act_order", "method: gptq"]),
    ("online-rotation-without-rotation", GOOD.replace("group_size: 16", "group_size: 16\n  online_rotation: false"), ["'quantization'", "online_rotation", "rotation: hadamard"]),
    ("calibration-device", GOOD + "calibration:\n  device: tpu\n", ["'calibration.device'", "'tpu'", "cpu, cuda or cuda:N"]),
    ("calibration-device-kind", GOOD + "calibration:\n  device: mps\n", ["'calibration.device'", "'mps'", "cpu or cuda"]),
    ("gptq-damp", GOOD.replace("group_size: 16", "group_size: 16\n    method: gptq\n    gptq_damp: 0"), ["'quantization.weights.gptq_damp'", "greater than 0"]),
    ("weight-bits", GOOD.replace("group_size: 16", "group_size: 16\n    bits: 3"), ["'quantization.weights.bits'", "4", "3"]),
    ("kv-bits", GOOD.replace("  weights:", "  kv_cache:\n    bits: 2\n  weights:"), ["'quantization.kv_cache.bits'", "4", "8", "2"]),
    ("activation-bits", GOOD.replace("  weights:", "  activations:\n    bits: 16\n  weights:"), ["'quantization.activations.bits'", "16"]),
    ("clip-ratio", GOOD.replace("  weights:", "  activations:\n    clip_ratio: 1.5\n  weights:"), ["'quantization.activations.clip_ratio'", "at most 1"]),
    ("bad-regex", GOOD.replace("  weights:", "  ignore: ['re:(unclosed']\n  weights:"), ["'quantization.ignore'", "'(unclosed'", "regular expression"]),
    ("version", GOOD.replace("version: 1", "version: 2"), ["'version'", "1", "2"]),
    ("missing-model", "version: 1\noutput:\n  dir: {out}\n", ["'model'", "required"]),
    ("missing-version", GOOD.replace("version: 1\n", ""), ["'version'", "required"]),
    ("pruning-method", GOOD + "pruning:\n  method: magic\n", ["'pruning.method'", "'quota'", "'magic'"]),
    ("keep-ratio", GOOD + "pruning:\n  method: quota\n  keep_ratio: 0\n", ["'pruning.keep_ratio'", "greater than 0"]),
    ("keep-ratio-above-one", GOOD + "pruning:\n  method: quota\n  keep_ratio: 1.5\n", ["'pruning.keep_ratio'", "at most 1"]),
    ("score-weights-all-zero", GOOD + "pruning:\n  method: quota\n  weights: {att: 0}\n", ["'pruning.weights'", "at least one"]),
    ("score-weights", GOOD + "pruning:\n  method: quota\n  weights: {att: 1, magnitude: 2}\n", ["'pruning.weights.magnitude'", "not a known key"]),
    ("opset", GOOD + "export:\n  opset: 17\n", ["'export.opset'", "21"]),
    ("export-pass-form", GOOD + "export:\n  passes: [fuse_all]\n", ["'export.passes'", "'fuse_all'", "module:function"]),
    ("export-pass-module", GOOD + "export:\n  passes: ['no_such_module_q7:run']\n", ["'export.passes[0]'", "cannot import module", "'no_such_module_q7'"]),
    ("output-name", GOOD.replace("output:", "output:\n  name: ../escape"), ["'output.name'", "folder name"]),
    ("unknown-builtin", GOOD.replace("{source}", "builtin:no-such-model"), ["'model.source'", "no-such-model", "builtin:tiny-llava"]),
    ("missing-checkpoint", GOOD.replace("{source}", "./no/such/folder"), ["'model.source'", "does not exist"]),
    ("prompt-template", GOOD.replace("  source: {source}", "  source: {source}\n  prompt_template: 'no image here {question}'"), ["'model.prompt_template'", "<image>"]),
]


def _run(tmp_path: Path, text: str, source: str, capsys) -> tuple[int, str, Path]:
    out = tmp_path / "out"
    cfg = tmp_path / "model.yaml"
    cfg.write_text(text.replace("{source}", source).replace("{out}", str(out)))
    rc = main([str(cfg)])
    return rc, capsys.readouterr().err, out


def _assert_clean_error(rc: int, err: str, out: Path, words: list[str], cfg_name: str = "model.yaml"):
    assert rc == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("quota-compile: error: "), last
    assert cfg_name in last, last
    for w in words:
        assert w in last, f"{w!r} not in {last!r}"
    assert not out.exists(), "no output folder may be created for bad input"


@pytest.mark.parametrize("case,text,words", CASES, ids=[c[0] for c in CASES])
def test_bad_config(tmp_path, capsys, tiny_folder, case, text, words):
    rc, err, out = _run(tmp_path, text, str(tiny_folder), capsys)
    _assert_clean_error(rc, err, out, words)


def test_export_passes_from_the_yaml_folder_must_name_a_function_that_returns_a_model(tmp_path, capsys, small_folder):
    """``export.passes`` modules are found beside the YAML file; a missing function is refused in
    the config stage, a pass returning something other than a model when it runs (in lower),
    and neither leaves anything behind."""
    (tmp_path / "my_passes_q7.py").write_text("def wrong(model, graph):\n    return 'not a model'\n")
    rc, err, out = _run(tmp_path, GOOD + "export:\n  passes: ['my_passes_q7:absent']\n", str(small_folder), capsys)
    _assert_clean_error(rc, err, out, ["'export.passes[0]'", "'my_passes_q7'", "no function 'absent'"])
    rc, err, out = _run(tmp_path, GOOD + "export:\n  passes: ['my_passes_q7:wrong']\n", str(small_folder), capsys)
    _assert_clean_error(rc, err, out, ["'export.passes[0]'", "my_passes_q7:wrong returned str for the vision graph", "onnx.ModelProto"])


def test_missing_yaml_file(tmp_path, capsys):
    rc = main([str(tmp_path / "absent.yaml")])
    err = capsys.readouterr().err
    _assert_clean_error(rc, err, tmp_path / "out", ["no such file"], "absent.yaml")


def test_folder_without_config_json(tmp_path, capsys):
    empty = tmp_path / "empty-ckpt"
    empty.mkdir()
    rc, err, out = _run(tmp_path, GOOD, str(empty), capsys)
    _assert_clean_error(rc, err, out, ["'model.source'", "config.json"])


def test_checkpoint_of_another_family(tmp_path, capsys):
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    rc, err, out = _run(tmp_path, GOOD, str(other), capsys)
    _assert_clean_error(rc, err, out, ["'model.source'", "'bert'", "llava"])


def test_group_size_that_does_not_divide_the_hidden_size(tmp_path, capsys, tiny_folder):
    rc, err, out = _run(tmp_path, GOOD.replace("group_size: 16", "group_size: 48"), str(tiny_folder), capsys)
    _assert_clean_error(rc, err, out, ["'quantization.weights.group_size'", "48", "does not divide", "64"])


def test_unknown_command_line_option(tmp_path, capsys):
    cfg = tmp_path / "model.yaml"
    cfg.write_text(GOOD)
    rc = main([str(cfg), "--frobnicate"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "--frobnicate" in err.strip().splitlines()[-1]


def test_run_on_a_folder_that_is_not_a_bundle(tmp_path, capsys):
    img = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(img)
    rc = main(["run", str(tmp_path), "--image", str(img), "--prompt", "hi"])
    err = capsys.readouterr().err
    assert rc == 2 and "not a quota-compile bundle" in err and "Traceback" not in err


def test_run_with_a_missing_image(tiny_bundle, tmp_path, capsys):
    rc = main(["run", str(tiny_bundle), "--image", str(tmp_path / "nope.png"), "--prompt", "hi"])
    err = capsys.readouterr().err
    assert rc == 2 and "nope.png" in err and "--image" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_cuda_calibration_without_a_gpu(tmp_path, capsys, tiny_folder):
    rc, err, out = _run(tmp_path, GOOD + "calibration:\n  device: cuda\n", str(tiny_folder), capsys)
    _assert_clean_error(rc, err, out, ["'calibration.device'", "'cuda'", "CUDA GPU"])


# ------------------------------------------------------------------ bad input


def test_truncated_safetensors_in_the_checkpoint(tmp_path, capsys, tiny_folder):
    ckpt = Path(shutil.copytree(tiny_folder, tmp_path / "ckpt"))
    weights = ckpt / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 4096])
    rc, err, out = _run(tmp_path, GOOD, str(ckpt), capsys)
    _assert_clean_error(rc, err, out, ["'model.source'", f"{weights}", "truncated", str(len(data)), str(len(data) - 4096)])


def test_safetensors_file_that_is_not_one(tmp_path, capsys, tiny_folder):
    ckpt = Path(shutil.copytree(tiny_folder, tmp_path / "ckpt"))
    (ckpt / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 3\n")
    rc, err, out = _run(tmp_path, GOOD, str(ckpt), capsys)
    _assert_clean_error(rc, err, out, ["'model.source'", "model.safetensors", "not a safetensors file"])


RECIPE = """\
version: 1
tool_version: 0.1.0
model: {source: builtin:tiny-llava, sha256: abc, num_layers: 8, visual_tokens: 64}
quantization: {weights: {group_size: 16}}
pruning: {method: none, keep: [64, 64, 64, 64, 64, 64, 64, 64]}
calibration: {dataset: synthetic, num_samples: 16, seed: 0, holdout: 0.25}
"""

BAD_RECIPES = [
    ("yaml-syntax", RECIPE.replace("keep: [64,", "keep: [64,,"), ["recipe.yaml", "malformed YAML", "line 5"]),
    ("yaml-unclosed", RECIPE.replace("holdout: 0.25}", "holdout: 0.25"), ["recipe.yaml", "malformed YAML", "line"]),
    ("nul-byte", RECIPE.replace("abc", "a\x00bc"), ["recipe.yaml", "malformed YAML", "line 3", "'\\x00'"]),
    ("not-a-mapping", "- 1\n- 2\n", ["recipe.yaml", "expected a mapping"]),
    ("missing-key", RECIPE.replace(", keep: [64, 64, 64, 64, 64, 64, 64, 64]", ""), ["recipe.yaml", "key 'pruning.keep'", "required but missing"]),
    ("wrong-type", RECIPE.replace("num_layers: 8", "num_layers: eight"), ["recipe.yaml", "key 'model.num_layers'", "integer", "'eight'"]),
    ("list-item", RECIPE.replace("keep: [64, 64,", "keep: [64, many,"), ["recipe.yaml", "key 'pruning.keep[1]'", "integer", "'many'"]),
    ("unknown-key", RECIPE.replace("sha256: abc", "sha256: abc, extra: 1"), ["recipe.yaml", "key 'model.extra'", "not a known key"]),
    ("nested-quantization", RECIPE.replace("group_size: 16", "group_size: -1"), ["recipe.yaml", "key 'quantization.weights.group_size'", "greater than 0"]),
    ("pruning-method", RECIPE.replace("method: none", "method: magic"), ["recipe.yaml", "key 'pruning.method'", "'magic'"]),
]


@pytest.mark.parametrize("case,text,words", BAD_RECIPES, ids=[c[0] for c in BAD_RECIPES])
def test_bad_recipe_file(tmp_path, capsys, tiny_folder, case, text, words):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    cfg = tmp_path / "model.yaml"
    cfg.write_text(GOOD.replace("{source}", str(tiny_folder)).replace("{out}", str(tmp_path / "out")))
    rc = main([str(cfg), "--recipe", str(recipe)])
    err = capsys.readouterr().err
    _assert_clean_error(rc, err, tmp_path / "out", words, "recipe.yaml")
    assert "validation error" not in err  # pydantic's summary ("6 validation errors for Recipe") is not the message


def test_run_with_a_text_file_as_image(tiny_bundle, tmp_path, capsys):
    notes = tmp_path / "notes.png"
    notes.write_text("not an image, a note\n")
    rc = main(["run", str(tiny_bundle), "--image", str(notes), "--prompt", "hi"])
    out, err = capsys.readouterr()
    _assert_clean_error(rc, err, tmp_path / "out", ["notes.png", "not an image file", "--image"], "notes.png")
    assert out == ""


def test_run_with_a_truncated_image(tiny_bundle, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    whole = tmp_path / "whole.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(whole)
    half = tmp_path / "half.png"
    half.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    rc = main(["run", str(tiny_bundle), "--image", str(whole), "--prompt", "hi", "--image", str(half), "--prompt", "hi"])
    out, err = capsys.readouterr()
    _assert_clean_error(rc, err, tmp_path / "out", ["half.png", "truncated", "--image"], "half.png")
    assert out == ""
