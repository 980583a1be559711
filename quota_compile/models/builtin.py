"""Builtin models, built offline from a config and a seed, written as normal HF folders.

``builtin:tiny-llava`` is a random-init LLaVA (CLIP vision tower, Llama decoder with GQA) for
tests. ``builtin:shapes-llava`` is a small LLaVA trained on ShapesVQA by
``scripts/train_shapes_llava.py``; its checkpoint is committed in ``models/shapes_llava/``. It is written to a folder exactly like a Hugging Face checkpoint
(config.json, model.safetensors, tokenizer and processor files) and loaded back through the
same code path as a user's checkpoint.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from quota_compile.errors import UserError

LOGIT_GAIN = 25.0
_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
# A small fixed corpus: the byte-level BPE tokenizer trained on it is deterministic and covers
# any input (bytes are its base alphabet).
_CORPUS = [
    "USER: What is in the image? ASSISTANT: There is a red circle on the left.",
    "Is there a blue square in the image? Answer yes or no. yes no",
    "How many triangles are there? one two three four five six seven eight nine ten zero",
    "What colour is the small shape at the top? red green blue yellow purple orange white black grey",
    "Which shape is to the right of the circle? A. square B. triangle C. star D. circle",
    "Describe the picture in one sentence. The picture shows shapes of several colours and sizes.",
    "left right top bottom above below next to between large small big tiny middle centre corner",
    "0 1 2 3 4 5 6 7 8 9 . , ? ! : ; ' \" ( ) - + = / A B C D E",
]


def build_tokenizer(vocab_size: int = 384):
    """A byte-level BPE tokenizer (``PreTrainedTokenizerFast``), trained offline on a fixed corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="right",
    )
    return fast


def build_tiny_llava(
    seed: int = 0,
    vision: str = "clip",
    text: str = "llama",
    strategy: str = "default",
    feature_layer: int | list[int] = -2,
    num_layers: int = 8,
):
    """Random-init tiny LLaVA: 32x32 images, patch 4 (64 visual tokens), a 2-layer vision
    tower, an 8-layer decoder with GQA 4/2.

    ``vision`` (``clip`` | ``siglip``), ``text`` (``llama`` | ``mistral`` | ``qwen2``),
    ``strategy``, ``feature_layer`` and ``num_layers`` (decoder depth) select the architecture
    variant; ``builtin:tiny-llava`` is the default CLIP + Llama one.
    """
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        MistralConfig,
        Qwen2Config,
        SiglipVisionConfig,
    )

    tokenizer = build_tokenizer()
    vision_cls = {"clip": CLIPVisionConfig, "siglip": SiglipVisionConfig}[vision]
    text_cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[text]
    vision_cfg = vision_cls(
        hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=4
    )
    text_cfg = text_cls(
        hidden_size=64,
        intermediate_size=128,
        # 8 by default: deep enough that a 30% visual-token budget is reachable with 2 full layers.
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.02,
    )
    # CLIP prepends a CLS embedding to the patches; SigLIP does not.
    return _assemble(tokenizer, vision_cfg, text_cfg, seed, feature_layer, strategy, 1 if vision == "clip" else 0)


def _assemble(tokenizer, vision_cfg, text_cfg, seed: int, feature_layer, strategy: str, extra_image_tokens: int):
    """The random-init LLaVA model and its processor from a vision and a text config."""
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    config = LlavaConfig(
        vision_config=vision_cfg,
        text_config=text_cfg,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy=strategy,
        projector_hidden_act="gelu",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    # A random model is well conditioned with small weights (one INT4 rounding step more or
    # less, which float reassociation between PyTorch and onnxruntime can cause, then barely
    # moves the output), but its logits are then nearly flat and greedy decoding would hinge
    # on ties. A larger output head makes the next-token distribution peaked.
    with torch.no_grad():
        model.lm_head.weight.mul_(LOGIT_GAIN)
    size = vision_cfg.image_size
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
        tokenizer=tokenizer,
        patch_size=vision_cfg.patch_size,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=extra_image_tokens,
        image_token="<image>",
    )
    return model, processor


def build_bench_llava(seed: int = 0):
    """Random-init LLaVA-1.5-shaped model for speed work (``builtin:bench-llava``): 336-px
    images, patch 14 (576 visual tokens, CLS dropped by the ``default`` strategy), a 12-layer
    CLIP tower of width 384, and a Llama decoder of 12 layers, width 768, 12 query / 4 KV
    heads (GQA), SwiGLU 2048 and a 32,000-entry vocabulary (about 124 M decoder parameters
    with the embeddings and the output head). The tokenizer is the small offline BPE one, so
    only the first ids are ever produced by text; the embedding table and the output head have
    LLaVA-1.5's vocabulary size, which is what matters for speed. Random weights: its answers
    mean nothing, only its timings do."""
    from transformers import CLIPVisionConfig, LlamaConfig

    tokenizer = build_tokenizer()
    vision_cfg = CLIPVisionConfig(
        hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6, image_size=336, patch_size=14
    )
    text_cfg = LlamaConfig(
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.02,
    )
    return _assemble(tokenizer, vision_cfg, text_cfg, seed, -2, "default", 1)


# Trained builtins ship as committed checkpoint folders inside the package.
TRAINED: dict[str, Path] = {"shapes-llava": Path(__file__).resolve().parent / "shapes_llava"}

BUILTINS: dict[str, Callable | Path] = {"tiny-llava": build_tiny_llava, "bench-llava": build_bench_llava, **TRAINED}


def write_builtin(name: str, folder: str | Path, seed: int = 0) -> Path:
    """Write ``builtin:NAME`` to ``folder`` as a Hugging Face checkpoint folder."""
    if name not in BUILTINS:
        raise UserError(f"unknown builtin model {name!r}; available: {', '.join(sorted(BUILTINS))}.")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if name in TRAINED:  # a copy of the committed checkpoint (the seed does not apply)
        source = TRAINED[name]
        if not (source / "model.safetensors").is_file():
            raise UserError(f"builtin:{name}: its checkpoint is missing from {source} (a broken installation).")
        for f in sorted(source.iterdir()):
            if f.is_file() and f.name != "README.md":
                shutil.copyfile(f, folder / f.name)
        return folder
    model, processor = BUILTINS[name](seed)
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return folder


def materialize_builtin(name: str, seed: int) -> tempfile.TemporaryDirectory:
    """Write a builtin into a fresh temporary folder (removed when the returned object is)."""
    tmp = tempfile.TemporaryDirectory(prefix=f"quota-{name}-")
    write_builtin(name, tmp.name, seed)
    return tmp
