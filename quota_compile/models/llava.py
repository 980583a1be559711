"""LLaVA-family adapter over transformers' ``LlavaForConditionalGeneration``.

Supported: a CLIP or SigLIP vision tower; a Llama, Mistral or Qwen2 text model (GQA included);
``vision_feature_select_strategy`` ``default`` (drop CLS) or ``full``; an integer or a list of
``vision_feature_layer``. Mistral's sliding window is not applied: contexts are assumed to be
shorter than the window (true of every LLaVA prompt at 4096 positions and more).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from quota_compile.errors import ConfigError, UserError

TEXT_MODELS = ("llama", "mistral", "qwen2")
VISION_MODELS = ("clip_vision_model", "siglip_vision_model")
_REQUIRED = ("config.json",)


@dataclass
class VLM:
    """A loaded LLaVA model with the facts the compiler needs about it."""

    model: torch.nn.Module  # LlavaForConditionalGeneration, eval mode, float32, eager attention
    processor: object  # LlavaProcessor (tokenizer + image processor)
    path: Path
    source: str
    prompt_template: str

    @property
    def config(self):
        return self.model.config

    @property
    def text_config(self):
        return self.model.config.text_config

    @property
    def num_layers(self) -> int:
        return self.text_config.num_hidden_layers

    @property
    def num_heads(self) -> int:
        return self.text_config.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return self.text_config.num_key_value_heads or self.num_heads

    @property
    def head_dim(self) -> int:
        return getattr(self.text_config, "head_dim", None) or self.text_config.hidden_size // self.num_heads

    @property
    def hidden_size(self) -> int:
        return self.text_config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.text_config.vocab_size

    @property
    def image_token_id(self) -> int:
        return self.config.image_token_index

    @property
    def image_size(self) -> int:
        return self.config.vision_config.image_size

    @property
    def patch_size(self) -> int:
        return self.config.vision_config.patch_size

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def eos_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    def prompt(self, question: str) -> str:
        return self.prompt_template.replace("{question}", question)

    def visual_span(self) -> tuple[int, int]:
        """``(start, count)`` of the image tokens in a tokenized prompt (same for every prompt)."""
        ids = self.processor(text=[self.prompt("?")], images=[_blank(self.image_size)], return_tensors="pt")["input_ids"][0]
        pos = (ids == self.image_token_id).nonzero().flatten().tolist()
        if not pos or pos != list(range(pos[0], pos[0] + len(pos))):
            raise UserError(f"{self.source}: the prompt template does not give one contiguous span of image tokens.")
        return pos[0], len(pos)

    def weights_sha256(self) -> str:
        """Hash of the state dict (names, dtypes, shapes, bytes) in name order."""
        h = hashlib.sha256()
        for name, t in sorted(self.model.state_dict().items()):
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()


SOURCE = "model.source"  # the config key of every checkpoint-folder error


def _blank(size: int):
    from PIL import Image

    return Image.new("RGB", (size, size), (127, 127, 127))


def check_folder(path: Path) -> dict:
    """Validate a checkpoint folder (errors: :class:`ConfigError` of ``model.source``); return
    its config.json."""
    if not path.exists():
        raise ConfigError(SOURCE, f"checkpoint folder {path} does not exist.")
    if not path.is_dir():
        raise ConfigError(SOURCE, f"{path} is not a folder (expected a Hugging Face checkpoint folder).")
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise ConfigError(SOURCE, f"{path} has no config.json (expected a Hugging Face checkpoint folder).")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{cfg_path}: not valid JSON ({e}).") from None
    if cfg.get("model_type") != "llava":
        raise ConfigError(SOURCE, f"{path} holds a {cfg.get('model_type')!r} model; family 'llava' needs model_type 'llava'.")
    text_type = (cfg.get("text_config") or {}).get("model_type", "llama")
    vision_type = (cfg.get("vision_config") or {}).get("model_type", "clip_vision_model")
    if text_type not in TEXT_MODELS:
        raise ConfigError(SOURCE, f"text model {text_type!r} is not supported (expected one of {', '.join(TEXT_MODELS)}).")
    if vision_type not in VISION_MODELS:
        raise ConfigError(SOURCE, f"vision tower {vision_type!r} is not supported (expected one of {', '.join(VISION_MODELS)}).")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise ConfigError(SOURCE, f"{path} has no *.safetensors weights.")
    for f in weights:
        check_safetensors(f)
    if not ((path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file()):
        raise ConfigError(SOURCE, f"{path} has no tokenizer files (tokenizer.json or tokenizer.model).")
    return cfg


def check_safetensors(file: Path) -> None:
    """A safetensors file is an 8-byte header length, a JSON header giving each tensor's byte
    range, then the data: a file whose size is not exactly what its header describes is
    truncated or damaged (checked from the header alone, before anything is loaded)."""
    size = file.stat().st_size
    try:
        with file.open("rb") as f:
            n = int.from_bytes(f.read(8), "little") if size >= 8 else -1
            header = json.loads(f.read(n)) if 0 < n <= size - 8 else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        header = None
    except OSError as e:
        raise ConfigError(SOURCE, f"{file} cannot be read ({e.strerror or e}).") from None
    if not isinstance(header, dict):
        raise ConfigError(SOURCE, f"{file} is not a safetensors file (no valid header; {size} bytes).")
    try:
        data = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        raise ConfigError(SOURCE, f"{file} is not a safetensors file (its header has no tensor byte ranges).") from None
    expected = 8 + n + data
    if size != expected:
        what = "truncated" if size < expected else "damaged"
        raise ConfigError(SOURCE, f"{file} is {what}: its header describes {expected} bytes, the file has {size}; copy or download it again.")


def load_llava(path: Path, source: str, prompt_template: str) -> VLM:
    """Load a LLaVA checkpoint folder (float32, eager attention, eval mode) and its processor."""
    from safetensors import SafetensorError
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    check_folder(path)
    try:
        processor = AutoProcessor.from_pretrained(path)
        model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    except (OSError, ValueError, SafetensorError) as e:
        raise ConfigError(SOURCE, f"could not load {path} ({str(e).splitlines()[0]}).") from None
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if getattr(processor, "tokenizer", None) is None or getattr(processor, "image_processor", None) is None:
        raise ConfigError(SOURCE, f"{path} has no LLaVA processor (tokenizer + image processor).")
    processor.tokenizer.padding_side = "right"
    return VLM(model=model, processor=processor, path=path, source=source, prompt_template=prompt_template)
