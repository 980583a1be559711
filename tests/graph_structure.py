"""What an ONNX graph computes, with every name the exporter chose erased: for comparing two
graphs node for node (same operators in the same order, same attributes, each input read from
the same place, the same initializer contents) when only their value and node names differ."""

from __future__ import annotations

import hashlib

import onnx


def _attribute(a: onnx.AttributeProto):
    if a.type in (onnx.AttributeProto.TENSOR, onnx.AttributeProto.GRAPH, onnx.AttributeProto.SPARSE_TENSOR):
        copy = onnx.AttributeProto()
        copy.CopyFrom(a)
        copy.t.name = ""
        return (a.name, hashlib.sha256(copy.SerializeToString()).hexdigest())
    value = onnx.helper.get_attribute_value(a)
    return (a.name, tuple(value) if isinstance(value, list) else value)


def _tensor_key(t: onnx.TensorProto) -> str:
    copy = onnx.TensorProto()
    copy.CopyFrom(t)
    copy.name = ""
    return "init:" + hashlib.sha256(copy.SerializeToString()).hexdigest()[:16]


def _io(model: onnx.ModelProto) -> list[tuple]:
    """Each graph input and output: name, element type and dimensions (sizes or symbol names)."""
    out = []
    for v in list(model.graph.input) + list(model.graph.output):
        t = v.type.tensor_type
        out.append((v.name, t.elem_type, tuple(d.dim_param or d.dim_value for d in t.shape.dim)))
    return out


def structure(model: onnx.ModelProto) -> dict:
    """``io``: the graph inputs' and outputs' names, types and dimensions; ``nodes``:
    ``(domain, op_type, inputs, outputs, attributes)`` in graph order, every value
    named by where it comes from (``in<i>`` a graph input, ``init:<hash>`` an initializer by
    its contents, ``v<j>`` the j-th node output); ``outputs``: the graph outputs' names and
    sources; ``initializers``: the sorted content keys. External-data initializers are compared
    by their location fields, so load graphs with their data for a content comparison."""
    g = model.graph
    source: dict[str, str] = {v.name: f"in{i}" for i, v in enumerate(g.input)}
    inits = sorted(_tensor_key(t) for t in g.initializer)
    source.update({t.name: _tensor_key(t) for t in g.initializer})
    nodes, produced = [], 0
    for n in g.node:
        ins = tuple(source[x] if x else "" for x in n.input)
        outs = []
        for o in n.output:
            if o:
                source[o] = f"v{produced}"
                outs.append(source[o])
                produced += 1
            else:
                outs.append("")
        nodes.append((n.domain, n.op_type, ins, tuple(outs), tuple(sorted(_attribute(a) for a in n.attribute))))
    outputs = [(o.name, source.get(o.name)) for o in g.output]
    return {"nodes": nodes, "outputs": outputs, "initializers": inits, "inputs": [v.name for v in g.input], "io": _io(model)}


def differences(a: onnx.ModelProto, b: onnx.ModelProto, limit: int = 5) -> list[str]:
    """Where :func:`structure` of ``a`` and ``b`` differ (empty when they compute alike)."""
    sa, sb = structure(a), structure(b)
    out = []
    for key in ("inputs", "outputs", "initializers", "io"):
        if sa[key] != sb[key]:
            out.append(f"{key} differ")
    if len(sa["nodes"]) != len(sb["nodes"]):
        out.append(f"{len(sa['nodes'])} nodes against {len(sb['nodes'])}")
    for i, (x, y) in enumerate(zip(sa["nodes"], sb["nodes"])):
        if x != y:
            out.append(f"node {i}: {x[:4]} against {y[:4]}")
            if len(out) >= limit:
                break
    return out


def computation(model: onnx.ModelProto) -> dict:
    """What the graph computes, independent of node order too: each value is named by a hash of
    how it is computed (operator, attributes, the names of its inputs, which output), so two
    graphs that compute the same values from the same inputs and initializers in another
    topological order get the same names. ``nodes``: the sorted node hashes; ``outputs``: each
    graph output's name and hash."""
    g = model.graph
    source: dict[str, str] = {v.name: f"in{i}" for i, v in enumerate(g.input)}
    source.update({t.name: _tensor_key(t) for t in g.initializer})
    nodes = []
    for n in g.node:
        missing = [x for x in n.input if x and x not in source]
        if missing:
            raise ValueError(f"{n.name} reads {missing[0]} before any node computes it: the graph is not topologically sorted")
        ins = tuple(source[x] if x else "" for x in n.input)
        key = repr((n.domain, n.op_type, ins, tuple(sorted(_attribute(a) for a in n.attribute))))
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        nodes.append(digest)
        for j, o in enumerate(n.output):
            if o:
                source[o] = f"{digest}:{j}"
    return {"nodes": sorted(nodes), "outputs": [(o.name, source.get(o.name)) for o in g.output],
            "inputs": [v.name for v in g.input], "initializers": sorted(_tensor_key(t) for t in g.initializer),
            "io": _io(model)}


def computation_differences(a: onnx.ModelProto, b: onnx.ModelProto) -> list[str]:
    """Where :func:`computation` of ``a`` and ``b`` differ (empty when they compute the same
    values, whatever their node order)."""
    ca, cb = computation(a), computation(b)
    out = [f"{key} differ" for key in ("inputs", "initializers", "io") if ca[key] != cb[key]]
    if ca["nodes"] != cb["nodes"]:
        only_a = len(set(ca["nodes"]) - set(cb["nodes"]))
        out.append(f"{len(ca['nodes'])} nodes against {len(cb['nodes'])}; {only_a} computed only by the first")
    out += [f"output {x[0]} is computed differently" for x, y in zip(ca["outputs"], cb["outputs"]) if x != y]
    return out
