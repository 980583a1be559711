"""GPTQ weights (quota_compile.quant.gptq) against round-to-nearest, measured on inputs the GPTQ
calibration did not see (independently seeded draws of the same input distribution)."""

from __future__ import annotations

import pytest
import torch

from quota_compile.quant import ops
from quota_compile.quant.gptq import HessianAccumulator, gptq_quantize


def _layer(n=48, k=256, samples=512, seed=0, test_seed=None):
    """``(x, w)``, or ``(x, w, x_test)`` with ``test_seed``: ``x_test`` comes from the same
    input distribution (same mixing, same large channels) but its own random stream."""
    g = torch.Generator().manual_seed(seed)
    # correlated inputs with a few large channels, as real activations have
    mix = torch.randn(k, k, generator=g, dtype=torch.float64) / k**0.5

    def draw(gen):
        x = torch.randn(samples, k, generator=gen, dtype=torch.float64) @ mix
        x[:, :4] *= 8.0
        return x

    x = draw(g)
    w = torch.randn(n, k, generator=g, dtype=torch.float64) * 0.05
    if test_seed is None:
        return x, w
    return x, w, draw(torch.Generator().manual_seed(test_seed))


def _output_error(x, w, codes, scale, group):
    wq = ops.dequantize_weight(codes, scale, group).to(torch.float64)  # [K, N]
    return float(torch.linalg.norm(x @ w.T - x @ wq) / torch.linalg.norm(x @ w.T))


@pytest.mark.parametrize("group, act_order", [(32, False), (32, True), (256, False)])
def test_gptq_has_lower_output_error_than_rtn_on_held_out_inputs(group, act_order):
    """The Hessian comes from ``x``; the error is measured on ``x_test``, drawn independently
    from the same distribution: GPTQ's advantage is not a fit to its calibration samples."""
    x, w, x_test = _layer(test_seed=1000 + group)
    assert not torch.equal(x, x_test)
    acc = HessianAccumulator(x.shape[1])
    for chunk in x.split(100):  # accumulated in pieces, as calibration batches arrive
        acc.add(chunk)
    assert torch.allclose(acc.h, 2 * x.T @ x / x.shape[0])
    rtn = ops.quantize_weight_rtn(w.float(), 4, group)
    gptq = gptq_quantize(w, acc.h, 4, group, act_order=act_order)
    assert gptq[0].shape == rtn[0].shape and gptq[1].shape == rtn[1].shape
    assert gptq[0].dtype == torch.int8 and int(gptq[0].min()) >= -8 and int(gptq[0].max()) <= 7
    e_rtn, e_gptq = _output_error(x_test, w, *rtn, group), _output_error(x_test, w, *gptq, group)
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


def test_gptq_on_the_model_beats_rtn_layer_by_layer_on_held_out_prompts(small_folder):
    """GPTQ through the compiler's calibration (quantize_model with weights.method: gptq) on
    the small model: for every quantized Linear, on the inputs it sees from held-out prompts
    (the verification samples, seeded apart from calibration; the GPTQ model's own inputs,
    after the per-token quantizer), the output error of its weights is below RTN's. Run twice,
    the codes are identical."""
    import contextlib
    from pathlib import Path

    from quota_compile.calibration.calibrate import batches_sha256, calibration_batches, quantize_model
    from quota_compile.config import parse_config
    from quota_compile.models import load_model
    from quota_compile.capture.programs import PrefillProgram, VisionProgram
    from quota_compile.verify.gate import held_out_samples

    def build(method):
        doc = {"version": 1, "model": {"source": str(small_folder)}, "calibration": {"num_samples": 4},
               "quantization": {"weights": {"group_size": 16, "method": method}}, "verify": {"samples": 4}}
        cfg = parse_config(doc, Path("t.yaml"))
        vlm = load_model(cfg, contextlib.ExitStack())
        span = vlm.visual_span()
        return cfg, vlm, span, quantize_model(vlm, cfg, span)

    cfg, vlm, span, qm = build("gptq")
    _, _, _, rtn = build("rtn")
    _, _, _, again = build("gptq")
    assert set(qm.weights) == set(rtn.weights) and len(qm.weights) > 4
    assert all(torch.equal(qm.weights[n].codes, again.weights[n].codes) for n in qm.weights)

    held_out = [s.batch for s in held_out_samples(vlm, cfg.verify, span)]
    calibrated = calibration_batches(vlm, cfg.calibration, span)
    seen = {batches_sha256([b]) for b in calibrated}
    seen_images = {b.pixel_values.tobytes() for b in calibrated}
    assert not seen & {batches_sha256([b]) for b in held_out}  # no held-out prompt was calibrated on
    assert not seen_images & {b.pixel_values.tobytes() for b in held_out}  # nor any of its images

    inputs: dict[str, list[torch.Tensor]] = {n: [] for n in qm.weights}
    hooks = [vlm.model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: inputs[n].append(m.quantize_input(a[0]).reshape(-1, a[0].shape[-1])))
             for n in qm.weights]
    vision, prefill = VisionProgram(vlm, qm), PrefillProgram(vlm, qm, *span)
    with torch.no_grad():
        for b in held_out:
            prefill(torch.from_numpy(b.input_ids), torch.from_numpy(b.attention_mask), vision(torch.from_numpy(b.pixel_values)))
    for h in hooks:
        h.remove()
    ratios = {}
    for n, q in qm.weights.items():
        x = torch.cat(inputs[n]).to(torch.float64)
        w = vlm.model.get_submodule(n).weight.detach().to(torch.float64)
        err = {k: _output_error(x, w, qw.codes, qw.scale, qw.group_size) for k, qw in (("gptq", q), ("rtn", rtn.weights[n]))}
        ratios[n] = err["gptq"] / err["rtn"]
    assert all(r < 1 for r in ratios.values()), ratios
    assert sum(ratios.values()) / len(ratios) < 0.9
