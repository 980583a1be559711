"""The PyTorch execution path: the traced, pass-processed programs (what the ONNX graphs are
lowered from) run by PyTorch on a GPU, each W4A4 Linear and each decode layer's attention over
the quantized KV cache as a Triton kernel.

What a user without TensorRT runs on an NVIDIA GPU. :func:`kernel_programs` copies the traced
vision / prefill / decode graph modules (:func:`quota_compile.capture.trace.trace_programs`), applies
the passes of ``passes/use_triton_kernels.py`` and moves them to the device:
``use_triton_kernels`` in every graph (each ``matmul(qdq_per_token(x), dequantize_int4(...))``
becomes one ``quota.w4a4_linear``) and, in the decode graph with a quantized cache,
``use_kv_decode_attention`` (each layer's dequantize / concatenate / repeat-heads / matmul /
scale / mask / softmax / matmul becomes one ``quota.kv_decode_attention``: the flash-decoding
kernel of :mod:`quota_compile.kernels.kv_attention` reading the stored past in place, with the
mask as an additive bias and the new token's entry merged in). The prefill keeps its own
attention (QUOTA reads its softmax probabilities); a float cache keeps the graph's attention.
:class:`KernelBackend` runs them behind the :class:`~quota_compile.runtime.ort.Backend` interface,
so ``greedy_generate`` and the verification take it like the onnxruntime sessions.

Verified here (``tests/test_kernels.py``), on the CPU, with triton in its interpreter
(``TRITON_INTERPRET=1``): the decode graph holds one ``quota.kv_decode_attention`` per decoder
layer and no softmax; the kernel path's logits, greedy tokens and kept indices match the
simulation's, for the ``per_token`` cache with every kernel in the interpreter, and for the
``per_channel`` cache and a right-padded batch of two prompts (masked holes inside the cache)
with the attention kernel in the interpreter and the W4A4 Linears as the simulation's ops.
Not verified: a CUDA run (no GPU on this machine).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import fx

from quota_compile.bundle.schema import KEPT, PAST
from quota_compile.runtime.ort import append_kv


def kernel_programs(traced: dict, device: str | torch.device = "cuda") -> dict[str, fx.GraphModule]:
    """Copies of the traced programs with the Triton W4A4 Linear and, in the decode program
    with a quantized cache, the Triton decode attention, on ``device``."""
    from quota_compile.passes.use_triton_kernels import UseKVDecodeAttention, UseTritonKernels, quantized_past, w4a4_matmuls

    out = {}
    for name, t in traced.items():
        gm = copy.deepcopy(t.module)
        if w4a4_matmuls(gm):
            gm = UseTritonKernels()(gm).graph_module
        if name == "decode" and quantized_past(gm):
            layers = {n.split(".")[1] for n in t.input_names if n.startswith(PAST)}
            gm = UseKVDecodeAttention(len(layers))(gm).graph_module
        out[name] = gm.to(device).eval()
    return out


class KernelBackend:
    """:func:`kernel_programs` behind the runtime's Backend interface (numpy in and out)."""

    def __init__(self, traced: dict, device: str | torch.device = "cuda"):
        self.device = torch.device(device)
        self.programs = kernel_programs(traced, self.device)
        self._kept = sum(1 for n in traced["prefill"].output_names if n.startswith(KEPT))

    def _run(self, name: str, values: list[np.ndarray]) -> list[np.ndarray]:
        with torch.no_grad():
            out = self.programs[name](*(torch.from_numpy(np.ascontiguousarray(v)).to(self.device) for v in values))
        out = out if isinstance(out, (tuple, list)) else (out,)
        return [o.cpu().numpy() for o in out]

    def vision(self, pixel_values):
        return self._run("vision", [pixel_values])[0]

    def prefill(self, input_ids, attention_mask, image_features):
        out = self._run("prefill", [input_ids, attention_mask, image_features])
        return out[0], out[1 : len(out) - self._kept], out[len(out) - self._kept :]

    def decode(self, input_ids, position_ids, attention_mask, past):
        out = self._run("decode", [input_ids, position_ids, attention_mask, *past])
        return out[0], append_kv(past, out[1:])
