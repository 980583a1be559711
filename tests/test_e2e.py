"""End to end on the tiny model: compile -> verify -> generate through the onnxruntime runner."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx

from quota_compile.bundle.format import sha256_file
from quota_compile.cli import main
from quota_compile.pruning.recipe import Recipe
from quota_compile.runtime.ort import BundleRunner, greedy_generate, make_batch
from quota_compile.data.samples import synthetic_images

from .conftest import write_config

GRAPHS = ("vision", "prefill", "decode")


def test_bundle_has_every_file_and_the_manifest_hashes_match(tiny_bundle: Path):
    for name in ("vision.onnx", "prefill.onnx", "decode.onnx", "recipe.yaml", "manifest.json", "verify.json", "report.md"):
        assert (tiny_bundle / name).is_file(), name
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    files = manifest["files"]
    on_disk = {p.relative_to(tiny_bundle).as_posix() for p in tiny_bundle.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(files) == on_disk
    for rel, digest in files.items():
        assert sha256_file(tiny_bundle / rel) == digest, rel
    assert {"torch", "onnx", "onnxruntime", "quota-compile"} <= set(manifest["versions"])
    # No temporary folder is left beside the bundle.
    assert [p.name for p in tiny_bundle.parent.iterdir()] == ["tiny"]


def test_peak_memory_counts_what_a_stage_held_and_freed():
    import numpy as np

    from quota_compile.commands.compile import PeakMemory

    mib = 1 << 20
    with PeakMemory() as outside:
        pass
    with PeakMemory(interval=0.01) as memory:
        held = np.ones(300 * mib, dtype=np.uint8)  # every page touched
        import time

        time.sleep(0.5)  # (the sampler, every 10 ms, sees it)
        del held
    assert memory.peak - outside.peak >= 250 * mib


def test_graphs_pass_the_full_onnx_check_with_standard_ops_and_int4_weights(tiny_bundle: Path):
    for g in GRAPHS:
        model = onnx.load(tiny_bundle / f"{g}.onnx")
        onnx.checker.check_model(model, full_check=True)
        assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}
        assert max(o.version for o in model.opset_import) >= 21
        assert {n.domain for n in model.graph.node} <= {""}
        int4 = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT4]
        assert int4, f"{g} has no INT4 weights"
        ops = [n.op_type for n in model.graph.node]
        assert ops.count("QuantizeLinear") > 0 and ops.count("DequantizeLinear") > 0


def test_manifest_describes_io_and_the_quantized_kv_layout(tiny_bundle: Path):
    m = json.loads((tiny_bundle / "manifest.json").read_text())
    layers = m["model"]["num_layers"]
    dec = m["graphs"]["decode"]
    names = [i["name"] for i in dec["inputs"]]
    assert names[:3] == ["input_ids", "position_ids", "attention_mask"]
    assert len(names) == 3 + 6 * layers
    past_key = next(i for i in dec["inputs"] if i["name"] == "past.0.key")
    kv = m["kv_cache"][0]
    assert past_key["dtype"] == "uint8"
    assert past_key["shape"] == ["batch", kv["num_kv_heads"], "past", kv["head_dim"] // 2]  # INT4: two per byte
    assert next(i for i in dec["inputs"] if i["name"] == "past.0.key_scale")["dtype"] == "float32"
    assert len(m["kv_cache"]) == layers and kv["bits"] == 4
    pre_out = [o["name"] for o in m["graphs"]["prefill"]["outputs"]]
    assert pre_out[0] == "logits" and len(pre_out) == 1 + 6 * layers


def test_verify_json_reports_agreement_on_at_least_four_samples(tiny_bundle: Path):
    v = json.loads((tiny_bundle / "verify.json").read_text())
    assert v["passed"] is True
    assert v["samples"] >= 4 and v["new_tokens"] >= 16
    assert v["greedy_agreement"] == 1.0
    assert all(len(s["tokens_onnxruntime"]) == 16 and s["identical"] for s in v["per_sample"])
    assert v["max_logits_rel_error"] <= v["thresholds"]["max_logits_rel_error"]
    for kind in ("activations", "kv_cache"):  # the gate compared codes of every graph that has them
        c = v["codes"][kind]
        assert c["compared"] > 0 and c["rate"] <= v["thresholds"]["max_code_flip_rate"]
        assert all(c["graphs"][g]["compared"] > 0 for g in (("vision", "prefill", "decode") if kind == "activations" else ("prefill", "decode")))


def test_recipe_round_trips_exactly(tiny_bundle: Path, tmp_path: Path):
    recipe = Recipe.load(tiny_bundle / "recipe.yaml")
    again = Recipe.load(recipe.dump(tmp_path / "r.yaml"))
    assert again == recipe
    assert (tmp_path / "r.yaml").read_text() == (tiny_bundle / "recipe.yaml").read_text()
    assert recipe.quantization.weights.group_size == 16 and recipe.model.num_layers == 8
    assert recipe.pruning.method == "none" and recipe.pruning.keep == [64] * 8


def test_runner_answers_and_a_batch_of_three_matches_one_at_a_time(tiny_bundle: Path):
    runner = BundleRunner(tiny_bundle)
    images = synthetic_images(3, 32, seed=99)
    questions = ["Hi", "What colour is the large square in the middle?", "How many circles are there on the left and on the right?"]
    batch = make_batch(runner.processor, runner.prompt_template, images, questions, runner.visual_span, runner.image_token_id)
    lengths = batch.attention_mask.sum(axis=1)
    assert len(set(lengths.tolist())) == 3, "the prompts must have different lengths"
    together = greedy_generate(runner.backend, batch, 12, eos_token_id=None)
    for i in range(3):
        one = make_batch(runner.processor, runner.prompt_template, [images[i]], [questions[i]], runner.visual_span, runner.image_token_id)
        alone = greedy_generate(runner.backend, one, 12, eos_token_id=None)
        assert alone.tokens[0] == together.tokens[i], f"sample {i} differs in a batch"
    answers = runner.answer(images, questions, max_new_tokens=12)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)


def test_two_compiles_give_byte_identical_graphs(tiny_bundle: Path, tiny_folder: Path, tmp_path: Path):
    # Same YAML content and checkpoint as the session bundle, another output folder.
    cfg = write_config(tmp_path / "tiny.yaml", str(tiny_folder), tmp_path / "again")
    assert main([str(cfg)]) == 0
    second = tmp_path / "again" / "tiny"
    for g in GRAPHS:
        assert (second / f"{g}.onnx").read_bytes() == (tiny_bundle / f"{g}.onnx").read_bytes(), g
    first_files = json.loads((tiny_bundle / "manifest.json").read_text())["files"]
    second_files = json.loads((second / "manifest.json").read_text())["files"]
    assert first_files == second_files


def test_graph_bytes_do_not_depend_on_where_the_code_is_installed(tiny_bundle: Path):
    """The exporter stamps each node with the Python stack that made it (absolute paths of
    quota_compile and of the installed packages): the compile drops those stamps, so a clone
    elsewhere, or another virtualenv, writes the same bytes."""
    import torch

    import quota_compile

    roots = {Path(quota_compile.__file__).resolve().parents[1], Path(torch.__file__).resolve().parents[1], Path(onnx.__file__).resolve().parents[1]}
    for g in GRAPHS:
        data = (tiny_bundle / f"{g}.onnx").read_bytes()
        for root in roots:
            assert str(root).encode() not in data, (g, root)
        model = onnx.load(tiny_bundle / f"{g}.onnx", load_external_data=False)
        assert all(p.key != "pkg.torch.onnx.stack_trace" for n in model.graph.node for p in n.metadata_props)


def test_existing_bundle_is_kept_without_force_and_replaced_with_it(small_folder: Path, tmp_path: Path, capsys):
    out = tmp_path / "exported"
    (out / "tiny").mkdir(parents=True)
    marker = out / "tiny" / "keep.txt"
    marker.write_text("user data")
    cfg = write_config(tmp_path / "tiny.yaml", str(small_folder), out, verify={"samples": 1, "new_tokens": 2})
    assert main([str(cfg)]) == 2
    assert "--force" in capsys.readouterr().err
    assert marker.read_text() == "user data"
    assert main([str(cfg), "--force"]) == 0
    assert not marker.exists() and (out / "tiny" / "manifest.json").is_file()
    assert sorted(p.name for p in out.iterdir()) == ["tiny"]


def test_a_wrong_graph_fails_verification_exits_1_and_leaves_no_bundle(small_folder: Path, tmp_path: Path, capsys, monkeypatch):
    """The lowering is made to write a wrong prefill graph: its first activation quantizer
    rounds on a grid three times too coarse. The gate's code comparison refuses it."""
    from onnx import TensorProto, helper, numpy_helper

    import quota_compile.core.workbench as workbench  # the one build every command goes through

    real = workbench.expand_to_onnx  # the portable graphs from the semantic ones

    def wrong_prefill(*args, **kw):
        model = real(*args, **kw)
        if "image_features" in [i.name for i in model.graph.input]:
            q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear"
                     and any(a.name == "output_dtype" and a.i == TensorProto.INT4 for a in n.attribute))
            model.graph.initializer.append(numpy_helper.from_array(np.array(3.0, np.float32), "test.three"))
            nodes = list(model.graph.node)
            nodes.insert(nodes.index(q), helper.make_node("Mul", [q.input[1], "test.three"], ["test.scale3"]))
            q.input[1] = "test.scale3"
            del model.graph.node[:]
            model.graph.node.extend(nodes)
        return model

    monkeypatch.setattr(workbench, "expand_to_onnx", wrong_prefill)
    cfg = write_config(tmp_path / "wrong.yaml", str(small_folder), tmp_path / "out", verify={"samples": 1, "new_tokens": 2})
    assert main([str(cfg)]) == 1
    err = " ".join(capsys.readouterr().err.split())  # (rich wraps long lines)
    assert "verification failed" in err and "activation code" in err and "max_tensor_code_flip_rate" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_a_logits_bound_set_in_the_yaml_still_gates(small_folder: Path, tmp_path: Path, capsys):
    cfg = write_config(
        tmp_path / "strict.yaml", str(small_folder), tmp_path / "out", verify={"samples": 1, "new_tokens": 2, "max_logits_rel_error": 1e-30}
    )
    assert main([str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "verification failed" in err and "max_logits_rel_error" in err
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_int8_kv_cache_and_activations_compile_and_verify(small_folder: Path, tmp_path: Path):
    cfg = write_config(
        tmp_path / "kv8.yaml",
        str(small_folder),
        tmp_path / "out",
        quantization={"weights": {"group_size": 16}, "activations": {"bits": 8}, "kv_cache": {"bits": 8}},
        verify={"samples": 4, "new_tokens": 16},
    )
    assert main([str(cfg)]) == 0
    m = json.loads((tmp_path / "out" / "kv8" / "manifest.json").read_text())
    key = next(i for i in m["graphs"]["decode"]["inputs"] if i["name"] == "past.0.key")
    assert key["shape"][-1] == m["kv_cache"][0]["head_dim"]  # INT8: one code per byte
    v = json.loads((tmp_path / "out" / "kv8" / "verify.json").read_text())
    assert v["passed"] and v["greedy_agreement"] == 1.0
    assert np.isfinite(v["max_logits_rel_error"])
