"""Verification (DESIGN §6): the exported graphs in onnxruntime against the PyTorch simulation.

On held-out samples (generated images and questions, seeded apart from calibration), both
decode greedily for exactly ``verify.new_tokens`` tokens (EOS ignored) through the same loop
(:func:`quota_compile.runtime.greedy_generate`). Reported per sample and overall: the relative
error of the visual embeddings and of the logits at every step up to the first token where
the two disagree (``||ort - torch|| / ||torch||``), and greedy-token agreement. The export is
refused when the worst logits error exceeds ``verify.max_logits_rel_error`` or the fraction of
samples whose tokens are all identical is below ``verify.min_greedy_agreement``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from .config import VerifySection
from .runtime import Backend, Batch, Generation, append_kv, greedy_generate, make_batch
from .trace import Programs

QUESTIONS = [
    "What is in the image?",
    "How many shapes are there?",
    "Is there a red circle on the left side of the picture?",
    "What colour is the largest object?",
    "Describe the image.",
    "Which shape is at the top?",
]


# Independent random streams, so calibration and verification never share an image.
CALIBRATION_STREAM, VERIFICATION_STREAM = 1, 2


def synthetic_images(n: int, size: int, seed: int, stream: int = VERIFICATION_STREAM) -> list:
    """``n`` seeded RGB images: a flat background with a few coloured rectangles and discs."""
    from PIL import Image

    rng = np.random.default_rng([stream, seed])
    images = []
    yy, xx = np.mgrid[0:size, 0:size]
    for _ in range(n):
        img = np.empty((size, size, 3), dtype=np.float32)
        img[:] = rng.uniform(0, 255, 3)
        for _ in range(int(rng.integers(1, 5))):
            colour = rng.uniform(0, 255, 3)
            cx, cy = rng.uniform(0, size, 2)
            r = rng.uniform(size / 10, size / 3)
            inside = (xx - cx) ** 2 + (yy - cy) ** 2 <= r**2 if rng.random() < 0.5 else (abs(xx - cx) <= r) & (abs(yy - cy) <= r)
            img[inside] = colour
        images.append(Image.fromarray(img.astype(np.uint8)))
    return images


class TorchBackend:
    """The eager quantized simulation behind the :class:`~quota_compile.runtime.Backend` interface."""

    def __init__(self, programs: Programs):
        self.p = programs

    @staticmethod
    def _np(xs) -> list[np.ndarray]:
        return [x.numpy() for x in xs]

    @torch.no_grad()
    def vision(self, pixel_values):
        return self.p.vision(torch.from_numpy(pixel_values)).numpy()

    @torch.no_grad()
    def prefill(self, input_ids, attention_mask, image_features):
        out = self.p.prefill(torch.from_numpy(input_ids), torch.from_numpy(attention_mask), torch.from_numpy(image_features))
        n_kv = 1 + len(self.p.prefill.kv_names) * self.p.prefill.num_layers
        return out[0].numpy(), self._np(out[1:n_kv]), self._np(out[n_kv:])

    @torch.no_grad()
    def decode(self, input_ids, position_ids, attention_mask, past):
        args = [torch.from_numpy(a) for a in (input_ids, position_ids, attention_mask, *past)]
        out = self.p.decode(*args)
        return out[0].numpy(), append_kv(past, self._np(out[1:]))


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return float(np.linalg.norm(a64 - b64) / max(np.linalg.norm(b64), 1e-30))


@dataclass
class Sample:
    question: str
    batch: Batch
    image: object  # the PIL image


def held_out_samples(vlm, cfg: VerifySection, visual_span: tuple[int, int], dataset: str = "synthetic") -> list[Sample]:
    """Verification inputs: generated images with generic questions, or (``dataset:
    shapesvqa``) ShapesVQA test-split samples drawn with ``verify.seed`` (a stream apart from
    the evaluation's)."""
    if dataset == "shapesvqa":
        from .shapes import vqa_items

        items = vqa_items("test", cfg.seed, cfg.samples, vlm.image_size, vlm.patch_size)
        images, qs = [i.image for i in items], [i.text for i in items]
    else:
        images = synthetic_images(cfg.samples, vlm.image_size, cfg.seed)
        qs = [QUESTIONS[(cfg.seed + i) % len(QUESTIONS)] for i in range(cfg.samples)]
    return [
        Sample(q, make_batch(vlm.processor, vlm.prompt_template, [img], [q], visual_span, vlm.image_token_id), img)
        for img, q in zip(images, qs)
    ]


def compare(ref: Generation, got: Generation) -> dict:
    """Figures for one sample (batch of one)."""
    a, b = ref.tokens[0], got.tokens[0]
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
    steps = min(same + 1, len(ref.step_logits))
    errors = [_rel(got.step_logits[i], ref.step_logits[i]) for i in range(steps)]
    kept_same = [bool(np.array_equal(r, g)) for r, g in zip(ref.kept, got.kept)]
    return {
        "kept_index_agreement": kept_same,
        "vision_rel_error": _rel(got.image_features, ref.image_features),
        "prefill_logits_rel_error": errors[0],
        "max_logits_rel_error": max(errors),
        "tokens_reference": a,
        "tokens_onnxruntime": b,
        "matching_prefix": same,
        "identical": a == b,
    }


class _SimulationRunner:
    """A Polygraphy runner over one eager program of the simulation (Polygraphy's own
    ``PytRunner`` moves tensors to CUDA, so it cannot run here)."""

    def __new__(cls, program, inputs: dict[str, np.ndarray], output_names: list[str], compared: list[str], name: str):
        from polygraphy.backend.base import BaseRunner
        from polygraphy.common import TensorMetadata

        class Runner(BaseRunner):
            def activate_impl(self):
                pass

            def deactivate_impl(self):
                pass

            def get_input_metadata_impl(self):
                meta = TensorMetadata()
                for n, v in inputs.items():
                    meta.add(n, v.dtype, v.shape)
                return meta

            def infer_impl(self, feed_dict):
                start = time.perf_counter()
                with torch.no_grad():
                    out = program(*[torch.from_numpy(feed_dict[n]) for n in inputs])
                self.inference_time = time.perf_counter() - start
                out = out if isinstance(out, tuple) else (out,)
                named = dict(zip(output_names, out))
                return {n: np.ascontiguousarray(named[n].numpy()) for n in compared}

        return Runner(name=name)


def polygraphy_compare(programs: Programs, bundle, sample: Sample, torch_backend: Backend) -> dict:
    """Compare each graph with its eager program through Polygraphy's Comparator on one
    sample. Kept indices must be identical; float outputs (logits, features, KV scales) must
    agree in mean error within rtol 1e-2 / atol 1e-4. KV codes are not compared here: float
    reassociation between PyTorch and onnxruntime legitimately moves a few values across a
    rounding boundary (one code step), and what matters of the codes, the logits they lead
    to, is checked by the greedy decode."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import Comparator, CompareFunc
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.ERROR
    feats = torch_backend.vision(sample.batch.pixel_values)
    _, cache, _ = torch_backend.prefill(sample.batch.input_ids, sample.batch.attention_mask, feats)
    length = sample.batch.attention_mask.sum(axis=1)
    step = [np.array([[1]], dtype=np.int64), length[:, None].astype(np.int64), np.ones((1, cache[0].shape[2] + 1), dtype=np.int64)]
    feeds = {
        "vision": [sample.batch.pixel_values],
        "prefill": [sample.batch.input_ids, sample.batch.attention_mask, feats],
        "decode": step + cache,
    }
    results = {}
    for graph, values in feeds.items():
        session = SessionFromOnnx(str(bundle / f"{graph}.onnx"))
        ort_runner = OnnxrtRunner(session, name=f"onnxruntime-{graph}")
        with ort_runner:
            names_in = [i.name for i in ort_runner.sess.get_inputs()]
            names_out = [o.name for o in ort_runner.sess.get_outputs()]
        feed = {n: np.ascontiguousarray(v) for n, v in zip(names_in, values)}
        compared = [n for n in names_out if not n.endswith((".key", ".value", "zero_point"))]
        sim = _SimulationRunner(getattr(programs, graph), feed, names_out, compared, name=f"simulation-{graph}")
        kept = [n for n in compared if n.startswith("kept.")]
        atol = {"": 1e-4, **dict.fromkeys(kept, 0.0)}
        rtol = {"": 1e-2, **dict.fromkeys(kept, 0.0)}
        stat = {"": "mean", **dict.fromkeys(kept, "elemwise")}
        run = Comparator.run([sim, ort_runner], data_loader=[feed])
        with np.errstate(divide="ignore", invalid="ignore"):  # relative error of exact zeros
            acc = Comparator.compare_accuracy(run, compare_func=CompareFunc.simple(rtol=rtol, atol=atol, check_error_stat=stat))
        results[graph] = {"passed": bool(acc), "outputs_compared": len(compared)}
    return results


def verify(torch_backend: Backend, ort_backend: Backend, samples: list[Sample], cfg: VerifySection, graphs: dict | None = None) -> dict:
    """Run both backends on every sample; return the verify.json document. ``graphs``: the
    per-graph Polygraphy comparison (:func:`polygraphy_compare`), reported but not gating:
    its per-tensor tolerances cannot tell a legitimate rounding-boundary step from an error,
    whereas the end-to-end logits, greedy tokens and kept indices can."""
    rows = []
    for s in samples:
        ref = greedy_generate(torch_backend, s.batch, cfg.new_tokens, eos_token_id=None, keep_logits=True)
        got = greedy_generate(ort_backend, s.batch, cfg.new_tokens, eos_token_id=None, keep_logits=True)
        rows.append({"question": s.question, "prompt_length": int(s.batch.attention_mask.sum()), **compare(ref, got)})
    worst = max(r["max_logits_rel_error"] for r in rows)
    agreement = sum(r["identical"] for r in rows) / len(rows)
    tokens = sum(r["matching_prefix"] for r in rows) / (len(rows) * cfg.new_tokens)
    pairs = [same for r in rows for same in r["kept_index_agreement"]]
    kept = sum(pairs) / len(pairs) if pairs else None
    failures = []
    if kept is not None and kept < cfg.min_kept_index_agreement:
        failures.append(
            f"kept-index agreement {kept:.1%} at the pruning layers is below verify.min_kept_index_agreement {cfg.min_kept_index_agreement:.0%}"
        )
    if worst > cfg.max_logits_rel_error:
        failures.append(f"logits relative error {worst:.3g} exceeds verify.max_logits_rel_error {cfg.max_logits_rel_error:g}")
    if agreement < cfg.min_greedy_agreement:
        failures.append(f"greedy agreement {agreement:.0%} is below verify.min_greedy_agreement {cfg.min_greedy_agreement:.0%}")
    return {
        "reference": "PyTorch quantized simulation (eager)",
        "runtime": "onnxruntime CPUExecutionProvider",
        "samples": len(rows),
        "new_tokens": cfg.new_tokens,
        "seed": cfg.seed,
        "max_logits_rel_error": worst,
        "max_vision_rel_error": max(r["vision_rel_error"] for r in rows),
        "greedy_agreement": agreement,
        "token_agreement": tokens,
        "kept_index_agreement": kept,
        "thresholds": {"max_logits_rel_error": cfg.max_logits_rel_error, "min_greedy_agreement": cfg.min_greedy_agreement,
                       "min_kept_index_agreement": cfg.min_kept_index_agreement},
        "polygraphy": graphs or {},
        "passed": not failures,
        "failures": failures,
        "per_sample": rows,
    }
