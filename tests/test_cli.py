"""CLI behaviour beyond bad input: write-builtin, internal errors, the default command."""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

from quota_compile import cli
from quota_compile.commands import compile as pipeline


def test_write_builtin_writes_a_loadable_hf_folder(tmp_path: Path, capsys):
    assert cli.main(["write-builtin", "tiny-llava", str(tmp_path / "m")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["model_type"] == "llava" and cfg["text_config"]["num_key_value_heads"] == 2
    for name in ("model.safetensors", "tokenizer.json", "processor_config.json"):
        assert (tmp_path / "m" / name).is_file(), name


def test_write_builtin_unknown_name_is_bad_input(tmp_path: Path, capsys):
    assert cli.main(["write-builtin", "huge-llava", str(tmp_path / "m")]) == 2
    assert "unknown builtin model 'huge-llava'" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_internal_error_exits_1_with_a_traceback(tmp_path: Path, capsys, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(pipeline, "load_model", boom)
    cfg = tmp_path / "m.yaml"
    cfg.write_text(f"version: 1\nmodel:\n  source: builtin:tiny-llava\noutput:\n  dir: {tmp_path / 'out'}\n")
    assert cli.main([str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "simulated bug" in err and "internal error" in err
    assert not (tmp_path / "out").exists()


def test_compile_is_the_default_command(monkeypatch):
    seen = {}

    def fake_compile(args):
        seen["config"], seen["force"] = args.config, args.force
        return 0

    monkeypatch.setattr(cli, "_compile", fake_compile)
    assert cli.main(["model.yaml", "--force"]) == 0
    assert seen == {"config": Path("model.yaml"), "force": True}
    assert cli.main(["compile", "other.yaml"]) == 0
    assert seen == {"config": Path("other.yaml"), "force": False}


def test_version_prints_the_tool_and_its_key_dependencies(capsys):
    import onnx
    import onnxruntime
    import torch
    import transformers

    from quota_compile import __version__

    assert cli.main(["--version"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith(f"quota-compile {__version__} ") and len(out.splitlines()) == 1
    for name, version in (("torch", torch.__version__), ("transformers", transformers.__version__), ("onnx", onnx.__version__),
                          ("onnxruntime", onnxruntime.__version__), ("python", platform.python_version())):
        assert f"{name} {version}" in out, name


def test_top_level_help_shows_the_implicit_compile(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: quota-compile CONFIG.yaml")
    assert "short for quota-compile compile CONFIG.yaml" in out
    for command in cli.COMMANDS:
        assert command in out


def test_every_argument_of_every_command_has_a_help_text_with_its_default(capsys):
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert sorted(commands) == sorted(cli.COMMANDS)
    for name, sub in commands.items():
        for action in sub._actions:
            assert action.help, f"{name} {action.dest} has no help text"
        assert cli.main([name, "--help"]) == 0
        out = " ".join(capsys.readouterr().out.split())  # (argparse wraps the help at the terminal's width)
        for action in sub._actions:
            if action.default not in (None, False, argparse.SUPPRESS) and action.option_strings:
                assert f"(default: {action.default})" in out, f"{name} {action.dest}: default not shown"
    assert cli.main(["run", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "bundle the bundle folder" in out and "(default: 32)" in out
    assert cli.main(["write-builtin", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "name builtin model name" in out and "folder the folder to write" in out and "(default: 0)" in out


def test_compile_results_go_to_stdout_and_stage_lines_to_stderr(monkeypatch, capsys):
    def fake_compile(config, force, console, recipe_path):
        console.print("[1/8] config    fake.yaml ...")
        graph = {"bytes": 2048, "nodes": 7, "quantize_linear": 1, "dequantize_linear": 2, "int4_initializers": 3}
        verify = {"samples": 4, "new_tokens": 16, "greedy_agreement": 1.0, "max_logits_rel_error": 1e-3,
                  "codes": {"activations": {"flips": 2, "compared": 1000}, "kv_cache": {"flips": 0, "compared": 500}},
                  "kept": {"compared": 8, "identical": 7}, "thresholds": {"max_code_flip_rate": 1e-3}}
        return pipeline.CompileResult(Path("exported/fake"), {"graphs": {"vision": graph}}, verify, 1.5)

    monkeypatch.setattr(pipeline, "compile_model", fake_compile)
    assert cli.main(["fake.yaml"]) == 0
    out, err = capsys.readouterr()
    assert "[1/8] config" in err and "[1/8]" not in out
    assert "bundle exported/fake" in out and "vision" in out and "2.0 KiB" in out
    verified = [line for line in out.splitlines() if line.startswith("verified: ")]
    assert len(verified) == 1 and "greedy agreement 100%" in verified[0]
    assert "activations 2 of 1,000, kv cache 0 of 500 (limit 0.001)" in verified[0] and "kept-set differences: 1 of 8" in verified[0]
    assert "verified" not in err and "vision" not in err


def test_run_warns_about_an_empty_prompt_and_still_answers(tiny_bundle, tmp_path, capsys):
    from PIL import Image

    img = tmp_path / "x.png"
    Image.new("RGB", (32, 32), (30, 200, 30)).save(img)
    assert cli.main(["run", str(tiny_bundle), "--image", str(img), "--prompt", "What colour is it?", "--max-new-tokens", "2"]) == 0
    out, err = capsys.readouterr()
    assert "warning" not in err and len(out.splitlines()) == 1
    assert cli.main(["run", str(tiny_bundle), "--image", str(img), "--prompt", "", "--image", str(img), "--prompt", "Hi", "--max-new-tokens", "2"]) == 0
    out, err = capsys.readouterr()
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "''" in warnings[0] and "empty" in warnings[0]
    assert len(out.splitlines()) == 2, "both prompts are still answered"


def test_prompt_warnings_for_words_the_tokenizer_does_not_know():
    """builtin:shapes-llava's word-level tokenizer maps unknown words to <unk> (the tiny
    model's byte-level one never does)."""
    from transformers import AutoTokenizer

    from quota_compile.models.builtin import TRAINED
    from quota_compile.runtime.ort import prompt_warnings

    tok = AutoTokenizer.from_pretrained(TRAINED["shapes-llava"])
    assert prompt_warnings(tok, ["What colour is the circle?", "xyzzy circle"]) == []
    (warning,) = prompt_warnings(tok, ["xyzzy plugh"])
    assert "'xyzzy plugh'" in warning and "<unk>" in warning
    (warning,) = prompt_warnings(tok, ["   "])
    assert "empty" in warning
