"""CLI behaviour beyond bad input: write-builtin, internal errors, the default command."""

from __future__ import annotations

import json
from pathlib import Path

from quota_compile import cli, pipeline


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
