"""The verification gate (quota_compile/verify/gate.py): it refuses wrong graphs and wrong runtimes
(code flips, kept sets that differ away from a near-tie, a missing pruning layer, other greedy
tokens) and accepts what float reassociation legitimately does (a few flipped codes, a kept
set that differs at a near-tie).

One small pruned bundle (2 decoder layers, FastV at layer 1) is compiled once; each test runs
``verify`` on it with a deliberately changed graph or a backend / probe that tampers with
what the graphs return, against the PyTorch simulation of the same config.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper

from quota_compile.calibration.calibrate import quantize_model
from quota_compile.cli import main
from quota_compile.config import load_config, parse_config
from quota_compile.models import load_model
from quota_compile.core.decisions import decide_pruning
from quota_compile.quant import ops
from quota_compile.runtime.ort import GRAPHS, OrtBackend
from quota_compile.capture.trace import build_programs
from quota_compile.export.onnx import load_structure
from quota_compile.verify.gate import (CodeProbe, TorchBackend, held_out_samples, kept_after_rounding_ties, kept_differences, verify,
                                       weight_bytes)

from .conftest import write_config

PRUNING = {"method": "fastv", "keep_ratio": 0.75, "fastv_layer": 1}
VERIFY = {"samples": 2, "new_tokens": 4}


@pytest.fixture(scope="module")
def gate(tmp_path_factory, small_folder: Path):
    """``(bundle folder, config path, reference backend, samples, quantized model)``."""
    work = tmp_path_factory.mktemp("gate")
    cfg_path = write_config(work / "g.yaml", str(small_folder), work / "out", pruning=PRUNING, verify=VERIFY)
    assert main([str(cfg_path)]) == 0
    cfg = load_config(cfg_path)
    with contextlib.ExitStack() as stack:
        vlm = load_model(cfg, stack, cfg_path.parent)
        span = vlm.visual_span()
        qm = quantize_model(vlm, cfg, span)
        _, _, spec = decide_pruning(cfg, vlm, qm, span)
        reference = TorchBackend(build_programs(vlm, qm, spec))
        yield work / "out" / "g", cfg.verify, reference, held_out_samples(vlm, cfg.verify, span), qm


def _models(folder: Path) -> dict[str, onnx.ModelProto]:
    return {g: onnx.load(folder / f"{g}.onnx") for g in GRAPHS}


def _run(gate, folder: Path | None = None, backend=None, probe=None, **settings) -> dict:
    bundle, cfg, reference, samples, _ = gate
    folder = folder or bundle
    backend = backend or OrtBackend(folder)
    probe = probe or CodeProbe(_models(folder))
    return verify(reference, backend, samples, cfg.model_copy(update=settings), probe=probe)


def _changed_copy(bundle: Path, dest: Path, graph: str, change) -> Path:
    """The bundle copied to ``dest`` with ``change(model)`` applied to one graph."""
    shutil.copytree(bundle, dest)
    model = onnx.load(dest / f"{graph}.onnx")
    change(model)
    onnx.save_model(model, dest / f"{graph}.onnx")
    return dest


def _int4_activation_quantizers(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The graph's per-token activation QuantizeLinear nodes (INT4 output), in node order."""
    return [
        n for n in model.graph.node
        if n.op_type == "QuantizeLinear"
        and any(a.name == "output_dtype" and a.i == TensorProto.INT4 for a in n.attribute)
    ]


# ------------------------------------------------------------------ the compiled graphs pass


def test_the_compiled_graphs_pass_and_every_quantizer_is_compared(gate):
    report = _run(gate)
    assert report["passed"], report["failures"]
    layers = 2
    observed = report["codes"]["activations"]["observed_quantizers"]
    # per decoder layer: q/k/v share one, o_proj, gate/up share one, down_proj; the projector: 2
    assert observed == {"vision": {"observed": 2, "in_graph": 2},
                        "prefill": {"observed": 4 * layers, "in_graph": 4 * layers},
                        "decode": {"observed": 4 * layers, "in_graph": 4 * layers}}
    # teacher forcing feeds every layer's six stored KV tensors (per_token: codes, scales, zero points)
    assert report["codes"]["kv_cache"]["teacher_forced_tensors"] == {"vision": 0, "prefill": 6 * layers, "decode": 6 * layers}
    for kind in ("activations", "kv_cache"):
        c = report["codes"][kind]
        assert c["compared"] > 0 and c["graphs"]["prefill"]["compared"] > 0 and c["graphs"]["decode"]["compared"] > 0
        assert c["rate"] <= report["thresholds"]["max_code_flip_rate"]
    assert report["codes"]["activations"]["graphs"]["vision"]["compared"] > 0
    # the free-running copy computes what the deployed graphs compute, bit for bit
    assert report["codes_free_running"]["observation_copy_matches_deployed"] == {"vision": True, "prefill": True, "decode": True}
    assert report["kept"]["missing"] == report["kept"]["not_a_tie"] == 0 and report["kept"]["compared"] > 0
    assert report["greedy_agreement"] == 1.0
    # the float tail after the last quantizer was compared in every graph, within the gate
    forced = report["teacher_forced_rel_error"]
    assert set(forced) == {"vision", "prefill", "decode"}
    assert all(e is not None and e <= report["thresholds"]["max_teacher_forced_rel_error"] for e in forced.values()), forced


# ------------------------------------------------------------------ wrong graphs are refused


def test_a_changed_activation_scale_is_refused_naming_the_activation_codes(gate, tmp_path: Path):
    """The second activation quantizer of the prefill (layer 0's o_proj input) quantizes with
    three times its scale (its DequantizeLinear keeps the right one): most of its codes differ."""

    def coarser(model: onnx.ModelProto) -> None:
        q = _int4_activation_quantizers(model)[1]
        model.graph.initializer.append(numpy_helper.from_array(np.array(3.0, np.float32), "test.three"))
        mul = onnx.helper.make_node("Mul", [q.input[1], "test.three"], ["test.scale3"])
        nodes = list(model.graph.node)
        nodes.insert(nodes.index(q), mul)
        q.input[1] = "test.scale3"
        del model.graph.node[:]
        model.graph.node.extend(nodes)

    folder = _changed_copy(gate[0], tmp_path / "b", "prefill", coarser)
    report = _run(gate, folder)
    assert not report["passed"]
    flips = [f for f in report["failures"] if f.startswith("activation code")]
    assert flips and "o_proj" in " ".join(flips), report["failures"]
    worst = report["codes"]["activations"]["tensors_with_flips"][0]
    assert worst["where"].startswith("prefill:") and "layers.0.self_attn.o_proj" in worst["where"] and worst["rate"] > 0.3
    # teacher forcing keeps the damage where it is: no other quantizer flips beyond the bound
    others = report["codes"]["activations"]["tensors_with_flips"][1:]
    assert all(t["rate"] <= 1e-2 or t["flips"] <= 1 for t in others), others


def _int4_initializer_of(model: onnx.ModelProto, codes: torch.Tensor) -> onnx.TensorProto:
    """The INT4 initializer holding these ``[K, N]`` codes (``ops.pack_int4``'s bytes)."""
    packed = ops.pack_int4(codes).numpy().tobytes()
    (t,) = [t for t in model.graph.initializer if t.data_type == TensorProto.INT4 and t.raw_data == packed]
    return t


@pytest.mark.parametrize("linear,kind", [("layers.0.self_attn.k_proj", "KV-cache"), ("layers.0.mlp.gate_proj", "activation")])
def test_a_perturbed_weight_is_refused_naming_the_codes_it_moves(gate, tmp_path: Path, linear: str, kind: str):
    """One Linear's INT4 weight negated in the prefill graph: k_proj's output is the cached
    key (its codes flip), gate_proj's goes through the MLP into down_proj's quantizer."""
    qm = gate[4]
    (name,) = [n for n in qm.weights if n.endswith(linear)]
    codes = qm.weights[name].codes

    def negate(model: onnx.ModelProto) -> None:
        t = _int4_initializer_of(model, codes)
        t.raw_data = ops.pack_int4((-codes.to(torch.int16)).clamp(-8, 7).to(torch.int8)).numpy().tobytes()

    folder = _changed_copy(gate[0], tmp_path / "b", "prefill", negate)
    report = _run(gate, folder)
    assert not report["passed"]
    assert any(f.startswith(f"{kind} code") for f in report["failures"]), report["failures"]


def test_a_dropped_activation_quantizer_is_refused(gate, tmp_path: Path):
    """Layer 0's o_proj input quantizer removed from the prefill graph (its QuantizeLinear and
    DequantizeLinear bypassed: o_proj reads the float activation)."""

    def bypass(model: onnx.ModelProto) -> None:
        q = _int4_activation_quantizers(model)[1]
        (dq,) = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == q.output[0]]
        for n in model.graph.node:
            for i, name in enumerate(n.input):
                if name == dq.output[0]:
                    n.input[i] = q.input[0]
        model.graph.node.remove(dq)
        model.graph.node.remove(q)

    folder = _changed_copy(gate[0], tmp_path / "b", "prefill", bypass)
    report = _run(gate, folder)
    assert not report["passed"]
    layers = 2
    assert f"the prefill graph has {4 * layers - 1} activation quantizers, the simulation ran {4 * layers}" in report["failures"], report["failures"]


def test_observation_copies_opened_from_the_bundle_folder_observe_the_same_and_leave_nothing_behind(gate):
    """CodeProbe(folder=...): the copies of graphs loaded without their weights are opened from
    files beside the bundle's weights file (mapped by onnxruntime, not copied per session), and
    with a weights budget of 0 only one graph's copies are open at a time. Both give the report
    that copies held in memory give; the temporary files are gone afterwards."""
    bundle = gate[0]
    before = sorted(p.name for p in bundle.iterdir())
    in_memory = _run(gate)
    structure = load_structure(bundle, GRAPHS)
    assert all(weight_bytes(m) > 0 and not any(t.raw_data for t in m.graph.initializer if t.data_location == TensorProto.EXTERNAL)
               for m in structure.values())
    assert any(t.data_location == TensorProto.EXTERNAL for t in structure["prefill"].graph.initializer)
    resident = CodeProbe(structure, folder=bundle)
    assert not resident.one_at_a_time and resident.opened == 6
    assert _run(gate, probe=resident) == in_memory
    assert resident.opened == 6
    one = CodeProbe(structure, folder=bundle, resident_bytes=0)
    assert one.one_at_a_time and one.opened == 0
    assert _run(gate, probe=one) == in_memory
    # each sample runs vision, prefill, then its decode steps: each graph's two copies opened once per sample
    assert one.opened == 2 * len(GRAPHS) * len(gate[3])
    assert sorted(p.name for p in bundle.iterdir()) == before


def test_verification_sessions_run_without_the_memory_arena_and_compute_what_the_runtime_computes(gate):
    """Verification opens the deployed graphs and the observation copies without onnxruntime's
    CPU memory arena (what a run allocates is freed when it ends; docs/scale.md), the runtime
    with it. The deployed graphs' outputs are the same bit for bit either way, and so is the
    verification report."""
    bundle, _, _, samples, _ = gate
    lean, runtime = OrtBackend(bundle, arena=False), OrtBackend(bundle)
    assert not any(s.get_session_options().enable_cpu_mem_arena for s in lean.sessions.values())
    assert all(s.get_session_options().enable_cpu_mem_arena for s in runtime.sessions.values())
    probe = CodeProbe(_models(bundle))
    copies = [c.session for pair in probe._open.values() for c in pair]
    assert len(copies) == 2 * len(GRAPHS) and not any(s.get_session_options().enable_cpu_mem_arena for s in copies)
    batch = samples[0].batch
    outputs = []
    for backend in (lean, runtime):
        feats = backend.vision(batch.pixel_values)
        logits, cache, kept = backend.prefill(batch.input_ids, batch.attention_mask, feats)
        step = [np.array([[1]], dtype=np.int64), batch.attention_mask.sum(axis=1)[:, None].astype(np.int64),
                np.ones((1, cache[0].shape[2] + 1), dtype=np.int64)]
        next_logits, next_cache = backend.decode(*step, cache)
        outputs.append([feats, logits, *cache, *kept, next_logits, *next_cache])
    assert len(outputs[0]) == len(outputs[1]) and all(np.array_equal(a, b) for a, b in zip(*outputs))
    assert _run(gate, backend=lean, probe=probe) == _run(gate, backend=runtime, probe=probe)


# ------------------------------------------------------------------ thresholds on controlled flips


class _FlippingProbe(CodeProbe):
    """The real teacher-forced observations with ``flip(graph, observation)`` applied."""

    def __init__(self, models, flip):
        super().__init__(models)
        self.flip = flip

    def run_forced(self, graph, values, codes, kv):
        obs = super().run_forced(graph, values, codes, kv)
        self.flip(graph, obs)
        return obs


def test_a_single_flipped_code_passes_and_a_broadly_flipped_tensor_fails(gate):
    models = _models(gate[0])
    seen = {"once": False}

    def one(graph, obs):  # one code of one prefill quantizer, once: a rounding-boundary case
        if graph == "prefill" and not seen["once"]:
            obs.codes[0][0].reshape(-1)[0] += 1
            seen["once"] = True

    report = _run(gate, probe=_FlippingProbe(models, one))
    assert seen["once"] and report["passed"], report["failures"]
    assert report["codes"]["activations"]["flips"] >= 1 and report["codes"]["activations"]["max_step"] >= 1

    def many(graph, obs):  # a third of the down_proj quantizer's codes in every prefill
        if graph == "prefill":
            c = obs.codes[3][0].reshape(-1)
            c[::3] += 1

    report = _run(gate, probe=_FlippingProbe(models, many))
    assert not report["passed"]
    assert any("tensor(s) flip more than verify.max_tensor_code_flip_rate" in f and "down_proj" in f for f in report["failures"]), report["failures"]


def test_the_overall_rate_gates_flips_spread_thinly_over_every_tensor(gate):
    """Every 200th code of every prefill activation quantizer: each tensor stays within the
    per-tensor bound (1 %), the overall rate of the kind does not stay within
    max_code_flip_rate (0.1 %)."""

    def spread(graph, obs):
        if graph == "prefill":
            for arrays in obs.codes.values():
                for c in arrays:
                    c.reshape(-1)[::200] += 1

    report = _run(gate, probe=_FlippingProbe(_models(gate[0]), spread))
    assert not report["passed"]
    overall = [f for f in report["failures"] if f.startswith("activation code-flip rate")]
    assert overall and "exceeds verify.max_code_flip_rate 0.001" in overall[0], report["failures"]
    assert not any("max_tensor_code_flip_rate" in f for f in report["failures"]), report["failures"]
    prefill = report["codes"]["activations"]["graphs"]["prefill"]
    assert 0.005 <= prefill["rate"] < 0.0055 and report["codes"]["activations"]["rate"] > 0.001


# ------------------------------------------------------------------ kept sets and greedy tokens


class _Tampering:
    """An onnxruntime backend whose prefill kept indices or decode logits are changed."""

    def __init__(self, inner: OrtBackend, kept=None, logits=None):
        self.inner, self.kept_change, self.logits_change = inner, kept, logits
        self.kv_update = inner.kv_update
        self.steps = 0

    def vision(self, pixel_values):
        return self.inner.vision(pixel_values)

    def prefill(self, input_ids, attention_mask, image_features):
        logits, kv, kept = self.inner.prefill(input_ids, attention_mask, image_features)
        return logits, kv, self.kept_change(kept) if self.kept_change else kept

    def decode(self, input_ids, position_ids, attention_mask, past):
        logits, cache = self.inner.decode(input_ids, position_ids, attention_mask, past)
        return (self.logits_change(logits) if self.logits_change else logits), cache


def _reference_scores(gate):
    """The reference's pruning-layer scores and kept indices for the first sample."""
    _, _, reference, samples, _ = gate
    batch = samples[0].batch
    with reference.observing():
        feats = reference.vision(batch.pixel_values)
        _, _, kept = reference.prefill(batch.input_ids, batch.attention_mask, feats)
        scores = reference.last.scores
    return kept, scores


def test_a_kept_set_difference_passes_at_a_near_tie_and_fails_away_from_one(gate):
    kept, scores = _reference_scores(gate)
    assert len(scores) == len(kept) == 1  # FastV: one pruning layer
    _, s, candidates = scores[0]
    s, candidates = s[0].astype(np.float64), candidates[0]
    order = np.argsort(-s, kind="stable")
    k = kept[0].shape[1]
    last_in, first_out, lowest = candidates[order[k - 1]], candidates[order[k]], candidates[order[-1]]
    assert set(kept[0][0].tolist()) == set(candidates[order[:k]].tolist())  # the reference keeps the top k
    scale = s.max() - s.min()  # the score scale: the spread of the layer's candidate scores
    gap = (s[order[k - 1]] - s[order[k]]) / scale  # the k-th against the (k+1)-th, on the score scale
    far = (s[order[k - 1]] - s[order[-1]]) / scale
    assert 0 < gap and far > 2 * gap  # (the lowest candidate is further from the k-th than the next one)

    def swap(new):
        def change(kept_lists):
            first = kept_lists[0][0].copy()
            first[first == last_in] = new
            return [np.sort(first)[None], *kept_lists[1:]]
        return change

    sample = [gate[3][0]]
    bundle, cfg, reference = gate[0], gate[1], gate[2]

    def run(new, tolerance):
        return verify(reference, _Tampering(OrtBackend(bundle), kept=swap(new)), sample,
                      cfg.model_copy(update={"kept_tie_tolerance": tolerance}), probe=CodeProbe(_models(bundle)))

    # the k-th kept token exchanged for the best dropped one: a near-tie within 2x its gap
    tie = run(first_out, 2 * gap)
    assert tie["passed"], tie["failures"]
    assert tie["kept"]["near_tie"] == 2 and tie["kept"]["not_a_tie"] == 0  # same inputs and end to end
    assert tie["kept"]["max_margin"] == pytest.approx(gap, rel=1e-6)
    # the same exchange with a tolerance below the gap is refused
    assert not run(first_out, gap / 2)["passed"]
    # the same near-tie is refused where verify.min_kept_index_agreement asks for identical sets
    strict = verify(reference, _Tampering(OrtBackend(bundle), kept=swap(first_out)), sample,
                    cfg.model_copy(update={"kept_tie_tolerance": 2 * gap, "min_kept_index_agreement": 1.0}), probe=CodeProbe(_models(bundle)))
    assert not strict["passed"] and any(f.startswith("kept-index agreement 0.0%") for f in strict["failures"]), strict["failures"]
    # exchanged for the lowest-scored candidate: refused at the same generous tolerance
    untied = run(lowest, 2 * gap)
    assert not untied["passed"]
    assert any("not near-ties of the reference scores" in f for f in untied["failures"]), untied["failures"]


def test_a_missing_pruning_layer_is_a_failure(gate):
    report = _run(gate, backend=_Tampering(OrtBackend(gate[0]), kept=lambda kept: kept[:-1]))
    assert not report["passed"]
    assert any(f.startswith("kept indices missing") for f in report["failures"]), report["failures"]
    assert all(s["kept_index_agreement"] == [False] for s in report["per_sample"])  # not silently zipped away


def test_kept_differences_reports_a_layer_missing_on_either_side():
    a, b = np.array([[1, 2]]), np.array([[1, 3]])
    scores = [(1, np.array([[0.5, 0.4, 0.3, 0.1]]), np.array([[0, 1, 2, 3]])), (2, np.array([[0.5, 0.4]]), np.array([[1, 2]]))]
    assert [r["status"] for r in kept_differences([a, a], [a], scores, 0.1, "x")] == ["identical", "missing"]
    assert [r["status"] for r in kept_differences([a], [a, a], scores, 0.1, "x")] == ["identical", "missing"]
    # the k-th largest score is 0.4; token 2 (0.3) only on one side, token 3 (0.1) only on the
    # other: margin max(0.1, 0.3) over the score scale 0.4 (the spread 0.5 - 0.1); the next
    # layer is downstream of it
    rows = kept_differences([a, a], [b, b], scores, 0.1, "x")
    assert [r["status"] for r in rows] == ["not_a_tie", "downstream"] and rows[0]["margin"] == pytest.approx(0.75)


def test_a_kept_set_difference_after_a_rounding_tie_upstream_is_marked_only_when_teacher_forcing_keeps_the_same_sets():
    """Free-running kept sets may differ because a code upstream flipped at a rounding boundary
    (the 1.4 B random model of docs/scale.md: the first difference a tie in layer 0, the
    teacher-forced sets identical). Such a difference is marked ``after_rounding_tie``; one with
    a non-tie first difference, a teacher-forced difference that is not a near-tie, no
    teacher-forced rows, or no margin stays ``not_a_tie``."""
    def rows(forced="identical", margin=0.05):
        same = [{"source": "same inputs", "pruning_layer": 2, "status": "not_a_tie", "margin": margin},
                {"source": "same inputs", "pruning_layer": 12, "status": "downstream"}]
        teacher = [{"source": "teacher forced", "pruning_layer": 2, "status": forced, "margin": None},
                   {"source": "teacher forced", "pruning_layer": 12, "status": "identical"}]
        return same + teacher, [{"source": "end to end", "pruning_layer": 2, "status": "not_a_tie", "margin": margin},
                                {"source": "end to end", "pruning_layer": 12, "status": "downstream"}]

    tie = {"graph": "prefill", "where": "prefill: layers.0.q_proj", "flips": 14, "max_step": 1, "max_margin": 5e-7, "tie": True}
    not_tie = {**tie, "max_step": 2, "tie": False}
    kept, e2e = rows()
    assert kept_after_rounding_ties(kept, e2e, [tie, {**tie, "graph": "decode"}]) == 2
    assert [r["status"] for r in kept + e2e] == ["after_rounding_tie", "downstream", "identical", "identical", "after_rounding_tie", "downstream"]
    for forced, firsts, margin in (("identical", [tie, not_tie], 0.05), ("identical", [], 0.05), ("not_a_tie", [tie], 0.05),
                                   ("identical", [tie], None)):
        kept, e2e = rows(forced, margin)
        statuses = [r["status"] for r in kept + e2e]
        assert kept_after_rounding_ties(kept, e2e, firsts) == 0 and [r["status"] for r in kept + e2e] == statuses
    kept, e2e = rows()
    only_free = [r for r in kept if r["source"] != "teacher forced"]
    assert kept_after_rounding_ties(only_free, e2e, [tie]) == 0 and only_free[0]["status"] == "not_a_tie"


def test_other_greedy_tokens_are_a_failure(gate):
    def other_token(logits):
        out = logits.copy()
        out[:, (int(logits.argmax()) + 1) % logits.shape[-1]] = logits.max() + 1.0
        return out

    report = _run(gate, backend=_Tampering(OrtBackend(gate[0]), logits=other_token))
    assert not report["passed"]
    assert any(f.startswith("greedy agreement 0%") and "with the same codes in every call" in f for f in report["failures"]), report["failures"]
    assert report["greedy_divergences_at_rounding_ties"] == 0


class _FreeFlippingProbe(CodeProbe):
    """The real free-running observations with ``flip(graph, observation)`` applied."""

    def __init__(self, models, flip):
        super().__init__(models)
        self.flip = flip

    def run(self, graph, values):
        obs = super().run(graph, values)
        self.flip(graph, obs)
        return obs


def test_tokens_that_differ_after_a_rounding_tie_agree_and_after_any_other_difference_do_not(gate):
    """A sample whose tokens differ counts as agreeing only when each call's first differing
    codes (same inputs) moved one step from a value within verify.rounding_tie_tolerance of a
    rounding boundary in the simulation."""
    bundle, cfg, reference, samples = gate[0], gate[1], gate[2], [gate[3][0]]
    batch = samples[0].batch
    with reference.observing():
        feats = reference.vision(batch.pixel_values)
        reference.prefill(batch.input_ids, batch.attention_mask, feats)
        record = reference.last
    margins = record.margins[0]  # the prefill's first quantizer (layer 0's input)
    at = int(np.argmin(margins))
    closest = float(margins.reshape(-1)[at])
    assert closest < 0.05 and record.codes[0][1].shape == margins.shape

    def flip(step):
        def change(graph, obs):
            if graph == "prefill":
                obs.codes[0][0].reshape(-1)[at] += step
        return change

    def other_token(logits):
        out = logits.copy()
        out[:, (int(logits.argmax()) + 1) % logits.shape[-1]] = logits.max() + 1.0
        return out

    def run(step, tolerance):
        return verify(reference, _Tampering(OrtBackend(bundle), logits=other_token), samples,
                      cfg.model_copy(update={"rounding_tie_tolerance": tolerance}), probe=_FreeFlippingProbe(_models(bundle), flip(step)))

    tie = run(1, closest * 1.01 + 1e-9)
    assert tie["passed"], tie["failures"]
    assert tie["greedy_agreement"] == 0.0 and tie["greedy_divergences_at_rounding_ties"] == 1
    first = tie["per_sample"][0]["first_differences"]
    assert [f["graph"] for f in first] == ["prefill"] and first[0]["flips"] == 1 and first[0]["tie"]
    assert first[0]["max_margin"] == pytest.approx(closest) and "layers.0.self_attn.q_proj" in first[0]["where"]
    # the same flip with a tolerance below its margin, or two steps at the same code: refused
    for step, tolerance in ((1, closest / 2), (2, closest * 1.01 + 1e-9)):
        report = run(step, tolerance)
        assert not report["passed"] and report["greedy_divergences_at_rounding_ties"] == 0
        assert any("diverges at token 1, its first differing codes (prefill: model.language_model.layers.0.self_attn.q_proj" in f
                   for f in report["failures"]), report["failures"]


# ------------------------------------------------------------------ configuration


def test_old_verify_keys_still_load_and_gate_only_when_set(tmp_path: Path):
    cfg = parse_config({"version": 1, "model": {"source": "builtin:tiny-llava"},
                        "verify": {"max_logits_rel_error": 0.5, "min_kept_index_agreement": 0.9,
                                   "onnxruntime": {"max_code_flip_rate": 0.05, "kept_tie_tolerance": 0.1}}}, tmp_path / "m.yaml")
    assert cfg.verify.max_logits_rel_error == 0.5 and cfg.verify.min_kept_index_agreement == 0.9
    flavour = cfg.verify.for_flavour("onnxruntime")
    assert flavour.max_code_flip_rate == 0.05 and flavour.kept_tie_tolerance == 0.1 and flavour.max_logits_rel_error == 0.5
    default = parse_config({"version": 1, "model": {"source": "builtin:tiny-llava"}}, tmp_path / "m.yaml").verify
    assert default.min_kept_index_agreement is None and default.min_greedy_agreement == 1.0


def test_the_onnxruntime_flavour_at_accuracy_level_4_gets_looser_float_bounds_unless_set(tmp_path: Path):
    doc = {"version": 1, "model": {"source": "builtin:tiny-llava"}}
    v = parse_config(doc, tmp_path / "m.yaml").verify
    assert v.for_flavour("onnxruntime", 0).max_teacher_forced_rel_error == v.max_teacher_forced_rel_error == 1e-3
    level4 = v.for_flavour("onnxruntime", 4)
    assert level4.max_teacher_forced_rel_error == 0.05 and level4.max_kv_scale_rel_difference == 0.05
    assert level4.max_code_flip_rate == v.max_code_flip_rate  # the code gate is not loosened
    own = parse_config({**doc, "verify": {"onnxruntime": {"max_teacher_forced_rel_error": 0.02}}}, tmp_path / "m.yaml").verify
    assert own.for_flavour("onnxruntime", 4).max_teacher_forced_rel_error == 0.02  # what the YAML says wins
    assert own.for_flavour("tensorrt", 4).max_teacher_forced_rel_error == 1e-3
