"""GPTQ weights (quota_compile.quant.gptq) against round-to-nearest on calibration data."""

from __future__ import annotations

import pytest
import torch

from quota_compile.quant import ops
from quota_compile.quant.gptq import HessianAccumulator, gptq_quantize


def _layer(n=48, k=256, samples=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    # correlated inputs with a few large channels, as real activations have
    mix = torch.randn(k, k, generator=g, dtype=torch.float64) / k**0.5
    x = torch.randn(samples, k, generator=g, dtype=torch.float64) @ mix
    x[:, :4] *= 8.0
    w = torch.randn(n, k, generator=g, dtype=torch.float64) * 0.05
    return x, w


def _output_error(x, w, codes, scale, group):
    wq = ops.dequantize_weight(codes, scale, group).to(torch.float64)  # [K, N]
    return float(torch.linalg.norm(x @ w.T - x @ wq) / torch.linalg.norm(x @ w.T))


@pytest.mark.parametrize("group, act_order", [(32, False), (32, True), (256, False)])
def test_gptq_has_lower_output_error_than_rtn(group, act_order):
    x, w = _layer()
    acc = HessianAccumulator(x.shape[1])
    for chunk in x.split(100):  # accumulated in pieces, as calibration batches arrive
        acc.add(chunk)
    assert torch.allclose(acc.h, 2 * x.T @ x / x.shape[0])
    rtn = ops.quantize_weight_rtn(w.float(), 4, group)
    gptq = gptq_quantize(w, acc.h, 4, group, act_order=act_order)
    assert gptq[0].shape == rtn[0].shape and gptq[1].shape == rtn[1].shape
    assert gptq[0].dtype == torch.int8 and int(gptq[0].min()) >= -8 and int(gptq[0].max()) <= 7
    e_rtn, e_gptq = _output_error(x, w, *rtn, group), _output_error(x, w, *gptq, group)
    assert e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)


def test_gptq_is_deterministic_and_handles_dead_inputs():
    x, w = _layer(k=64, samples=128)
    x[:, 5] = 0.0  # an input that never fires
    h = HessianAccumulator(64)
    h.add(x)
    a, b = gptq_quantize(w, h.h, 4, 32), gptq_quantize(w, h.h, 4, 32)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert int(a[0][5].abs().sum()) == 0  # the dead input's codes are 0


def test_gptq_with_identity_hessian_is_round_to_nearest():
    """With H = I there is nothing to compensate: GPTQ reduces to RTN."""
    _, w = _layer(k=64)
    codes, scale = gptq_quantize(w, torch.eye(64, dtype=torch.float64), 4, 32, damp=0.0)
    rtn_codes, rtn_scale = ops.quantize_weight_rtn(w.float(), 4, 32)
    assert torch.equal(codes, rtn_codes) and torch.allclose(scale, rtn_scale)


def test_gptq_on_the_model_beats_rtn_layer_by_layer(small_folder):
    """GPTQ through the compiler's calibration (quantize_model with weights.method: gptq) on
    the small model: for every quantized Linear, on the inputs it sees from the calibration
    prompts (the GPTQ model's own, after the per-token quantizer), the output error of its
    weights is below RTN's. Run twice, the codes are identical."""
    import contextlib
    from pathlib import Path

    from quota_compile.calibrate import calibration_batches, quantize_model
    from quota_compile.config import parse_config
    from quota_compile.models import load_model
    from quota_compile.programs import PrefillProgram, VisionProgram

    def build(method):
        doc = {"version": 1, "model": {"source": str(small_folder)}, "calibration": {"num_samples": 4},
               "quantization": {"weights": {"group_size": 16, "method": method}}}
        cfg = parse_config(doc, Path("t.yaml"))
        vlm = load_model(cfg, Path("t.yaml"), contextlib.ExitStack())
        span = vlm.visual_span()
        return cfg, vlm, span, quantize_model(vlm, cfg, span)

    cfg, vlm, span, qm = build("gptq")
    _, _, _, rtn = build("rtn")
    _, _, _, again = build("gptq")
    assert set(qm.weights) == set(rtn.weights) and len(qm.weights) > 4
    assert all(torch.equal(qm.weights[n].codes, again.weights[n].codes) for n in qm.weights)

    inputs: dict[str, list[torch.Tensor]] = {n: [] for n in qm.weights}
    hooks = [vlm.model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: inputs[n].append(m.quantize_input(a[0]).reshape(-1, a[0].shape[-1])))
             for n in qm.weights]
    vision, prefill = VisionProgram(vlm, qm), PrefillProgram(vlm, qm, *span)
    with torch.no_grad():
        for b in calibration_batches(vlm, cfg.calibration, span):
            prefill(torch.from_numpy(b.input_ids), torch.from_numpy(b.attention_mask), vision(torch.from_numpy(b.pixel_values)))
    for h in hooks:
        h.remove()
    ratios = []
    for n, q in qm.weights.items():
        x = torch.cat(inputs[n]).to(torch.float64)
        w = vlm.model.get_submodule(n).weight.detach().to(torch.float64)
        err = {k: _output_error(x, w, qw.codes, qw.scale, qw.group_size) for k, qw in (("gptq", q), ("rtn", rtn.weights[n]))}
        assert err["gptq"] < err["rtn"], (n, err)
        ratios.append(err["gptq"] / err["rtn"])
    assert sum(ratios) / len(ratios) < 0.9
