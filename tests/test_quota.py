"""QUOTA: calibration, selection, the fold_topk_gather pass, per-layer KV, recipes, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import yaml
from onnx import numpy_helper

from quota_compile.passes import count_calls
from quota_compile.passes.fold_topk_gather import FoldTopKGather
from quota_compile.passes.strip_runtime_asserts import StripRuntimeAsserts
from quota_compile.calibration.calibrate import calibrate, calibration_batches, collect_signals
from quota_compile.cli import main
from quota_compile.config import CalibrationSection, PruningSection
from quota_compile.export.onnx import export_onnx
from quota_compile.capture.programs import PrefillProgram, PruneSpec, prune_spec_from_recipe
from quota_compile.pruning.score import ScoreWeights, gather_visual
from quota_compile.pruning.recipe import Recipe
from quota_compile.runtime.ort import BundleRunner, make_batch
from quota_compile.capture.trace import build_programs
from quota_compile.data.samples import synthetic_images

from .conftest import write_config

QUOTA = {"method": "quota", "keep_ratio": 0.3}


@pytest.fixture(scope="module")
def quota_bundle(tmp_path_factory, tiny_folder) -> Path:
    work = tmp_path_factory.mktemp("quota")
    cfg = write_config(work / "q.yaml", str(tiny_folder), work / "out", pruning=QUOTA, calibration={"num_samples": 8})
    assert main([str(cfg)]) == 0
    return work / "out" / "q"


# ------------------------------------------------------------------ selection


def test_select_topk_ties_go_to_the_lower_index_in_torch_and_onnxruntime():
    class Select(torch.nn.Module):
        def forward(self, score):
            return torch.ops.quota.select_topk(score, 3)

    score = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    ours = torch.ops.quota.select_topk(score, 3)
    assert ours.tolist() == [[1, 2, 4], [0, 1, 2]]  # among equal 3.0s the lower indices; ascending
    model = export_onnx(Select(), (score,), ["score"], ["keep"], ({0: torch.export.Dim("b")},))
    assert [n.op_type for n in model.graph.node].count("TopK") == 2
    sess = ort.InferenceSession(model.SerializeToString())
    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        s = torch.randint(0, 4, (5, 6), generator=gen).float()  # many ties
        got = sess.run(None, {"score": s.numpy()})[0]
        assert np.array_equal(got, torch.ops.quota.select_topk(s, 3).numpy()), trial


def test_gather_visual_keeps_text_and_original_positions():
    b, t, d, start, v = 2, 9, 3, 2, 4
    h = torch.arange(b * t * d, dtype=torch.float32).reshape(b, t, d)
    pos = torch.arange(t).expand(b, t)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, -1] = 0
    index = torch.arange(v).expand(b, v)
    score = torch.tensor([[0.1, 0.9, 0.2, 0.8], [0.7, 0.1, 0.6, 0.0]])
    h2, pos2, mask2, kept = gather_visual(h, pos, mask, index, score, 2, start)
    assert kept.tolist() == [[1, 3], [0, 2]]
    assert pos2.tolist() == [[0, 1, 3, 5, 6, 7, 8], [0, 1, 2, 4, 6, 7, 8]]
    assert mask2[1].tolist() == [1, 1, 1, 1, 1, 1, 0]
    assert torch.equal(h2[0, :2], h[0, :2]) and torch.equal(h2[0, 4:], h[0, 6:])
    assert torch.equal(h2[0, 2], h[0, start + 1]) and torch.equal(h2[1, 3], h[1, start + 2])


# ------------------------------------------------------------------ the pass


def test_fold_topk_gather_replaces_each_marker_by_a_static_k_gather(tiny):
    vlm, qm = tiny
    spec = PruneSpec(keep=(64, 64, 20, 20, 9, 9, 9, 3), weights=ScoreWeights(0.5, 0.25, 0.25))
    programs = build_programs(vlm, qm, spec)
    t = programs.prefill.visual_start + 64 + 6
    ids = torch.randint(0, vlm.vocab_size, (2, t), generator=torch.Generator().manual_seed(1))
    ids[:, programs.prefill.visual_start : programs.prefill.visual_start + 64] = vlm.image_token_id
    mask = torch.ones(2, t, dtype=torch.long)
    mask[0, -2:] = 0
    feats = torch.randn(2, 64, vlm.hidden_size, generator=torch.Generator().manual_seed(2))
    seq = torch.export.Dim("seq", min=programs.prefill.visual_start + 66, max=512)
    with qm.fake_quant(False):
        gm = torch.export.export(programs.prefill, (ids, mask, feats), dynamic_shapes=({1: seq}, {1: seq}, None), strict=False).module()
        StripRuntimeAsserts()(gm)
        assert count_calls(gm, torch.ops.quota.prune_point.default) == 3
        before = gm(ids, mask, feats)
        fold = FoldTopKGather()
        assert fold(gm).modified
        after = gm(ids, mask, feats)
    assert count_calls(gm, torch.ops.quota.prune_point.default) == 0
    assert fold.folded == [20, 9, 3]
    for a, b in zip(before, after):
        if a.is_floating_point():
            # logits and float KV: two runs of the same products, whose float32 sum order follows
            # the GEMM kernel's blocking (thread count); a wrong gather moves them by far more
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(a, b)  # kept indices
    # static shapes after each pruning layer: KV of layer l has t - 64 + keep[l] tokens
    kv = after[1 : 1 + 2 * 8]
    assert [x.shape[2] for x in kv[::2]] == [t - 64 + k for k in spec.keep]
    assert [x.shape[1] for x in after[1 + 16 :]] == [20, 9, 3]  # kept indices per pruning layer


def test_batched_pruned_prefill_equals_one_sample_at_a_time(tiny):
    vlm, qm = tiny
    spec = PruneSpec(keep=(64, 64, 16, 16, 8, 8, 8, 8), weights=ScoreWeights(0.5, 0.25, 0.25))
    programs = build_programs(vlm, qm, spec)
    span = (programs.prefill.visual_start, 64)
    images = synthetic_images(3, 32, seed=11)
    questions = ["Hi", "What is in the image on the left?", "How many shapes of each colour are there in the picture?"]
    batch = make_batch(vlm.processor, vlm.prompt_template, images, questions, span, vlm.image_token_id)
    with torch.no_grad():
        feats = programs.vision(torch.from_numpy(batch.pixel_values))
        out = programs.prefill(torch.from_numpy(batch.input_ids), torch.from_numpy(batch.attention_mask), feats)
        for i in range(3):
            one = make_batch(vlm.processor, vlm.prompt_template, [images[i]], [questions[i]], span, vlm.image_token_id)
            single = programs.prefill(torch.from_numpy(one.input_ids), torch.from_numpy(one.attention_mask), feats[i : i + 1])
            torch.testing.assert_close(single[0][0], out[0][i], rtol=1e-4, atol=1e-4)
            for j in (-2, -1):  # kept indices at both pruning layers
                assert torch.equal(single[j][0], out[j][i])


# ------------------------------------------------------------------ calibration and baselines


def test_lowbit_and_fp_signals_differ_and_calibration_is_deterministic(tiny):
    vlm, qm = tiny
    prefill = PrefillProgram(vlm, qm, *vlm.visual_span())
    vision = build_programs(vlm, qm).vision
    batches = calibration_batches(vlm, CalibrationSection(num_samples=3), vlm.visual_span())
    low = collect_signals(vision, prefill, batches, 32, qm.spec.activations)
    with qm.fake_quant(False):
        fp = collect_signals(vision, prefill, batches, 32, qm.spec.activations)
    assert low.att.shape == (3, 8, 64) and np.all(low.att[:, 0] == 0)
    assert not np.allclose(low.att[:, 1:], fp.att[:, 1:])
    assert not np.allclose(low.risk[:, 1:], fp.risk[:, 1:])
    pr = PruningSection(method="quota", keep_ratio=0.4)
    cal = CalibrationSection(num_samples=6)
    notes: list[str] = []
    a, a_provenance = calibrate(vlm, qm, vision, vlm.visual_span(), pr, cal, note=notes.append)
    b, b_provenance = calibrate(vlm, qm, vision, vlm.visual_span(), pr, cal)
    assert a == b and a_provenance.sha256 == b_provenance.sha256
    # progress: the two long steps, with the counts they run (6 samples, 2 of them held out)
    assert notes == [
        "signals: 4 samples through the low-bit simulation on cpu ...",
        "weight search: 15 candidates on 2 held-out samples ...",
    ]
    assert len(a.weight_search) == 15
    assert a.weights == min(a.weight_search, key=lambda p: p.kl).weights
    keep = a.keep
    assert keep[:2] == [64, 64] and all(x >= y for x, y in zip(keep, keep[1:]))
    assert sum(keep) == round(0.4 * 8 * 64)  # the allocator realises the budget exactly


def test_quota_fp_calibrates_on_the_full_precision_model_whatever_signals_says(tiny):
    vlm, qm = tiny
    vision = build_programs(vlm, qm).vision
    cal = CalibrationSection(num_samples=6)
    span = vlm.visual_span()
    stagewise, _ = calibrate(vlm, qm, vision, span, PruningSection(method="quota-fp", keep_ratio=0.4, signals="lowbit"), cal)
    fp, _ = calibrate(vlm, qm, vision, span, PruningSection(method="quota", keep_ratio=0.4, signals="fp"), cal)
    low, _ = calibrate(vlm, qm, vision, span, PruningSection(method="quota", keep_ratio=0.4, signals="lowbit"), cal)
    assert stagewise.method == "quota-fp" and stagewise.signals == "fp"
    # the same measurements as quota with fp signals: every candidate's schedule and held-out KL
    assert stagewise.model_copy(update={"method": "quota"}) == fp
    # and not the low-bit ones: the KLs of the weight search were measured on another model
    assert [p.kl for p in stagewise.weight_search] != [p.kl for p in low.weight_search]


def test_answer_nll_is_the_mean_negative_log_probability_of_the_gold_token():
    from quota_compile.calibration.calibrate import answer_nll

    logp = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.15, 0.75]]))
    assert answer_nll(logp, [0, 2]) == pytest.approx(-(np.log(0.5) + np.log(0.75)) / 2, rel=1e-12)


def test_answer_nll_search_picks_the_candidate_most_likely_to_answer(tiny):
    from quota_compile.data.shapes import vqa_items

    vlm, qm = tiny
    start, v = span = vlm.visual_span()
    vision = build_programs(vlm, qm).vision
    pr = PruningSection(method="quota", keep_ratio=0.4)
    by_kl, _ = calibrate(vlm, qm, vision, span, pr, CalibrationSection(dataset="shapesvqa", num_samples=8))
    cal = CalibrationSection(dataset="shapesvqa", num_samples=8, objective="answer_nll")
    recipe, provenance = calibrate(vlm, qm, vision, span, pr, cal)
    assert provenance.objective == "answer_nll"
    search = recipe.weight_search
    assert all(p.answer_nll is not None for p in search)
    assert recipe.weights == min(search, key=lambda p: p.answer_nll).weights
    # on this model the two objectives choose differently, so the line above tells them apart
    assert recipe.weights != by_kl.weights
    # the same candidates and the same KLs as the KL search: only the choice differs
    assert [(p.weights, p.keep, p.kl) for p in search] == [(p.weights, p.keep, p.kl) for p in by_kl.weight_search]
    # one candidate's NLL recomputed here: its pruned prefill on the held-out questions (the
    # last 2 of 8) and the first token of each gold answer
    point = search[3]
    w = point.weights
    spec = PruneSpec(tuple(point.keep), ScoreWeights(w.att, w.mag, w.risk), pr.query_tokens, qm.spec.activations.bits, qm.spec.activations.clip_ratio)
    prefill = PrefillProgram(vlm, qm, start, v, spec)
    items = vqa_items("calibration", 0, 8, vlm.image_size, vlm.patch_size)[-2:]
    batches = calibration_batches(vlm, cal, span)[-2:]
    nll = []
    with torch.no_grad():
        for item, b in zip(items, batches):
            logits = prefill(torch.from_numpy(b.input_ids), torch.from_numpy(b.attention_mask), vision(torch.from_numpy(b.pixel_values)))[0]
            gold = vlm.tokenizer(item.question.answer, add_special_tokens=False)["input_ids"][0]
            nll.append(-torch.log_softmax(logits.double(), dim=-1)[0, gold].item())
    assert point.answer_nll == pytest.approx(float(np.mean(nll)), rel=1e-9)


def test_answer_nll_needs_shapesvqa_answers(tmp_path):
    from quota_compile.config import parse_config
    from quota_compile.errors import UserError

    doc = {"version": 1, "model": {"source": "builtin:tiny-llava"}, "calibration": {"objective": "answer_nll"}}
    with pytest.raises(UserError, match=r"calibration.*answer_nll.*dataset: shapesvqa"):
        parse_config(doc, tmp_path / "m.yaml")


def test_duplication_score_ranks_pivots_first_and_duplicates_last():
    from quota_compile.pruning.score import duplication_score

    # 2 text tokens, then 5 visual tokens in 3 dimensions, then 1 text token
    visual = torch.tensor([
        [0.0, 3.0, 0.0],   # 0: orthogonal to the pivot -> -0
        [5.0, 0.0, 0.0],   # 1: the largest norm: the pivot
        [2.0, 0.0, 0.0],   # 2: a scaled copy of the pivot -> -1, first to go
        [-1.0, 0.0, 0.0],  # 3: opposite to the pivot -> +1
        [1.0, 1.0, 0.0],   # 4: 45 degrees -> -0.707
    ])
    h = torch.cat([torch.randn(2, 3), visual, torch.randn(1, 3)])[None]
    score = duplication_score(h, 2, 5, pivots=1)[0]
    assert score[1] > 2.0
    assert score[[3, 0, 4, 2]].tolist() == pytest.approx([1.0, 0.0, -2 ** -0.5, -1.0], abs=1e-6)
    keep = torch.ops.quota.select_topk(score[None], 3)[0].tolist()
    assert keep == [0, 1, 3]  # the pivot and the two least like it
    # two pivots: token 0 (norm 3) becomes one, and 4 now resembles a pivot most at 45 degrees too
    two = duplication_score(h, 2, 5, pivots=2)[0]
    assert two[1] > two[0] > 2.0
    assert two[[3, 4, 2]].tolist() == pytest.approx([0.0, -2 ** -0.5, -1.0], abs=1e-6)  # 3 is orthogonal to pivot 0


def _numpy_dart(hv: np.ndarray, pivots: int, k: int) -> list[int]:
    """DART's kept set written out independently: the pivots by norm, then the tokens least
    similar (cosine) to their nearest pivot; ties are not expected with random weights."""
    norm = np.linalg.norm(hv, axis=-1)
    piv = list(np.argsort(-norm, kind="stable")[:pivots])
    unit = hv / norm[:, None]
    dup = (unit @ unit[piv].T).max(axis=1)
    others = [i for i in np.argsort(dup, kind="stable") if i not in piv]
    return sorted(piv + others[: k - pivots])


def test_dart_keeps_what_an_independent_dart_keeps(tiny):
    vlm, qm = tiny
    start, v = vlm.visual_span()
    pr = PruningSection(method="dart", keep_ratio=0.5, first_full_layers=3, pivots=5)
    vision = build_programs(vlm, qm).vision
    recipe, _ = calibrate(vlm, qm, vision, (start, v), pr, CalibrationSection())
    assert recipe.method == "dart" and recipe.pivots == 5 and recipe.weights is None
    assert recipe.keep[:3] == [v] * 3 and recipe.pruning_layers[0] == 3  # (and a one-token step later)
    spec = prune_spec_from_recipe(recipe, qm.spec.activations)
    assert spec.pivots == 5 and spec.random_scores is None
    prefill = PrefillProgram(vlm, qm, start, v, spec)
    seen = {}
    prefill_observe = lambda layer, h, probs, mask, index: seen.setdefault(layer, h[:, start : start + v].detach().numpy().copy())
    batches = calibration_batches(vlm, CalibrationSection(num_samples=2), (start, v))
    with torch.no_grad():
        for b in batches:
            feats = vision(torch.from_numpy(b.pixel_values))
            seen.clear()
            out = prefill.run(torch.from_numpy(b.input_ids), torch.from_numpy(b.attention_mask), feats, observe=prefill_observe)
            kept = out[-len(recipe.pruning_layers)].numpy()  # layer 3's kept original indices
            for row, hv in zip(kept, seen[3]):
                assert row.tolist() == _numpy_dart(hv.astype(np.float64), 5, recipe.keep[3])


def test_dart_compiles_into_graphs_that_pass_the_gate_and_say_so(small_folder, tmp_path):
    cfg = write_config(
        tmp_path / "dart.yaml", str(small_folder), tmp_path / "out",
        pruning={"method": "dart", "keep_ratio": 0.6, "first_full_layers": 1, "pivots": 4},
        verify={"samples": 4, "new_tokens": 8},
    )
    assert main([str(cfg)]) == 0
    bundle = tmp_path / "out" / "dart"
    recipe = Recipe.load(bundle / "recipe.yaml")
    assert recipe.pruning.method == "dart" and recipe.pruning.pivots == 4 and recipe.pruning.pruning_layers == [1]
    verify = json.loads((bundle / "verify.json").read_text())
    assert verify["kept_index_agreement"] == 1.0
    # the pivots' TopK is in the prefill graph beside the selection's two
    prefill = onnx.load(bundle / "prefill.onnx")
    assert [n.op_type for n in prefill.graph.node].count("TopK") == 3
    assert "DART, 4 pivot tokens" in (bundle / "report.md").read_text()


@pytest.mark.parametrize("method", ["fastv", "pdrop", "random"])
def test_baseline_schedules_meet_the_budget(tiny, method):
    vlm, qm = tiny
    vision = build_programs(vlm, qm).vision
    recipe, _ = calibrate(vlm, qm, vision, vlm.visual_span(), PruningSection(method=method, keep_ratio=0.5, fastv_layer=3), CalibrationSection())
    keep = recipe.keep
    assert sum(keep) == round(0.5 * 8 * 64)
    if method == "fastv":
        assert keep[:3] == [64] * 3 and max(keep[3:]) - min(keep[3:]) <= 1
    if method == "pdrop":
        assert len(set(keep[2:])) >= 3
    if method == "random":
        spec = prune_spec_from_recipe(recipe, qm.spec.activations)
        assert spec.random_scores is not None and recipe.random_seed == 0
        again, _ = calibrate(vlm, qm, vision, vlm.visual_span(), PruningSection(method="random", keep_ratio=0.5), CalibrationSection())
        assert prune_spec_from_recipe(again, qm.spec.activations).random_scores == spec.random_scores


def test_budget_below_the_minimum_is_a_clear_error(tiny_folder, tmp_path, capsys):
    cfg = write_config(tmp_path / "low.yaml", str(tiny_folder), tmp_path / "out", pruning={"method": "quota", "keep_ratio": 0.1})
    assert main([str(cfg)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "low.yaml" in last and "pruning.keep_ratio" in last and "minimum" in last
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ end to end


def test_quota_bundle_is_verified_with_full_index_agreement(quota_bundle: Path):
    v = json.loads((quota_bundle / "verify.json").read_text())
    assert v["passed"] and v["greedy_agreement"] == 1.0 and v["kept_index_agreement"] == 1.0
    assert all(all(s["kept_index_agreement"]) and len(s["kept_index_agreement"]) >= 1 for s in v["per_sample"])


def _topk_ks(model: onnx.ModelProto, largest: int) -> list[int]:
    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    ks = []
    for n in model.graph.node:
        if n.op_type == "TopK" and next(a.i for a in n.attribute if a.name == "largest") == largest:
            ks.append(int(consts[n.input[1]].reshape(-1)[0]))
    return ks


def test_prefill_has_one_topk_per_pruning_layer_with_the_recipe_k(quota_bundle: Path):
    recipe = Recipe.load(quota_bundle / "recipe.yaml")
    assert recipe.pruning.method == "quota" and recipe.pruning.pruning_layers
    prefill = onnx.load(quota_bundle / "prefill.onnx")
    expected = [recipe.pruning.keep[layer] for layer in recipe.pruning.pruning_layers]
    assert _topk_ks(prefill, largest=1) == expected  # the selection
    assert _topk_ks(prefill, largest=0) == expected  # ascending order of the kept indices
    assert [o.name for o in prefill.graph.output if o.name.startswith("kept.")] == [f"kept.{layer}" for layer in recipe.pruning.pruning_layers]
    assert not [n for n in onnx.load(quota_bundle / "decode.onnx").graph.node if n.op_type == "TopK"]


def test_kv_cache_has_the_per_layer_lengths(quota_bundle: Path):
    recipe = Recipe.load(quota_bundle / "recipe.yaml")
    keep, v = recipe.pruning.keep, recipe.model.visual_tokens
    runner = BundleRunner(quota_bundle)
    batch = make_batch(runner.processor, runner.prompt_template, synthetic_images(1, 32, 5), ["What is it?"], runner.visual_span, runner.image_token_id)
    feats = runner.backend.vision(batch.pixel_values)
    _, cache, kept = runner.backend.prefill(batch.input_ids, batch.attention_mask, feats)
    t = batch.input_ids.shape[1]
    assert [cache[6 * i].shape[2] for i in range(len(keep))] == [t - v + k for k in keep]
    assert [k.shape[1] for k in kept] == [keep[layer] for layer in recipe.pruning.pruning_layers]
    # The decode graph declares those lengths: layers with the same keep share a symbol, and
    # the declared differences between layers are the differences of their keep counts.
    dec = onnx.load(quota_bundle / "decode.onnx")
    dims = {i.name: i.type.tensor_type.shape.dim[2].dim_param for i in dec.graph.input if i.name.endswith(".key")}
    for i in range(len(keep)):
        for j in range(len(keep)):
            same = dims[f"past.{i}.key"] == dims[f"past.{j}.key"]
            assert same == (keep[i] == keep[j]), (i, j, dims)
    m = json.loads((quota_bundle / "manifest.json").read_text())
    assert [layer["visual_tokens"] for layer in m["kv_cache"]] == keep
    # The cache size the manifest states, recomputed from the cache this bundle's prefill
    # returned: each layer's K and V (codes, scales, zero points) cost what its arrays hold per
    # position, at the manifest's prompt length plus generated tokens, each layer short of
    # its pruned visual tokens; against FP16 K and V of every layer, unpruned.
    kv = m["kv_cache_bytes_per_sequence"]
    p, g = kv["prompt_length"], kv["generated"]
    per_layer = [cache[6 * i : 6 * i + 6] for i in range(len(keep))]
    assert all(np.asarray(a).shape[0] == 1 for arrays in per_layer for a in arrays)  # one sequence
    per_position = [sum(np.asarray(a).nbytes for a in arrays) // arrays[0].shape[2] for arrays in per_layer]
    assert kv["bundle"] == sum(b * (p - (v - k) + g) for b, k in zip(per_position, keep))
    bits = m["quantization"]["kv_cache"]["bits"]
    kv_heads, head_dim = cache[0].shape[1], cache[0].shape[3] * 8 // bits  # codes: bits / 8 bytes per value
    assert kv["fp16_unpruned"] == len(keep) * 2 * kv_heads * head_dim * 2 * (p + g)
    assert kv["ratio"] == pytest.approx(kv["fp16_unpruned"] / kv["bundle"])


def test_report_shows_the_schedule_and_kept_patch_overlays(quota_bundle: Path):
    report = (quota_bundle / "report.md").read_text()
    for png in ("schedule.png", "kept_patches_0.png", "kept_patches_1.png"):
        assert f"]({png})" in report
        assert (quota_bundle / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Score-weight search" in report and "**chosen**" in report


def test_exporting_again_from_the_recipe_gives_the_same_bytes(quota_bundle: Path, tiny_folder: Path, tmp_path: Path):
    cfg = write_config(tmp_path / "q.yaml", str(tiny_folder), tmp_path / "again", pruning=QUOTA, calibration={"num_samples": 8})
    assert main([str(cfg), "--recipe", str(quota_bundle / "recipe.yaml")]) == 0
    again = tmp_path / "again" / "q"
    for g in ("vision", "prefill", "decode"):
        assert (again / f"{g}.onnx").read_bytes() == (quota_bundle / f"{g}.onnx").read_bytes(), g
    assert (again / "recipe.yaml").read_text() == (quota_bundle / "recipe.yaml").read_text()


def test_recipe_that_does_not_fit_the_model_is_exit_2(quota_bundle: Path, small_folder: Path, tiny_folder: Path, tmp_path: Path, capsys):
    cfg = write_config(tmp_path / "small.yaml", str(small_folder), tmp_path / "out")
    assert main([str(cfg), "--recipe", str(quota_bundle / "recipe.yaml")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "recipe.yaml" in last and "8 decoder layers" in last and "2" in last
    doc = yaml.safe_load((quota_bundle / "recipe.yaml").read_text())
    doc["model"]["visual_tokens"] = 100
    bad = tmp_path / "bad-recipe.yaml"
    bad.write_text(yaml.safe_dump(doc))
    cfg = write_config(tmp_path / "tiny.yaml", str(tiny_folder), tmp_path / "out")
    assert main([str(cfg), "--recipe", str(bad)]) == 2
    assert "100 visual tokens" in capsys.readouterr().err
    (tmp_path / "junk.yaml").write_text("version: 1\nmodel: nope\n")
    assert main([str(cfg), "--recipe", str(tmp_path / "junk.yaml")]) == 2
    assert "not a valid quota-compile recipe" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_onnxruntime_batch_of_three_matches_one_at_a_time_with_pruning(quota_bundle: Path):
    from quota_compile.runtime.ort import greedy_generate

    runner = BundleRunner(quota_bundle)
    images = synthetic_images(3, 32, seed=21)
    questions = ["Hi", "What colour is the square?", "How many circles are there on the left and on the right?"]
    batch = make_batch(runner.processor, runner.prompt_template, images, questions, runner.visual_span, runner.image_token_id)
    together = greedy_generate(runner.backend, batch, 10, eos_token_id=None)
    for i in range(3):
        one = make_batch(runner.processor, runner.prompt_template, [images[i]], [questions[i]], runner.visual_span, runner.image_token_id)
        alone = greedy_generate(runner.backend, one, 10, eos_token_id=None)
        assert alone.tokens[0] == together.tokens[i]
        for a, b in zip(alone.kept, together.kept):
            assert np.array_equal(a[0], b[i])
