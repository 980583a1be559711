"""The synthetic outlier experiment: what the rotation and GPTQ do to W4A4KV4 on a
model whose activations have outlier channels, as real LLaVA-class decoders do.

:func:`inject_outliers` makes a few channels ``factor`` times larger in two places, each
compensated in the weights so that the full-precision function is unchanged up to rounding:

- ``norm``: the residual stream as the Linears read it (the RMSNorm scales ×factor, the reading
  Linears' input columns ÷factor). Folding the RMSNorm scales, the first step of the rotation,
  undoes exactly this injection; so do per-channel smoothing methods.
- ``mlp``: ``down_proj``'s input (``up_proj``'s output rows ×factor, ``down_proj``'s input
  columns ÷factor): the "massive activations" of real decoders. Only the online rotation before
  ``down_proj`` spreads these.

Outliers in the value cache are not injected: with the tiny model's head size of 16, a 50×
value channel makes every variant fail (KL above 7 nats, measured), rotated or not, since a
rotation within a head only spreads it over 16 channels; real value caches have no such
outliers (keys do, per channel, which the ``per_channel`` KV granularity addresses).

:func:`run_experiment` quantizes copies of one such model under several variants (RTN, the
rotation with and without its online part, GPTQ, GPTQ with the rotation), runs held-out prompts
through the simulation (prefill, then decode steps fed the full-precision model's greedy
tokens) and reports the mean KL divergence of the next-token distributions from full precision
and the share of steps whose greedy token agrees. ``benchmarks/outliers.py`` prints the table;
``tests/test_rotation.py`` asserts what it claims.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

VARIANTS: dict[str, dict] = {
    "rtn": {},
    "rtn + offline rotation": {"rotation": "hadamard", "online_rotation": False},
    "rtn + rotation": {"rotation": "hadamard"},
    "gptq": {"weights": {"method": "gptq"}},
    "gptq + rotation": {"rotation": "hadamard", "weights": {"method": "gptq"}},
}


@torch.no_grad()
def inject_outliers(model: torch.nn.Module, factor: float = 50.0, where: tuple[str, ...] = ("norm", "mlp"), count: int = 3) -> None:
    """Scale ``count`` channels by ``factor`` at each place named in ``where`` (see the module
    docstring), in place, keeping the full-precision function. Channels are fixed, spread
    over the axis: ``(i * 2 + 1) * size // (2 * count)``."""
    lm = model.model.language_model

    def channels(size: int) -> list[int]:
        return [(2 * i + 1) * size // (2 * count) for i in range(count)]

    if "norm" in where:
        c = channels(lm.config.hidden_size)
        pairs = [(layer.input_layernorm, [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]) for layer in lm.layers]
        pairs += [(layer.post_attention_layernorm, [layer.mlp.gate_proj, layer.mlp.up_proj]) for layer in lm.layers]
        pairs += [(lm.norm, [model.lm_head])]
        for norm, readers in pairs:
            norm.weight[c] *= factor
            for lin in readers:
                lin.weight[:, c] /= factor
    for layer in lm.layers:
        if "mlp" in where:
            mlp = layer.mlp
            c = channels(mlp.down_proj.in_features)
            mlp.up_proj.weight[c] *= factor
            mlp.down_proj.weight[:, c] /= factor


@dataclass(frozen=True)
class Result:
    kl: float  # mean KL(full precision || quantized) of the next-token distributions, nats
    agreement: float  # share of steps whose greedy token equals full precision's


def _config(source: str, group_size: int, variant: dict, calibration_samples: int):
    from quota_compile.config import parse_config

    quant = {"weights": {"group_size": group_size}, **{k: v for k, v in variant.items() if k != "weights"}}
    quant["weights"].update(variant.get("weights", {}))
    doc = {"version": 1, "model": {"source": source}, "quantization": quant, "calibration": {"num_samples": calibration_samples}}
    return parse_config(doc, Path("outliers.yaml"))


def _trajectory(programs, batch, steps: int, forced: list[np.ndarray] | None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Log-probabilities of ``steps`` next tokens; the decode is fed ``forced`` tokens where
    given, else its own greedy ones (returned, one ``[B]`` array per step)."""
    from quota_compile.runtime.ort import greedy_generate
    from quota_compile.verify.gate import TorchBackend

    gen = greedy_generate(TorchBackend(programs), batch, steps, None, keep_logits=True, feed=forced)
    logp = [torch.log_softmax(torch.from_numpy(x).double(), -1).numpy() for x in gen.step_logits]
    return logp, list(np.array(gen.tokens).T)


def run_experiment(
    source: str = "builtin:tiny-llava",
    variants: dict[str, dict] | None = None,
    factor: float = 50.0,
    where: tuple[str, ...] = ("norm", "mlp"),
    group_size: int = 16,
    prompts: int = 16,
    steps: int = 8,
    calibration_samples: int = 16,
) -> dict[str, Result]:
    """KL and greedy agreement of each variant (default :data:`VARIANTS`) on ``prompts``
    held-out synthetic prompts × ``steps`` next tokens, W4A4 with an INT4 per-token KV cache."""
    from quota_compile.calibration.calibrate import kl_divergence, quantize_model
    from quota_compile.config import VerifySection
    from quota_compile.models import load_model
    from quota_compile.capture.trace import build_programs
    from quota_compile.verify.gate import held_out_samples

    variants = VARIANTS if variants is None else variants
    results: dict[str, Result] = {}
    reference = None
    for name, variant in variants.items():
        cfg = _config(source, group_size, variant, calibration_samples)
        with contextlib.ExitStack() as stack:
            vlm = load_model(cfg, stack)
            inject_outliers(vlm.model, factor, where)
            span = vlm.visual_span()
            qm = quantize_model(vlm, cfg, span)
            programs = build_programs(vlm, qm)
            samples = held_out_samples(vlm, VerifySection(samples=prompts, new_tokens=steps), span)
            batches = [s.batch for s in samples]
            if reference is None:
                with qm.fake_quant(False):
                    reference = [_trajectory(programs, b, steps, None) for b in batches]
            ref_rows, rows = [], []  # one next-token distribution per row: every step of every prompt
            for b, (ref_lp, ref_tok) in zip(batches, reference):
                ref_rows += ref_lp
                rows += _trajectory(programs, b, steps, ref_tok)[0]
            p, q = np.concatenate(ref_rows), np.concatenate(rows)
            results[name] = Result(kl_divergence(p, q), float(np.mean(p.argmax(-1) == q.argmax(-1))))
    return results
