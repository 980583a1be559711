"""The residual-stream rotation (quota_compile.quant.rotation) leaves the full-precision model's
outputs unchanged."""

from __future__ import annotations

import pytest
import torch

from quota_compile.quant.rotation import KroneckerRotation, RotatedLinear, random_hadamard, rotate_llava


@pytest.mark.parametrize("n", [1, 8, 64, 96, 768])
def test_random_hadamard_is_orthogonal_and_seeded(n):
    q = random_hadamard(n, seed=3)
    assert torch.allclose(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.equal(q, random_hadamard(n, seed=3)) and (n == 1 or not torch.equal(q, random_hadamard(n, seed=4)))


@pytest.mark.parametrize("n", [8, 64, 96, 172, 688])
def test_kronecker_rotation_applies_its_dense_matrix(n):
    """The factored online rotation (Reshape, one MatMul per factor, the signs) computes
    ``x @ R`` for the dense ``R`` that the weights are multiplied by offline; 172 and 688 have
    the odd factor 43 of LLaVA-7B's 11008."""
    rot = KroneckerRotation(n, seed=2)
    x = torch.randn(3, 5, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(rot(x), x @ rot.matrix(), rtol=0, atol=1e-12)
    assert torch.allclose(rot(x.float()).double(), x @ rot.matrix(), rtol=0, atol=1e-5)  # float32 factors


def test_online_rotation_puts_rotated_linears_in_place():
    from .conftest import build_tiny_llava

    for online in (True, False):
        model, _ = build_tiny_llava(0, num_layers=2)
        rotate_llava(model, seed=0, online=online)
        for layer in model.model.language_model.layers:
            assert isinstance(layer.mlp.down_proj, RotatedLinear) == online
            assert isinstance(layer.self_attn.o_proj, RotatedLinear) == online
            assert hasattr(layer.self_attn, "qk_rotation") == online


def test_rotation_leaves_fp_logits_unchanged_in_float64():
    """The whole LLaVA forward (vision tower, projector, decoder, lm_head) in float64, before
    and after the rotation. (Hugging Face's RMSNorm computes in float32 even in a float64
    model, so the difference is at float32 rounding, not float64's.)"""
    import numpy as np
    from PIL import Image

    from .conftest import build_tiny_llava

    model, processor = build_tiny_llava(0, num_layers=2)
    model = model.double().eval()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    enc = processor(images=[image], text=["USER: <image>\nwhat is it? ASSISTANT:"], return_tensors="pt")
    args = dict(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=enc["pixel_values"].double())
    with torch.no_grad():
        before = model(**args, output_hidden_states=True)
        rotate_llava(model, seed=1)
        after = model(**args, output_hidden_states=True)
    rel = float(torch.linalg.norm(after.logits - before.logits) / torch.linalg.norm(before.logits))
    assert rel <= 1e-5, rel
    # the residual stream itself is rotated, not unchanged
    assert not torch.allclose(before.hidden_states[1], after.hidden_states[1], atol=1e-3)


def test_rotation_cuts_the_w4a4kv4_error_of_outlier_channels():
    """The outlier experiment (benchmarks/outlier_experiment.py) on the tiny model: outliers x50
    in the normalised residual stream and in down_proj's input, W4A4 with an INT4 KV cache.
    The rotation cuts the KL from full precision by more than 5x (measured 16.8x with
    benchmarks/outliers.py, docs/benchmark.md); its online part, not only the RMSNorm folding
    that undoes the residual injection, matters; GPTQ on the rotated model is better still."""
    from benchmarks.outlier_experiment import run_experiment

    r = run_experiment(prompts=8, steps=4, calibration_samples=8)
    print({k: (v.kl, v.agreement) for k, v in r.items()})
    assert r["rtn + rotation"].kl * 5 < r["rtn"].kl
    assert r["rtn + rotation"].agreement > r["rtn"].agreement + 0.3
    assert r["rtn + rotation"].kl < r["rtn + offline rotation"].kl
    assert r["gptq + rotation"].kl < r["rtn + rotation"].kl
    assert r["gptq"].kl > 5 * r["gptq + rotation"].kl  # GPTQ alone does not fix outliers


def test_injected_outliers_keep_the_fp_function():
    import contextlib
    from pathlib import Path

    from quota_compile.config import parse_config
    from quota_compile.models import load_model
    from benchmarks.outlier_experiment import inject_outliers

    cfg = parse_config({"version": 1, "model": {"source": "builtin:tiny-llava"}}, Path("t.yaml"))
    vlm = load_model(cfg, contextlib.ExitStack())
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    m = vlm.model

    def logits():
        with torch.no_grad():
            return m.lm_head(m.model.language_model(input_ids=ids).last_hidden_state)

    before = logits()
    up = m.model.language_model.layers[0].mlp.up_proj.weight.detach().clone()
    inject_outliers(m)
    assert torch.allclose(logits(), before, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(m.model.language_model.layers[0].mlp.up_proj.weight, up)


def test_config_rotation_rotates_before_quantizing(small_folder):
    """``quantization.rotation: hadamard`` through quantize_model: the model's weights are
    rotated and its full-precision function (quantizers off) is unchanged."""
    import contextlib
    from pathlib import Path

    from quota_compile.calibration.calibrate import quantize_model
    from quota_compile.config import parse_config
    from quota_compile.models import load_model

    def build(rotation):
        doc = {"version": 1, "model": {"source": str(small_folder)}, "quantization": {"weights": {"group_size": 16}, "rotation": rotation}}
        cfg = parse_config(doc, Path("t.yaml"))
        vlm = load_model(cfg, contextlib.ExitStack())
        return vlm, quantize_model(vlm, cfg, vlm.visual_span())

    ids = torch.randint(3, 300, (1, 16), generator=torch.Generator().manual_seed(0))
    out, table = {}, {}
    for rotation in ("none", "hadamard"):
        vlm, qm = build(rotation)
        table[rotation] = vlm.model.get_input_embeddings().weight.detach().clone()
        with qm.fake_quant(False), torch.no_grad():
            out[rotation] = vlm.model.lm_head(vlm.model.model.language_model(input_ids=ids).last_hidden_state)
    assert not torch.allclose(table["none"], table["hadamard"], atol=1e-3)  # rotated
    assert torch.allclose(out["none"], out["hadamard"], rtol=1e-4, atol=1e-4)


def test_online_rotation_keeps_the_programs_fp_function_and_rotates_the_cache(small_folder):
    """Through quantize_model and the prefill program (which applies the query/key rotation
    after RoPE): with the quantizers off, the logits do not change; the key and value caches
    the program stores are rotated, not equal."""
    import contextlib
    from pathlib import Path

    from quota_compile.calibration.calibrate import quantize_model
    from quota_compile.config import parse_config
    from quota_compile.models import load_model
    from quota_compile.capture.programs import PrefillProgram, VisionProgram

    out = {}
    for rotation in ("none", "hadamard"):
        doc = {"version": 1, "model": {"source": str(small_folder)}, "quantization": {"weights": {"group_size": 16}, "rotation": rotation}}
        cfg = parse_config(doc, Path("t.yaml"))
        vlm = load_model(cfg, contextlib.ExitStack())
        qm = quantize_model(vlm, cfg, vlm.visual_span())
        start, count = vlm.visual_span()
        prefill = PrefillProgram(vlm, qm, start, count)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, 300, (1, start + count + 6), generator=g)
        ids[0, start : start + count] = vlm.image_token_id
        size = vlm.image_size
        pixels = torch.randn(1, 3, size, size, generator=g)
        with qm.fake_quant(False), torch.no_grad():
            features = VisionProgram(vlm, qm)(pixels)  # the projector writes the rotated stream
            out[rotation] = prefill(ids, torch.ones_like(ids), features)
    plain, rotated = out["none"], out["hadamard"]  # (logits, the cache tensors...)
    assert torch.allclose(plain[0], rotated[0], rtol=1e-4, atol=1e-4)
    for a, b in zip(plain[1:], rotated[1:]):
        if a.dtype.is_floating_point and a.dim() == 4:
            assert a.shape == b.shape and not torch.allclose(a, b, atol=1e-3)


def test_compiled_graphs_rotate_online_before_the_quantizer(small_folder, tmp_path):
    """A compile with rotation: hadamard verifies (portable and onnxruntime flavours, the decode
    through GroupQueryAttention, at accuracy_level 0), and in the graphs each layer's o_proj
    and down_proj inputs go through the rotation (its sign Mul) into the activation quantizer."""
    import json

    import onnx

    from quota_compile.cli import main

    from .conftest import write_config

    cfg = write_config(
        tmp_path / "rot.yaml", str(small_folder), tmp_path / "out",
        quantization={"weights": {"group_size": 16, "granularity": "per_channel"}, "kv_cache": {"bits": 4, "granularity": "per_channel"}, "rotation": "hadamard"},
        export={"targets": ["portable", "onnxruntime"], "onnxruntime": {"accuracy_level": 0}},
    )
    assert main([str(cfg)]) == 0
    bundle = tmp_path / "out" / "rot"
    report = json.loads((bundle / "verify.json").read_text())
    assert report["passed"] and report["flavours"]["onnxruntime"]["passed"]
    for graph in ("prefill.onnx", "decode.onnx", "onnxruntime/decode.onnx"):
        m = onnx.load(bundle / graph)
        signs = {i.name for i in m.graph.initializer if i.name.endswith("input_rotation.signs")}
        readers: dict[str, list[str]] = {}
        for n in m.graph.node:
            for i in n.input:
                readers.setdefault(i, []).append(n.op_type)
        muls = [n for n in m.graph.node if n.op_type == "Mul" and signs & set(n.input)]
        assert len(muls) == 2 * 2, graph  # o_proj and down_proj, 2 layers
        quantizer = "QuantizeLinear" if "onnxruntime" not in graph else "Div"
        assert all(quantizer in readers[n.output[0]] for n in muls), graph
    ort_decode = onnx.load(bundle / "onnxruntime" / "decode.onnx")
    assert sum(n.op_type == "GroupQueryAttention" for n in ort_decode.graph.node) == 2
