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

With static scales (the ``per_channel`` granularity: one ``[Hkv, 1, D]`` scale per listed
position, given to the constructor), ``quantize_kv_static`` / ``dequantize_kv_static`` take
their place, the scales become buffers of the graph, and each KV tensor crossing the boundary
is its codes alone (inputs and outputs keep their count).
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

    def __init__(
        self,
        bits: int,
        kv_inputs: Sequence[int] = (),
        kv_outputs: Sequence[int] = (),
        input_scales: Sequence[torch.Tensor] | None = None,
        output_scales: Sequence[torch.Tensor] | None = None,
    ):
        """``kv_inputs`` / ``kv_outputs``: positions of the float KV placeholders / outputs;
        ``input_scales`` / ``output_scales``: their static scales (``per_channel``), in the
        same order, or ``None`` for the dynamic ``per_token`` form."""
        self.bits = bits
        self.kv_inputs = list(kv_inputs)
        self.kv_outputs = list(kv_outputs)
        self.static = input_scales is not None or output_scales is not None
        self.input_scales = list(input_scales or [])
        self.output_scales = list(output_scales or [])
        if self.static and (len(self.input_scales) != len(self.kv_inputs) or len(self.output_scales) != len(self.kv_outputs)):
            raise ValueError("one static scale per listed KV input and output")

    @property
    def _ops(self):
        if self.static:
            return torch.ops.quota.quantize_kv_static.default, torch.ops.quota.dequantize_kv_static.default
        return torch.ops.quota.quantize_kv.default, torch.ops.quota.dequantize_kv.default

    def _scale(self, gm: fx.GraphModule, scale: torch.Tensor, tag: str) -> fx.Node:
        name = f"kv_scale_{tag}"
        gm.register_buffer(name, scale.to(torch.float32).contiguous())
        return gm.graph.get_attr(name)

    def requires(self, gm: fx.GraphModule) -> None:
        if any(count_calls(gm, op) for op in (
            torch.ops.quota.quantize_kv.default, torch.ops.quota.dequantize_kv.default,
            torch.ops.quota.quantize_kv_static.default, torch.ops.quota.dequantize_kv_static.default,
        )):
            raise PassError(f"{self.name}: the KV cache is already quantized")
        n_in, n_out = len(placeholders(gm)), len(outputs(gm))
        if any(i >= n_in for i in self.kv_inputs) or any(i >= n_out for i in self.kv_outputs):
            raise PassError(f"{self.name}: KV positions outside the program's {n_in} inputs / {n_out} outputs")
        self._before = (n_in, n_out)

    def _store(self, gm: fx.GraphModule, x: fx.Node, pos: int) -> tuple[fx.Node, list[fx.Node], fx.Node]:
        """Quantize output ``x``: ``(quantize node, the stored tensors, what attention reads)``."""
        graph = gm.graph
        quant, dequant = self._ops
        if self.static:
            with graph.inserting_after(x):
                s = self._scale(gm, self.output_scales[self.kv_outputs.index(pos)], f"out{pos}")
            with graph.inserting_after(s):
                q = graph.call_function(quant, (x, s, self.bits))
            parts, last, extra = [q], q, (s,)
        else:
            with graph.inserting_after(x):
                q = graph.call_function(quant, (x, self.bits))
            parts, last, extra = [], q, ()
            for i in range(len(STORED_SUFFIXES)):
                with graph.inserting_after(last):
                    last = graph.call_function(operator.getitem, (q, i))
                parts.append(last)
        with graph.inserting_after(last):
            dq = graph.call_function(dequant, (*parts, *extra, self.bits))
        return q, parts, dq

    def _load(self, gm: fx.GraphModule, p: fx.Node, j: int) -> fx.Node:
        """The stored input(s) replacing placeholder ``p`` (the j-th listed), dequantized."""
        graph = gm.graph
        suffixes = ("codes",) if self.static else STORED_SUFFIXES
        with graph.inserting_before(p):
            parts = [graph.placeholder(f"{p.target}_{s}") for s in suffixes]
        with graph.inserting_after(placeholders(gm)[-1]):
            extra = (self._scale(gm, self.input_scales[j], f"in{self.kv_inputs[j]}"),) if self.static else ()
        with graph.inserting_after(extra[0] if extra else placeholders(gm)[-1]):
            return graph.call_function(self._ops[1], (*parts, *extra, self.bits))

    def call(self, gm: fx.GraphModule) -> PassResult:
        new_outs: list = []
        for pos, x in enumerate(outputs(gm)):
            if pos not in self.kv_outputs:
                new_outs.append(x)
                continue
            q, parts, dq = self._store(gm, x, pos)
            x.replace_all_uses_with(dq, delete_user_cb=lambda user: user is not q and user.op != "output")
            new_outs.extend(parts)
        set_outputs(gm, new_outs)
        for j, p in enumerate([placeholders(gm)[i] for i in self.kv_inputs]):
            p.replace_all_uses_with(self._load(gm, p, j))
            gm.graph.erase_node(p)
        return PassResult(gm, bool(self.kv_inputs or self.kv_outputs))

    def ensures(self, gm: fx.GraphModule) -> None:
        n_in, n_out = self._before
        if self.static:
            q, dq = (count_calls(gm, op) for op in self._ops)
            if (len(placeholders(gm)), len(outputs(gm))) != (n_in, n_out):
                raise PassError(f"{self.name}: static KV quantization changed the number of inputs or outputs")
            if (q, dq) != (len(self.kv_outputs), len(self.kv_outputs) + len(self.kv_inputs)):
                raise PassError(f"{self.name}: unexpected quantize_kv_static / dequantize_kv_static counts {q} / {dq}")
            stored = [n for i, n in enumerate(outputs(gm)) if i in self.kv_outputs]
            if not all(n.op == "call_function" and n.target == self._ops[0] for n in stored):
                raise PassError(f"{self.name}: a listed KV output is not the codes of quantize_kv_static")
            return
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
