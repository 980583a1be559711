"""Shared fixtures: the tiny builtin model written as a Hugging Face folder, and one compiled
bundle of it (compiled once per session through the CLI, from that folder)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import yaml

from quota_compile.cli import main
from quota_compile.config import parse_config
from quota_compile.models import load_model
from quota_compile.quant.simulate import quantize
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


@pytest.fixture(scope="module")
def tiny(tiny_folder):
    """``(vlm, quantized model)``: the 8-layer tiny model, quantized, for program-level tests
    (one per test module: a module may change the quantized model's switches)."""
    cfg = parse_config({"version": 1, "model": {"source": str(tiny_folder)}, "quantization": {"weights": {"group_size": 16}}}, Path("t.yaml"))
    with contextlib.ExitStack() as stack:
        vlm = load_model(cfg, stack)
        yield vlm, quantize(vlm.model, cfg.quantization)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_folder) -> Path:
    work = tmp_path_factory.mktemp("compile")
    cfg = write_config(work / "tiny.yaml", str(tiny_folder), work / "exported")
    assert main([str(cfg)]) == 0
    return work / "exported" / "tiny"


# The long end-to-end tests: each compiles, evaluates or benchmarks whole models for more than
# about 20 s on a 2-core machine (pytest --durations, 2026-12-05). `pytest -q -m "not slow"`
# leaves them out for a quick run; `pytest -q` (what .ci/run runs) runs everything. Listed here
# by test module and name prefix so that the list sits in one place beside the measurement.
SLOW = {
    "test_eval.py": ("",),
    "test_bench.py": ("",),
    "test_gate_mutations.py": ("",),
    "test_flavours.py": ("test_a_registered_flavour_is_compiled", "test_a_flavour_whose_lowering_is_wrong"),
    "test_quota.py": ("test_lowbit_and_fp_signals_differ", "test_quota_bundle_is_verified", "test_exporting_again_from_the_recipe",
                      "test_fold_topk_gather_replaces_each_marker"),
    "test_kernels.py": ("test_torch_path_",),
    "test_ort_flavour.py": ("test_per_channel_",),
    "test_e2e.py": ("test_two_compiles_give_byte_identical_graphs", "test_int8_kv_cache_and_activations"),
    "test_models.py": ("test_siglip_qwen2_full_strategy",),
    "test_gptq.py": ("test_gptq_on_the_model",),
    "test_rotation.py": ("test_compiled_graphs_rotate_online",),
    "test_trt_flavour.py": ("test_one_plugin_per_w4a4_linear",),
    "test_torch_flavour.py": ("",),
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        prefixes = SLOW.get(Path(str(item.fspath)).name, ())
        if any(item.name.startswith(p) for p in prefixes):
            item.add_marker(pytest.mark.slow)
