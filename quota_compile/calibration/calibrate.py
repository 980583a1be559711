"""QUOTA calibration: signals under the deployed operators -> score weights ->
layer-wise keep schedule.

The calibration samples run through the quantized simulation (W4A4 + quantized KV cache; with
``pruning.signals: fp``, or ``pruning.method: quota-fp``, through the full-precision model
instead, which is the stage-wise combination). At the input of every decoder layer after the first we record, per visual token,
the three signals of :func:`quota_compile.pruning.score.visual_signals`, and per layer the share of
the query tokens' attention that goes to visual tokens (the layer's measured sensitivity).

- ``weights: auto`` tries the score weights on a simplex grid (step 1/4). For each it
  allocates a schedule on the fitting part of the calibration set and measures, on the
  held-out part, the KL divergence of the final-token distribution of the pruned model from
  the unpruned one (both in the same precision). The smallest KL wins; ties go to the earlier
  grid point. Every point is recorded in the recipe.
- The allocator (:func:`quota_compile.pruning.allocate.allocate`) maximises the retained score mass
  weighted by each layer's sensitivity under the ``keep_ratio`` budget.
- Baselines: ``fastv`` (one cut at ``fastv_layer``, attention cue), ``pdrop`` (geometric
  stages, attention cue), ``random`` (one cut after the full layers, a fixed seeded score per
  visual token). Their schedules do not depend on calibration data: each method's own rule
  (:mod:`quota_compile.pruning.methods`) decides them from the config.

Calibration signals are measured on the unpruned model; a layer after a pruning layer sees
the kept tokens only, whose signals are assumed to keep their calibrated distribution.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from quota_compile.pruning.allocate import KeepSchedule, allocate, retained_mass_curves
from quota_compile.pruning.methods import pruning_layers, pruning_method
from quota_compile.config import ActivationQuant, CalibrationSection, PruningSection
from quota_compile.errors import ConfigError, UserError
from quota_compile.models.llava import VLM
from quota_compile.capture.programs import PrefillProgram, PruneSpec
from quota_compile.pruning.score import ScoreWeights, token_score, visual_signals
from quota_compile.quant import ops
from quota_compile.quant.simulate import QuantizedModel, settle_group_size
from quota_compile.pruning.recipe import CalibrationProvenance, PruningRecipe, SearchPoint, Weights
from quota_compile.runtime.ort import Batch, make_batch
from quota_compile.capture.sequential import Placement
from quota_compile.data.samples import CALIBRATION_STREAM, QUESTIONS, synthetic_images

GRID_STEP = 4  # weights on the simplex in quarters


@dataclass
class Signals:
    att: np.ndarray  # [N, L, V] raw attention cue (layer 0: zeros, it never prunes)
    mag: np.ndarray  # [N, L, V]
    risk: np.ndarray  # [N, L, V]
    visual_share: np.ndarray  # [N, L] attention share of the query tokens on visual tokens


def calibration_batches(vlm: VLM, cfg: CalibrationSection, span: tuple[int, int]) -> list[Batch]:
    if cfg.dataset == "shapesvqa":
        from quota_compile.data.shapes import vqa_items

        items = vqa_items("calibration", cfg.seed, cfg.num_samples, vlm.image_size, vlm.patch_size)
        images, questions = [i.image for i in items], [i.text for i in items]
    else:
        images = synthetic_images(cfg.num_samples, vlm.image_size, cfg.seed, stream=CALIBRATION_STREAM)
        questions = [QUESTIONS[(cfg.seed + 3 * i + 1) % len(QUESTIONS)] for i in range(cfg.num_samples)]
    return [make_batch(vlm.processor, vlm.prompt_template, [img], [q], span, vlm.image_token_id) for img, q in zip(images, questions)]


def calibration_answer_ids(vlm: VLM, cfg: CalibrationSection) -> list[int]:
    """The first token of each ShapesVQA calibration question's gold answer, in the order of
    :func:`calibration_batches` (``calibration.objective: answer_nll``)."""
    from quota_compile.data.shapes import vqa_items

    items = vqa_items("calibration", cfg.seed, cfg.num_samples, vlm.image_size, vlm.patch_size)
    ids = []
    for item in items:
        tokens = vlm.tokenizer(item.question.answer, add_special_tokens=False)["input_ids"]
        if not tokens:
            raise UserError(f"the tokenizer gives no token for the answer {item.question.answer!r}")
        ids.append(int(tokens[0]))
    return ids


def answer_nll(log_probs: np.ndarray, answer_ids: list[int]) -> float:
    """Mean over samples of −log p(gold answer token) at the final position."""
    return float(-np.mean(log_probs[np.arange(len(answer_ids)), answer_ids]))


def batches_sha256(batches: list[Batch]) -> str:
    h = hashlib.sha256()
    for b in batches:
        for a in (b.input_ids, b.attention_mask, b.pixel_values):
            h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


@torch.no_grad()
def _features(vision, batch: Batch) -> torch.Tensor:
    device = next(vision.hf.model.vision_tower.parameters()).device
    return vision(torch.from_numpy(batch.pixel_values).to(device)).cpu()


def _prefill_args(vision, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The prefill program's inputs for one calibration batch, image features from ``vision``
    (on the host; :meth:`Placement.prefill` moves them)."""
    return torch.from_numpy(batch.input_ids), torch.from_numpy(batch.attention_mask), _features(vision, batch)


def _whole_model(model: torch.nn.Module) -> Placement:
    """The default placement: the whole model where it is (the CPU), no streaming."""
    return Placement(model, "cpu", False)


@torch.no_grad()
def collect_signals(
    vision, prefill: PrefillProgram, batches: list[Batch], query_tokens: int, activations: ActivationQuant, place: Placement | None = None
) -> Signals:
    n, layers, v = len(batches), prefill.num_layers, prefill.visual_count
    att, mag, risk = (np.zeros((n, layers, v)) for _ in range(3))
    share = np.zeros((n, layers))

    def observer(s: int):
        def observe(i, h, probs, mask, visual_index):
            a_, m_, r_ = (x[0].double().cpu().numpy() for x in visual_signals(
                h, probs, mask, prefill.visual_start, v, query_tokens, activations.bits, activations.clip_ratio
            ))
            att[s, i], mag[s, i], risk[s, i] = a_, m_, r_
            share[s, i] = float(a_.sum())

        return observe

    place = place or _whole_model(vision.hf)
    place.prefill([(prefill, *_prefill_args(vision, batch), observer(s)) for s, batch in enumerate(batches)])
    return Signals(att, mag, risk, share)


def scores(signals: Signals, w: ScoreWeights) -> np.ndarray:
    t = [torch.from_numpy(x) for x in (signals.att, signals.mag, signals.risk)]
    return token_score(*t, w).numpy()


def quota_schedule(signals: Signals, w: ScoreWeights, keep_ratio: float, first_full: int) -> KeepSchedule:
    mass = retained_mass_curves(scores(signals, w))
    sensitivity = signals.visual_share.mean(axis=0)
    return allocate(mass, sensitivity, keep_ratio, first_full=first_full)


@torch.no_grad()
def _final_log_probs(vision, prefills: list[PrefillProgram], batches: list[Batch], place: Placement) -> list[np.ndarray]:
    """Per program, the final-token log-probabilities ``[N, vocab]`` of ``batches`` (all
    programs' passes in one placement run: streamed together when sequential)."""
    args = [_prefill_args(vision, b) for b in batches]
    outs = place.prefill([(p, *a) for p in prefills for a in args])
    logp = [torch.log_softmax(o[0].double(), dim=-1)[0].numpy() for o in outs]
    return [np.stack(logp[k * len(args) : (k + 1) * len(args)]) for k in range(len(prefills))]


def kl_divergence(ref_log_probs: np.ndarray, log_probs: np.ndarray) -> float:
    """Mean over samples of KL(reference || pruned) of the final-token distributions."""
    return float(np.mean(np.sum(np.exp(ref_log_probs) * (ref_log_probs - log_probs), axis=-1)))


def weight_grid() -> list[ScoreWeights]:
    pts = [(a, m, GRID_STEP - a - m) for a, m in itertools.product(range(GRID_STEP + 1), repeat=2) if a + m <= GRID_STEP]
    return [ScoreWeights(a / GRID_STEP, m / GRID_STEP, r / GRID_STEP) for a, m, r in sorted(pts, reverse=True)]


def _weights(w: ScoreWeights) -> Weights:
    return Weights(att=w.att, mag=w.mag, risk=w.risk)


def calibrate(
    vlm: VLM, qm: QuantizedModel, vision, span: tuple[int, int], pruning: PruningSection, calibration: CalibrationSection,
    note: Callable[[str], None] | None = None,
) -> tuple[PruningRecipe, CalibrationProvenance]:
    """Decide the pruning for ``pruning.method``: the recipe and the calibration it came from.

    A method that is not ``calibrated`` (:mod:`quota_compile.pruning.methods`) decides from the
    config alone and reads no data (``vision`` may then be ``None``); ``quota`` runs the
    calibration described above. ``note`` gets a line as each of its two long steps starts."""
    note = note or (lambda what: None)
    start, v = span
    layers = vlm.num_layers
    act = qm.spec.activations
    method = pruning_method(pruning.method)
    provenance = CalibrationProvenance(
        dataset=calibration.dataset, num_samples=calibration.num_samples, seed=calibration.seed, holdout=calibration.holdout,
        objective=calibration.objective,
    )
    try:
        if not method.calibrated:
            return method.recipe(pruning, layers, v), provenance

        batches = calibration_batches(vlm, calibration, span)
        provenance = provenance.model_copy(update={"sha256": batches_sha256(batches)})
        holdout = max(1, round(len(batches) * calibration.holdout))
        fit, held = batches[:-holdout], batches[-holdout:]
        place = Placement(vlm.model, calibration.device, calibration.sequential)
        on = method.calibration_signals(pruning)
        with qm.fake_quant(on == "lowbit"), place.active():
            unpruned = PrefillProgram(vlm, qm, start, v)
            how = f", layer by layer on {calibration.device}" if calibration.sequential else f" on {calibration.device}"
            model = "the low-bit simulation" if on == "lowbit" else "the full-precision model"
            note(f"signals: {len(fit)} samples through {model}{how} ...")
            signals = collect_signals(vision, unpruned, fit, pruning.query_tokens, act, place)
            candidates = weight_grid() if pruning.weights == "auto" else [ScoreWeights(**pruning.weights.model_dump())]
            schedules = [quota_schedule(signals, w, pruning.keep_ratio, pruning.first_full_layers) for w in candidates]
            search: list[SearchPoint] = []
            best = 0
            if len(candidates) > 1:
                # the unpruned reference and every candidate's pruned prefill, in one run
                pruned = [
                    PrefillProgram(vlm, qm, start, v, PruneSpec(tuple(sch.keep), w, pruning.query_tokens, act.bits, act.clip_ratio))
                    for w, sch in zip(candidates, schedules)
                ]
                note(f"weight search: {len(candidates)} candidates on {len(held)} held-out samples ...")
                ref, *logps = _final_log_probs(vision, [unpruned, *pruned], held, place)
                kls = [kl_divergence(ref, logp) for logp in logps]
                nlls: list[float | None] = [None] * len(kls)
                if calibration.objective == "answer_nll":
                    answers = calibration_answer_ids(vlm, calibration)[-holdout:]
                    nlls = [answer_nll(logp, answers) for logp in logps]
                search = [
                    SearchPoint(weights=_weights(w), keep=list(sch.keep), kl=kl, answer_nll=nll)
                    for w, sch, kl, nll in zip(candidates, schedules, kls, nlls)
                ]
                objective = kls if calibration.objective == "kl" else nlls
                best = min(range(len(objective)), key=objective.__getitem__)  # ties: the earlier grid point
    except ConfigError:
        raise
    except UserError as e:  # the pruning methods' errors name their key (pruning.keep_ratio, ...)
        raise ConfigError(None, str(e)) from None
    w, schedule = candidates[best], schedules[best]
    keep = list(schedule.keep)
    recipe = PruningRecipe(
        method=method.name,
        signals=on,
        keep_ratio=pruning.keep_ratio,
        query_tokens=pruning.query_tokens,
        weights=_weights(w),
        keep=keep,
        pruning_layers=pruning_layers(keep),
        weight_search=search,
    )
    return recipe, provenance


@torch.no_grad()
def calibrate_kv_scales(vlm: VLM, qm: QuantizedModel, span: tuple[int, int], calibration: CalibrationSection) -> torch.Tensor:
    """Static ``per_channel`` KV scales: ``max |x|`` per layer, key/value, KV head and channel
    over every token of the calibration prompts (the unpruned prefill under the W4A4
    simulation, cache in float while measuring), divided by the largest code. Stored in
    ``qm.kv_scales`` (``[layers, 2, Hkv, 1, head_dim]``) and returned."""
    from quota_compile.capture.programs import VisionProgram

    start, v = span
    amax = torch.zeros(vlm.num_layers, 2, vlm.num_kv_heads, 1, vlm.head_dim)

    def observe(layer: int, which: int, x: torch.Tensor) -> None:
        m = x.detach().abs().amax(dim=(0, 2))[:, None, :].to("cpu", torch.float32)  # [Hkv, 1, D]
        amax[layer, which] = torch.maximum(amax[layer, which], m)

    qm.kv_scales = None
    vision, prefill = VisionProgram(vlm, qm), PrefillProgram(vlm, qm, start, v)
    prefill.kv_observer = observe
    place = Placement(vlm.model, calibration.device, calibration.sequential)
    with qm.fake_quant(True), place.active():
        # Padding rows of a one-sample batch do not exist; every position is a real token.
        place.prefill([(prefill, *_prefill_args(vision, batch)) for batch in calibration_batches(vlm, calibration, span)])
    qm.kv_scales = ops.kv_static_scale(amax, qm.kv_bits)
    return qm.kv_scales


class _BlockDone(Exception):
    """Raised by a hook once the block being calibrated has run: the rest of the forward pass
    is not needed."""


def gptq_weights(vlm: VLM, qm: QuantizedModel, span: tuple[int, int], calibration: CalibrationSection, damp: float, act_order: bool) -> None:
    """Replace every quantized Linear's RTN weight by GPTQ's (:mod:`quota_compile.quant.gptq`).

    The Linears are taken in blocks, in the order the unpruned prefill runs them: one block per
    decoder (or vision-tower) layer, and each other Linear (projector, ``lm_head``) on its own.
    For each block, the calibration prompts run through the W4A4 simulation, whose earlier
    blocks already hold their GPTQ weights; each Linear's Hessian is accumulated from its
    input as the deployed product sees it (after the per-token activation quantizer); then the
    block's weights are replaced. A ``per_channel`` KV cache whose static scales are not
    calibrated yet (:func:`quantize_model` calibrates them afterwards, on the final weights) is
    float while this runs.

    Whole-model (the default): each block reruns the prompts from the start and stops at the
    block's end. Sequential (``calibration.sequential``, :mod:`quota_compile.capture.sequential`): the
    vision-side blocks as whole-model (they only need the vision program), then one layer-major
    pass in which each decoder layer, once on the device, first runs every prompt's state
    through it to collect the Hessians, is quantized, and then advances the states; ``lm_head``
    is collected while the pass finishes. The same inputs reach every block, in the same order,
    so both give the same codes."""
    import re

    from quota_compile.capture.programs import VisionProgram
    from quota_compile.quant.gptq import HessianAccumulator, gptq_quantize
    from quota_compile.quant.simulate import QuantizedWeight

    start, v = span
    batches = calibration_batches(vlm, calibration, span)
    modules = {name: vlm.model.get_submodule(name) for name in qm.weights}
    vision, prefill = VisionProgram(vlm, qm), PrefillProgram(vlm, qm, start, v)
    if qm.kv_granularity == "per_channel" and qm.kv_scales is None:
        prefill.kv_observer = lambda layer, which, x: None  # float cache while measuring
    place = Placement(vlm.model, calibration.device, calibration.sequential)
    layer_of = {name: i for name, m in vlm.model.named_modules() for i, layer in enumerate(place.layers) if m is layer}

    def run(batch: Batch) -> None:
        place.prefill([(prefill, *_prefill_args(vision, batch))])

    def collect(names: list[str], stop: bool):
        """Hooks that accumulate the Hessians of ``names`` (and, with ``stop``, end the pass
        once all have run); returns the accumulators and the hooks."""
        acc = {n: HessianAccumulator(modules[n].in_features) for n in names}
        seen: set[str] = set()

        def pre(mod, args, n):
            acc[n].add(mod.quantize_input(args[0]))
            seen.add(n)

        def post(mod, args, out):
            if len(seen) == len(names):
                seen.clear()
                raise _BlockDone

        hooks = [modules[n].register_forward_pre_hook(lambda mod, args, n=n: pre(mod, args, n)) for n in names]
        if stop:
            hooks += [modules[n].register_forward_hook(post) for n in names]
        return acc, hooks

    def remove(hooks: list) -> None:
        for h in hooks:
            h.remove()

    def quantize_block(names: list[str], feed: Callable[[Batch], object]) -> None:
        """Hessians of the block ``names`` from every batch fed through ``feed`` (each pass
        stopped once the block has run), then its GPTQ weights."""
        acc, hooks = collect(names, stop=True)
        try:
            for batch in batches:
                try:
                    feed(batch)
                except _BlockDone:
                    pass
        finally:
            remove(hooks)
        replace(names, acc)

    def replace(names: list[str], acc: dict) -> None:
        for n in names:
            old = qm.weights[n]
            codes, scale = gptq_quantize(modules[n].weight, acc[n].h, qm.spec.weights.bits, old.group_size, damp, act_order)
            qm.weights[n] = QuantizedWeight(codes=codes, scale=scale, group_size=old.group_size)
            modules[n].set_qweight(qm.weights[n])

    with qm.fake_quant(True), torch.no_grad(), place.active():
        # execution order of the quantized Linears, from one prompt
        order: list[str] = []
        hooks = [m.register_forward_pre_hook(lambda mod, args, n=name: order.append(n) if n not in order else None) for name, m in modules.items()]
        try:
            run(batches[0])
        finally:
            remove(hooks)
        blocks: dict[str, list[str]] = {}
        for name in order:
            m = re.match(r"(.*\.layers\.\d+)\.", name)
            blocks.setdefault(m.group(1) if m else name, []).append(name)

        if not place.streaming:
            for names in blocks.values():
                quantize_block(names, run)
            return

        decoder = {layer_of[b]: names for b, names in blocks.items() if b in layer_of}
        first = next(k for k, b in enumerate(blocks) if b in layer_of) if decoder else len(blocks)
        before, after = list(blocks.values())[:first], [names for b, names in list(blocks.items())[first:] if b not in layer_of]
        for names in before:  # the vision tower's and the projector's: the vision program only
            quantize_block(names, lambda batch: _features(vision, batch))

        def before_layer(i: int, jobs: list) -> None:
            if i in decoder:
                acc, hooks = collect(decoder[i], stop=False)
                try:
                    for p, state in jobs:
                        place.step_on_device(p, state)
                finally:
                    remove(hooks)
                replace(decoder[i], acc)

        tail = [collect(names, stop=False) for names in after]  # lm_head: collected as the pass ends
        try:
            place.prefill([(prefill, *_prefill_args(vision, b)) for b in batches], before_layer)
        finally:
            for _, hooks in tail:
                remove(hooks)
        for names, (acc, _) in zip(after, tail):
            replace(names, acc)


def settle_quantization(cfg, vlm: VLM):
    """``cfg`` with the weight group size settled for this model
    (:func:`quota_compile.quant.simulate.settle_group_size`): what the recipe, the manifest and
    the progress line state."""
    return cfg.model_copy(update={"quantization": settle_group_size(vlm.model, cfg.quantization)})


def quantize_model(vlm: VLM, cfg, span: tuple[int, int]) -> QuantizedModel:
    """The quantized simulation of ``cfg.quantization``: the model rotated first where
    ``rotation: hadamard`` (in place, with the online rotations where ``online_rotation``: the
    full-precision function is unchanged), RTN weights
    or GPTQ's (``weights.method: gptq``) calibrated on ``cfg.calibration``, then the
    ``per_channel`` KV scales calibrated on ``cfg.calibration`` where that granularity is
    chosen."""
    from quota_compile.quant.rotation import rotate_llava
    from quota_compile.quant.simulate import quantize

    if cfg.quantization.rotation == "hadamard":
        rotate_llava(vlm.model, cfg.quantization.rotation_seed, online=cfg.quantization.online_rotation)
    qm = quantize(vlm.model, cfg.quantization)
    w = cfg.quantization.weights
    if w.method == "gptq":
        gptq_weights(vlm, qm, span, cfg.calibration, w.gptq_damp, w.act_order)
    if qm.kv_granularity == "per_channel":
        calibrate_kv_scales(vlm, qm, span, cfg.calibration)
    return qm
