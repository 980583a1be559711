#!/usr/bin/env python
"""Train the builtin ``shapes-llava`` model from scratch on ShapesVQA, on CPU.

Independent of the ``quota-compile`` pipeline: it uses only :mod:`quota_compile.data.shapes` (the data)
and transformers' Llava classes. The result is a normal Hugging Face folder (``config.json``,
``model.safetensors``, tokenizer and processor files) that loads offline with
``LlavaForConditionalGeneration.from_pretrained`` and ``AutoProcessor.from_pretrained``.

Model: a CLIP ViT tower (64x64 images, patch 8: 64 patch tokens + CLS, CLS dropped by the
``default`` feature strategy, so 64 visual tokens), LLaVA's two-layer GELU projector and a Llama
decoder with grouped-query attention. The tokenizer is word-level (the ShapesVQA question words,
the answers and the LLaVA template words), so a prompt is 64 image tokens plus ~10-25 text
tokens and the visual tokens are >= 70% of every prefill.

Training (what makes a from-scratch run converge on two CPU cores):

- dense auxiliary supervision of the vision tower: on the 64 patch features that feed the
  projector, linear heads predict, per patch, whether it is covered by a shape, the colour and
  the kind of the shape covering most of it (:func:`quota_compile.data.shapes.patch_targets`),
  whether it holds a shape's centre (one patch per object: what counting needs) and its row
  and column (position questions). The first ``--vision-steps`` steps train the tower on these
  targets alone (cheap: no decoder), after that both losses are trained jointly; the heads are
  training-only and never exported;
- attention supervision of the decoder (``--attn-weight``): two heads of decoder layer
  ``--attn-layer`` (1, the first layer whose answer position can know the question) are
  trained to attend, from the answer position, to the patches of the object(s) the question
  names (the second head to a relation's second object). With ``--sink`` (default) the target
  is ``<s>`` when the named object is absent, and ``<s>`` plus one centre patch per object for
  counts. ``--option-weight``: a head of layer ``attn-layer + 2`` attends to the correct
  choice option;
- position supervision (``--proj-pos-weight``, ``--where-weight``): the aux row/column heads
  above only keep the patch position in the *vision* features; nothing kept it through the
  projector, and the trained projector dropped it (measured on the v1 model and v2 step 7,500:
  a linear probe recovers a patch's column from the vision features with R^2 0.96, from the
  projector output with R^2 0.09, from the answer position with R^2 ~0; a randomly initialised
  projector keeps R^2 0.84), so position questions stayed at chance. Row/column heads on the
  projector output (the visual token embeddings the decoder reads), and "where" heads on the
  answer position's hidden state after decoder layer ``--where-layer`` (default
  ``attn-layer + 1``) that predict the grid column and row of the centre of the object(s) the
  question names (every question naming one present object, not only position questions).
  Both heads are training-only (never exported) and have their own optimizer at the constant
  base learning rate, so a checkpoint without them resumes (they start fresh). Measured by
  resuming v2 from step 7,500 at batch 32 with the defaults: 1,373 steps later the "side"
  questions went from 0.52 to 1.00 and the calibration accuracy from 0.832 to 0.880
  (position 0.45 to 0.74); "relation" questions were still at chance, their where heads
  still weak. ``--proj-pos-weight 0 --where-weight 0`` restores the old training;
- question-parse supervision (``--parse-weight``): two heads of decoder layer 0 are trained to
  attend, from the answer position, to the question's colour word(s) and kind word(s), so
  that layer 1 has the object's description at the answer position to aim its attention
  with. Measured on a run without it (step 2,000): the layer-1 heads put ~0.9 of their
  attention on the named object when it was named by its kind ("What colour is the
  circle?") but only ~0.37 when it was named by its colour ("What shape is the red
  object?"), and existence questions stayed near chance;
- note for the benchmark: the supervised heads make the answer position's attention
  unusually well aimed at the relevant patches in layer 1, which favours attention-based
  token pruning (FastV-like) on this model;
- a curriculum: the ShapesVQA ``difficulty`` rises linearly from 0 (one or two large shapes,
  exists/colour/shape questions) to 1 (full scenes, all families) over ``--curriculum-steps``
  steps after the vision phase, then stays at 1;
- answer-only loss: cross-entropy on the answer token and the EOS that follows it;
- float32 (bf16 autocast is optional: measured slower at these sizes), AdamW, linear warm-up
  then cosine decay.

Determinism: sample ``i`` of step ``s`` is ``make_sample("train", seed, s * batch + i, ...)``, so
the data stream depends only on the step and a resumed run continues it exactly; the
checkpoint holds the model, the auxiliary heads, the optimizer, the scheduler, the step and the
RNG states, written atomically (temporary file, then rename).

Evaluation (every ``--eval-every`` steps): greedy accuracy per question family on the first
``--eval-samples`` samples of the *calibration* split at difficulty 1 (never train or test),
plus the same with a random 30% of the visual tokens kept (the benchmark's pruning-sensitivity
check). A sample counts as correct when greedy decoding emits exactly the answer and then EOS.

Usage::

    python scripts/train_shapes_llava.py --out RUN_DIR [--steps N] [--batch B] [--seed S]
        [--resume] [--eval-every K] [--eval-samples M] [--threads T] [--minutes X]
        [--stop-after STEP] [--export HF_DIR] [--tiny]

The HF folder is written to ``--export`` (default ``RUN_DIR/hf``) whenever the run stops: at
``--steps``, at the ``--minutes`` budget, at ``--stop-after``, or on SIGINT/SIGTERM (after a
checkpoint). ``--resume`` with ``--steps`` already reached only re-exports. A resumed run must
repeat the settings that shape the result (steps, batch, seed, losses, curriculum; a warning
names any that differ).
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import math
import os
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from quota_compile.data.shapes import (  # noqa: E402
    COLOUR_NAMES,
    KINDS,
    LETTERS,
    NUMBERS,
    PLURALS,
    answer_vocabulary,
    curriculum,
    make_sample,
    patch_targets,
    question_families,
    shape_mask,
    render_array,
    to_chat,
)

PROMPT_TEMPLATE = "USER: <image>\n{question} ASSISTANT:"
SPECIALS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
EVAL_SPLIT = "calibration"  # never train or test
KEEP_PROBE = 0.3  # share of visual tokens kept in the random-pruning probe
AUX_TARGETS = {"covered": 2, "colour": len(COLOUR_NAMES), "kind": len(KINDS), "centre": 2, "row": 8, "col": 8}


@dataclass(frozen=True)
class ModelConfig:
    """Architecture. ``full()`` is the shipped model, ``tiny()`` the smoke-test one; both take
    64x64 images with 8-pixel patches (64 visual tokens)."""

    image_size: int = 64
    patch_size: int = 8
    vision_hidden: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    vision_mlp: int = 512
    text_hidden: int = 128
    text_layers: int = 6
    text_heads: int = 4
    text_kv_heads: int = 2
    text_mlp: int = 384
    max_positions: int = 256

    @classmethod
    def full(cls) -> ModelConfig:
        return cls()

    @classmethod
    def tiny(cls) -> ModelConfig:
        return cls(
            vision_hidden=32, vision_layers=1, vision_heads=2, vision_mlp=64,
            text_hidden=32, text_layers=2, text_heads=2, text_kv_heads=1, text_mlp=64,
        )

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_visual_tokens(self) -> int:
        return self.grid * self.grid


# --------------------------------------------------------------------------------------------
# Tokenizer, processor, model
# --------------------------------------------------------------------------------------------


def vocabulary() -> list[str]:
    """The word-level vocabulary: special tokens, the template words, then every word of every
    ShapesVQA question text, option, instruction and answer (sorted, so the ids are stable)."""
    texts = ["Answer yes or no.", "Answer with one word.", "Answer with the letter.", "Which object is in the image?"]
    texts += [f"{letter}." for letter in LETTERS]
    texts += ["on the left or the right?", "at the top or the bottom?", "left of right of above below"]
    for colour in COLOUR_NAMES:
        texts += [f"What shape is the {colour} object?", f"How many {colour} objects are there?"]
        for kind in KINDS:
            texts += [f"Is there a {colour} {kind}?", f"an {colour} {kind}"]
    for kind in KINDS:
        texts += [f"What colour is the {kind}?", f"How many {PLURALS[kind]} are there?", kind]
    texts += list(NUMBERS) + answer_vocabulary()
    words = {w for t in texts for w in t.split()}
    # A safety net for template words not listed above (tests check full coverage).
    for index in range(1200):
        words.update(to_chat(make_sample("train", 0, index).question).split())
    return [*SPECIALS, "USER:", "ASSISTANT:", *sorted(words - {"USER:", "ASSISTANT:"})]


def build_tokenizer():
    """A word-level ``PreTrainedTokenizerFast``: whitespace-split words, ``<s>`` prepended,
    unknown words map to ``<unk>``. Every ShapesVQA question word and answer is one token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tok.add_special_tokens(list(SPECIALS))
    bos = vocab["<s>"]
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="right",
        model_max_length=256,
    )


def build_processor(cfg: ModelConfig | None = None, tokenizer=None):
    """``LlavaProcessor``: a CLIP image processor for ``cfg.image_size`` square input (CLIP
    mean/std), the word-level tokenizer, and 64 image tokens per ``<image>`` (patches + CLS,
    minus CLS for the ``default`` strategy)."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    cfg = cfg or ModelConfig.full()
    size = cfg.image_size
    return LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size},
            image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
        ),
        tokenizer=tokenizer if tokenizer is not None else build_tokenizer(),
        patch_size=cfg.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS
        image_token="<image>",
    )


def build_model(cfg: ModelConfig | None = None, tokenizer=None, seed: int = 0):
    """A randomly initialised ``LlavaForConditionalGeneration`` (CLIP tower, GELU projector,
    Llama decoder with GQA), float32, for ``cfg``. ``vision_feature_layer`` is -1 (the tower's
    last layer feeds the projector), strategy ``default`` (CLS dropped)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    cfg = cfg or ModelConfig.full()
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
    vision = CLIPVisionConfig(
        hidden_size=cfg.vision_hidden, intermediate_size=cfg.vision_mlp, num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads, image_size=cfg.image_size, patch_size=cfg.patch_size,
        projection_dim=cfg.vision_hidden,
    )
    text = LlamaConfig(
        hidden_size=cfg.text_hidden, intermediate_size=cfg.text_mlp, num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads, num_key_value_heads=cfg.text_kv_heads, vocab_size=len(tokenizer),
        max_position_embeddings=cfg.max_positions, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1, vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.config.use_cache = False
    return model


class AuxHeads(nn.Module):
    """Training-only linear heads on the vision features (one per :data:`AUX_TARGETS`)."""

    def __init__(self, dim: int):
        super().__init__()
        self.heads = nn.ModuleDict({name: nn.Linear(dim, n) for name, n in AUX_TARGETS.items()})

    def forward(self, feats: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: head(feats) for name, head in self.heads.items()}


class PositionHeads(nn.Module):
    """Training-only heads that keep object positions readable by the decoder (never exported):
    ``proj`` predicts each visual token's row and column (8 bins each, as the ``row``/``col`` aux
    targets) from the projector output; ``where`` predicts, from the answer position's hidden
    state after decoder layer ``where_layer``, the grid column and row of the named object(s)
    (:meth:`Encoder.where_targets`)."""

    def __init__(self, dim: int, grid: int):
        super().__init__()
        self.grid = grid
        self.proj = nn.Linear(dim, 2 * AUX_TARGETS["row"])
        self.where = nn.Linear(dim, 4 * grid)


class PositionCapture:
    """Forward hooks that keep the projector output ``[B, V, D]`` and the hidden states after
    decoder layer ``layer`` ``[B, T, D]`` of the last forward."""

    def __init__(self, model, layer: int):
        self.image: torch.Tensor | None = None
        self.hidden: torch.Tensor | None = None
        self.handles = [
            model.model.multi_modal_projector.register_forward_hook(lambda m, a, out: setattr(self, "image", out)),
            model.model.language_model.layers[layer].register_forward_hook(
                lambda m, a, out: setattr(self, "hidden", out[0] if isinstance(out, tuple) else out)),
        ]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def position_loss(heads: PositionHeads, capture: PositionCapture, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(proj, where)``: cross-entropy of the projector-output row/column heads over every
    visual token, and of the answer-position where heads over the named objects (0 if none)."""
    img = capture.image
    b, v, _ = img.shape
    bins = AUX_TARGETS["row"]
    # Parameter-free layer norm: the heads read directions, not the (large, drifting) scale of
    # the projector output and the residual stream.
    norm = lambda x: F.layer_norm(x.float(), x.shape[-1:])  # noqa: E731
    logits = heads.proj(norm(img)).view(b, v, 2, bins)
    proj = (F.cross_entropy(logits[:, :, 0].flatten(0, 1), batch.aux["row"].flatten())
            + F.cross_entropy(logits[:, :, 1].flatten(0, 1), batch.aux["col"].flatten()))
    query = torch.tensor([n - 1 for n in batch.prompt_lengths], device=img.device)
    hidden = capture.hidden[torch.arange(b, device=img.device), query]  # [B, D]
    target = batch.where  # [B, 4]
    if not (target >= 0).any():
        return proj, hidden.sum() * 0.0
    where = F.cross_entropy(heads.where(norm(hidden)).view(b * 4, heads.grid), target.flatten(), ignore_index=-100)
    return proj, where


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] long, right-padded with <pad>
    attention_mask: torch.Tensor  # [B, T] long
    pixel_values: torch.Tensor  # [B, 3, H, W] float32, CLIP-normalised
    targets: torch.Tensor  # [B, T] long: targets[b, t] is the token at t + 1 where it is trained, else -100
    aux: dict[str, torch.Tensor]  # name -> [B, V] long (-100 where unlabelled)
    attn: torch.Tensor  # [B, 2, 1 + V] float: target attention over <s> and the visual tokens (zero rows: none)
    option: torch.Tensor  # [B] long: position of the correct choice option's last word, -1 if none
    parse: torch.Tensor  # [B, 2, T] float: target attention of layer 0 on the stem's colour / kind words
    letters: torch.Tensor  # [B, 4, 2] long: (option's last word, its letter mark) prompt positions; -1: none
    families: list[str]
    answers: list[str]
    prompt_lengths: list[int]
    where: torch.Tensor | None = None  # [B, 4] long: grid (col, row) of the named object's centre, then the second's; -100: none

    def to(self, device) -> Batch:
        if torch.device(device).type == "cpu":
            return self
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.input_ids), move(self.attention_mask), move(self.pixel_values), move(self.targets),
                     {k: move(v) for k, v in self.aux.items()}, move(self.attn), move(self.option), move(self.parse),
                     move(self.letters), self.families, self.answers, self.prompt_lengths,
                     None if self.where is None else move(self.where))


class Encoder:
    """Turns ShapesVQA samples into model inputs exactly as ``LlavaProcessor`` does (the tests
    check the equality), without the processor's per-sample overhead."""

    def __init__(self, tokenizer, cfg: ModelConfig, sink: bool = True):
        self.cfg = cfg
        self.sink = sink
        self.vocab = tokenizer.get_vocab()
        self.unk = self.vocab["<unk>"]
        self.bos, self.eos, self.pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
        self.image = self.vocab["<image>"]
        self.mean = np.array(CLIP_MEAN, dtype=np.float32)[:, None, None]
        self.std = np.array(CLIP_STD, dtype=np.float32)[:, None, None]

    def words(self, text: str) -> list[int]:
        return [self.vocab.get(w, self.unk) for w in text.split()]

    def prompt_ids(self, chat: str) -> list[int]:
        head, tail = PROMPT_TEMPLATE.split("<image>")
        text = tail.replace("{question}", chat)
        return [self.bos, *self.words(head), *[self.image] * self.cfg.num_visual_tokens, *self.words(text)]

    def answer_ids(self, answer: str) -> list[int]:
        return [*self.words(answer), self.eos]

    def pixels(self, image: np.ndarray) -> np.ndarray:
        x = image.astype(np.float32).transpose(2, 0, 1) * np.float32(1 / 255)
        return (x - self.mean) / self.std

    def aux_targets(self, scene) -> dict[str, np.ndarray]:
        t = patch_targets(scene, self.cfg.image_size, self.cfg.patch_size)
        g, p = self.cfg.grid, self.cfg.patch_size
        centre = np.zeros(g * g, dtype=np.int64)
        for s in scene.shapes:
            col = min(g - 1, int(s.centre[0] // p))
            row = min(g - 1, int(s.centre[1] // p))
            centre[row * g + col] = 1
        ignore = lambda a: np.where(a < 0, -100, a)  # noqa: E731
        index = np.arange(g * g)
        # Row and column (8 bins across the image) keep the patch position decodable for
        # position questions.
        return {"covered": t["covered"], "colour": ignore(t["colour"]), "kind": ignore(t["kind"]), "centre": centre,
                "row": index // g * 8 // g, "col": index % g * 8 // g}

    def object_patches(self, shape) -> np.ndarray:
        """Boolean [V]: the patches holding at least 1/8 patch of ``shape``, or, for a thin small
        shape spread thinner than that, the patch holding most of it."""
        size, p, g = self.cfg.image_size, self.cfg.patch_size, self.cfg.grid
        canvas = np.zeros((size, size), dtype=bool)
        x0, y0, x1, y1 = shape.box
        canvas[y0:y1, x0:x1] = shape_mask(shape.kind, shape.size)
        counts = canvas.reshape(g, p, g, p).sum(axis=(1, 3)).reshape(-1)
        mask = counts >= p * p / 8
        if not mask.any():
            mask[counts.argmax()] = True
        return mask

    def centre_patch(self, shape) -> int:
        g, p = self.cfg.grid, self.cfg.patch_size
        return min(g - 1, int(shape.centre[1] // p)) * g + min(g - 1, int(shape.centre[0] // p))

    def attention_targets(self, sample) -> np.ndarray:
        """``[2, 1 + V]`` target attention of the answer position over ``<s>`` (slot 0, the
        "nothing here" sink) and the visual tokens (slots 1..V). Row 0 is for the object(s) the
        question names first, row 1 for the second object of a relation (else row 0 again).
        Objects asked about: uniform over their patches. Existence with no match, or a count of
        zero: all on ``<s>``. A count of n: uniform over ``<s>`` and the n objects' centre
        patches, so the share left on ``<s>`` (1 / (n + 1)) encodes n. All zero: no target (the
        "which object" choice). Without ``sink``: never ``<s>``; counts are uniform over the
        counted objects' patches, and a question with no present object has no target."""
        mode, *groups = referred_objects(sample)
        v = self.cfg.num_visual_tokens
        out = np.zeros((2, 1 + v), dtype=np.float32)
        if mode == "none" or (not self.sink and not groups[0]):
            return out
        for row, group in enumerate(groups):
            weights = np.zeros(1 + v, dtype=np.float32)
            if mode == "count" and self.sink:
                weights[0] = 1.0
                for shape in group:
                    weights[1 + self.centre_patch(shape)] += 1.0
            elif not group:
                weights[0] = 1.0  # an existence question with no match
            else:
                for shape in group:
                    weights[1:] = np.maximum(weights[1:], self.object_patches(shape))
            out[row] = weights / weights.sum()
        return out

    def where_targets(self, sample) -> np.ndarray:
        """``[4]``: the grid column and row of the centre of the object the question names, then
        of a relation's second object (the first again otherwise); -100 where the question does
        not name exactly one present object (counts, absent objects, the "which object" choice).
        What position questions need at the answer position, supervised on every question that
        names an object so that the decoder learns to carry the place it attends to."""
        mode, first, second = referred_objects(sample)
        out = np.full(4, -100, dtype=np.int64)
        if mode in ("count", "none"):
            return out
        g, p = self.cfg.grid, self.cfg.patch_size
        for k, group in enumerate((first, second)):
            if len(group) == 1:
                x, y = group[0].centre
                out[2 * k : 2 * k + 2] = min(g - 1, int(x // p)), min(g - 1, int(y // p))
        return out

    def option_target(self, sample, prompt: list[int]) -> int:
        """For a lettered choice, the prompt position of the correct option's last word (what
        the answer position should look at to copy the letter); -1 otherwise."""
        q = sample.question
        if q.family != "choice":
            return -1
        words = to_chat(q).split()
        letter = LETTERS.index(q.answer)
        marks = [i for i, w in enumerate(words) if w in {f"{x}." for x in LETTERS}]
        # Options are listed A-D after the stem; the option ends before the next mark / "Answer".
        start = marks[-len(LETTERS) + letter]
        end = marks[-len(LETTERS) + letter + 1] if letter + 1 < len(LETTERS) else words.index("Answer", start)
        offset = len(prompt) - 1 - len(words)  # the chat words sit just before "ASSISTANT:"
        return offset + end - 1

    def letter_targets(self, sample, prompt: list[int]) -> np.ndarray:
        """``[4, 2]``: for each lettered option, the prompt position of its last word and of
        its letter mark ("B."): the letter-binding supervision makes the last word's state
        carry the letter, which the option pointer then copies. All -1 for other families."""
        out = np.full((len(LETTERS), 2), -1, dtype=np.int64)
        if sample.question.family != "choice":
            return out
        words = to_chat(sample.question).split()
        marks = [i for i, w in enumerate(words) if w in {f"{x}." for x in LETTERS}][-len(LETTERS):]
        offset = len(prompt) - 1 - len(words)
        for k, start in enumerate(marks):
            end = marks[k + 1] if k + 1 < len(marks) else words.index("Answer", start)
            out[k] = (offset + end - 1, offset + start)
        return out

    def parse_targets(self, sample, prompt: list[int], length: int) -> np.ndarray:
        """``[2, length]`` target attention of the answer position (layer 0) over the prompt: row
        0 uniform over the question stem's colour words, row 1 over its kind words (zero rows
        where the stem names none). The stem is the question text without the options and the
        answer-format instruction."""
        words = to_chat(sample.question).split()
        stem = sample.question.text.split()
        offset = len(prompt) - 1 - len(words)  # the chat words sit just before "ASSISTANT:"
        out = np.zeros((2, length), dtype=np.float32)
        for i, word in enumerate(stem):
            bare = word.rstrip("?.,").lower()
            row = 0 if bare in COLOUR_NAMES else 1 if (bare in KINDS or bare in _PLURAL_KIND) else None
            if row is not None:
                out[row, offset + i] = 1.0
        sums = out.sum(-1, keepdims=True)
        return np.divide(out, sums, out=np.zeros_like(out), where=sums > 0)

    def batch(self, samples) -> Batch:
        prompts = [self.prompt_ids(to_chat(s.question)) for s in samples]
        answers = [self.answer_ids(s.question.answer) for s in samples]
        length = max(len(p) + len(a) for p, a in zip(prompts, answers))
        b = len(samples)
        ids = np.full((b, length), self.pad, dtype=np.int64)
        mask = np.zeros((b, length), dtype=np.int64)
        targets = np.full((b, length), -100, dtype=np.int64)
        for i, (p, a) in enumerate(zip(prompts, answers)):
            seq = p + a
            ids[i, : len(seq)] = seq
            mask[i, : len(seq)] = 1
            # The logits at position t predict token t + 1: train the answer tokens and EOS.
            targets[i, len(p) - 1 : len(seq) - 1] = a
        pixels = np.stack([self.pixels(render_array(s.scene)) for s in samples])
        aux = [self.aux_targets(s.scene) for s in samples]
        return Batch(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            pixel_values=torch.from_numpy(pixels),
            targets=torch.from_numpy(targets),
            aux={k: torch.from_numpy(np.stack([a[k] for a in aux])) for k in AUX_TARGETS},
            attn=torch.from_numpy(np.stack([self.attention_targets(s) for s in samples])),
            option=torch.tensor([self.option_target(s, p) for s, p in zip(samples, prompts)], dtype=torch.long),
            parse=torch.from_numpy(np.stack([self.parse_targets(s, p, length) for s, p in zip(samples, prompts)])),
            letters=torch.from_numpy(np.stack([self.letter_targets(s, p) for s, p in zip(samples, prompts)])),
            families=[s.question.family for s in samples],
            answers=[s.question.answer for s in samples],
            prompt_lengths=[len(p) for p in prompts],
            where=torch.from_numpy(np.stack([self.where_targets(s) for s in samples])),
        )


_PLURAL_KIND = {plural: kind for kind, plural in PLURALS.items()}


def referred_objects(sample) -> tuple[str, list, list]:
    """``(mode, first, second)``: the scene's shapes that the question names. ``mode`` is
    ``find`` (an object the question asks about), ``exists`` (objects matching an existence
    question, possibly none), ``count`` (the objects counted, possibly none), ``relation``
    (``second`` is the relation's second object) or ``none`` (the "which object" choice);
    ``second`` is ``first`` again except for relations."""
    q, shapes = sample.question, sample.scene.shapes

    def find(colour=None, kind=None):
        return [s for s in shapes if colour in (None, s.colour) and kind in (None, s.kind)]

    text = q.text
    if m := re.fullmatch(r"Is there an? (\w+) (\w+)\?", text):
        mode, found = "exists", find(m[1], m[2])
    elif m := re.fullmatch(r"What colour is the (\w+)\?", text):
        mode, found = "find", find(kind=m[1])
    elif m := re.fullmatch(r"What shape is the (\w+) object\?", text):
        mode, found = "find", find(colour=m[1])
    elif m := re.fullmatch(r"How many (\w+) objects are there\?", text):
        mode, found = "count", find(colour=m[1])
    elif m := re.fullmatch(r"How many (\w+) are there\?", text):
        mode, found = "count", find(kind=_PLURAL_KIND[m[1]])
    elif m := re.fullmatch(r"Is the (\w+) (\w+) (?:left of|right of|above|below) the (\w+) (\w+)\?", text):
        return "relation", find(m[1], m[2]), find(m[3], m[4])
    elif m := re.fullmatch(r"Is the (\w+) (\w+) (?:on the left or the right|at the top or the bottom)\?", text):
        mode, found = "find", find(m[1], m[2])
    else:
        mode, found = "none", []
    return mode, found, found


def difficulty_at(step: int, args) -> float:
    """Curriculum: 0 during the vision phase, then a linear ramp to 1 over ``curriculum_steps``."""
    if step < args.vision_steps:
        return 0.0
    if args.curriculum_steps <= 0:
        return 1.0
    return min(1.0, (step - args.vision_steps) / args.curriculum_steps)


def family_pool(difficulty: float, weights: str) -> tuple[str, ...] | None:
    """The families asked at ``difficulty`` (those :func:`curriculum` allows), each repeated by
    its integer weight from ``weights`` ("count=2,position=2"): ``make_sample`` draws uniformly
    from the pool, so a repeated family is asked that many times as often. None: no weights."""
    if not weights:
        return None
    w = {k: int(v) for k, v in (item.split("=") for item in weights.split(","))}
    return tuple(f for f in curriculum(difficulty).families for _ in range(w.get(f, 1)))


def train_batch(encoder: Encoder, step: int, args) -> Batch:
    d = round(difficulty_at(step, args), 4)
    cfg = encoder.cfg
    pool = family_pool(d, args.family_weights)
    samples = [
        make_sample("train", args.seed, step * args.batch + i, cfg.image_size, cfg.patch_size, difficulty=d, families=pool)
        for i in range(args.batch)
    ]
    return encoder.batch(samples)


# --------------------------------------------------------------------------------------------
# Forward, loss, evaluation
# --------------------------------------------------------------------------------------------


def vision_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """The patch features the projector sees: ``vision_feature_layer``, CLS dropped."""
    out = model.model.vision_tower(pixel_values, output_hidden_states=True)
    return out.hidden_states[model.config.vision_feature_layer][:, 1:]


def decoder_logits(model, feats: torch.Tensor, input_ids, attention_mask, positions=None):
    """``LlavaForConditionalGeneration``'s logits from the vision features (the tests check the
    equality with ``model(...)``); only at ``positions`` (a boolean [B, T] mask) when given."""
    image = model.model.multi_modal_projector(feats)
    embeds = model.get_input_embeddings()(input_ids)
    where = (input_ids == model.config.image_token_index).unsqueeze(-1)
    embeds = embeds.masked_scatter(where, image.to(embeds.dtype))
    hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
    if positions is not None:
        hidden = hidden[positions]
    return model.lm_head(hidden)


def aux_loss(heads: AuxHeads, feats: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
    logits = heads(feats)
    losses = {
        name: F.cross_entropy(logits[name].float().flatten(0, 1), batch.aux[name].flatten(), ignore_index=-100)
        for name in AUX_TARGETS
    }
    return sum(losses.values()), {k: float(v.detach()) for k, v in losses.items()}


class AttentionProbe:
    """Captures the inputs of one decoder layer's self-attention (a forward pre-hook) and
    recomputes, for one query position per row, that layer's attention probabilities exactly as
    the eager implementation does (q/k projections, RoPE, GQA, scaling, softmax over the causal
    prefix). Only a few query rows, so the model itself keeps its fast attention kernel."""

    def __init__(self, model, layer: int):
        self.attn = model.model.language_model.layers[layer].self_attn
        self.captured: dict | None = None
        self.handle = self.attn.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.captured = {"hidden": kwargs["hidden_states"], "rope": kwargs["position_embeddings"]}

    def probs(self, query_pos: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """[B, heads, T] attention of row b's position ``query_pos[b]`` over keys ``<= query_pos``
        where ``key_mask`` is 1."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        a, h = self.attn, self.captured["hidden"]
        cos, sin = self.captured["rope"]
        b, t, _ = h.shape
        cos, sin = cos.expand(b, -1, -1), sin.expand(b, -1, -1)  # [1, T, D] when positions are shared
        rows = torch.arange(b, device=h.device)
        q = a.q_proj(h[rows, query_pos]).view(b, 1, -1, a.head_dim).transpose(1, 2)  # [B, H, 1, D]
        k = a.k_proj(h).view(b, t, -1, a.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        q, _ = apply_rotary_pos_emb(q, q, cos[rows, query_pos][:, None], sin[rows, query_pos][:, None])
        _, k = apply_rotary_pos_emb(k, k, cos, sin)
        k = k.repeat_interleave(a.num_key_value_groups, dim=1)
        scores = (q @ k.transpose(-1, -2)).squeeze(2).float() * a.scaling  # [B, H, T]
        allowed = (torch.arange(t, device=h.device)[None] <= query_pos[:, None]) & key_mask.bool()
        return scores.masked_fill(~allowed[:, None], float("-inf")).softmax(-1)

    def remove(self) -> None:
        self.handle.remove()


def attention_heads(cfg: ModelConfig) -> tuple[int, int]:
    """The two supervised heads: the first of each of two KV groups where there are two."""
    return 0, cfg.text_heads // 2 if cfg.text_heads > 1 else 0


def attention_loss(probe: AttentionProbe, batch: Batch, image_start: int, heads: tuple[int, int]) -> torch.Tensor:
    """Cross-entropy of the supervised heads' attention (answer position) against the target
    distributions over ``<s>`` and the visual tokens, averaged over the rows with a target."""
    query = torch.tensor([n - 1 for n in batch.prompt_lengths], device=batch.input_ids.device)
    probs = probe.probs(query, batch.attention_mask)[:, list(heads)]  # [B, 2, T]
    v = batch.attn.shape[-1] - 1
    seen = torch.cat([probs[..., :1], probs[..., image_start : image_start + v]], dim=-1)  # [B, 2, 1 + V]
    has = batch.attn.sum(-1) > 0  # [B, 2]
    if not has.any():
        return seen.sum() * 0.0
    ce = -(batch.attn * torch.log(seen.clamp_min(1e-9))).sum(-1)
    return ce[has].mean()


def option_loss(probe: AttentionProbe, batch: Batch, head: int = 0) -> torch.Tensor:
    """Cross-entropy of one head's attention (answer position) on the correct choice option."""
    query = torch.tensor([n - 1 for n in batch.prompt_lengths], device=batch.input_ids.device)
    rows = batch.option >= 0
    probs = probe.probs(query, batch.attention_mask)[:, head]  # [B, T]
    if not rows.any():
        return probs.sum() * 0.0
    picked = probs[rows].gather(1, batch.option[rows, None]).squeeze(1)
    return -torch.log(picked.clamp_min(1e-9)).mean()


def parse_heads(cfg: ModelConfig) -> tuple[int, int]:
    """The layer-0 heads supervised to read the stem's colour / kind words (1 and 3 of 4)."""
    return (1, 3) if cfg.text_heads >= 4 else (0, cfg.text_heads - 1)


def parse_loss(probe: AttentionProbe, batch: Batch, heads: tuple[int, int]) -> torch.Tensor:
    """Cross-entropy of two layer-0 heads' attention (answer position) against the question
    parse targets (:meth:`Encoder.parse_targets`), averaged over the rows with a target."""
    query = torch.tensor([n - 1 for n in batch.prompt_lengths], device=batch.input_ids.device)
    probs = probe.probs(query, batch.attention_mask)[:, list(heads)]  # [B, 2, T]
    has = batch.parse.sum(-1) > 0
    if not has.any():
        return probs.sum() * 0.0
    ce = -(batch.parse * torch.log(probs.clamp_min(1e-9))).sum(-1)
    return ce[has].mean()


LETTER_HEAD = 1  # a layer-1 head not used by the object supervision (heads 0 and text_heads // 2)


def letter_loss(probe: AttentionProbe, batch: Batch, head: int) -> torch.Tensor:
    """Cross-entropy of one head's attention from each option's last word to that option's
    letter mark, averaged over the options of the choice questions in the batch."""
    rows = batch.letters[:, 0, 0] >= 0
    if not rows.any():
        return probe.captured["hidden"].sum() * 0.0
    losses = []
    for k in range(batch.letters.shape[1]):
        query = batch.letters[:, k, 0].clamp_min(0)
        probs = probe.probs(query, batch.attention_mask)[:, head]  # [B, T]
        key = batch.letters[:, k, 1].clamp_min(0)
        picked = probs[rows].gather(1, key[rows, None]).squeeze(1)
        losses.append(-torch.log(picked.clamp_min(1e-9)))
    return torch.cat(losses).mean()


def vqa_loss(model, feats: torch.Tensor, batch: Batch) -> torch.Tensor:
    positions = batch.targets != -100
    logits = decoder_logits(model, feats, batch.input_ids, batch.attention_mask, positions)
    return F.cross_entropy(logits.float(), batch.targets[positions])


def autocast(enabled: bool, device: str = "cpu"):
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=enabled)


@torch.no_grad()
def evaluate(model, encoder: Encoder, args, keep: float | None = None) -> dict:
    """Greedy accuracy per family on the first ``eval_samples`` calibration samples (difficulty
    1). Answers are one token, so greedy decoding is right exactly when the argmax after the
    prompt is the answer token and the argmax after that is EOS (one teacher-forced forward).
    ``keep``: attend to only a random (fixed-seed) share of the visual tokens."""
    model.eval()
    cfg = encoder.cfg
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(1234)
    right: dict[str, list[int]] = {f: [] for f in question_families()}
    step = 128
    for lo in range(0, args.eval_samples, step):
        samples = [
            make_sample(EVAL_SPLIT, args.seed, i, cfg.image_size, cfg.patch_size, difficulty=1.0)
            for i in range(lo, min(args.eval_samples, lo + step))
        ]
        batch = encoder.batch(samples).to(device)
        mask = batch.attention_mask.clone()
        if keep is not None:
            visual = batch.input_ids == encoder.image
            drop = (torch.rand(visual.shape, generator=gen) >= keep).to(device)
            mask[visual & drop] = 0
        positions = batch.targets != -100
        with autocast(args.bf16, args.device):
            feats = vision_features(model, batch.pixel_values)
            logits = decoder_logits(model, feats, batch.input_ids, mask, positions)
        pred = logits.argmax(-1).view(len(samples), -1)  # [B, answer tokens + EOS]
        gold = batch.targets[positions].view(len(samples), -1)
        ok = (pred == gold).all(-1)
        for fam, o in zip(batch.families, ok.tolist()):
            right[fam].append(int(o))
    model.train()
    per = {f: (sum(v) / len(v) if v else float("nan")) for f, v in right.items()}
    counts = {f: len(v) for f, v in right.items()}
    total = sum(sum(v) for v in right.values()) / max(1, sum(counts.values()))
    return {"accuracy": total, "per_family": per, "counts": counts}


# --------------------------------------------------------------------------------------------
# Optimizer, checkpoints, export
# --------------------------------------------------------------------------------------------


def make_optimizer(model, heads, args):
    decay, no_decay = [], []
    for module in (model, heads):
        for name, p in module.named_parameters():
            (no_decay if p.ndim < 2 or "norm" in name or "embed" in name else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.98), eps=1e-8,
    )

    def factor(step: int) -> float:
        if step < args.warmup:
            return (step + 1) / args.warmup
        span = max(1, args.steps - args.warmup)
        t = min(1.0, (step - args.warmup) / span)
        return args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# Arguments that change the result; a resumed run must repeat them.
_RUN_KEYS = ("steps", "batch", "seed", "tiny", "dims", "lr", "warmup", "min_lr_ratio", "weight_decay", "vision_steps",
             "curriculum_steps", "aux_weight", "attn_weight", "attn_layer", "option_weight", "sink", "parse_weight", "letter_weight",
             "family_weights", "bf16", "proj_pos_weight", "where_weight", "where_layer")


def save_checkpoint(path: Path, model, heads, opt, sched, step: int, args, extra: dict | None = None) -> None:
    state = {
        **(extra or {}),
        "step": step,
        "model": model.state_dict(),
        "aux_heads": heads.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "rng": rng_state(),
        "run": {k: getattr(args, k) for k in _RUN_KEYS},
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def export_hf(model, processor, folder: Path, dtype: str = "float32") -> int:
    """Write the HF folder (weights as safetensors in ``dtype``); returns its size in bytes."""
    from transformers import LlavaForConditionalGeneration

    folder.mkdir(parents=True, exist_ok=True)
    out = LlavaForConditionalGeneration(copy.deepcopy(model.config))
    out.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})
    out = out.to(getattr(torch, dtype)).eval()
    out.config.use_cache = True
    out.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


# --------------------------------------------------------------------------------------------
# Main loop
# --------------------------------------------------------------------------------------------


def model_config(args) -> ModelConfig:
    cfg = ModelConfig.tiny() if args.tiny else ModelConfig.full()
    if args.dims:
        fields = {k: int(v) for k, v in (item.split("=") for item in args.dims.split(","))}
        cfg = ModelConfig(**{**asdict(cfg), **fields})
    return cfg


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="run folder: checkpoint.pt, log.jsonl, hf/")
    p.add_argument("--steps", type=int, default=6000, help="total optimizer steps (also sets the LR schedule)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="data seed (train stream and calibration eval slice) and init seed")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--eval-every", type=int, default=250, help="checkpoint and evaluate every K steps")
    p.add_argument("--eval-samples", type=int, default=600, help="calibration samples per evaluation")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--minutes", type=float, default=None, help="stop cleanly (checkpoint + export) after this wall time")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop cleanly (checkpoint + export) at this step, as an interruption would; resume later")
    p.add_argument("--export", type=Path, default=None, help="HF folder to write when the run stops (default OUT/hf)")
    p.add_argument("--export-dtype", choices=("float32", "float16"), default="float32")
    p.add_argument("--tiny", action="store_true", help="very small dimensions, for smoke tests")
    p.add_argument("--dims", default="", help="override ModelConfig fields, e.g. 'text_hidden=192,text_heads=6'")
    p.add_argument("--device", default="cpu", help="torch device (the shipped model is trained on cpu)")
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--min-lr-ratio", type=float, default=0.05)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--vision-steps", type=int, default=300, help="steps of auxiliary-only vision training first")
    p.add_argument("--curriculum-steps", type=int, default=1500, help="steps to ramp difficulty 0 -> 1 after the vision phase")
    p.add_argument("--family-weights", default="", help="integer sampling weights, e.g. 'count=2,position=2'")
    p.add_argument("--attn-weight", type=float, default=1.0,
                   help="weight of the attention supervision (answer position -> referred objects); 0 disables")
    p.add_argument("--attn-layer", type=int, default=1,
                   help="decoder layer whose attention is supervised (1: the first that can see the question)")
    p.add_argument("--sink", action=argparse.BooleanOptionalAction, default=True,
                   help="attention targets on <s> for absent objects and as the counting sink")
    p.add_argument("--option-weight", type=float, default=1.0,
                   help="weight of the choice-option pointer supervision (layer attn-layer + 2, head 0); 0 disables")
    p.add_argument("--parse-weight", type=float, default=0.0,
                   help="weight of the question-parse supervision (layer 0, heads 1 and 3 -> the stem's colour / kind words); 0 disables")
    p.add_argument("--letter-weight", type=float, default=0.0,
                   help="weight of the letter-binding supervision (a layer attn-layer head: option's last word -> its letter mark); 0 disables")
    p.add_argument("--aux-weight", type=float, default=0.5, help="auxiliary loss weight once VQA training starts")
    p.add_argument("--proj-pos-weight", type=float, default=1.0,
                   help="weight of the row/column heads on the projector output (keeps patch positions in the visual tokens); 0 disables")
    p.add_argument("--where-weight", type=float, default=3.0,
                   help="weight of the where heads (answer position after --where-layer -> grid column/row of the named objects); 0 disables")
    p.add_argument("--where-layer", type=int, default=None, help="decoder layer whose output the where heads read (default attn-layer + 1)")
    p.add_argument("--bf16", action="store_true",
                   help="bf16 autocast (measured slower than float32 for the full model on 2 cores)")
    p.add_argument("--keep-probe", action=argparse.BooleanOptionalAction, default=True,
                   help="also evaluate with a random 30%% of visual tokens kept")
    return p.parse_args(argv)


class Stopper:
    """SIGINT/SIGTERM set a flag; the loop checkpoints and exits after the current step."""

    def __init__(self):
        self.reason: str | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        self.reason = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def log(fh, record: dict) -> None:
    line = json.dumps(record, sort_keys=False)
    print(line, flush=True)
    fh.write(line + "\n")
    fh.flush()


def main(argv=None) -> int:
    args = parse_args(argv)
    # Process-wide torch settings, restored on return (the tests call main() in-process).
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        return train(args)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def train(args) -> int:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.pt"
    cfg = model_config(args)
    device = torch.device(args.device)

    tokenizer = build_tokenizer()
    processor = build_processor(cfg, tokenizer)
    model = build_model(cfg, tokenizer, seed=args.seed)
    model.config._attn_implementation = "sdpa"
    heads = AuxHeads(cfg.vision_hidden)
    model.to(device)
    heads.to(device)
    opt, sched = make_optimizer(model, heads, args)
    encoder = Encoder(tokenizer, cfg, sink=args.sink)
    attn_layer = min(args.attn_layer, cfg.text_layers - 1)
    # Position heads: their own optimizer at the constant base learning rate (linear probes,
    # never exported; a fresh head added on resume must learn fast at a late, decayed step),
    # so that a checkpoint without them resumes.
    use_pos = args.proj_pos_weight > 0 or args.where_weight > 0
    where_layer = min(cfg.text_layers - 1, attn_layer + 1 if args.where_layer is None else args.where_layer)
    pos_heads = PositionHeads(cfg.text_hidden, cfg.grid).to(device) if use_pos else None
    pos_opt = torch.optim.AdamW(pos_heads.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.0) if use_pos else None
    capture = PositionCapture(model, where_layer) if use_pos else None
    probe = AttentionProbe(model, attn_layer) if args.attn_weight > 0 else None
    option_layer = min(cfg.text_layers - 1, attn_layer + 2)
    option_probe = AttentionProbe(model, option_layer) if args.option_weight > 0 else None
    parse_probe = AttentionProbe(model, 0) if args.parse_weight > 0 else None
    letter_head = LETTER_HEAD if cfg.text_heads > 2 else cfg.text_heads - 1
    if args.letter_weight > 0 and probe is None:
        probe = AttentionProbe(model, attn_layer)  # the letter loss reads the same layer's attention
    image_start = encoder.prompt_ids("").index(encoder.image)
    step = 0
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)

    if args.resume and ckpt_path.exists():
        state = torch.load(ckpt_path, weights_only=False, map_location=device)
        run = {k: getattr(args, k) for k in _RUN_KEYS}
        changed = {k: (state["run"].get(k), v) for k, v in run.items() if state["run"].get(k) != v}
        if changed:
            print(f"warning: resuming with different settings (checkpoint, now): {changed}", file=sys.stderr, flush=True)
        model.load_state_dict(state["model"])
        heads.load_state_dict(state["aux_heads"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        step = state["step"]
        if use_pos and "pos_heads" in state:
            pos_heads.load_state_dict(state["pos_heads"])
            pos_opt.load_state_dict(state["pos_optimizer"])
        elif use_pos:
            print("checkpoint has no position heads: starting them fresh", file=sys.stderr, flush=True)
    elif args.resume:
        print(f"no checkpoint at {ckpt_path}: starting from scratch", file=sys.stderr, flush=True)

    model.train()
    heads.train()
    pos_extra = lambda: {"pos_heads": pos_heads.state_dict(), "pos_optimizer": pos_opt.state_dict()} if use_pos else None  # noqa: E731
    started = time.time()
    with open(out / "log.jsonl", "a") as fh, Stopper() as stopper:
        log(fh, {"event": "start", "step": step, "params": count_parameters(model), "attn_layer": attn_layer,
                 "option_layer": option_layer, "where_layer": where_layer if use_pos else None,
                 "aux_params": count_parameters(heads), "config": asdict(cfg),
                 "run": {k: getattr(args, k) for k in _RUN_KEYS}, "threads": args.threads})
        window = {"t": time.time(), "steps": 0, "loss": 0.0, "vqa": 0.0, "aux": 0.0, "attn": 0.0, "data_s": 0.0, "parts": {}}
        last_saved = step
        while step < args.steps and stopper.reason is None:
            t0 = time.time()
            batch = train_batch(encoder, step, args).to(device)
            window["data_s"] += time.time() - t0
            vision_only = step < args.vision_steps
            with autocast(args.bf16, args.device):
                feats = vision_features(model, batch.pixel_values)
                a_loss, a_parts = aux_loss(heads, feats, batch)
                t_loss = torch.zeros(())
                if vision_only:
                    v_loss = torch.zeros(())
                    loss = a_loss
                else:
                    v_loss = vqa_loss(model, feats, batch)
                    loss = v_loss + args.aux_weight * a_loss
                    if probe is not None and args.attn_weight > 0:
                        t_loss = attention_loss(probe, batch, image_start, attention_heads(cfg))
                        loss = loss + args.attn_weight * t_loss
                    if probe is not None and args.letter_weight > 0:
                        l_loss = letter_loss(probe, batch, letter_head)
                        t_loss = t_loss + l_loss
                        loss = loss + args.letter_weight * l_loss
                    if option_probe is not None:
                        o_loss = option_loss(option_probe, batch)
                        t_loss = t_loss + o_loss
                        loss = loss + args.option_weight * o_loss
                    if parse_probe is not None:
                        p_loss = parse_loss(parse_probe, batch, parse_heads(cfg))
                        t_loss = t_loss + p_loss
                        loss = loss + args.parse_weight * p_loss
                    if use_pos:
                        proj_loss, where_loss = position_loss(pos_heads, capture, batch)
                        loss = loss + args.proj_pos_weight * proj_loss + args.where_weight * where_loss
                        a_parts = {**a_parts, "proj_pos": float(proj_loss.detach()), "where": float(where_loss.detach())}
            opt.zero_grad(set_to_none=True)
            if use_pos:
                pos_opt.zero_grad(set_to_none=True)
            if not math.isfinite(float(loss.detach())):  # before the update: the checkpoint stays clean
                log(fh, {"event": "error", "step": step, "message": "non-finite loss; last checkpoint kept"})
                return 1
            loss.backward()
            extra_params = [*pos_heads.parameters()] if use_pos else []
            torch.nn.utils.clip_grad_norm_([*model.parameters(), *heads.parameters(), *extra_params], 1.0)
            opt.step()
            sched.step()
            if use_pos:
                pos_opt.step()
            step += 1
            window["steps"] += 1
            window["loss"] += float(loss.detach())
            window["vqa"] += float(v_loss.detach())
            window["aux"] += float(a_loss.detach())
            window["attn"] += float(t_loss.detach())
            for k, v in a_parts.items():
                window["parts"][k] = window["parts"].get(k, 0.0) + v
            if step % args.log_every == 0 or step == args.steps:
                n, dt = window["steps"], time.time() - window["t"]
                log(fh, {"step": step, "loss": window["loss"] / n, "vqa_loss": window["vqa"] / n,
                         "aux_loss": window["aux"] / n, "attn_loss": window["attn"] / n,
                         "aux_parts": {k: round(v / n, 4) for k, v in window["parts"].items()}, "lr": sched.get_last_lr()[0],
                         "difficulty": round(difficulty_at(step - 1, args), 4), "steps_per_s": n / dt,
                         "data_share": window["data_s"] / dt, "elapsed_s": round(time.time() - started, 1)})
                window = {"t": time.time(), "steps": 0, "loss": 0.0, "vqa": 0.0, "aux": 0.0, "attn": 0.0, "data_s": 0.0, "parts": {}}
            if args.minutes is not None and time.time() - started >= args.minutes * 60:
                stopper.reason = "minutes"
            if args.stop_after is not None and step >= args.stop_after:
                stopper.reason = "stop-after"
            if step % args.eval_every == 0 and step < args.steps:
                save_checkpoint(ckpt_path, model, heads, opt, sched, step, args, pos_extra())
                last_saved = step
                if step > args.vision_steps:
                    report(fh, model, encoder, args, step)
                window["t"] = time.time()
        if step != last_saved or not ckpt_path.exists():
            save_checkpoint(ckpt_path, model, heads, opt, sched, step, args, pos_extra())
        reason = stopper.reason or "done"
        if reason in ("done", "minutes") and args.eval_samples > 0 and step > args.vision_steps:
            report(fh, model, encoder, args, step)
        size = export_hf(model, processor, args.export or out / "hf", args.export_dtype)
        log(fh, {"event": "stop", "reason": reason, "step": step, "export": str(args.export or out / "hf"),
                 "export_bytes": size, "elapsed_s": round(time.time() - started, 1)})
    return 0


def report(fh, model, encoder: Encoder, args, step: int) -> None:
    t = time.time()
    with torch.random.fork_rng():
        res = evaluate(model, encoder, args)
        record = {"step": step, "eval": EVAL_SPLIT, "samples": args.eval_samples, "accuracy": res["accuracy"],
                  "per_family": res["per_family"]}
        if args.keep_probe:
            record["accuracy_keep30"] = evaluate(model, encoder, args, keep=KEEP_PROBE)["accuracy"]
    record["eval_s"] = round(time.time() - t, 1)
    log(fh, record)


if __name__ == "__main__":
    sys.exit(main())
