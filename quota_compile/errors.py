"""Errors the user can fix (exit code 2) versus everything else (a bug: exit code 1)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path


class UserError(Exception):
    """Bad input: one sentence naming the file, the key and what was expected."""

    exit_code = 2


class ConfigError(UserError):
    """A problem with one key of the config file, raised where the file is not known.

    ``str()`` is ``"key '{key}': {message}"`` (with ``key=None``: the message alone, for a message
    that names its key itself); once :func:`errors_in` has named the file, the file name comes
    first: ``"{file}: key '{key}': {message}"``, the one sentence the user reads."""

    def __init__(self, key: str | None, message: str):
        super().__init__(key, message)
        self.key = key
        self.message = message
        self.file: Path | str | None = None

    def __str__(self) -> str:
        text = self.message if self.key is None else f"key '{self.key}': {self.message}"
        return text if self.file is None else f"{self.file}: {text}"


@contextlib.contextmanager
def errors_in(config_file: Path | str) -> Iterator[None]:
    """Name ``config_file`` in every :class:`ConfigError` raised inside (the command entry
    points wrap their work in this; the code below them raises without knowing the file). An
    error that already names a file keeps it."""
    try:
        yield
    except ConfigError as e:
        if e.file is None:
            e.file = config_file
        raise


class VerificationFailed(Exception):
    """The exported graphs do not match the PyTorch reference; no bundle is written."""

    exit_code = 1


class GraphRunError(RuntimeError):
    """onnxruntime could not load or run a graph; the message names the graph."""


@contextlib.contextmanager
def onnxruntime_errors(what: str):
    """Turn an onnxruntime exception raised inside into a :class:`GraphRunError` saying
    ``what`` failed (e.g. ``"prefill.onnx"``); other exceptions pass through."""
    try:
        yield
    except Exception as e:
        if type(e).__module__.startswith("onnxruntime"):
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise GraphRunError(f"{what}: {first}") from e
        raise
