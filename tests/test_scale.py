"""benchmarks/scale.py (random checkpoints of real shapes) and the simulation's memory form."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def scale():
    spec = importlib.util.spec_from_file_location("scale_benchmark", ROOT / "benchmarks" / "scale.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["scale_benchmark"] = module
    spec.loader.exec_module(module)
    return module


def test_the_checkpoint_is_a_sharded_bfloat16_llava_folder_that_transformers_loads_whole(scale, tmp_path, monkeypatch):
    from safetensors import safe_open
    from transformers import LlavaForConditionalGeneration

    monkeypatch.setattr(scale, "SHARD_BYTES", 200_000)  # several shards from the small shape
    folder = scale.write_checkpoint("smoke", tmp_path / "a", seed=3)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == {s.name for s in shards}
    stored = {}
    for s in shards:
        with safe_open(str(s), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        assert all(t.dtype == torch.bfloat16 for t in tensors.values())
        # a shard only goes over the limit when one tensor alone does
        assert sum(t.numel() * 2 for t in tensors.values()) <= 200_000 or len(tensors) == 1
        stored.update(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in stored.values())

    model, info = LlavaForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    text = model.config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_key_value_heads) == (128, 8, 2)
    params = dict(model.named_parameters())
    assert set(stored) == set(params)
    for name, t in stored.items():
        assert torch.equal(params[name].to(torch.bfloat16), t), name
    norm = stored["model.language_model.layers.0.input_layernorm.weight"]
    assert torch.equal(norm, torch.ones_like(norm))
    bias = stored["model.multi_modal_projector.linear_1.bias"]
    assert torch.equal(bias, torch.zeros_like(bias))
    q = stored["model.language_model.layers.0.self_attn.q_proj.weight"].float()
    assert 0.015 < q.std().item() < 0.025
    head = stored["lm_head.weight"].float()
    assert head.std().item() > 10 * q.std().item()  # the builtins' logit gain

    # the same seed gives the same bytes; another seed other weights; a complete folder is reused
    again = scale.write_checkpoint("smoke", tmp_path / "b", seed=3)
    other = scale.write_checkpoint("smoke", tmp_path / "c", seed=4)
    for s in shards:
        assert (again / s.name).read_bytes() == s.read_bytes()
        assert (other / s.name).read_bytes() != s.read_bytes()
    before = shards[0].stat().st_mtime_ns
    scale.write_checkpoint("smoke", tmp_path / "a", seed=3)
    assert shards[0].stat().st_mtime_ns == before


def test_progress_lines_give_each_stage_its_time_and_peak_memory(scale):
    lines = [
        "[1/8] config    model.yaml ...\n",
        "                done in 0.0 s, peak memory 325.5 MiB\n",
        "[2/8] load      /x/checkpoint ...\n",
        "                done in 19.2 s, peak memory 5.3 GiB\n",
        "[3/8] quantize  W4A4 RTN weights (group 128), per-token activations, INT4 KV \n",
        "cache (per_token) ...\n",
        "                done in 44.0 s, peak memory 812 B\n",
        "[4/8] calibrate quota, keep_ratio 0.3, lowbit signals ...\n",
        "                prefill 3/8\n",
    ]
    assert scale.parse_progress(lines) == [
        {"stage": "config", "seconds": 0.0, "peak_rss_bytes": round(325.5 * 1024**2)},
        {"stage": "load", "seconds": 19.2, "peak_rss_bytes": round(5.3 * 1024**3)},
        {"stage": "quantize", "seconds": 44.0, "peak_rss_bytes": 812},
        {"stage": "calibrate"},
    ]


@pytest.mark.parametrize("budget", ["none", "one weight", "all"])
def test_quantized_modules_keep_dequantized_weights_only_within_the_budget(budget, monkeypatch):
    """The simulation's stored form is the INT4 codes + scales beside the float weight. A
    dequantized float weight is kept only within ``DEQUANTIZED_CACHE_BYTES`` (the first ones
    computed), and the embedding table never: a large model holds no second float copy. The
    outputs are the same whatever is kept."""
    from quota_compile.config import QuantizationSection
    from quota_compile.quant import ops, simulate
    from quota_compile.quant.simulate import QuantEmbedding, QuantLinear, quantize

    limit = {"none": 0, "one weight": 32 * 48 * 4, "all": 1 << 30}[budget]
    monkeypatch.setattr(simulate, "DEQUANTIZED_CACHE_BYTES", limit)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(40, 32), torch.nn.Linear(32, 48), torch.nn.ReLU(), torch.nn.Linear(48, 32))
    model.get_input_embeddings = lambda: model[0]
    spec = QuantizationSection.model_validate({"weights": {"group_size": 16}, "embeddings": {"bits": 4}, "ignore": []})
    qm = quantize(model, spec)
    ids = torch.randint(0, 40, (2, 5))
    with torch.no_grad():
        y = model(ids)
        y_again = model(ids)

    def float_copies(m) -> list[str]:
        return [k for k, v in vars(m).items() if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel() >= m.weight.numel()]

    quantized = [m for m in model.modules() if isinstance(m, (QuantLinear, QuantEmbedding))]
    assert len(quantized) == 3
    assert not float_copies(model[0]) and not any(b.is_floating_point() for b in model[0].buffers())
    held = [i for i in (1, 3) if float_copies(model[i])]
    assert held == {"none": [], "one weight": [1], "all": [1, 3]}[budget]
    assert qm._state.cached_bytes == sum(model[i].weight.numel() * 4 for i in held) <= limit

    # the outputs are those of the dequantized weights, computed here from the codes
    emb = qm.embeddings["0"]
    table = emb.codes.float() * emb.scale.repeat_interleave(16, dim=1)
    x = table[ids]
    for i in (1, 3):
        w = qm.weights[str(i)]
        dequantized = w.codes.float() * w.scale.repeat_interleave(w.group_size, dim=0)
        assert torch.equal(ops.dequantize_weight(w.codes, w.scale, w.group_size), dequantized)
        x = ops.qdq_per_token(x, 4, spec.activations.clip_ratio) @ dequantized + model[i].bias
        if i == 1:
            x = torch.relu(x)
    assert torch.equal(y, x) and torch.equal(y_again, x)

    # new codes (GPTQ's) drop the kept copy and give back its bytes
    model[1].set_qweight(qm.weights["1"])
    assert not float_copies(model[1]) and qm._state.cached_bytes == sum(model[i].weight.numel() * 4 for i in held if i != 1)


def test_released_float_weights_leave_the_simulation_unchanged_and_the_float_path_refuses():
    """After lowering, the compile drops the float weights of the quantized Linears
    (``QuantizedModel.release_float_weights``): the simulation's outputs stay the same bit for
    bit (it reads the codes), the bytes are counted, the weight is a meta tensor of the same shape
    and dtype, and the full-precision path fails instead of computing with a stale weight. A
    move of the model still moves the codes where the weight would have gone."""
    from quota_compile.config import QuantizationSection
    from quota_compile.quant.simulate import QuantLinear, quantize

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.ReLU(), torch.nn.Linear(48, 16))
    qm = quantize(model, QuantizationSection.model_validate({"weights": {"group_size": 16}, "ignore": []}))
    x = torch.randn(3, 5, 32)
    with torch.no_grad():
        y = model(x)
        released = qm.release_float_weights()
        assert released == (32 * 48 + 48 * 16) * 4
        assert qm.release_float_weights() == 0  # once
        for m in (model[0], model[2]):
            assert isinstance(m, QuantLinear) and m.weight.is_meta and m.weight.dtype == torch.float32
        assert model[0].weight.shape == (48, 32)
        assert torch.equal(model(x), y)
        with qm.fake_quant(False), pytest.raises(RuntimeError, match="float weight was released"):
            model(x)
        model.to(torch.float64)
        assert model[0].dequantized_weight().dtype == torch.float64
        assert torch.allclose(model(x.double()), y.double(), rtol=1e-5, atol=1e-5)


def test_session_memory_measures_both_arena_settings_on_the_same_logits(tiny_bundle, tmp_path):
    """benchmarks/session_memory.py opens a bundle's graphs with the memory arena (the runtime)
    and without it (verification), each in a fresh process, and prints their memory per call
    and whether every logit agreed bit for bit; a folder without the graphs is refused (exit 2)."""
    script = str(ROOT / "benchmarks" / "session_memory.py")
    done = subprocess.run([sys.executable, script, str(tiny_bundle), "--new-tokens", "2", "--threads", "1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    calls = [line.split()[0] + (" " + line.split()[1] if line.startswith("decode") else "") for line in lines[2:-1]]
    assert calls == ["(start)", "open", "vision", "prefill", "decode 1", "decode 2"], lines
    assert lines[-1] == "logits of every call bit-identical: yes"
    bad = subprocess.run([sys.executable, script, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "no vision.onnx, prefill.onnx, decode.onnx" in bad.stderr and "Traceback" not in bad.stderr
