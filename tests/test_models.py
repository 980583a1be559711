"""The LLaVA adapter on the architectures it claims: CLIP or SigLIP towers, Llama / Mistral /
Qwen2 decoders with GQA, both feature-select strategies. In full precision the programs must
compute what transformers computes; one variant is compiled and verified end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from quota_compile.cli import main
from quota_compile.config import DEFAULT_PROMPT, QuantizationSection, WeightQuant
from quota_compile.models.builtin import build_tiny_llava
from quota_compile.models.llava import load_llava
from quota_compile.quant.simulate import quantize
from quota_compile.trace import build_programs
from quota_compile.verify import synthetic_images

from .conftest import write_config

VARIANTS = {
    # id: (vision tower, text model, select strategy, feature layer)
    "clip-llama-default": ("clip", "llama", "default", -2),
    "siglip-qwen2-full": ("siglip", "qwen2", "full", -1),
    "clip-mistral-two-layers": ("clip", "mistral", "default", [-2, -1]),
}


def write_variant(folder: Path, vision: str, text: str, strategy: str, layer, num_layers: int = 8) -> Path:
    model, processor = build_tiny_llava(0, vision=vision, text=text, strategy=strategy, feature_layer=layer, num_layers=num_layers)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("variant", list(VARIANTS), ids=list(VARIANTS))
def test_full_precision_programs_match_transformers(tmp_path: Path, variant: str):
    folder = write_variant(tmp_path / variant, *VARIANTS[variant])
    vlm = load_llava(folder, str(folder), DEFAULT_PROMPT, tmp_path / "model.yaml")
    start, count = vlm.visual_span()
    assert count == 64  # 8x8 patches; CLS dropped by 'default', absent from SigLIP
    images = synthetic_images(2, 32, seed=5)
    enc = vlm.processor(images=images, text=[vlm.prompt("What is it?"), vlm.prompt("How many red circles are there?")], padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    with torch.no_grad():
        hf_logits = vlm.model(**enc).logits
    qm = quantize(vlm.model, QuantizationSection(weights=WeightQuant(group_size=16)))
    programs = build_programs(vlm, qm)
    last = mask.sum(-1) - 1
    with torch.no_grad(), qm.fake_quant(False):
        feats = programs.vision(enc["pixel_values"])
        logits, *kv = programs.prefill(ids, mask, feats)
        torch.testing.assert_close(logits, hf_logits[torch.arange(2), last], rtol=1e-4, atol=1e-4)
        # One decode step equals transformers on the prompt extended by that token.
        nxt = logits.argmax(-1)
        dmask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
        step_logits, *_ = programs.decode(nxt[:, None], last[:, None] + 1, dmask, *kv)
        for i in range(2):
            n = int(last[i]) + 1
            row_ids = torch.cat([ids[i, :n], nxt[i : i + 1]])[None]
            # The swapped-in QuantLinears compute full precision inside fake_quant(False).
            ref = vlm.model(input_ids=row_ids, pixel_values=enc["pixel_values"][i : i + 1]).logits[0, -1]
            torch.testing.assert_close(step_logits[i], ref, rtol=1e-4, atol=1e-4)
    # The quantized simulation really quantizes: it differs from full precision.
    with torch.no_grad():
        sim_logits = programs.prefill(ids, mask, programs.vision(enc["pixel_values"]))[0]
    assert not torch.allclose(sim_logits, logits, atol=1e-3)


def test_siglip_qwen2_full_strategy_compiles_and_verifies(tmp_path: Path):
    # Two decoder layers: the test is about the architecture; fewer layers also means fewer
    # values that float reassociation can move across a rounding boundary.
    folder = write_variant(tmp_path / "siglip-qwen2", *VARIANTS["siglip-qwen2-full"], num_layers=2)
    cfg = write_config(tmp_path / "sq.yaml", str(folder), tmp_path / "out", verify={"samples": 4, "new_tokens": 16})
    assert main([str(cfg)]) == 0
    v = json.loads((tmp_path / "out" / "sq" / "verify.json").read_text())
    assert v["passed"] and v["greedy_agreement"] == 1.0
    m = json.loads((tmp_path / "out" / "sq" / "manifest.json").read_text())
    assert m["model"]["visual_start"] >= 1 and m["model"]["visual_tokens"] == 64
    # Qwen2's q/k/v biases survive quantization as float Adds after the INT4 MatMuls.
    assert np.isfinite(v["max_logits_rel_error"])


def test_bench_llava_is_llava_1_5_shaped():
    from quota_compile.models.builtin import build_bench_llava

    model, processor = build_bench_llava()
    cfg = model.config
    assert (cfg.vision_config.image_size, cfg.vision_config.patch_size) == (336, 14)
    text = processor(images=[Image.new("RGB", (336, 336))], text=["USER: <image>\nHi ASSISTANT:"], return_tensors="pt")
    assert int((text["input_ids"] == cfg.image_token_index).sum()) == 576
    decoder = sum(p.numel() for p in model.model.language_model.parameters()) + model.lm_head.weight.numel()
    assert decoder >= 100e6 and cfg.text_config.vocab_size == 32000
    assert cfg.text_config.num_key_value_heads < cfg.text_config.num_attention_heads  # GQA
