"""``quota-compile bench`` on the tiny model: structure of bench.json and that every variant ran
(no timing assertions: timings belong to benchmarks, not tests)."""

from __future__ import annotations

import json
import statistics

import pytest

from quota_compile.cli import main

from .conftest import write_config


def test_bench_runs_every_variant(tmp_path, capsys):
    cfg = write_config(
        tmp_path / "b.yaml", "builtin:tiny-llava", tmp_path / "out",
        pruning={"method": "quota", "keep_ratio": 0.3, "weights": {"att": 1.0}},
        bench={"repeats": 2, "warmup": 0, "new_tokens": 3, "prompt_tokens": 8, "threads": 1},
    )
    assert main(["bench", str(cfg)]) == 0
    printed = capsys.readouterr().out
    doc = json.loads((tmp_path / "out" / "b-bench" / "bench.json").read_text())
    names = [r["name"] for r in doc["variants"]]
    assert names == ["pytorch-fp32", "ort-fp32", "ort-w4", "ort-w4a4kv4", "quota@0.3"]
    assert all(n in printed for n in names)
    assert doc["threads"] == 1 and doc["repeats"] == 2 and doc["prompt"]["new_tokens"] == 3
    assert set(doc["versions"]) >= {"torch", "onnxruntime"}
    by = {r["name"]: r for r in doc["variants"]}
    prefill = {n: statistics.median(x["prefill_s"] for x in by[n]["repetitions"]) for n in names}
    decode = {n: statistics.median(x["decode_s"] for x in by[n]["repetitions"]) for n in names}
    for r in doc["variants"]:
        assert len(r["repetitions"]) == 2 and all(x["prefill_s"] > 0 and x["decode_s"] > 0 for x in r["repetitions"])
        # the medians of the timed repetitions, and every ratio recomputed from them
        assert r["prefill_s"] == pytest.approx(prefill[r["name"]])
        assert r["decode_tokens_per_s"] == pytest.approx(doc["prompt"]["new_tokens"] / decode[r["name"]])
        assert set(r["ratios"]) == set(names)
        for other, ratio in r["ratios"].items():
            assert ratio["prefill_speedup"] == pytest.approx(prefill[other] / prefill[r["name"]]), other
            assert ratio["decode_speedup"] == pytest.approx(decode[other] / decode[r["name"]]), other
            assert ratio["kv_bytes_reduction"] == pytest.approx(by[other]["kv_bytes_per_sequence"] / r["kv_bytes_per_sequence"]), other
        assert r["disk_bytes"] > 0 and r["floor"]["prefill_flops"] > 0
        assert r["decoder_fp16_bytes"] > 0
    assert by["pytorch-fp32"]["decoder_graph_bytes"] is None
    # INT4 weights: the decode graph (every decoder weight) is smaller than the fp32 one
    assert by["ort-w4"]["decoder_graph_bytes"] < by["ort-fp32"]["decoder_graph_bytes"]
    assert by["ort-w4"]["flavour"] == "onnxruntime" and by["ort-fp32"]["flavour"] == "portable"
    # weight-only keeps an fp32 cache; its decode floor reads fewer weight bytes than fp32
    assert by["ort-w4"]["kv_bytes_per_sequence"] == by["ort-fp32"]["kv_bytes_per_sequence"]
    assert by["ort-w4"]["floor"]["decode_weight_bytes"] < by["ort-fp32"]["floor"]["decode_weight_bytes"]
    v = doc["prompt"]["visual_tokens"]
    assert by["quota@0.3"]["visual_tokens_per_layer"][0] == v and min(by["quota@0.3"]["visual_tokens_per_layer"]) < v
    # pruning and quantization shrink the cache and the prefill work, in that order
    kv = [by[n]["kv_bytes_per_sequence"] for n in ("ort-fp32", "ort-w4a4kv4", "quota@0.3")]
    assert kv[0] > kv[1] > kv[2]
    assert by["quota@0.3"]["floor"]["prefill_flops"] < by["ort-w4a4kv4"]["floor"]["prefill_flops"] == by["ort-fp32"]["floor"]["prefill_flops"]
    assert by["pytorch-fp32"]["kv_bytes_per_sequence"] == by["ort-fp32"]["kv_bytes_per_sequence"]
    assert main(["bench", str(cfg)]) == 2  # never overwritten silently


def test_shipped_configs_are_valid():
    """Every YAML in examples/ and benchmarks/ passes the config check (a typo in a key there
    would only show when someone runs the documented command)."""
    from pathlib import Path

    from quota_compile.config import load_config

    root = Path(__file__).resolve().parents[1]
    files = sorted((root / "examples").glob("*.yaml")) + sorted((root / "benchmarks").glob("*.yaml"))
    assert len(files) >= 3
    for f in files:
        load_config(f)


def test_bench_times_the_pytorch_path_at_each_batch_size(tmp_path, monkeypatch):
    """``bench.paths: [torch]``: the Hugging Face row, then the quantized and the bundle's builds
    through the PyTorch path (its kernel operators in the programs run), with the graphs' and
    the K-major weight layout, each at every batch size; ratios compare rows of one batch size;
    tokens/s count every sequence of the batch."""
    from quota_compile.flavours import torch_path

    seen = []

    class Recording(torch_path.KernelBackend):
        def __init__(self, traced, device="cuda", weight_layout="graph"):
            super().__init__(traced, device, weight_layout)
            seen.append((weight_layout, {str(n.target) for m in self.programs.values() for n in m.graph.nodes if n.op == "call_function"}))

    monkeypatch.setattr(torch_path, "KernelBackend", Recording)
    cfg = write_config(
        tmp_path / "t.yaml", "builtin:tiny-llava", tmp_path / "out",
        pruning={"method": "quota", "keep_ratio": 0.3, "weights": {"att": 1.0}},
        bench={"repeats": 2, "warmup": 0, "new_tokens": 3, "prompt_tokens": 8, "threads": 1,
               "paths": ["torch"], "batch_sizes": [1, 2], "torch_weight_layouts": ["graph", "kmajor"]},
    )
    assert main(["bench", str(cfg)]) == 0
    doc = json.loads((tmp_path / "out" / "t-bench" / "bench.json").read_text())
    assert doc["device"] == "cpu" and doc["batch_sizes"] == [1, 2]
    names = ["pytorch-fp32", "pytorch-fp32 x2"]
    for build in ("torch-w4a4kv4", "torch-quota@0.3"):
        names += [build, f"{build} x2", f"{build} kmajor", f"{build} kmajor x2"]
    assert [r["name"] for r in doc["variants"]] == names
    assert [layout for layout, _ in seen] == ["graph", "kmajor"] * 2
    for layout, ops in seen:  # the kernel operators are what runs; kmajor: the K-major Linear
        linear = "quota.w4a4_linear_kmajor.default" if layout == "kmajor" else "quota.w4a4_linear.default"
        assert {linear, "quota.kv_decode_attention.default"} <= ops, layout
    by = {r["name"]: r for r in doc["variants"]}
    for r in doc["variants"]:
        bs = r["batch_size"]
        assert bs == (2 if r["name"].endswith(" x2") else 1)
        assert set(r["ratios"]) == {n for n in names if by[n]["batch_size"] == bs}
        decode = statistics.median(x["decode_s"] for x in r["repetitions"])
        assert r["decode_tokens_per_s"] == pytest.approx(bs * 3 / decode)
        if r["name"].startswith("torch-"):
            assert r["flavour"] == "torch" and r["disk_bytes"] is None
    assert by["torch-quota@0.3"]["kv_bytes_per_sequence"] < by["torch-w4a4kv4"]["kv_bytes_per_sequence"] < by["pytorch-fp32"]["kv_bytes_per_sequence"]


def test_bench_on_a_gpu_torch_cannot_see_is_refused(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU torch can use: the refusal is for machines without one")
    cfg = write_config(tmp_path / "g.yaml", "builtin:tiny-llava", tmp_path / "out", bench={"device": "cuda", "paths": ["torch"]})
    assert main(["bench", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "g.yaml" in err and "bench.device" in err and "CUDA" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
