"""quota-compile: W4A4 + quantized-KV compilation of vision-language models into verified ONNX
bundles, with QUOTA visual-token pruning."""

__version__ = "0.1.0"


def _map_checkout_passes() -> None:
    """Make ``quota_compile.passes`` importable from a source checkout.

    The FX graph passes live in the repository's top-level ``passes/`` folder. An installed
    package has them at ``quota_compile/passes`` (``pyproject.toml`` maps the folder there), and
    an editable install maps them with setuptools' own finder; but Python run from the
    repository root (``python -m quota_compile``, the tests) imports this package from the
    checkout, where ``quota_compile/passes`` does not exist. This finder maps that one name to
    the folder, and does nothing in an installed package.
    """
    import importlib.util
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    folder = here.parent / "passes"
    if (here / "passes").is_dir() or not (folder / "__init__.py").is_file():
        return

    class _CheckoutPasses:
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name != "quota_compile.passes":
                return None
            return importlib.util.spec_from_file_location(name, folder / "__init__.py", submodule_search_locations=[str(folder)])

    if not any(type(f).__name__ == "_CheckoutPasses" for f in sys.meta_path):
        sys.meta_path.append(_CheckoutPasses())


_map_checkout_passes()
