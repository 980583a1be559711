"""docs/config.md is generated from the config schema, and every key of the schema is described."""

from __future__ import annotations

from quota_compile import config_reference
from quota_compile.config import CompileConfig


def test_docs_config_md_is_up_to_date():
    path = config_reference.DOC_PATH
    assert path.is_file(), f"{path} is missing; generate it with `{config_reference.COMMAND}`"
    assert path.read_text(encoding="utf-8") == config_reference.render(), (
        f"{path} differs from the config schema in quota_compile/config.py; regenerate it with `{config_reference.COMMAND}`"
    )


def test_every_key_has_a_description():
    keys = dict(config_reference.fields(CompileConfig))
    assert len(keys) > 90  # nested sections are walked, not only the top level
    missing = [k for k, f in keys.items() if not (f.description or "").strip()]
    assert not missing, f"keys without Field(description=...) in quota_compile/config.py: {missing}"


def _row(text: str, key: str) -> list[str]:
    rows = [line for line in text.splitlines() if line.startswith(f"| `{key}` |")]
    assert len(rows) == 1, f"expected one row for {key}"
    return [c.strip() for c in rows[0].strip("|").split(" | ")]


def test_concrete_rows():
    text = config_reference.render()
    key, kind, default, allowed, meaning = _row(text, "pruning.keep_ratio")
    assert (kind, default, allowed) == ("float", "`0.3`", "(0.0, 1.0]")
    assert "budget" in meaning
    assert _row(text, "model.source")[2] == "required"
    assert _row(text, "export.opset")[2:4] == ["`21`", "[21, 23]"]
    assert _row(text, "export.targets")[2] == '`["portable"]`'
    assert _row(text, "verify.onnxruntime.max_code_flip_rate")[1:3] == ["float or null", "`null`"]
    assert _row(text, "pruning.method")[3] == "`none`, `quota`, `quota-fp`, `fastv`, `pdrop`, `random`, `dart`"
    # one section per top-level YAML key, in schema order
    headings = [line[4:-1] for line in text.splitlines() if line.startswith("## `")]
    assert headings == list(CompileConfig.model_fields)


def test_render_is_deterministic():
    assert config_reference.render() == config_reference.render()


def test_main_prints_the_reference(capsys):
    assert config_reference.main([]) == 0
    assert capsys.readouterr().out == config_reference.render()
