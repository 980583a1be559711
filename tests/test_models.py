"""The LLaVA adapter on the architectures it claims: CLIP or SigLIP towers, Llama / Mistral /
Qwen2 decoders with GQA, both feature-select strategies. In full precision the programs must
compute what transformers computes; one variant is compiled and verified end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from PIL import Image

from quota_compile.cli import main
from quota_compile.config import DEFAULT_PROMPT, QuantizationSection, WeightQuant
from quota_compile.models.builtin import build_tiny_llava
from quota_compile.models.llava import load_llava
from quota_compile.quant.simulate import quantize
from quota_compile.capture.trace import build_programs
from quota_compile.data.samples import synthetic_images

from .conftest import write_config

def _decoder_biased_linears(model) -> list[tuple[str, torch.nn.Linear]]:
    return [(n, m) for n, m in model.model.language_model.named_modules() if isinstance(m, torch.nn.Linear) and m.bias is not None]


VARIANTS = {
    # id: (vision tower, text model, select strategy, feature layer)
    "clip-llama-default": ("clip", "llama", "default", -2),
    "siglip-qwen2-full": ("siglip", "qwen2", "full", -1),
    "clip-mistral-two-layers": ("clip", "mistral", "default", [-2, -1]),
}


def write_variant(folder: Path, vision: str, text: str, strategy: str, layer, num_layers: int = 8,
                  bias_std: float = 0.0) -> Path:
    """The tiny model of that architecture as a Hugging Face folder; ``bias_std > 0`` draws the
    decoder's Linear biases (Qwen2's q/k/v; zeros at init) from N(0, bias_std)."""
    model, processor = build_tiny_llava(0, vision=vision, text=text, strategy=strategy, feature_layer=layer, num_layers=num_layers)
    if bias_std > 0:
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for _, module in _decoder_biased_linears(model):
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * bias_std)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("variant", list(VARIANTS), ids=list(VARIANTS))
def test_full_precision_programs_match_transformers(tmp_path: Path, variant: str):
    folder = write_variant(tmp_path / variant, *VARIANTS[variant])
    vlm = load_llava(folder, str(folder), DEFAULT_PROMPT)
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
    # Qwen2's q/k/v biases are drawn (zeros at init), so that dropping one changes the function
    folder = write_variant(tmp_path / "siglip-qwen2", *VARIANTS["siglip-qwen2-full"], num_layers=2, bias_std=0.5)
    cfg = write_config(tmp_path / "sq.yaml", str(folder), tmp_path / "out", verify={"samples": 4, "new_tokens": 16})
    assert main([str(cfg)]) == 0
    bundle = tmp_path / "out" / "sq"
    v = json.loads((bundle / "verify.json").read_text())
    assert v["passed"] and v["greedy_agreement"] == 1.0
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["model"]["visual_start"] >= 1 and m["model"]["visual_tokens"] == 64
    # Qwen2's q/k/v biases survive quantization as float Adds after the INT4 MatMuls: in the
    # prefill and decode graphs, the 1-D float initializers added to the output of a MatMul of
    # dequantized INT4 weights are exactly the decoder's biases (by value, as the folder holds them).
    from safetensors.torch import load_file

    weights = load_file(folder / "model.safetensors")
    biases = sorted(t.numpy().tobytes() for n, t in weights.items()
                    if "language_model" in n and n.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")))
    assert len(biases) == 3 * 2 and all(np.frombuffer(b, np.float32).any() for b in biases)
    for graph in ("prefill", "decode"):
        assert _biases_after_int4_matmuls(onnx.load(bundle / f"{graph}.onnx")) == biases, graph


def _biases_after_int4_matmuls(model: onnx.ModelProto) -> list[bytes]:
    """The float32 bytes of each 1-D initializer that an Add adds to a MatMul whose weights are
    a DequantizeLinear of an INT4 initializer, sorted."""
    inits = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}

    def int4_matmul(name: str) -> bool:
        mm = producer.get(name)
        if mm is None or mm.op_type != "MatMul":
            return False
        dq = producer.get(mm.input[1])
        return dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in inits \
            and inits[dq.input[0]].data_type == onnx.TensorProto.INT4

    found = []
    for node in model.graph.node:
        if node.op_type != "Add":
            continue
        for i, name in enumerate(node.input):
            t = inits.get(name)
            if t is not None and len(t.dims) == 1 and t.data_type == onnx.TensorProto.FLOAT and int4_matmul(node.input[1 - i]):
                found.append(numpy_helper.to_array(t).astype(np.float32).tobytes())
    return sorted(found)


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
