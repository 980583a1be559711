"""Model loading: ``builtin:NAME`` or a local Hugging Face folder, through one code path."""

from __future__ import annotations

import contextlib
from pathlib import Path

from quota_compile.config import CompileConfig, resolve_source
from quota_compile.errors import ConfigError
from quota_compile.models.builtin import BUILTINS, TRAINED, materialize_builtin
from quota_compile.models.llava import VLM, load_llava

__all__ = ["VLM", "load_model", "BUILTINS"]


def load_model(cfg: CompileConfig, stack: contextlib.ExitStack, folder: Path | None = None) -> VLM:
    """Load the model named by ``cfg.model``. A builtin is first written to a temporary HF
    folder (kept alive by ``stack``) so it loads exactly as a user's checkpoint does. A relative
    checkpoint path is resolved against ``folder``: the YAML file's (None: the current one)."""
    src = resolve_source(cfg, folder if folder is not None else Path())
    if isinstance(src, str):
        name = src.removeprefix("builtin:")
        if name not in BUILTINS:
            raise ConfigError(
                None,
                f"key 'model.source' names unknown builtin {name!r} "
                f"(expected one of {', '.join('builtin:' + b for b in sorted(BUILTINS))})."
            )
        if name in TRAINED:  # a committed checkpoint folder: loaded in place, never written to
            path = TRAINED[name]
        else:
            path = Path(stack.enter_context(materialize_builtin(name, cfg.model.seed)))
    else:
        path = src
    return load_llava(path, cfg.model.source, cfg.model.prompt_template)
