"""quantize_kv_io: make the KV cache that crosses the graph boundary quantized.

Requires: a program with plain positional I/O (``plain_signature``) whose listed outputs are
float K/V tensors ``[B, Hkv, T, D]`` (the new cache entries) and whose listed inputs are the
float past K/V; no ``quantize_kv`` / ``dequantize_kv`` yet.
Ensures:
- each listed output ``x`` is replaced by the three stored tensors of ``quantize_kv(x)``
  (codes ``uint8``, scale ``float32``, zero point ``uint8``), and every other reader of ``x``
  (attention) reads ``dequantize_kv`` of them: attention sees exactly what the cache holds;
- each listed input becomes three inputs (codes, scale, zero point) read through
  ``dequantize_kv``.
Counts: ``quantize_kv`` = listed outputs; ``dequantize_kv`` = listed outputs + listed inputs;
outputs grow by 2 per listed output, inputs by 2 per listed input.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
from torch import fx

from quota_compile.quant import ops  # noqa: F401  (registers torch.ops.quota)

from . import GraphPass, PassError, PassResult, count_calls, outputs, placeholders, set_outputs

STORED_SUFFIXES = ("codes", "scale", "zero_point")


class QuantizeKVIO(GraphPass):
    name = "quantize_kv_io"

    def __init__(self, bits: int, kv_inputs: Sequence[int] = (), kv_outputs: Sequence[int] = ()):
        """``kv_inputs`` / ``kv_outputs``: positions of the float KV placeholders / outputs."""
        self.bits = bits
        self.kv_inputs = list(kv_inputs)
        self.kv_outputs = list(kv_outputs)

    def requires(self, gm: fx.GraphModule) -> None:
        if count_calls(gm, torch.ops.quota.quantize_kv.default) or count_calls(gm, torch.ops.quota.dequantize_kv.default):
            raise PassError(f"{self.name}: the KV cache is already quantized")
        n_in, n_out = len(placeholders(gm)), len(outputs(gm))
        if any(i >= n_in for i in self.kv_inputs) or any(i >= n_out for i in self.kv_outputs):
            raise PassError(f"{self.name}: KV positions outside the program's {n_in} inputs / {n_out} outputs")
        self._before = (n_in, n_out)

    def call(self, gm: fx.GraphModule) -> PassResult:
        graph = gm.graph
        outs = outputs(gm)
        new_outs: list = []
        for pos, x in enumerate(outs):
            if pos not in self.kv_outputs:
                new_outs.append(x)
                continue
            with graph.inserting_after(x):
                q = graph.call_function(torch.ops.quota.quantize_kv.default, (x, self.bits))
            parts, last = [], q
            for i in range(3):
                with graph.inserting_after(last):
                    last = graph.call_function(operator.getitem, (q, i))
                parts.append(last)
            with graph.inserting_after(last):
                dq = graph.call_function(torch.ops.quota.dequantize_kv.default, (*parts, self.bits))
            x.replace_all_uses_with(dq, delete_user_cb=lambda user: user is not q and user.op != "output")
            new_outs.extend(parts)
        set_outputs(gm, new_outs)
        for p in [placeholders(gm)[i] for i in self.kv_inputs]:
            with graph.inserting_before(p):
                parts = [graph.placeholder(f"{p.target}_{s}") for s in STORED_SUFFIXES]
            with graph.inserting_after(placeholders(gm)[-1]):
                dq = graph.call_function(torch.ops.quota.dequantize_kv.default, (*parts, self.bits))
            p.replace_all_uses_with(dq)
            graph.erase_node(p)
        return PassResult(gm, bool(self.kv_inputs or self.kv_outputs))

    def ensures(self, gm: fx.GraphModule) -> None:
        n_in, n_out = self._before
        expected_io = (n_in + 2 * len(self.kv_inputs), n_out + 2 * len(self.kv_outputs))
        got_io = (len(placeholders(gm)), len(outputs(gm)))
        if got_io != expected_io:
            raise PassError(f"{self.name}: expected (inputs, outputs) = {expected_io}, found {got_io}")
        q, dq = count_calls(gm, torch.ops.quota.quantize_kv.default), count_calls(gm, torch.ops.quota.dequantize_kv.default)
        if (q, dq) != (len(self.kv_outputs), len(self.kv_outputs) + len(self.kv_inputs)):
            raise PassError(f"{self.name}: unexpected quantize_kv / dequantize_kv counts {q} / {dq}")
        stored = {id(n) for n in outputs(gm) if n.op == "call_function" and n.target == operator.getitem and n.args[0].target == torch.ops.quota.quantize_kv.default}
        if len(stored) != 3 * len(self.kv_outputs):
            raise PassError(f"{self.name}: expected {3 * len(self.kv_outputs)} stored KV outputs, found {len(stored)}")
