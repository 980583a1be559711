"""The flavours a compile knows: the built-in ones (portable, onnxruntime, tensorrt, torch) and any
registered with :func:`register_flavour`."""

from __future__ import annotations

import re

from quota_compile import config
from quota_compile.flavours.base import Flavour
from quota_compile.flavours.onnxruntime.flavour import OnnxruntimeFlavour
from quota_compile.flavours.portable import PortableFlavour
from quota_compile.flavours.tensorrt.flavour import TensorrtFlavour
from quota_compile.flavours.torch_path import TorchFlavour

_NAME = re.compile(r"^[a-z][a-z0-9_-]*$")
_FLAVOURS: dict[str, Flavour] = {}


def register_flavour(flavour: Flavour) -> Flavour:
    """Make ``flavour`` a valid ``export.targets`` entry. Its name must be new, lowercase, and
    (for a derived flavour) its folder a new plain folder name."""
    name = flavour.name
    if not _NAME.match(name or ""):
        raise ValueError(f"a flavour name is lowercase letters, digits, '-' and '_', not {name!r}")
    if name in _FLAVOURS:
        raise ValueError(f"a flavour named {name!r} is registered already")
    if flavour.derived and (not _NAME.match(flavour.folder) or flavour.folder in {f.folder for f in _FLAVOURS.values()}):
        raise ValueError(f"flavour {name!r}: its folder must be a new plain folder name, not {flavour.folder!r}")
    _FLAVOURS[name] = flavour
    if name not in config.TARGETS:
        config.TARGETS.append(name)
    return flavour


def unregister_flavour(name: str) -> None:
    """Remove a registered flavour (the built-in ones cannot be removed)."""
    if name in BUILTIN:
        raise ValueError(f"the built-in flavour {name!r} cannot be removed")
    _FLAVOURS.pop(name)
    config.TARGETS.remove(name)


def get_flavour(name: str) -> Flavour:
    return _FLAVOURS[name]


def flavours_for(targets: list[str]) -> list[Flavour]:
    """The flavours of ``export.targets``, in registration order (portable first)."""
    return [f for n, f in _FLAVOURS.items() if n in targets]


def runtime_flavour(targets: list[str]) -> str:
    """The flavour a bundle of these targets runs in: the one of highest ``runtime_rank``."""
    ranked = [f for f in flavours_for(targets) if f.runtime_rank is not None]
    return max(ranked, key=lambda f: f.runtime_rank).name


BUILTIN = ("portable", "onnxruntime", "tensorrt", "torch")
for _flavour in (PortableFlavour(), OnnxruntimeFlavour(), TensorrtFlavour(), TorchFlavour()):
    register_flavour(_flavour)
