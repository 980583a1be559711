"""Triton kernels for the deployed low-bit operators, each with a PyTorch reference.

- :mod:`quota_compile.kernels.w4a4_linear`: ``w4a4_linear`` — activations quantized per token
  to INT4 on the fly (the integers of ``quant.ops.quantize_per_token``), weights
  packed INT4 with group-wise scales, int8 ``tl.dot`` with int32 accumulation per group.
- :mod:`quota_compile.kernels.w4a4_kmajor`: the same W4A4 Linear over a K-major INT4 weight
  (``[N, K/2]``, the two halves of K in the two nibbles): one int32 accumulation over K per
  output channel, split over K for small ``M``; a candidate not yet used by the PyTorch path
  or the plugins (it has not been timed on a GPU).
- :mod:`quota_compile.kernels.kv_attention`: ``kv_decode_attention`` — one query token over a
  quantized KV cache (``per_token`` or ``per_channel``, INT4 or INT8, grouped-query heads),
  flash-decoding split over the context with an online softmax (one program per KV head for
  its whole query group with grouped-query heads); optionally with an additive
  mask bias (holes of right-padded batches) and the new token's entry merged after the cache.
- :mod:`quota_compile.kernels.trt_aot`: single-launch variants with TensorRT's AOT calling
  convention, for the TensorRT plugins.
- :mod:`quota_compile.kernels.ops`: ``torch.ops.quota.w4a4_linear`` and
  ``torch.ops.quota.kv_decode_attention``, the operators the PyTorch execution path
  (:mod:`quota_compile.flavours.torch_path`) puts in the traced graphs.

What is verified where
- Correctness: ``tests/test_kernels.py`` runs every kernel against its reference under
  ``TRITON_INTERPRET=1`` (Triton's numpy interpreter) on the CPU: the activation codes and
  scales bit for bit against ``quant.ops``, the outputs within float-summation tolerances.
  The interpreter executes the kernels' operations with numpy, so it checks indexing, masking,
  packing, the integer conventions and the arithmetic order, not the GPU code generator.
- GPU: correctness at LLaVA-1.5-7B shapes and timings (against torch FP16) only through
  ``benchmarks/gpu_kernels.py`` on an NVIDIA GPU; nothing in the test suite needs a GPU.

``TRITON_INTERPRET=1`` must be set before triton is first imported: triton 3.8 reads it each
time a ``@triton.jit`` function is decorated, and its own ``triton.language`` helpers
(``tl.cdiv``, ``tl.interleave``, used by these kernels) are decorated when triton is imported;
this package's kernels when their module is. This ``__init__`` imports no kernel module.
"""

from __future__ import annotations

import importlib


def available() -> bool:
    """Whether ``triton`` imports (the kernels need it; the references do not)."""
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def is_interpreted(kernel: object) -> bool:
    """Whether a ``triton.jit`` kernel was decorated under ``TRITON_INTERPRET=1`` (runs on CPU
    tensors through Triton's numpy interpreter) rather than compiled for a GPU."""
    return type(kernel).__name__ == "InterpretedFunction"


def module_is_interpreted(module: object) -> bool:
    """Whether the ``triton.jit`` kernels that kernel module ``module`` defines were decorated
    under ``TRITON_INTERPRET=1`` (all of them; a module decorates them together when it is
    imported). A module imported without it can be reloaded with it set
    (``importlib.reload``), as the tests do."""
    name = getattr(module, "__name__", None)
    jitted = [
        v for v in vars(module).values()
        if type(v).__name__ in ("JITFunction", "InterpretedFunction")
        and getattr(getattr(v, "fn", None), "__module__", None) == name
    ]
    return bool(jitted) and all(is_interpreted(v) for v in jitted)
