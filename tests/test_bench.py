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
