"""Shared fixtures: the tiny builtin model written as a Hugging Face folder, and one compiled
bundle of it (compiled once per session through the CLI, from that folder)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from quota_compile.cli import main
from quota_compile.models.builtin import build_tiny_llava, write_builtin


def write_config(path: Path, source: str, out_dir: Path, **sections) -> Path:
    """A model.yaml for the tiny model; ``sections`` override or add top-level sections."""
    doc = {
        "version": 1,
        "model": {"source": source},
        "verify": {"samples": 4, "new_tokens": 16},
        "output": {"dir": str(out_dir)},
    }
    doc.update(sections)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    return write_builtin("tiny-llava", tmp_path_factory.mktemp("hf") / "tiny-llava")


@pytest.fixture(scope="session")
def small_folder(tmp_path_factory) -> Path:
    """A 2-layer variant of the tiny model: for tests about the pipeline, not about depth."""
    folder = tmp_path_factory.mktemp("hf") / "tiny-llava-2"
    model, processor = build_tiny_llava(0, num_layers=2)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_folder) -> Path:
    work = tmp_path_factory.mktemp("compile")
    cfg = write_config(work / "tiny.yaml", str(tiny_folder), work / "exported")
    assert main([str(cfg)]) == 0
    return work / "exported" / "tiny"
