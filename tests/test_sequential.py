"""Sequential (layer-by-layer) calibration gives what whole-model calibration gives."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

from quota_compile.calibration.calibrate import quantize_model
from quota_compile.config import parse_config
from quota_compile.models import load_model
from quota_compile.core.decisions import decide_pruning
from quota_compile.capture.sequential import Placement


def _calibrate(folder: Path, sequential: bool):
    """GPTQ on the rotated model, the per_channel KV scales and QUOTA's signals and score-weight
    search: every calibration pass there is."""
    doc = {
        "version": 1,
        "model": {"source": str(folder)},
        "quantization": {"weights": {"group_size": 16, "method": "gptq"}, "kv_cache": {"granularity": "per_channel"}, "rotation": "hadamard"},
        "pruning": {"method": "quota", "keep_ratio": 0.5},
        "calibration": {"num_samples": 8, "sequential": sequential},
    }
    cfg = parse_config(doc, Path("t.yaml"))
    vlm = load_model(cfg, contextlib.ExitStack())
    span = vlm.visual_span()
    events: list = []
    real_layer = Placement.layer

    def record(self, i):  # every placement's layer moves, in order
        events.append(i)
        return real_layer(self, i)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Placement, "layer", record)
        qm = quantize_model(vlm, cfg, span)
        pruning, _, _ = decide_pruning(cfg, vlm, qm, span)
    return qm, pruning, events, vlm.num_layers


def test_sequential_calibration_gives_the_whole_model_recipe(tiny_folder):
    whole, whole_pruning, whole_events, layers = _calibrate(tiny_folder, False)
    seq, seq_pruning, seq_events, _ = _calibrate(tiny_folder, True)
    assert whole_events == []  # whole-model: no layer is moved
    # streaming: each pass (the order probe, GPTQ, the KV scales, the signals, the search) loads
    # the layers one at a time, in order
    assert len(seq_events) % layers == 0 and len(seq_events) >= 4 * layers
    assert seq_events == list(range(layers)) * (len(seq_events) // layers)
    assert whole.weights.keys() == seq.weights.keys()
    for name, w in whole.weights.items():
        assert torch.equal(w.codes, seq.weights[name].codes), name
        # GPTQ's group scales come from the weights as its sweep updated them (float64
        # products with the inverse Hessian, whose sum order follows the thread count)
        torch.testing.assert_close(w.scale, seq.weights[name].scale, rtol=1e-6, atol=0.0, msg=name)
    # the KV scales are maxima of k_proj / v_proj outputs: float matmul results of two runs,
    # whose float32 sum order follows the GEMM kernel's blocking (thread count)
    torch.testing.assert_close(whole.kv_scales, seq.kv_scales, rtol=1e-5, atol=0.0)
    assert whole_pruning.weight_search  # the search ran, and gave the same KL at every point
    assert whole_pruning.model_dump() == seq_pruning.model_dump()

