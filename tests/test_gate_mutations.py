"""Mutation tests of the verification gate, end to end through the command line.

Each test compiles the same small pruned model (2 decoder layers, FastV at layer 1) with one
deliberately wrong node planted in a graph by an ``export.passes`` function (the public seam
for passes over the exported graphs: it runs after export and before verification). The
compile must be refused with exit code 1, leave no bundle and no work folder, and say what
disagreed. One compile without a planted fault shows that the same configuration passes, so
each refusal is caused by its mutation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from quota_compile.cli import main

from .conftest import write_config

PRUNING = {"method": "fastv", "keep_ratio": 0.75, "fastv_layer": 1}
VERIFY = {"samples": 1, "new_tokens": 4}
HERE = "tests.test_gate_mutations"


# ------------------------------------------------------------------ the planted faults
# Each is an export.passes function: ``(model, graph) -> None``, editing one graph in place.


def _selection_topk(model: onnx.ModelProto) -> onnx.NodeProto:
    """The pruning layer's selection: the TopK taking the ``largest`` scores (the graph's other
    TopK sorts the kept indices ascending)."""
    (node,) = [n for n in model.graph.node if n.op_type == "TopK" and helper.get_node_attr_value(n, "largest") == 1]
    return node


def _set_attr(node: onnx.NodeProto, name: str, value: int) -> None:
    (attr,) = [a for a in node.attribute if a.name == name]
    attr.i = value


def _insert_before_outputs(model: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> None:
    model.graph.node.extend(nodes)  # appended after every producer: still topologically sorted


def _reroute_output(model: onnx.ModelProto, output: str, make) -> None:
    """Output ``output`` is now ``make(old_name)``'s result: the nodes it returns compute a new
    tensor from the old one, which takes the output's name."""
    old = f"mutation.{output}.before"
    for n in model.graph.node:
        for i, name in enumerate(n.output):
            if name == output:
                n.output[i] = old
        for i, name in enumerate(n.input):
            if name == output:
                n.input[i] = old
    _insert_before_outputs(model, make(old, output))


def flipped_topk_order(model: onnx.ModelProto, graph: str) -> None:
    """Prefill: the pruning layer keeps the k LOWEST scores."""
    if graph == "prefill":
        _set_attr(_selection_topk(model), "largest", 0)


def one_fewer_kept(model: onnx.ModelProto, graph: str) -> None:
    """Prefill: the pruning layer keeps k-1 tokens instead of k (both TopKs' k)."""
    if graph != "prefill":
        return
    select = _selection_topk(model)
    k_name = select.input[1]
    (k,) = [numpy_helper.to_array(t) for t in model.graph.initializer if t.name == k_name] or [None]
    if k is None:  # k as a Constant node
        (const,) = [n for n in model.graph.node if n.op_type == "Constant" and n.output[0] == k_name]
        k = numpy_helper.to_array(helper.get_node_attr_value(const, "value"))
    model.graph.initializer.append(numpy_helper.from_array(np.asarray(k - 1, dtype=k.dtype).reshape(k.shape), "mutation.k"))
    for n in model.graph.node:
        if n.op_type == "TopK" and n.input[1] == k_name:
            n.input[1] = "mutation.k"


def dropped_kv_scale(model: onnx.ModelProto, graph: str) -> None:
    """Prefill: layer 0's stored key scales are 1 (the scale dropped; the codes unchanged)."""
    if graph == "prefill":
        _reroute_output(model, "present.0.key_scale", lambda old, new: [helper.make_node("Div", [old, old], [new])])


def perturbed_logits_row(model: onnx.ModelProto, graph: str) -> None:
    """Decode: one vocabulary entry's logit raised by 3 standard deviations of the row."""
    if graph != "decode":
        return
    model.graph.initializer.append(numpy_helper.from_array(np.array([3.0], np.float32), "mutation.three"))
    model.graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), "mutation.axis"))

    def make(old, new):
        vocab = [
            helper.make_node("Shape", [old], ["mutation.shape"]),
            helper.make_node("Gather", ["mutation.shape", "mutation.axis"], ["mutation.vocab"], axis=0),
            helper.make_node("OneHot", ["mutation.token", "mutation.vocab", "mutation.off_on"], ["mutation.hot"]),
        ]
        model.graph.initializer.append(numpy_helper.from_array(np.array([7], np.int64), "mutation.token"))
        model.graph.initializer.append(numpy_helper.from_array(np.array([0.0, 1.0], np.float32), "mutation.off_on"))
        spread = [
            helper.make_node("ReduceMean", [old, "mutation.axis"], ["mutation.mean"], keepdims=1),
            helper.make_node("Sub", [old, "mutation.mean"], ["mutation.centred"]),
            helper.make_node("Mul", ["mutation.centred", "mutation.centred"], ["mutation.sq"]),
            helper.make_node("ReduceMean", ["mutation.sq", "mutation.axis"], ["mutation.var"], keepdims=1),
            helper.make_node("Sqrt", ["mutation.var"], ["mutation.std"]),
            helper.make_node("Mul", ["mutation.std", "mutation.three"], ["mutation.bump"]),
            helper.make_node("Mul", ["mutation.hot", "mutation.bump"], ["mutation.add"]),
            helper.make_node("Add", [old, "mutation.add"], [new]),
        ]
        return vocab + spread

    _reroute_output(model, "logits", make)


def missing_pruning_layer(model: onnx.ModelProto, graph: str) -> None:
    """Prefill: the pruning layer's kept indices are not returned."""
    if graph == "prefill":
        outputs = [o for o in model.graph.output if not o.name.startswith("kept.")]
        del model.graph.output[:]
        model.graph.output.extend(outputs)


def extra_pruning_layer(model: onnx.ModelProto, graph: str) -> None:
    """Prefill: a second set of kept indices (every visual token, as if layer 0 pruned)."""
    if graph != "prefill":
        return
    (kept,) = [o for o in model.graph.output if o.name.startswith("kept.")]
    model.graph.node.append(helper.make_node("Identity", [kept.name], ["kept.0"]))
    extra = onnx.ValueInfoProto()
    extra.CopyFrom(kept)
    extra.name = "kept.0"
    outputs = list(model.graph.output)
    del model.graph.output[:]
    model.graph.output.extend([*outputs[:-1], extra, outputs[-1]])


def unchanged(model: onnx.ModelProto, graph: str) -> None:
    """No change: the control."""


# ------------------------------------------------------------------ the compiles


def _compile(tmp_path: Path, folder: Path, mutation: str, capsys) -> tuple[int, str, Path]:
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "m.yaml", str(folder), out, pruning=PRUNING, verify=VERIFY,
                       export={"passes": [f"{HERE}:{mutation}"]})
    code = main([str(cfg)])
    return code, capsys.readouterr().err, out


def test_the_unmutated_configuration_compiles(tmp_path: Path, small_folder: Path, capsys):
    code, err, out = _compile(tmp_path, small_folder, "unchanged", capsys)
    assert code == 0, err
    assert "export.passes: tests.test_gate_mutations:unchanged" in err  # the pass ran
    assert (out / "m" / "manifest.json").is_file()


@pytest.mark.parametrize(
    "mutation,named",
    [
        ("flipped_topk_order", "kept-set difference(s) at a pruning layer are not near-ties"),
        ("one_fewer_kept", "prefill.onnx failed in onnxruntime"),
        ("dropped_kv_scale", "KV-cache scale relative difference"),
        ("perturbed_logits_row", "teacher-forced logits of the decode graph differ"),
        ("missing_pruning_layer", "kept indices missing"),
        ("extra_pruning_layer", "kept indices missing"),
    ],
)
def test_a_graph_with_one_wrong_node_is_refused(tmp_path: Path, small_folder: Path, capsys, mutation: str, named: str):
    code, err, out = _compile(tmp_path, small_folder, mutation, capsys)
    assert code == 1, err
    assert "verification failed, no bundle written" in err and named in err, err
    assert "Traceback" not in err
    # no bundle and no work folder left behind
    assert not out.exists() or list(out.iterdir()) == []
