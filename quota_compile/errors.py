"""Errors the user can fix (exit code 2) versus everything else (a bug: exit code 1)."""

from __future__ import annotations


class UserError(Exception):
    """Bad input: one sentence naming the file, the key and what was expected."""

    exit_code = 2


class VerificationFailed(Exception):
    """The exported graphs do not match the PyTorch reference; no bundle is written."""

    exit_code = 1
