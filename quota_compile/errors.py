"""Errors the user can fix (exit code 2) versus everything else (a bug: exit code 1)."""

from __future__ import annotations

import contextlib


class UserError(Exception):
    """Bad input: one sentence naming the file, the key and what was expected."""

    exit_code = 2


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
