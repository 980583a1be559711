"""Run a bundle with onnxruntime: vision -> prefill -> greedy decode with the quantized KV cache.

The generation loop is written once over a small backend interface (:class:`Backend`) so the
onnxruntime bundle and the PyTorch simulation (:mod:`quota_compile.verify.gate`) decode the same way.
A batch holds several images and prompts of different lengths: prompts are right-padded, the
image tokens sit at the same span in every row, each row has its own positions and its own
KV-cache mask, and a finished row (EOS) keeps decoding harmlessly until all are done.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from quota_compile.bundle.format import kv_update_of, open_bundle
from quota_compile.bundle.schema import GRAPHS, KEPT, KV_REPLACE, MANIFEST, PORTABLE_FOLDER, TOKENIZER
from quota_compile.errors import UserError, onnxruntime_errors


class Backend(Protocol):
    def vision(self, pixel_values: np.ndarray) -> np.ndarray: ...

    def prefill(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, image_features: np.ndarray
    ) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
        """``(logits, per-layer KV cache tensors, kept visual indices per pruning layer)``."""
        ...

    def decode(
        self, input_ids: np.ndarray, position_ids: np.ndarray, attention_mask: np.ndarray, past: list[np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """``(logits, the per-layer KV cache with the new token's entries appended)``."""
        ...


def append_kv(past: list[np.ndarray], new: list[np.ndarray]) -> list[np.ndarray]:
    """The cache after one decode step whose graph returned only the new entries."""
    return [np.concatenate([old, n], axis=2) for old, n in zip(past, new)]


@dataclass
class Batch:
    """Processor output for a batch of (image, question) pairs."""

    input_ids: np.ndarray  # int64 [B, T], right-padded
    attention_mask: np.ndarray  # int64 [B, T]
    pixel_values: np.ndarray  # float32 [B, 3, H, W]


@dataclass
class Generation:
    tokens: list[list[int]]  # per sample, generated token ids (up to and including EOS)
    step_logits: list[np.ndarray] = field(default_factory=list)  # per step, [B, vocab]
    image_features: np.ndarray | None = None
    kept: list[np.ndarray] = field(default_factory=list)  # per pruning layer, [B, k] original visual indices


def make_batch(
    processor, prompt_template: str, images: list, questions: list[str], visual_span: tuple[int, int], image_token_id: int
) -> Batch:
    """Tokenize and preprocess; check that every row has its image tokens at ``visual_span``."""
    if len(images) != len(questions):
        raise UserError(f"got {len(images)} images but {len(questions)} prompts; give one prompt per image.")
    prompts = [prompt_template.replace("{question}", q) for q in questions]
    enc = processor(images=images, text=prompts, padding=True, return_tensors="np")
    ids = enc["input_ids"].astype(np.int64)
    start, count = visual_span
    for row in ids:
        span = np.flatnonzero(row == image_token_id)
        if len(span) != count or span[0] != start:
            raise UserError(f"a prompt does not put its {count} image tokens at position {start}; use the bundle's prompt template.")
    return Batch(ids, enc["attention_mask"].astype(np.int64), enc["pixel_values"].astype(np.float32))


def greedy_generate(
    backend: Backend, batch: Batch, max_new_tokens: int, eos_token_id: int | None, keep_logits: bool = False, feed: list[np.ndarray] | None = None
) -> Generation:
    """Greedy decoding. With ``eos_token_id=None`` exactly ``max_new_tokens`` are generated.
    ``feed`` (one ``[B]`` array per step) is decoded instead of the greedy tokens (teacher
    forcing: the logits of each step then follow the given tokens)."""
    feats = backend.vision(batch.pixel_values)
    logits, cache, kept = backend.prefill(batch.input_ids, batch.attention_mask, feats)
    lengths = batch.attention_mask.sum(axis=1)
    b = len(lengths)
    out = Generation(tokens=[[] for _ in range(b)], image_features=feats, kept=kept)
    mask = batch.attention_mask
    done = np.zeros(b, dtype=bool)
    for step in range(max_new_tokens):
        if keep_logits:
            out.step_logits.append(logits)
        nxt = logits.argmax(axis=-1) if feed is None else feed[step]
        for i in range(b):
            if not done[i]:
                out.tokens[i].append(int(nxt[i]))
                done[i] = eos_token_id is not None and nxt[i] == eos_token_id
        if done.all() or step == max_new_tokens - 1:
            break
        mask = np.concatenate([mask, np.ones((b, 1), dtype=np.int64)], axis=1)
        positions = (lengths + step)[:, None].astype(np.int64)
        logits, cache = backend.decode(nxt[:, None].astype(np.int64), positions, mask, cache)
    return out


# Execution providers ``device="auto"`` asks for, best first, where this onnxruntime has them
# (``pip install quota-compile[gpu]`` brings onnxruntime-gpu, which has the CUDA and TensorRT
# ones; the CPU build has only CPUExecutionProvider).
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
DEVICES = ("auto", "cpu", "cuda")


def choose_providers(device: str = "auto") -> list[str]:
    """onnxruntime execution providers for ``device``: ``cpu``; ``cuda`` (the GPU providers
    this onnxruntime has, refused if none); ``auto`` (the GPU providers where present, else
    the CPU). The CPU provider always comes last, for the nodes the others do not take."""
    import onnxruntime as ort

    if device not in DEVICES:
        raise UserError(f"device {device!r}: expected one of {', '.join(DEVICES)}.")
    gpu = [p for p in GPU_PROVIDERS if p in ort.get_available_providers()]
    if device == "cuda" and not gpu:
        raise UserError(
            f"device cuda: this onnxruntime ({ort.__version__}) has no CUDA provider; install quota-compile[gpu] (onnxruntime-gpu) or use --device cpu."
        )
    return ([] if device == "cpu" else gpu) + ["CPUExecutionProvider"]


def session_options(threads: int | None = None, arena: bool = True):
    """The onnxruntime session options every bundle graph runs with.

    ``arena=False``: the session frees what a run allocated when the run ends instead of
    keeping it in onnxruntime's CPU memory arena for the next run. Same arithmetic, same
    results; slower where a run allocates large buffers (the portable graphs' dequantized
    weights), but the memory a session holds between runs stays at its weights. Verification
    opens its sessions so (docs/scale.md: on a 1.1 B decoder, the portable decode graph's arena
    held 3.5 GiB after one step)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.enable_cpu_mem_arena = arena
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Keep fp32 arithmetic if DQ(INT4)+MatMul is fused into MatMulNBits (the default
    # accuracy level 4 would quantize activations to int8, which is not the deployed W4A4).
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    if threads:
        opts.intra_op_num_threads = threads
    return opts


class OrtBackend:
    """The bundle's three graphs in onnxruntime sessions."""

    def __init__(self, bundle: Path, providers: list[str] | None = None, threads: int | None = None, profile_prefix: str | None = None,
                 arena: bool = True):
        """``profile_prefix``: turn onnxruntime's profiler on, writing ``<prefix>*.json``;
        ``arena``: :func:`session_options`."""
        import onnxruntime as ort

        opts = session_options(threads, arena)
        if profile_prefix:
            opts.enable_profiling = True
            opts.profile_file_prefix = profile_prefix
        providers = providers or ["CPUExecutionProvider"]
        self.folder = Path(bundle)
        with warnings.catch_warnings():  # (an unavailable provider: reported by ``missing``)
            warnings.filterwarnings("ignore", message="Specified provider")
            self.sessions = {}
            for g in GRAPHS:
                with onnxruntime_errors(f"{g}.onnx does not load in onnxruntime"):
                    self.sessions[g] = ort.InferenceSession(str(bundle / f"{g}.onnx"), opts, providers=providers)
        # the providers asked for that a session could not start (e.g. onnxruntime-gpu without
        # a GPU or CUDA libraries: onnxruntime then runs on the CPU)
        self.missing = [p for p in providers if any(p not in s.get_providers() for s in self.sessions.values())]
        self._inputs = {g: [i.name for i in s.get_inputs()] for g, s in self.sessions.items()}
        # The portable decode graph returns the new token's KV entries (appended here); the
        # onnxruntime flavour's GroupQueryAttention returns the whole updated cache.
        self.kv_update = kv_update_of(self.sessions["decode"].get_modelmeta().custom_metadata_map)

    def _run(self, graph: str, values: list[np.ndarray]) -> list[np.ndarray]:
        with onnxruntime_errors(f"{graph}.onnx failed in onnxruntime"):
            return self.sessions[graph].run(None, dict(zip(self._inputs[graph], values)))

    def vision(self, pixel_values):
        return self._run("vision", [pixel_values])[0]

    def prefill(self, input_ids, attention_mask, image_features):
        out = self._run("prefill", [input_ids, attention_mask, image_features])
        n_kept = sum(1 for o in self.sessions["prefill"].get_outputs() if o.name.startswith(KEPT))
        return out[0], out[1 : len(out) - n_kept], out[len(out) - n_kept :]

    def decode(self, input_ids, position_ids, attention_mask, past):
        out = self._run("decode", [input_ids, position_ids, attention_mask, *past])
        return out[0], (out[1:] if self.kv_update == KV_REPLACE else append_kv(past, out[1:]))


def prompt_warnings(tokenizer, questions: list[str]) -> list[str]:
    """One line per question the model cannot read: empty, or made only of words the
    tokenizer maps to its unknown token (the answer then ignores the question)."""
    out = []
    unk = tokenizer.unk_token_id
    for q in questions:
        ids = tokenizer(q, add_special_tokens=False)["input_ids"] if q.strip() else []
        if not ids:
            out.append(f"the prompt {q!r} is empty; the model sees only the image and the prompt template.")
        elif unk is not None and all(i == unk for i in ids):
            out.append(f"the bundle's tokenizer knows none of the words of the prompt {q!r} (all become {tokenizer.unk_token}); the answer ignores the question.")
    return out


def load_image(path: str | Path, option: str = "--image"):
    """An image file as an RGB PIL image; a file PIL cannot decode is a :class:`UserError`."""
    from PIL import Image

    if not Path(path).is_file():
        raise UserError(f"{path}: no such image file (option {option}).")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        # (PIL's UnidentifiedImageError and "image file is truncated" are OSErrors)
        reason = "not an image file PIL can read" if isinstance(e, Image.UnidentifiedImageError) else f"a damaged or truncated image ({e})"
        raise UserError(f"{path}: {reason} (option {option}).") from None


class BundleRunner:
    """Answer questions about images with a compiled bundle."""

    def __init__(self, bundle: str | Path, providers: list[str] | None = None, device: str = "auto", say: Callable[[str], None] | None = None,
                 backend: str = "onnxruntime"):
        """``providers`` (onnxruntime's names) or ``device`` (:func:`choose_providers`); ``say``
        gets one line when GPU providers were asked for but the sessions run on the CPU.
        ``backend="torch"``: the bundle's torch flavour instead, on ``device``
        (:func:`quota_compile.runtime.torch_programs.torch_device`)."""
        from PIL import Image
        from transformers import AutoProcessor

        bundle = Path(bundle)
        # integrity (files, sha256, format) and the manifest against the graphs, before loading anything
        self.manifest = open_bundle(bundle)  # a quota_compile.bundle.schema.Manifest
        manifest_path = bundle / MANIFEST
        model = self.manifest.model
        self.prompt_template = model.prompt_template
        self.visual_span = (model.visual_start, model.visual_tokens)
        self.eos_token_id = model.eos_token_id
        self.image_token_id = model.image_token_id
        self.processor = AutoProcessor.from_pretrained(bundle / TOKENIZER)
        self.processor.tokenizer.padding_side = "right"
        if "<image>" not in self.prompt_template or "{question}" not in self.prompt_template:
            raise UserError(f"{manifest_path}: key 'model.prompt_template' must contain '<image>' and '{{question}}'.")
        try:  # the template with this tokenizer puts the image tokens where the graphs expect them
            make_batch(self.processor, self.prompt_template, [Image.new("RGB", (8, 8))], ["?"], self.visual_span, self.image_token_id)
        except UserError:
            raise UserError(
                f"{manifest_path}: key 'model.prompt_template' does not put {self.visual_span[1]} image tokens at position "
                f"{self.visual_span[0]} with the bundle's tokenizer (keys 'model.visual_start', 'model.visual_tokens')."
            ) from None
        flavours = self.manifest.flavours
        if backend == "torch":
            from quota_compile.runtime.torch_programs import ProgramBackend, load_programs, torch_device

            if "torch" not in flavours:
                raise UserError(f"{manifest_path}: key 'flavours' has no torch flavour; compile the bundle with export.targets including torch to run it with --backend torch.")
            self.flavour = "torch"
            where = torch_device(device)
            kept = sum(1 for o in self.manifest.graphs["prefill"].outputs if o.name.startswith(KEPT))
            self.backend = ProgramBackend(load_programs(bundle / flavours["torch"].folder, where), kept, where)
            return
        # The flavour the manifest marks as the runtime's (the onnxruntime flavour when the bundle
        # has it: faster on the CPU), else portable.
        self.flavour = next((name for name, entry in flavours.items() if entry.used_by_runtime), "portable")
        folder = bundle / (flavours[self.flavour].folder if self.flavour in flavours else PORTABLE_FOLDER)
        self.backend = OrtBackend(folder, providers or choose_providers(device))
        for g, session in self.backend.sessions.items():
            for side, args in (("inputs", session.get_inputs()), ("outputs", session.get_outputs())):
                if [a.name for a in args] != [a.name for a in getattr(self.manifest.graphs[g], side)]:
                    raise UserError(
                        f"{manifest_path}: key 'graphs.{g}.{side}' does not name the {side} of {(folder / f'{g}.onnx').relative_to(bundle)} "
                        f"(flavour {self.flavour}); the bundle is inconsistent: compile it again."
                    )
        gpu_missing = [p for p in self.backend.missing if p in GPU_PROVIDERS]
        if gpu_missing and say is not None:
            say(f"note: {', '.join(gpu_missing)} could not start (no usable GPU or CUDA libraries); running on the CPU.")

    def prompt_warnings(self, questions: list[str]) -> list[str]:
        """:func:`prompt_warnings` with this bundle's tokenizer."""
        return prompt_warnings(self.processor.tokenizer, questions)

    def answer(self, images: list, questions: list[str], max_new_tokens: int = 32) -> list[str]:
        pics = [load_image(i) if isinstance(i, (str, Path)) else i for i in images]
        batch = make_batch(self.processor, self.prompt_template, pics, questions, self.visual_span, self.image_token_id)
        gen = greedy_generate(self.backend, batch, max_new_tokens, self.eos_token_id)
        return [self.processor.tokenizer.decode(t, skip_special_tokens=True).strip() for t in gen.tokens]
