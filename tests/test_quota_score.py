"""QUOTA's signals and score against a written-out reference (docs/pruning.md).

The reference below is re-derived from docs/pruning.md's text, in plain loops over numpy arrays:

- ``att``: the previous layer's softmax attention to each visual token, averaged over the
  heads and over the last ``query_tokens`` real (unmasked) text tokens after the image;
- ``mag``: ``||h||`` of each visual token's hidden state;
- ``risk``: ``||Q(h) - h|| / ||h||`` with the per-token activation quantizer of "Quantization
  semantics" (``qmax = 2^(bits-1) - 1``, ``scale = max(clip_ratio * max|x| / qmax, 1e-8)``,
  ``q = clamp(round_half_even(x / scale), -qmax - 1, qmax)``);
- each signal divided by its sum over the visual tokens of the sample, then
  ``s = w_att * att + w_mag * mag - w_risk * risk``; top-k ties go to the lower index.

Nothing under test produces an expected value here: the hand-sized cases are checked against
the reference (and a few numbers by hand), and ``signals: fp`` / ``lowbit`` calibration is
checked against signals recomputed from the Hugging Face model's own attention
probabilities (full precision) or from the quantized simulation's tensors (low-bit).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import quota_compile.calibration.calibrate as calibrate_module
from quota_compile.calibration.calibrate import calibrate
from quota_compile.config import CalibrationSection, PruningSection
from quota_compile.capture.programs import PrefillProgram, VisionProgram
from quota_compile.pruning.score import ScoreWeights, select_topk, token_score, visual_signals

# ------------------------------------------------------------------ the written-out reference


def ref_qdq(x: np.ndarray, bits: int, clip_ratio: float = 1.0) -> np.ndarray:
    """One token's quantize-dequantize, in ``x``'s own float type (so float32 inputs get the
    float32 divisions the deployed quantizer does and therefore the same codes)."""
    dt = x.dtype.type
    qmax = 2 ** (bits - 1) - 1
    amax = max(abs(float(e)) for e in x)
    if clip_ratio != 1.0:
        amax = dt(clip_ratio) * dt(amax)
    scale = max(dt(amax) / dt(qmax), dt(1e-8))
    out = np.empty_like(x)
    for i, e in enumerate(x):
        code = np.round(dt(e) / dt(scale))  # numpy rounds half to even, as QuantizeLinear does
        code = min(max(code, -qmax - 1), qmax)
        out[i] = dt(code) * dt(scale)
    return out


def ref_signals(h, probs, mask, visual_start, visual_count, query_tokens, bits, clip_ratio=1.0):
    """``(att, mag, risk)`` as float64 ``[B, V]`` from numpy ``h [B, T, D]``, ``probs [B, H, T, T]``,
    ``mask [B, T]``."""
    b_n, heads, t_n = probs.shape[0], probs.shape[1], probs.shape[2]
    a, v = visual_start, visual_count
    att, mag, risk = (np.zeros((b_n, v)) for _ in range(3))
    for b in range(b_n):
        text_rows = [t for t in range(a + v, t_n) if mask[b, t] != 0]
        rows = text_rows[-query_tokens:]
        for j in range(v):
            total = 0.0
            for t in rows:
                for hd in range(heads):
                    total += float(probs[b, hd, t, a + j])
            att[b, j] = total / (len(rows) * heads) if rows else 0.0
            x = h[b, a + j]
            norm = math.sqrt(sum(float(e) ** 2 for e in x))
            err = math.sqrt(sum((float(d) - float(e)) ** 2 for d, e in zip(ref_qdq(x, bits, clip_ratio), x)))
            mag[b, j] = norm
            risk[b, j] = err / norm
    return att, mag, risk


def ref_score(att, mag, risk, w: tuple[float, float, float]) -> np.ndarray:
    w_att, w_mag, w_risk = w
    s = np.zeros(att.shape)
    for b in range(att.shape[0]):
        sums = [float(sum(x[b])) for x in (att, mag, risk)]
        for j in range(att.shape[1]):
            share = [x[b, j] / total if total > 0 else 0.0 for x, total in zip((att, mag, risk), sums)]
            s[b, j] = w_att * share[0] + w_mag * share[1] - w_risk * share[2]
    return s


def ref_topk(score_row, k: int) -> list[int]:
    """The ``k`` largest, ties to the lower index, ascending."""
    order = sorted(range(len(score_row)), key=lambda j: (-score_row[j], j))
    return sorted(order[:k])


# ------------------------------------------------------------------ a hand-sized case

# B=2, H=2 heads, T=7: one prefix token, V=3 visual tokens at [1, 4), text rows 4, 5, 6.
# Sample 0 is all real; sample 1 is right-padded (row 6 is padding).
A, V, T, D = 1, 3, 7, 4
MASK = np.array([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0]], dtype=np.int64)

# Attention of the text rows to the visual tokens, [sample][row] -> (head 0, head 1).
TEXT_ATT = {
    0: {
        4: ([0.10, 0.56, 0.00], [0.10, 0.36, 0.00]),  # head mean [0.10, 0.46, 0.00]
        5: ([0.00, 0.10, 0.60], [0.00, 0.10, 0.40]),  # head mean [0.00, 0.10, 0.50]
        6: ([0.30, 0.10, 0.20], [0.10, 0.10, 0.00]),  # head mean [0.20, 0.10, 0.10]
    },
    1: {
        4: ([0.40, 0.00, 0.20], [0.20, 0.00, 0.00]),  # head mean [0.30, 0.00, 0.10]
        5: ([0.05, 0.25, 0.10], [0.15, 0.05, 0.10]),  # head mean [0.10, 0.15, 0.10]
        6: ([0.00, 0.00, 0.90], [0.00, 0.00, 0.90]),  # padding: must not count
    },
}
# By hand (mean over heads, then over the last q real text rows):
#   sample 0: q=1 [0.20, 0.10, 0.10] -> top-1 token 0; q=2 [0.10, 0.10, 0.30] -> token 2;
#             q=3 [0.10, 0.22, 0.20] -> token 1
#   sample 1: q=1 [0.10, 0.15, 0.10] -> token 1; q=2 = q=3 (only two real text rows after the
#             image) [0.20, 0.075, 0.10] -> token 0
HAND_ATT = {
    1: [[0.20, 0.10, 0.10], [0.10, 0.15, 0.10]],
    2: [[0.10, 0.10, 0.30], [0.20, 0.075, 0.10]],
    3: [[0.10, 0.22, 0.20], [0.20, 0.075, 0.10]],
}
HAND_TOP1 = {1: [[0], [1]], 2: [[2], [0]], 3: [[1], [0]]}

# Visual hidden states, chosen so that the INT4 scale max|x|/7 is a power of two (exact).
VISUAL_H = [
    [[7.0, 0.4, 0.4, 0.4], [3.5, 3.5, -3.5, 3.5], [14.0, 1.5, -2.5, 0.0]],
    [[1.75, 0.3, 0.0, -1.0], [7.0, 7.0, 7.0, 7.0], [0.2, 7.0, 0.3, -0.45]],
]
# By hand, INT4: [7, .4, .4, .4]: scale 1, codes [7, 0, 0, 0], error [0, .4, .4, .4],
#   risk = .4*sqrt(3) / sqrt(49.48) = 0.69282 / 7.03420 = 0.098494;
# [3.5, 3.5, -3.5, 3.5]: scale .5, exact: risk 0, ||h|| = 7;
# [14, 1.5, -2.5, 0]: scale 2, 1.5/2 = .75 -> 1, -2.5/2 = -1.25 -> -1: error [0, .5, .5, 0],
#   risk = sqrt(.5) / sqrt(204.5) = 0.049447.
HAND_RISK_INT4_SAMPLE0 = [0.4 * math.sqrt(3) / math.sqrt(49.48), 0.0, math.sqrt(0.5) / math.sqrt(204.5)]


def hand_case() -> tuple[np.ndarray, np.ndarray]:
    """``h [2, 7, 4]`` and ``probs [2, 2, 7, 7]`` (float32). Entries the definition ignores
    (the prefix, the visual rows, text tokens' hidden states) are seeded noise, so a signal that
    read them would change."""
    rng = np.random.default_rng(16)
    probs = rng.uniform(0.0, 0.5, size=(2, 2, T, T)).astype(np.float32)
    for b, rows in TEXT_ATT.items():
        for t, heads in rows.items():
            for hd, vals in enumerate(heads):
                probs[b, hd, t, A : A + V] = vals
    h = rng.normal(0.0, 3.0, size=(2, T, D)).astype(np.float32)
    h[:, A : A + V] = np.array(VISUAL_H, dtype=np.float32)
    return h, probs


def code_signals(h, probs, query_tokens, bits, mask=MASK, visual_start=A, visual_count=V):
    att, mag, risk = visual_signals(
        torch.from_numpy(h), torch.from_numpy(probs), torch.from_numpy(mask), visual_start, visual_count, query_tokens, bits
    )
    return att.double().numpy(), mag.double().numpy(), risk.double().numpy()


# ------------------------------------------------------------------ signals and score


def test_reference_reproduces_the_hand_computed_values():
    h, probs = hand_case()
    for q, expected in HAND_ATT.items():
        att, mag, risk = ref_signals(h, probs, MASK, A, V, q, bits=4)
        np.testing.assert_allclose(att, expected, rtol=1e-6)
    np.testing.assert_allclose(risk[0], HAND_RISK_INT4_SAMPLE0, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(mag[0, 1], 7.0)
    np.testing.assert_allclose(mag[1, 1], 14.0)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("query_tokens", [1, 2, 3, 32])
def test_visual_signals_equal_the_reference(query_tokens, bits):
    h, probs = hand_case()
    got = code_signals(h, probs, query_tokens, bits)
    want = ref_signals(h, probs, MASK, A, V, query_tokens, bits)
    for name, g, w in zip(("att", "mag", "risk"), got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7, err_msg=name)


def test_visual_signals_average_the_last_query_tokens_real_rows_after_the_image():
    h, probs = hand_case()
    for q, expected in HAND_ATT.items():
        att, _, _ = code_signals(h, probs, q, 4)
        np.testing.assert_allclose(att, expected, rtol=1e-5, err_msg=f"query_tokens={q}")


def test_visual_signals_risk_is_the_relative_int4_error():
    h, probs = hand_case()
    _, mag, risk = code_signals(h, probs, 2, 4)
    np.testing.assert_allclose(risk[0], HAND_RISK_INT4_SAMPLE0, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(mag[:, 1], [7.0, 14.0], rtol=1e-6)


WEIGHTS = [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (0.2, 0.3, 0.5), (0.5, 0.25, 0.25), (0.6, 0.0, 0.4)]


@pytest.mark.parametrize("w", WEIGHTS, ids=[f"att{a}-mag{m}-risk{r}" for a, m, r in WEIGHTS])
@pytest.mark.parametrize("query_tokens", [1, 2])
def test_token_score_is_the_weighted_sum_of_per_sample_shares_minus_risk(w, query_tokens):
    h, probs = hand_case()
    att, mag, risk = ref_signals(h, probs, MASK, A, V, query_tokens, 4)
    got = token_score(*(torch.from_numpy(x) for x in (att, mag, risk)), ScoreWeights(*w)).numpy()
    np.testing.assert_allclose(got, ref_score(att, mag, risk, w), rtol=1e-9, atol=1e-12)


def test_token_score_matches_a_hand_computed_value_with_risk_subtracted():
    # sample 0, q=2: att [.1, .1, .3] -> shares [.2, .2, .6]; risk shares r_j / sum(r):
    # r = [0.098494, 0, 0.049447], sum 0.147941 -> [0.665766, 0, 0.334234].
    # s = 0.6 * att_share - 0.4 * risk_share = [0.12 - 0.266306, 0.12, 0.36 - 0.133694]
    h, probs = hand_case()
    att, mag, risk = code_signals(h, probs, 2, 4)
    s = token_score(*(torch.from_numpy(x) for x in (att, mag, risk)), ScoreWeights(0.6, 0.0, 0.4)).numpy()
    np.testing.assert_allclose(s[0], [-0.146306, 0.12, 0.226306], atol=2e-6)


# ------------------------------------------------------------------ query_tokens and selection


def _select(score: np.ndarray, k: int) -> list[list[int]]:
    return select_topk(torch.from_numpy(score), k).tolist()


def test_query_tokens_changes_the_selection_as_the_reference_says():
    h, probs = hand_case()
    picks = {}
    for q in (1, 2, 3):
        att, mag, risk = code_signals(h, probs, q, 4)
        picks[q] = _select(token_score(*(torch.from_numpy(x) for x in (att, mag, risk)), ScoreWeights(1.0, 0.0, 0.0)).numpy(), 1)
        ref = ref_score(*ref_signals(h, probs, MASK, A, V, q, 4), (1.0, 0.0, 0.0))
        assert picks[q] == [ref_topk(row, 1) for row in ref] == HAND_TOP1[q], q
    assert picks[1] != picks[2] != picks[3]


def _two_tokens(visual: list[list[float]], att: list[float]):
    """One sample: a prefix token, two visual tokens with ``visual`` hidden states, one text
    row whose attention (both heads) to them is ``att``."""
    h = np.zeros((1, 4, 4), dtype=np.float32)
    h[0, 0] = [1.0, -1.0, 2.0, 0.5]
    h[0, 1:3] = visual
    h[0, 3] = [0.5, 0.5, 0.5, 0.5]
    probs = np.zeros((1, 2, 4, 4), dtype=np.float32)
    probs[0, :, 3, 1:3] = att
    probs[0, :, 3, 0] = 1.0 - sum(att)
    probs[0, :, 3, 3] = 0.0
    mask = np.ones((1, 4), dtype=np.int64)
    return h, probs, mask


def _keep_one(h, probs, mask, w: tuple[float, float, float]) -> int:
    sig = code_signals(h, probs, 1, 4, mask=mask, visual_start=1, visual_count=2)
    s = token_score(*(torch.from_numpy(x) for x in sig), ScoreWeights(*w)).numpy()
    kept = _select(s, 1)[0][0]
    ref = ref_score(*ref_signals(h, probs, mask, 1, 2, 1, 4), w)
    assert kept == ref_topk(ref[0], 1)[0]
    return kept


HIGH_RISK = [7.0, 0.4, 0.4, 0.4]  # outliers: 0.4 rounds to 0, risk 0.098
LOW_RISK = [3.5, 3.5, -3.5, 3.5]  # exact in INT4, risk 0


def test_at_equal_attention_the_high_int4_risk_token_loses_when_w_risk_is_positive():
    h, probs, mask = _two_tokens([HIGH_RISK, LOW_RISK], [0.25, 0.25])
    assert _keep_one(h, probs, mask, (0.5, 0.0, 0.5)) == 1
    assert _keep_one(h, probs, mask, (1.0, 0.0, 0.0)) == 0  # w_risk = 0: the tie goes to index 0


def test_higher_attention_does_not_save_a_high_risk_token_against_w_risk():
    h, probs, mask = _two_tokens([HIGH_RISK, LOW_RISK], [0.30, 0.20])
    assert _keep_one(h, probs, mask, (1.0, 0.0, 0.0)) == 0  # attention alone keeps it
    # att shares [.6, .4], risk shares [1, 0]: s = [.6 - 1, .4] with w_risk = 1
    assert _keep_one(h, probs, mask, (1.0, 0.0, 1.0)) == 1
    # a small risk weight leaves the attention cue in charge: [.6 - .1, .4]
    assert _keep_one(h, probs, mask, (1.0, 0.0, 0.1)) == 0


def test_at_equal_attention_the_larger_norm_wins_when_w_mag_is_positive():
    small, large = [1.75, 1.75, 1.75, 1.75], [3.5, 3.5, -3.5, 3.5]  # both exact in INT4
    h, probs, mask = _two_tokens([small, large], [0.25, 0.25])
    assert _keep_one(h, probs, mask, (1.0, 0.0, 0.0)) == 0  # tie: the lower index
    assert _keep_one(h, probs, mask, (1.0, 0.5, 0.0)) == 1
    h, probs, mask = _two_tokens([large, small], [0.25, 0.25])
    assert _keep_one(h, probs, mask, (1.0, 0.5, 0.0)) == 0


def test_higher_attention_wins_with_the_attention_cue_alone():
    h, probs, mask = _two_tokens([LOW_RISK, LOW_RISK], [0.20, 0.30])
    assert _keep_one(h, probs, mask, (1.0, 0.0, 0.0)) == 1


# ------------------------------------------------------------------ signals: fp / lowbit in calibration


def _calibrate_and_capture(vlm, qm, monkeypatch, signals: str, query_tokens: int):
    """Run calibration with explicit weights (no search) and return the signals it collected
    and the batches it collected them on (by wrapping the public ``collect_signals``)."""
    seen = []

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append((args[2] if len(args) > 2 else kwargs["batches"], out))
        return out

    real = calibrate_module.collect_signals
    monkeypatch.setattr(calibrate_module, "collect_signals", spy)
    span = vlm.visual_span()
    pr = PruningSection(method="quota", keep_ratio=0.4, signals=signals, query_tokens=query_tokens, weights={"att": 1.0})
    calibrate(vlm, qm, VisionProgram(vlm, qm), span, pr, CalibrationSection(num_samples=2))
    monkeypatch.setattr(calibrate_module, "collect_signals", real)
    assert len(seen) == 1
    batches, sig = seen[0]
    assert len(batches) == 1
    return batches[0], sig


def _hf_fp_reference(folder, batch, span, query_tokens, bits):
    """Per layer 1..L-1, signals from a freshly loaded Hugging Face model (full precision,
    eager attention): its ``hidden_states[l]`` is layer l's input and ``attentions[l-1]`` the
    previous layer's softmax attention."""
    from transformers import LlavaForConditionalGeneration

    hf = LlavaForConditionalGeneration.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        out = hf(
            input_ids=torch.from_numpy(batch.input_ids),
            attention_mask=torch.from_numpy(batch.attention_mask),
            pixel_values=torch.from_numpy(batch.pixel_values),
            output_attentions=True,
            output_hidden_states=True,
        )
    layers = len(out.attentions)
    return {
        i: ref_signals(out.hidden_states[i].numpy(), out.attentions[i - 1].numpy(), batch.attention_mask, *span, query_tokens, bits)
        for i in range(1, layers)
    }


def _lowbit_reference(vlm, qm, batch, span, query_tokens, bits):
    """Per layer, signals recomputed from the quantized simulation's own layer inputs and
    attention probabilities (W4A4, quantized KV cache), switched on explicitly here."""
    seen = {}

    def observe(i, h, probs, mask, visual_index):
        seen[i] = ref_signals(h.numpy(), probs.numpy(), mask.numpy(), *span, query_tokens, bits)

    with torch.no_grad(), qm.fake_quant(True):
        feats = VisionProgram(vlm, qm)(torch.from_numpy(batch.pixel_values))
        PrefillProgram(vlm, qm, *span).run(torch.from_numpy(batch.input_ids), torch.from_numpy(batch.attention_mask), feats, observe)
    return seen


def _assert_signals(sig, ref, close: bool):
    for i, (att, mag, risk) in ref.items():
        if close:  # the layer's sensitivity: the query rows' attention share on visual tokens
            np.testing.assert_allclose(sig.visual_share[0, i], att[0].sum(), rtol=1e-5)
        for name, got, want in zip(("att", "mag", "risk"), (sig.att, sig.mag, sig.risk), (att, mag, risk)):
            rel = np.abs(got[0, i] - want[0]).max() / np.abs(want[0]).max()
            if close:
                assert rel < 1e-5, (i, name, rel)
            elif name == "att":
                assert rel > 1e-3, (i, name, rel)  # far beyond the tolerance used for "close"


@pytest.mark.parametrize("query_tokens", [2, 32])
def test_signals_fp_calibration_measures_the_full_precision_model(tiny, tiny_folder, monkeypatch, query_tokens):
    vlm, qm = tiny
    span, bits = vlm.visual_span(), qm.spec.activations.bits
    batch, sig = _calibrate_and_capture(vlm, qm, monkeypatch, "fp", query_tokens)
    assert qm.simulating  # calibration switched the quantizers back on
    assert np.all(sig.att[:, 0] == 0)
    fp = _hf_fp_reference(tiny_folder, batch, span, query_tokens, bits)
    _assert_signals(sig, fp, close=True)
    _assert_signals(sig, _lowbit_reference(vlm, qm, batch, span, query_tokens, bits), close=False)
    # query_tokens is passed through: another count gives another cue on this prompt
    other = _hf_fp_reference(tiny_folder, batch, span, {2: 32, 32: 2}[query_tokens], bits)
    assert not np.allclose(other[1][0], fp[1][0], rtol=1e-3)


def test_signals_lowbit_calibration_measures_the_quantized_simulation(tiny, tiny_folder, monkeypatch):
    vlm, qm = tiny
    span, bits = vlm.visual_span(), qm.spec.activations.bits
    batch, sig = _calibrate_and_capture(vlm, qm, monkeypatch, "lowbit", 2)
    _assert_signals(sig, _lowbit_reference(vlm, qm, batch, span, 2, bits), close=True)
    _assert_signals(sig, _hf_fp_reference(tiny_folder, batch, span, 2, bits), close=False)
