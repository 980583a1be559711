"""Small helpers for rewriting exported ONNX graphs, shared by the flavours' lowerings: an
indexed copy of a model, dead-node elimination, writing nodes back, following a chain of
readers, topological order."""

from __future__ import annotations

import onnx
from onnx import helper

MS_DOMAIN = "com.microsoft"


def indexed_copy(model: onnx.ModelProto):
    """A copy of ``model`` with lookups over its graph: ``(copy, graph, initializers by name,
    producer of each tensor, readers of each tensor)``."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = {t.name: t for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return out, graph, inits, producers, consumers


def live_nodes(nodes: list[onnx.NodeProto], graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """``nodes`` less those whose outputs nothing reads (dead-node elimination)."""
    needed = {o.name for o in graph.output}
    while True:
        used = needed | {i for x in nodes for i in x.input}
        kept = [x for x in nodes if any(o in used for o in x.output)]
        if len(kept) == len(nodes):
            return nodes
        nodes = kept


def write_back(out: onnx.ModelProto, nodes: list[onnx.NodeProto], new_inits: list[onnx.TensorProto]) -> None:
    """Make ``nodes`` the graph of ``out``, keep the initializers (old, then ``new_inits``) that
    some node reads, and import the ``com.microsoft`` domain where a node uses it."""
    graph = out.graph
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input}
    keep = [t for t in list(graph.initializer) + new_inits if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    if any(n.domain == MS_DOMAIN for n in graph.node) and not any(o.domain == MS_DOMAIN for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


def node_attrs(node: onnx.NodeProto) -> dict:
    """A node's attributes by name, as Python values."""
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def follow_chain(consumers: dict, tensor: str, op_type: str, fail) -> list[onnx.NodeProto]:
    """The single-reader chain of nodes from ``tensor`` to the first ``op_type``."""
    path = []
    while True:
        readers = consumers.get(tensor, [])
        if len(readers) != 1:
            fail(f"{tensor} has {len(readers)} readers on the way to a {op_type}")
        path.append(readers[0])
        if readers[0].op_type == op_type:
            return path
        tensor = readers[0].output[0]


def downstream_node(consumers: dict, tensor: str, found) -> onnx.NodeProto | None:
    """The first node (breadth first) downstream of ``tensor`` for which ``found(node)``."""
    frontier, seen = [tensor], set()
    while frontier:
        nxt = []
        for t in frontier:
            for n in consumers.get(t, []):
                if id(n) in seen:
                    continue
                seen.add(id(n))
                if found(n):
                    return n
                nxt.extend(n.output)
        frontier = nxt
    return None


def is_cache_concat(n: onnx.NodeProto) -> bool:
    """The Concat along the sequence axis (2) that appends a new entry to the past."""
    return n.op_type == "Concat" and any(a.name == "axis" and helper.get_attribute_value(a) == 2 for a in n.attribute)


def toposort_nodes(nodes: list[onnx.NodeProto], available: set[str], fail) -> list[onnx.NodeProto]:
    """``nodes`` in an order where every input is written before it is read (``available``:
    the graph inputs and initializers)."""
    available = set(available) | {""}
    ordered, pending = [], nodes
    while pending:
        waiting = []
        for n in pending:
            if all(x in available for x in n.input):
                ordered.append(n)
                available.update(n.output)
            else:
                waiting.append(n)
        if len(waiting) == len(pending):
            fail("the rewritten graph has a cycle or reads a tensor nothing writes")
        pending = waiting
    return ordered
