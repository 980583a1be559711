"""The supported torch / transformers range: declared once, refused below, noted above."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from quota_compile.cli import main
from quota_compile.environment import SUPPORTED, check_versions
from quota_compile.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_declares_the_supported_range():
    tomllib = pytest.importorskip("tomllib")
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for name, spec in SUPPORTED.items():
        assert f"{name}{spec}" in deps


def test_the_installed_releases_are_in_range():
    # The suite itself runs on a supported torch and transformers: no error, no note.
    assert check_versions() == []


@pytest.mark.parametrize("name", sorted(SUPPORTED))
def test_an_older_release_is_refused_naming_installed_and_needed(name: str):
    installed = {n: ("2.13.0" if n == "torch" else "5.25.0") for n in SUPPORTED} | {name: "1.0.0"}
    with pytest.raises(UserError) as e:
        check_versions(installed)
    message = str(e.value)
    assert f"{name} 1.0.0 is installed" in message and SUPPORTED[name] in message
    assert message.count(".") >= 1 and "\n" not in message


def test_local_builds_and_newer_releases():
    base = {"torch": "2.11.0+cu130", "transformers": "5.17.0"}
    assert check_versions(base) == []  # a CUDA build of a supported release
    notes = check_versions(base | {"torch": "2.15.0.dev20261101+cu130"})
    assert len(notes) == 1 and "torch 2.15.0.dev20261101+cu130 is newer" in notes[0]


def test_cli_refuses_an_old_torch_with_one_line(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setattr(torch, "__version__", "2.9.1+cu128")
    cfg = tmp_path / "model.yaml"
    cfg.write_text(f"version: 1\nmodel:\n  source: builtin:tiny-llava\noutput:\n  dir: {tmp_path / 'exported'}\n")
    assert main([str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "torch 2.9.1+cu128 is installed" in err and SUPPORTED["torch"] in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "exported").exists()
