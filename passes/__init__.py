"""Graph passes over traced programs, one module each.

A pass takes the ``torch.fx.GraphModule`` of an exported program (``ExportedProgram.module()``,
parameters as ``get_attr`` nodes, as in torchao's PT2E flow) and returns a
:class:`PassResult`. Each pass states what it requires of the graph (checked by
``requires``) and what it guarantees afterwards (checked by ``ensures``); calling the pass
object runs all three. The compiler applies them in the order ``quota_compile.capture.trace._run_passes``
lists them (strip asserts, fold top-k gathers, insert Q/DQ, quantize KV I/O, pack INT4 weights,
fuse each W4A4 Linear into one operator, quantize the embedding table) and re-exports the
result for lowering.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx


class PassError(RuntimeError):
    """A pass found the graph violating its contract (a compiler bug, not a user error)."""


@dataclass
class PassResult:
    graph_module: fx.GraphModule
    modified: bool


class GraphPass:
    """Base class: ``requires`` -> ``call`` -> ``ensures``."""

    name = "pass"

    def requires(self, gm: fx.GraphModule) -> None:
        """Raise :class:`PassError` if ``gm`` is not what this pass can work on."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        raise NotImplementedError

    def ensures(self, gm: fx.GraphModule) -> None:
        """Raise :class:`PassError` if the guarantee of this pass does not hold on ``gm``."""

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        self.requires(gm)
        result = self.call(gm)
        result.graph_module.graph.lint()
        result.graph_module.recompile()
        self.ensures(result.graph_module)
        return result


def count_calls(gm: fx.GraphModule, target) -> int:
    """Number of ``call_function`` nodes with the given target."""
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target == target)


def remove_unused_attributes(gm: fx.GraphModule) -> list[str]:
    """Drop dead ``get_attr`` nodes and the parameters/buffers nobody reads any more, so that
    a re-export does not carry them into the graph as initializers. Returns the names."""
    gm.graph.eliminate_dead_code()
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    removed = []
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name not in used:
            owner, _, attr = name.rpartition(".")
            mod = gm.get_submodule(owner) if owner else gm
            delattr(mod, attr)
            removed.append(name)
    gm.recompile()
    return removed


def plain_signature(gm: fx.GraphModule) -> fx.GraphModule:
    """A new module computing what the unlifted program ``gm`` (``ExportedProgram.module()``)
    computes, called with plain positional arguments and returning a flat tuple (the passes
    add and remove inputs and outputs). Built from a copy of the graph with the default code
    generator, and from ``gm``'s attributes that the graph reads; ``gm``'s pytree calling
    convention and its input-checking hooks stay behind with ``gm``."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    graph.set_codegen(fx.graph.CodeGen())
    plain = fx.GraphModule(gm, graph)
    # The copy registers every tensor it takes over as a persistent buffer; keep those that
    # were not persistent so (the exporter records it in the graph's signature).
    persistent = set(gm.state_dict(keep_vars=True))
    for name, tensor in plain.named_buffers():
        if name not in persistent:
            owner, _, leaf = name.rpartition(".")
            plain.get_submodule(owner).register_buffer(leaf, tensor, persistent=False)
    return plain


def placeholders(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


def outputs(gm: fx.GraphModule) -> list[fx.Node]:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    return list(out.args[0])


def set_outputs(gm: fx.GraphModule, values: list[fx.Node]) -> None:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    out.args = (tuple(values),)


__all__ = [
    "GraphPass",
    "PassError",
    "PassResult",
    "count_calls",
    "outputs",
    "placeholders",
    "plain_signature",
    "remove_unused_attributes",
    "set_outputs",
]
