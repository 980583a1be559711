"""The torch and transformers releases quota-compile is tested with, checked when it starts.

``SUPPORTED`` is the range ``pyproject.toml`` declares (a test keeps the two equal). CI
compiles and verifies the examples with the oldest torch of the range as well as with the
one it pins, so the range is what has been run, not a guess. An older release is refused
with one sentence (the exporter's behaviour differs in ways that end in internal errors);
a newer one is used with a note, since it has not been tried.
"""

from __future__ import annotations

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from quota_compile.errors import UserError

SUPPORTED = {"torch": ">=2.10,<2.15", "transformers": ">=5.0,<5.26"}


def _installed(name: str) -> str:
    module = __import__(name)
    return module.__version__


def _release(version: str) -> Version | None:
    """The public release of ``version`` ('2.11.0+cu130' -> 2.11.0; '2.15.0.dev1' -> 2.15.0)."""
    try:
        return Version(Version(version).base_version)
    except InvalidVersion:
        return None


def check_versions(installed: dict[str, str] | None = None) -> list[str]:
    """Raise :class:`UserError` for a package older than :data:`SUPPORTED`; return one note per
    package newer than it. ``installed`` (name -> version) defaults to what imports here."""
    notes = []
    for name, spec in SUPPORTED.items():
        version = installed[name] if installed is not None else _installed(name)
        release = _release(version)
        allowed = SpecifierSet(spec)
        if release is None or release in allowed:
            continue
        lowest = min(Version(s.version) for s in allowed if s.operator == ">=")
        if release < lowest:
            raise UserError(
                f"{name} {version} is installed, but quota-compile needs {name}{spec}; "
                f"install a release in that range (e.g. pip install '{name}{spec}')."
            )
        notes.append(f"note: {name} {version} is newer than the releases quota-compile is tested with ({name}{spec}).")
    return notes
