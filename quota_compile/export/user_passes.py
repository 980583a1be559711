"""User passes over the exported ONNX graphs (``export.passes`` in model.yaml).

Each entry names a function as ``module:function``; the module is imported from ``sys.path``
or from the YAML file's folder. The compile calls ``function(model, graph)`` for each
portable graph (``graph`` is ``"vision"``, ``"prefill"`` or ``"decode"``) after torch.onnx
export and before the graphs are verified (the portable graphs only: the onnxruntime and
tensorrt flavours are translated from the semantic graphs and do not see them); the function edits
``model`` in place and returns None, or returns the new ``onnx.ModelProto``. Whatever a pass
does is then held to the same verification gate as the compiler's own graphs: a pass that
changes what a graph computes gets exit code 1 and no bundle.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path

import onnx

from quota_compile.errors import ConfigError

OnnxPass = Callable[[onnx.ModelProto, str], "onnx.ModelProto | None"]


def load_passes(specs: list[str], folder: Path) -> list[tuple[str, OnnxPass]]:
    """``(spec, function)`` for each ``module:function`` entry, a module imported from
    ``sys.path`` or from ``folder`` (the YAML file's); a module that does not import or a name
    that is not a function is a :class:`ConfigError` naming the key."""
    loaded = []
    folder = str(folder)
    for i, spec in enumerate(specs):
        key = f"export.passes[{i}]"
        module_name, _, name = spec.partition(":")
        added = folder not in sys.path
        if added:
            sys.path.insert(0, folder)
        try:
            module = importlib.import_module(module_name)
        except Exception as e:  # noqa: BLE001 - any failure while importing the user's module is theirs
            raise ConfigError(key, f"cannot import module {module_name!r} ({type(e).__name__}: {e}).") from None
        finally:
            if added:
                sys.path.remove(folder)
        function = getattr(module, name, None)
        if not callable(function):
            raise ConfigError(key, f"module {module_name!r} has no function {name!r}.")
        loaded.append((spec, function))
    return loaded


def apply_passes(passes: list[tuple[str, OnnxPass]], models: dict[str, onnx.ModelProto]) -> dict[str, onnx.ModelProto]:
    """The graphs after every pass, in the order given."""
    for i, (spec, function) in enumerate(passes):
        for graph in list(models):
            out = function(models[graph], graph)
            if out is not None and not isinstance(out, onnx.ModelProto):
                raise ConfigError(
                    f"export.passes[{i}]", f"{spec} returned {type(out).__name__} for the {graph} graph, "
                    "expected an onnx.ModelProto or None."
                )
            if out is not None:
                models[graph] = out
    return models
