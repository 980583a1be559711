"""The test suite (a package: its modules import helpers from ``tests.conftest``).

Triton's CPU interpreter. The kernel tests (test_kernels.py, test_trt_flavour.py) run the Triton
kernels in it, and ``TRITON_INTERPRET=1`` must be in the environment when triton is first
imported (``quota_compile/kernels/__init__.py`` says why). Pytest imports this package before
``tests.conftest`` and before any test module, so triton is imported here, interpreted, before
anything else in the session (a test module, a fixture, torch) can import it compiled, whatever
the modules collected and their order; the variable is then restored, so that everything else
runs as it would without it. A session where triton was nevertheless imported compiled first
(by a pytest plugin, say) fails the kernel tests with the reason: that is not a condition for
skipping them.

Only under pytest: scripts that the tests run in a subprocess import ``tests.trt_standin`` to
compile the kernels for a GPU, which needs triton compiled.
"""

from __future__ import annotations

import os
import sys

if "_pytest" in sys.modules and "triton" not in sys.modules:
    _previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton  # noqa: F401
    except ImportError:  # where the kernel tests skip or fail for it: test_kernels.py
        pass
    finally:
        if _previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = _previous
        del _previous
