"""use_kmajor_weights: hold each W4A4 Linear's weight in the K-major INT4 layout and run it as
``quota.w4a4_linear_kmajor`` (the contract: the class docstring of :class:`UseKMajorWeights`).

The traced graphs hold every W4A4 Linear as one ``quota.w4a4_linear`` over the graph's packing
of its INT4 codes (``ops.pack_int4`` of the ``[K, N]`` matrix, ``pack_int4_weights``). The
K-major layout (``uint8 [N, K/2]``, :func:`quota_compile.kernels.reference.pack_int4_kmajor`)
holds the same codes in the order the int8 tensor cores read them
(:mod:`quota_compile.kernels.w4a4_kmajor`). This pass converts each such weight once, when the
PyTorch path builds its programs (:func:`quota_compile.flavours.torch_path.kernel_programs`
with ``weight_layout="kmajor"``), and swaps the operator node for node. Not used for the ONNX
export or the bundle's saved programs, which keep the graph's packing.
"""

from __future__ import annotations

import torch
from torch import fx

from quota_compile.kernels import ops as kernel_ops  # noqa: F401  (registers the quota.w4a4_linear* operators)
from quota_compile.kernels.reference import pack_int4_kmajor
from quota_compile.quant import ops

from . import GraphPass, PassError, PassResult, count_calls

_GRAPH = torch.ops.quota.w4a4_linear.default
_KMAJOR = torch.ops.quota.w4a4_linear_kmajor.default


def fits_kmajor(k: int, group_size: int) -> bool:
    """Whether the K-major kernel takes a weight of input size ``k`` and group ``group_size``:
    per output channel, or an even number of groups (the two halves of K in the two nibbles)."""
    return k % 2 == 0 and (group_size == k or (k // 2) % group_size == 0)


def _attr(gm: fx.GraphModule, target: str) -> torch.Tensor:
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name)


class UseKMajorWeights(GraphPass):
    """use_kmajor_weights: each ``quota.w4a4_linear(x, packed, scale, k, n, g, clip)`` whose
    packed weight is a constant of the graph and whose ``(k, g)`` the K-major kernel takes
    (:func:`fits_kmajor`) becomes ``quota.w4a4_linear_kmajor(x, w_kmajor, scale, k, n, g,
    clip)``, ``w_kmajor`` a new constant holding the same codes in the K-major layout.

    Requires: a graph after ``fuse_w4a4_linear`` (a trace's programs).
    Ensures: every ``w4a4_linear`` that fits became one ``w4a4_linear_kmajor`` with the same
    input, scales, sizes and clip ratio and the same codes (unpacked from both layouts, equal);
    the others are left as they were; a packed weight no operator reads any more is dropped.
    """

    name = "use_kmajor_weights"

    def requires(self, gm: fx.GraphModule) -> None:
        self._before = count_calls(gm, _GRAPH)
        self._fits = sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target == _GRAPH
                         and n.args[1].op == "get_attr" and fits_kmajor(n.args[3], n.args[5]))
        self._checks: list[tuple[str, str, int, int]] = []

    def call(self, gm: fx.GraphModule) -> PassResult:
        graph = gm.graph
        converted: dict[str, str] = {}  # graph-packing constant -> its K-major constant
        for node in [n for n in graph.nodes if n.op == "call_function" and n.target == _GRAPH]:
            x, packed, scale, k, n, g, clip = node.args
            if packed.op != "get_attr" or not fits_kmajor(k, g):
                continue
            if packed.target not in converted:
                codes = ops.unpack_int4(_attr(gm, packed.target), (k, n))
                name = packed.target.replace(".", "_") + "_kmajor"
                if hasattr(gm, name):
                    raise PassError(f"{self.name}: the graph already has an attribute {name}")
                gm.register_buffer(name, pack_int4_kmajor(codes))
                converted[packed.target] = name
                self._checks.append((packed.target, name, k, n))
            with graph.inserting_before(node):
                w = graph.get_attr(converted[packed.target])
                y = graph.call_function(_KMAJOR, (x, w, scale, k, n, g, clip))
            y.meta.update(node.meta)
            node.replace_all_uses_with(y)
            graph.erase_node(node)
        for target in converted:
            for node in [n for n in graph.nodes if n.op == "get_attr" and n.target == target and not n.users]:
                graph.erase_node(node)
        self._dropped = {}
        for target in converted:
            if not any(n.op == "get_attr" and n.target == target for n in graph.nodes):
                self._dropped[target] = _attr(gm, target)
                owner, _, attr = target.rpartition(".")
                delattr(gm.get_submodule(owner) if owner else gm, attr)
        gm.recompile()
        return PassResult(gm, bool(converted))

    def ensures(self, gm: fx.GraphModule) -> None:
        got = count_calls(gm, _KMAJOR)
        if got != self._fits or count_calls(gm, _GRAPH) != self._before - self._fits:
            raise PassError(f"{self.name}: {got} w4a4_linear_kmajor for {self._fits} Linears that fit, "
                            f"{count_calls(gm, _GRAPH)} w4a4_linear left of {self._before}")
        from quota_compile.kernels.reference import unpack_int4_kmajor

        for old, new, k, n in self._checks:
            before = self._dropped.get(old)
            before = before if before is not None else _attr(gm, old)
            if not torch.equal(ops.unpack_int4(before, (k, n)), unpack_int4_kmajor(_attr(gm, new), k)):
                raise PassError(f"{self.name}: the K-major copy of {old} does not hold its codes")
