"""strip_runtime_asserts: remove the runtime checks ``torch.export`` leaves in a program.

Requires: nothing.
Ensures: no ``_assert_tensor_metadata`` / ``_assert_scalar`` / ``_assert_async`` /
``sym_constrain_range*`` call and no ``_guards_fn`` input-guard module remain. They check
dtypes, devices and shape relations that the exporter already proved for the declared dynamic
shapes; in ONNX they would be dead nodes or unsupported ops.
"""

from __future__ import annotations

import torch
from torch import fx

from . import GraphPass, PassError, PassResult

ASSERT_TARGETS = frozenset(
    {
        torch.ops.aten._assert_tensor_metadata.default,
        torch.ops.aten._assert_scalar.default,
        torch.ops.aten._assert_async.msg,
        torch.ops.aten._assert_async.default,
        torch.ops.aten.sym_constrain_range.default,
        torch.ops.aten.sym_constrain_range_for_size.default,
    }
)
GUARD_MODULE = "_guards_fn"


def _is_assert(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in ASSERT_TARGETS
    return node.op == "call_module" and node.target == GUARD_MODULE


class StripRuntimeAsserts(GraphPass):
    name = "strip_runtime_asserts"

    def call(self, gm: fx.GraphModule) -> PassResult:
        doomed = [n for n in gm.graph.nodes if _is_assert(n)]
        for node in reversed(doomed):
            if node.users:
                raise PassError(f"{self.name}: assertion node {node.name} has users")
            gm.graph.erase_node(node)
        if hasattr(gm, GUARD_MODULE):
            delattr(gm, GUARD_MODULE)
        return PassResult(gm, bool(doomed))

    def ensures(self, gm: fx.GraphModule) -> None:
        left = [n.name for n in gm.graph.nodes if _is_assert(n)]
        if left:
            raise PassError(f"{self.name}: runtime asserts remain: {left}")
