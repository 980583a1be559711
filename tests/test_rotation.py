"""The residual-stream rotation (quota_compile.quant.rotation) leaves the full-precision model's
outputs unchanged."""

from __future__ import annotations

import pytest
import torch

from quota_compile.quant.rotation import random_hadamard, rotate_llava


@pytest.mark.parametrize("n", [1, 8, 64, 96, 768])
def test_random_hadamard_is_orthogonal_and_seeded(n):
    q = random_hadamard(n, seed=3)
    assert torch.allclose(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.equal(q, random_hadamard(n, seed=3)) and (n == 1 or not torch.equal(q, random_hadamard(n, seed=4)))


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
