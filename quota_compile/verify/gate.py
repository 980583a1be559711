"""Verification: the exported graphs in onnxruntime against the PyTorch simulation.

On held-out samples (generated images and questions, seeded apart from calibration):

- End to end: both sides decode greedily for exactly ``verify.new_tokens`` tokens (EOS
  ignored), each on its own, through the same loop (:func:`quota_compile.runtime.ort.greedy_generate`).
  Gate: every sample's tokens identical (``verify.min_greedy_agreement``). Reported: the
  relative error of the visual embeddings and of the logits at every step up to the first token
  where the two disagree (``||ort - torch|| / ||torch||``; a gate only as far as
  ``verify.max_logits_rel_error`` says), the kept indices' agreement.
- Call by call, on the same inputs (:class:`_SameInputs`): each vision, prefill and decode
  call of the simulation's decode is repeated in onnxruntime on exactly its inputs (its image
  features, its cache, its tokens), in the deployed graph and in two verification-only copies
  of it (:func:`observation_copy`; the bundle's graphs are not touched): a free-running one
  with the activation quantizers' codes and the pruning scores as extra outputs, and a
  teacher-forced one whose quantizer readers read the simulation's codes, so that each
  stretch of float arithmetic between two quantizers starts from the same integers and a
  rounding-boundary flip does not cascade. Compared, as integers (INT4 nibbles unpacked):
  every activation quantizer's codes (mapped to the simulation's by execution order, checked
  by count; the simulation's come from :meth:`QuantLinear.input_codes`) and every KV tensor
  the call writes (codes and zero points; scales reported by their largest relative
  difference). Gate: the teacher-forced flip rate per kind (``verify.max_code_flip_rate``)
  and per tensor (``verify.max_tensor_code_flip_rate``). The free-running figures, cascades
  included, are reported.
- Kept indices at each pruning layer (same inputs, teacher-forced, end to end): a difference
  must be a near-tie of the reference scores (:func:`kept_differences`,
  ``verify.kept_tie_tolerance``); a pruning layer missing on one side is a failure.

What is compared depends on the flavour: the portable graphs show every activation quantizer
(``QuantizeLinear``) and every KV output, and both are teacher-forced; the onnxruntime flavour
shows its activation codes among the nodes its rules wrote for each quantizing operator
(found by provenance, :func:`observation_copy`) and its KV outputs (GroupQueryAttention quantizes the new entry inside the op: the decode's KV
attention is not teacher-forced there); the tensorrt flavour quantizes activations inside its
W4A4 plugin (none observable) and its KV plugins read their own codes (KV outputs compared,
not teacher-forced). verify.json says what was observed (``codes.activations.observed_quantizers``,
``codes.kv_cache.teacher_forced_tensors``).
"""

from __future__ import annotations

import contextlib
import functools
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch

from quota_compile.config import VerifySection
from quota_compile.errors import onnxruntime_errors
from quota_compile.bundle.format import external_tensors
from quota_compile.bundle.schema import GRAPHS, KEPT, KV_REPLACE, PRESENT, kv_name
from quota_compile.runtime.ort import Backend, Batch, Generation, append_kv, greedy_generate, make_batch
from quota_compile.capture.trace import Programs
from quota_compile.data.samples import QUESTIONS, synthetic_images

@dataclass
class CallRecord:
    """What the simulation computed inside one program call (:meth:`TorchBackend.observing`).

    ``codes``: one entry per activation quantizer in execution order (the Linears that read the
    same input share one, as in the graph: ``passes/insert_qdq.py``): the names of those
    Linears and the integer codes of their input (:meth:`QuantLinear.input_codes`).
    ``scores``: one entry per pruning layer of a prefill: ``(layer, score [B, n], the original
    visual indices of the n candidates [B, n])``, the scores its top-k selection ranked.
    """

    codes: list[tuple[list[str], np.ndarray]]
    scores: list[tuple[int, np.ndarray, np.ndarray]]
    # per entry of ``codes``: each code's rounding margin (:func:`quant.ops.rounding_margin`)
    margins: list[np.ndarray] = field(default_factory=list)
    # per (decoder layer, 0 key / 1 value) the call wrote: the margins of the KV codes and
    # (per_token caches) of the zero points, in the layouts of the unpacked codes
    kv_margins: dict[tuple[int, int], tuple[np.ndarray, np.ndarray | None]] = field(default_factory=dict)


class _CodeRecorder:
    """Forward pre-hooks on every :class:`QuantLinear`: the codes of each distinct input."""

    def __init__(self, model: torch.nn.Module, qm=None):
        from quota_compile.quant.simulate import QuantLinear

        self.names = {m: n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
        self.qm = qm
        self.inputs: list[torch.Tensor] = []
        self.codes: list[tuple[list[str], np.ndarray]] = []
        self.margins: list[np.ndarray] = []
        self.kv_margins: dict[tuple[int, int], tuple[np.ndarray, np.ndarray | None]] = {}

    def hook(self, module, args) -> None:
        x = args[0]
        for i, seen in enumerate(self.inputs):  # (the inputs are held, so an id cannot be reused)
            if seen is x:
                self.codes[i][0].append(self.names[module])
                return
        self.inputs.append(x)
        self.codes.append(([self.names[module]], module.input_codes(x).numpy().copy()))
        self.margins.append(module.input_margins(x).numpy().copy())

    def kv(self, layer: int, which: int, x: torch.Tensor) -> None:
        """The programs' ``kv_tap``: the margins of the KV entry the call stores."""
        from quota_compile.quant import ops

        if self.qm is None or not self.qm.simulating:
            return
        if self.qm.kv_granularity == "per_channel":
            if self.qm.kv_scales is None:
                return
            m = ops.kv_static_margins(x, self.qm.kv_scale(layer, which).to(x.device), self.qm.kv_bits)
            self.kv_margins[(layer, which)] = (m.numpy().copy(), None)
        else:
            m, zp = ops.kv_margins(x.to(torch.float32), self.qm.kv_bits)
            self.kv_margins[(layer, which)] = (m.numpy().copy(), zp.numpy().copy())

    def take(self, scores=()) -> CallRecord:
        record = CallRecord(self.codes, list(scores), self.margins, self.kv_margins)
        self.inputs, self.codes, self.margins, self.kv_margins = [], [], [], {}
        return record


class TorchBackend:
    """The eager quantized simulation behind the :class:`~quota_compile.runtime.ort.Backend` interface."""

    def __init__(self, programs: Programs):
        self.p = programs
        self.last: CallRecord | None = None  # set by each call while :meth:`observing`
        self._recorder: _CodeRecorder | None = None

    @property
    def kv_names(self) -> tuple[str, ...]:
        """Names of one layer's KV tensors, in the order the programs return them."""
        return self.p.prefill.kv_names

    @property
    def kv_bits(self) -> int:
        return self.p.prefill.kv_bits

    @contextlib.contextmanager
    def observing(self) -> Iterator[None]:
        """While open, each call leaves in :attr:`last` the activation codes of every quantizer
        it ran and, for a prefill, the scores of each pruning layer."""
        recorder = _CodeRecorder(self.p.prefill._qm.model, self.p.prefill._qm)
        handles = [m.register_forward_pre_hook(recorder.hook) for m in recorder.names]
        programs = [self.p.prefill, self.p.decode]
        for program in programs:
            program.kv_tap = recorder.kv
        self._recorder = recorder
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            for program in programs:
                program.kv_tap = None
            self._recorder, self.last = None, None

    def _done(self, scores=()) -> None:
        if self._recorder is not None:
            self.last = self._recorder.take(scores)

    @staticmethod
    def _np(xs) -> list[np.ndarray]:
        return [x.numpy() for x in xs]

    @torch.no_grad()
    def vision(self, pixel_values):
        out = self.p.vision(torch.from_numpy(pixel_values)).numpy()
        self._done()
        return out

    @torch.no_grad()
    def prefill(self, input_ids, attention_mask, image_features):
        program, scores = self.p.prefill, []

        def observe(layer, h, probs, mask, visual_index):
            # the score this layer's selection ranks (the same function on the same tensors)
            if layer in program.pruning_layers:
                scores.append((layer, program._score(h, probs, mask, visual_index).numpy().copy(), visual_index.numpy().copy()))

        args = (torch.from_numpy(input_ids), torch.from_numpy(attention_mask), torch.from_numpy(image_features))
        out = program.run(*args, observe=observe if self._recorder is not None else None)
        n_kv = 1 + len(program.kv_names) * program.num_layers
        self._done(scores)
        return out[0].numpy(), self._np(out[1:n_kv]), self._np(out[n_kv:])

    @torch.no_grad()
    def decode(self, input_ids, position_ids, attention_mask, past):
        args = [torch.from_numpy(a) for a in (input_ids, position_ids, attention_mask, *past)]
        out = self.p.decode(*args)
        self._done()
        return out[0].numpy(), append_kv(past, self._np(out[1:]))


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return float(np.linalg.norm(a64 - b64) / max(np.linalg.norm(b64), 1e-30))


@dataclass
class Sample:
    question: str
    batch: Batch
    image: object  # the PIL image


def held_out_samples(vlm, cfg: VerifySection, visual_span: tuple[int, int], dataset: str = "synthetic") -> list[Sample]:
    """Verification inputs: generated images with generic questions, or (``dataset:
    shapesvqa``) ShapesVQA test-split samples drawn with ``verify.seed`` (a stream apart from
    the evaluation's)."""
    if dataset == "shapesvqa":
        from quota_compile.data.shapes import vqa_items

        items = vqa_items("test", cfg.seed, cfg.samples, vlm.image_size, vlm.patch_size)
        images, qs = [i.image for i in items], [i.text for i in items]
    else:
        images = synthetic_images(cfg.samples, vlm.image_size, cfg.seed)
        qs = [QUESTIONS[(cfg.seed + i) % len(QUESTIONS)] for i in range(cfg.samples)]
    return [
        Sample(q, make_batch(vlm.processor, vlm.prompt_template, [img], [q], visual_span, vlm.image_token_id), img)
        for img, q in zip(images, qs)
    ]


# ------------------------------------------------------------------ observing the graphs' codes

ACTIVATIONS, KV_CACHE = "activations", "kv_cache"
KINDS = (ACTIVATIONS, KV_CACHE)
_ACTIVATION_DTYPES = (onnx.TensorProto.INT4, onnx.TensorProto.INT8)


def activation_quantizers(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The per-token activation quantizers of a portable graph, in node order (the order in
    which the traced program ran them): ``QuantizeLinear`` to INT4/INT8 along the last axis
    without a zero point (``quant/onnx_translation.py``, ``qdq_per_token``). The KV cache's
    quantizers are unsigned with zero points and are not among them."""
    found = []
    for n in model.graph.node:
        if n.op_type != "QuantizeLinear" or n.domain not in ("", "ai.onnx") or len(n.input) != 2:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        if attrs.get("output_dtype") in _ACTIVATION_DTYPES and attrs.get("axis") == -1:
            found.append(n)
    return found


@dataclass
class _Point:
    """Where a flavour graph holds the codes of the portable graph's ``index``-th activation
    quantizer: ``tensor`` (codes, or codes + ``offset`` as uint8; ``dtype`` its ONNX type),
    exposed as ``output``; with teacher forcing, its readers read ``feed`` instead."""

    index: int
    tensor: str
    offset: int
    dtype: int
    output: str
    feed: str | None = None


@dataclass
class ObservationCopy:
    model: onnx.ModelProto | None  # None once a session holds it (see _Copy)
    points: list[_Point]
    scores: list[str]  # outputs: the scores ranked by each pruning layer, in order
    kv_feeds: list[str]  # teacher forcing: the present.* tensors whose readers read verify.reference.<name>


FX_NODE_KEY = "pkg.torch.onnx.fx_node"


def _operator(node: onnx.NodeProto) -> str | None:
    """The traced program's operator a node was written for: the FX node the exporter stamps on
    every node it writes (``%w4a4_linear_3 : ... = call_function[...]``), by its name. A
    flavour's rules keep the stamps of the semantic node they replace."""
    stamp = next((p.value for p in node.metadata_props if p.key == FX_NODE_KEY), None)
    return stamp.split(" ", 1)[0] if stamp else None


def _flavour_codes(nodes: list[onnx.NodeProto], produced: dict, consumers: dict) -> list[tuple[str, int]]:
    """Where a flavour's nodes written for one operator (``nodes``) hold that operator's
    activation codes, as ``(tensor, ONNX type)``: a ``Clip(Round(Div(x, s)))`` that a ``Mul``
    rescales (the codes as float), and the uint8 codes a ``MatMulIntegerToFloat`` reads (codes
    plus 2^(bits-1)); none where the operator quantizes inside one node (a plugin)."""
    found = []
    for n in nodes:
        if n.op_type == "Clip" and any(c.op_type == "Mul" for c in consumers.get(n.output[0], [])):
            rounded = produced.get(n.input[0])
            if rounded is not None and rounded.op_type == "Round":
                found.append((n.output[0], onnx.TensorProto.FLOAT))
        elif n.op_type == "MatMulIntegerToFloat" and (n.input[0], onnx.TensorProto.UINT8) not in found:
            found.append((n.input[0], onnx.TensorProto.UINT8))
    return found


def observation_copy(model: onnx.ModelProto, quantizers: list[onnx.NodeProto], teacher_forced: bool = False) -> ObservationCopy:
    """A verification-only copy of ``model`` (a portable graph or a flavour derived from it)
    whose extra outputs are the codes of each activation quantizer of the portable graph
    (``quantizers``) that this graph still computes, and the scores each pruning layer's TopK
    ranks. The original outputs come first; the bundle's graphs are not touched.

    Where a quantizer's codes are: the portable graph's own ``QuantizeLinear`` output (INT4 or
    INT8); in a flavour translated from the semantic graph (the onnxruntime flavour's rules),
    among the nodes written for the same operator of the traced program (:func:`_operator`):
    the float codes before the rescaling ``Mul`` and/or the uint8 codes a
    ``MatMulIntegerToFloat`` reads (:func:`_flavour_codes`). The tensorrt flavour quantizes
    inside its W4A4 plugin: none there.

    ``teacher_forced``: every reader of those codes, and every reader of a ``present.*`` KV
    output other than its own quantizer (the attention's dequantization), reads an extra input
    instead (``verify.reference.*``), to be fed with the simulation's codes and KV tensors. The
    graph's own codes are still computed and returned, but each stretch of float arithmetic
    between two quantizers then starts from the simulation's codes, so a difference shows where
    it arises and does not cascade: a code that flips there is a rounding-boundary case of that
    stretch alone (or a wrong graph)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    produced = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    by_operator: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        if (key := _operator(n)) is not None:
            by_operator.setdefault(key, []).append(n)
    points: list[_Point] = []
    for i, q in enumerate(quantizers):
        dtype = next(onnx.helper.get_attribute_value(a) for a in q.attribute if a.name == "output_dtype")
        off = 2 ** ((4 if dtype == onnx.TensorProto.INT4 else 8) - 1)
        own = produced.get(q.output[0])
        # (a graph translated separately names its values on its own: the same name there can
        # be another tensor)
        if own is not None and own.op_type == "QuantizeLinear" and _operator(own) == _operator(q) and own.attribute == q.attribute:
            candidates = [(q.output[0], 0, dtype)]
        else:
            candidates = [(t, off if d == onnx.TensorProto.UINT8 else 0, d) for t, d in _flavour_codes(by_operator.get(_operator(q), []), produced, consumers)]
        for tensor, offset, kind in candidates:
            points.append(_Point(i, tensor, offset, kind, f"verify.activation.{len(points)}"))
    # select_topk: a TopK of the scores whose indices a second TopK sorts (onnx_translation)
    topk = [n for n in graph.node if n.op_type == "TopK" and any(c.op_type == "TopK" for c in consumers.get(n.output[1], []))]
    scores = [f"verify.score.{j}" for j in range(len(topk))]
    kv_feeds: list[str] = []
    new_nodes, new_inputs = [], []

    def redirect(tensor: str, feed: str, keep=lambda n: False) -> bool:
        readers = [n for n in consumers.get(tensor, []) if not keep(n)]
        for n in readers:
            for k, name in enumerate(n.input):
                if name == tensor:
                    n.input[k] = feed
        return bool(readers)

    if teacher_forced:
        for p in points:
            p.feed = f"verify.reference.activation.{p.output.rsplit('.', 1)[1]}"
            if p.dtype in (onnx.TensorProto.INT4, onnx.TensorProto.INT8):  # fed as int8, cast to the quantizer's type
                new_inputs.append(onnx.helper.make_tensor_value_info(p.feed, onnx.TensorProto.INT8, None))
                new_nodes.append(onnx.helper.make_node("Cast", [p.feed], [f"{p.feed}.cast"], to=p.dtype))
                redirect(p.tensor, f"{p.feed}.cast")
            else:
                new_inputs.append(onnx.helper.make_tensor_value_info(p.feed, p.dtype, None))
                redirect(p.tensor, p.feed)
        types = {o.name: o.type.tensor_type.elem_type for o in graph.output}
        for o in [o.name for o in graph.output if o.name.startswith(PRESENT)]:
            feed = f"verify.reference.{o}"
            if redirect(o, feed, keep=lambda n: n.op_type == "QuantizeLinear"):
                kv_feeds.append(o)
                new_inputs.append(onnx.helper.make_tensor_value_info(feed, types[o], None))
    for p in points:
        new_nodes.append(onnx.helper.make_node("Cast", [p.tensor], [p.output], to=onnx.TensorProto.INT16))
        graph.output.append(onnx.helper.make_tensor_value_info(p.output, onnx.TensorProto.INT16, None))
    for n, name in zip(topk, scores):
        new_nodes.append(onnx.helper.make_node("Identity", [n.input[0]], [name]))
        graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    graph.input.extend(new_inputs)
    # the casts of fed codes must precede their readers: put every new node first where it can go
    first = [n for n in new_nodes if all(i in {v.name for v in graph.input} for i in n.input)]
    rest = [n for n in new_nodes if n not in first]
    nodes = first + list(graph.node) + rest
    del graph.node[:]
    graph.node.extend(nodes)
    return ObservationCopy(out, points, scores, kv_feeds)


def _ort_session(model: onnx.ModelProto, folder: Path | None = None):
    """An onnxruntime session of an observation copy, with the options of the deployed graphs
    but without the CPU memory arena (``session_options(arena=False)``: what a run allocates is
    freed when it ends, so each of the copies holds no more than its weights between runs).

    ``folder``: where the copy's external weights are (the bundle folder of the graph it copies,
    loaded without its weights): the copy is written there under a temporary name, opened from
    that file and deleted, so that onnxruntime reads the weights from the folder's weights file
    and no protobuf of the copy holds them (its large tensors are aligned so that onnxruntime
    may map them rather than copy them; whether it does is its choice)."""
    import tempfile

    import onnxruntime as ort

    from quota_compile.runtime.ort import session_options

    options = session_options(arena=False)
    if folder is not None:
        fd, name = tempfile.mkstemp(prefix=".verify-", suffix=".onnx", dir=folder)
        try:
            with open(fd, "wb") as f:
                f.write(model.SerializeToString())
            return ort.InferenceSession(name, options, providers=["CPUExecutionProvider"])
        finally:
            Path(name).unlink()
    if model.ByteSize() < (1 << 31) - (1 << 26):
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    with tempfile.TemporaryDirectory() as tmp:  # over protobuf's 2 GB: through a file with external data
        path = Path(tmp) / "copy.onnx"
        onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location="copy.onnx.data")
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def weight_bytes(model: onnx.ModelProto) -> int:
    """The bytes of ``model``'s initializers, in the graph or in an external file."""
    inline = sum(len(t.raw_data) or onnx.numpy_helper.to_array(t).nbytes
                 for t in model.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL)
    return inline + sum(length for *_, length in external_tensors(model))


@dataclass
class Observation:
    """One run of an observation copy: its outputs by name (the graph's own), the codes of
    each observed activation quantizer (portable index -> one array per place the flavour
    holds them) and the scores ranked by each pruning layer."""

    outputs: dict[str, np.ndarray]
    codes: dict[int, list[np.ndarray]]
    scores: list[np.ndarray]

    @property
    def first(self) -> np.ndarray:
        return next(iter(self.outputs.values()))

    def kv(self) -> list[np.ndarray]:
        return [v for k, v in self.outputs.items() if k.startswith(PRESENT)]

    def kept(self) -> list[np.ndarray]:
        return [v for k, v in self.outputs.items() if k.startswith(KEPT)]


class _Copy:
    def __init__(self, copy: ObservationCopy, session, graph: str, keep_model: bool = False):
        self.copy, self.graph = copy, graph
        with onnxruntime_errors(f"the verification copy of {graph}.onnx does not load in onnxruntime"):
            self.session = session(copy.model)
        # the session holds the weights (its own copy, or the pages it maps from the bundle's
        # weights file): a protobuf holding them too (a full copy of the graph's weights per
        # observation copy, six per flavour) is released here
        if not keep_model:
            copy.model = None
        extra = {p.output for p in copy.points} | set(copy.scores)
        self.inputs = [i.name for i in self.session.get_inputs() if not i.name.startswith("verify.reference.")]
        self.outputs = [o.name for o in self.session.get_outputs() if o.name not in extra]

    def run(self, values: list[np.ndarray], feeds: dict[str, np.ndarray] | None = None) -> Observation:
        points, scores = self.copy.points, self.copy.scores
        names = [*self.outputs, *(p.output for p in points), *scores]
        with onnxruntime_errors(f"the verification copy of {self.graph}.onnx failed in onnxruntime"):
            out = self.session.run(names, {**dict(zip(self.inputs, values)), **(feeds or {})})
        n = len(self.outputs)
        codes: dict[int, list[np.ndarray]] = {}
        for p, c in zip(points, out[n : n + len(points)]):
            codes.setdefault(p.index, []).append(c.astype(np.int16) - p.offset)
        return Observation(dict(zip(self.outputs, out[:n])), codes, list(out[n + len(points) :]))


# Above this many bytes of weights in a flavour's three graphs, a CodeProbe reading them from the
# bundle's folder keeps only one graph's observation copies open at a time (each session holds
# what onnxruntime derives from the weights: pre-packed float matrices, fused INT4 blocks).
RESIDENT_COPIES_BYTES = 1 << 30


class CodeProbe:
    """The observation copies (:func:`observation_copy`) of one flavour's three graphs, free
    running and teacher-forced, in sessions of their own. ``portable``: the portable graphs
    (they define the quantizers); ``flavour``: the graphs to observe (default: the portable
    ones); ``session``: how to open one (the tensorrt flavour's need its custom ops).

    ``folder``: the bundle folder the observed graphs were written to, which they were loaded
    back from without their weights (``onnx.load(..., load_external_data=False)``): the copies
    are then opened from files there and read the folder's weights file (:func:`_ort_session`).
    If their weights exceed ``resident_bytes``, only the copies of the graph last run stay
    open: a call to another graph closes them and opens that graph's (the verification runs
    vision, prefill, then the decode steps, so this opens each graph's copies once per sample)."""

    def __init__(self, portable: dict[str, onnx.ModelProto], flavour: dict[str, onnx.ModelProto] | None = None, session=None,
                 folder: Path | None = None, resident_bytes: int = RESIDENT_COPIES_BYTES):
        flavour = flavour or portable
        if session is None:
            session = (lambda model: _ort_session(model, folder)) if folder is not None else _ort_session
        self._session = session
        self.quantizers: dict[str, int] = {}
        self.observed: dict[str, int] = {}
        self.kv_forced: dict[str, int] = {}
        self._copies: dict[str, tuple[ObservationCopy, ObservationCopy]] = {}
        for g in GRAPHS:
            quantizers = activation_quantizers(portable[g])
            self.quantizers[g] = len(quantizers)
            free, forced = observation_copy(flavour[g], quantizers), observation_copy(flavour[g], quantizers, teacher_forced=True)
            self._copies[g] = (free, forced)
            self.observed[g] = len({p.index for p in free.points})
            self.kv_forced[g] = len(forced.kv_feeds)
        # one graph at a time only where the copies' protobufs hold no weights (they are kept to reopen)
        self.one_at_a_time = folder is not None and sum(weight_bytes(flavour[g]) for g in GRAPHS) > resident_bytes
        self.opened = 0  # sessions opened so far
        self._open: dict[str, tuple[_Copy, _Copy]] = {}
        if not self.one_at_a_time:
            for g in GRAPHS:
                self._sessions(g)

    def _sessions(self, graph: str) -> tuple[_Copy, _Copy]:
        if graph not in self._open:
            if self.one_at_a_time:
                self._open.clear()  # the other graph's sessions go before this one's open
            free, forced = self._copies[graph]
            self._open[graph] = (_Copy(free, self._session, graph, self.one_at_a_time), _Copy(forced, self._session, graph, self.one_at_a_time))
            self.opened += 2
        return self._open[graph]

    def kv_feeds(self, graph: str) -> list[str]:
        """The ``present.*`` outputs the teacher-forced copy of ``graph`` reads from the simulation."""
        return self._copies[graph][1].kv_feeds

    def run(self, graph: str, values: list[np.ndarray]) -> Observation:
        return self._sessions(graph)[0].run(values)

    def run_forced(self, graph: str, values: list[np.ndarray], codes: list[np.ndarray], kv: dict[str, np.ndarray]) -> Observation:
        """The teacher-forced copy: ``codes`` the simulation's, per portable quantizer;
        ``kv`` the simulation's KV outputs by name (``present.<layer>.<tensor>``)."""
        forced = self._sessions(graph)[1]
        feeds = {}
        for p in forced.copy.points:
            ref = codes[p.index]
            if p.dtype == onnx.TensorProto.FLOAT:
                feeds[p.feed] = ref.astype(np.float32)
            elif p.dtype == onnx.TensorProto.UINT8:
                feeds[p.feed] = (ref.astype(np.int16) + p.offset).astype(np.uint8)
            else:
                feeds[p.feed] = ref.astype(np.int8)
        feeds.update({f"verify.reference.{name}": kv[name] for name in forced.copy.kv_feeds})
        return forced.run(values, feeds)


# ------------------------------------------------------------------ counting code flips


def unpack_kv(codes: np.ndarray, bits: int) -> np.ndarray:
    """Stored KV codes with INT4 nibbles unpacked (two codes per byte, low nibble first)."""
    return np.stack([codes & 0xF, codes >> 4], axis=-1).reshape(*codes.shape[:-1], -1) if bits == 4 else codes


@dataclass
class _Count:
    flips: int = 0
    compared: int = 0
    max_step: int = 0

    def add(self, ref: np.ndarray, got: np.ndarray) -> int:
        if ref.shape != got.shape:  # a different shape: every code differs
            n = max(ref.size, got.size)
            self.flips, self.compared = self.flips + n, self.compared + n
            return n
        d = np.abs(ref.astype(np.int32) - got.astype(np.int32))
        n = int(np.count_nonzero(d))
        self.flips, self.compared = self.flips + n, self.compared + ref.size
        self.max_step = max(self.max_step, int(d.max(initial=0)))
        return n

    def merge(self, other: _Count) -> None:
        self.flips += other.flips
        self.compared += other.compared
        self.max_step = max(self.max_step, other.max_step)

    def doc(self) -> dict:
        return {"flips": self.flips, "compared": self.compared, "rate": self.flips / self.compared if self.compared else None, "max_step": self.max_step}


@dataclass
class _Tally:
    """Code flips per tensor (an activation quantizer, or one KV tensor of one layer, over all
    the calls and samples that ran it), per kind and per graph; what was left out."""

    tensors: dict = field(default_factory=dict)  # (kind, graph, where) -> _Count
    excluded: int = 0
    kv_scale_rel_diff: float = 0.0
    kv_scale_where: str | None = None  # the KV scale tensor with the largest relative difference
    problems: list[str] = field(default_factory=list)

    def add(self, kind: str, graph: str, where: str, ref: np.ndarray, got: np.ndarray) -> None:
        self.tensors.setdefault((kind, graph, where), _Count()).add(ref, got)

    def merge(self, other: _Tally) -> None:
        for key, c in other.tensors.items():
            self.tensors.setdefault(key, _Count()).merge(c)
        self.excluded += other.excluded
        self.add_scale_difference(other.kv_scale_where, other.kv_scale_rel_diff)
        self.problems += [p for p in other.problems if p not in self.problems]

    def add_scale_difference(self, where: str | None, d: float) -> None:
        if where is not None and (self.kv_scale_where is None or d > self.kv_scale_rel_diff):
            self.kv_scale_rel_diff, self.kv_scale_where = d, where

    def total(self, kind: str, graph: str | None = None) -> _Count:
        c = _Count()
        for (k, g, _), one in self.tensors.items():
            if k == kind and graph in (None, g):
                c.merge(one)
        return c

    def flipped(self, kind: str) -> list[tuple[str, _Count]]:
        """The tensors of ``kind`` with a flip, highest rate first."""
        found = [(where, c) for (k, _, where), c in self.tensors.items() if k == kind and c.flips]
        return sorted(found, key=lambda wc: -wc[1].flips / wc[1].compared)

    def doc(self) -> dict:
        out = {}
        for k in KINDS:
            out[k] = {
                **self.total(k).doc(),
                "tensors": len([1 for key in self.tensors if key[0] == k]),
                "graphs": {g: self.total(k, g).doc() for g in GRAPHS},
                "tensors_with_flips": [{"where": w, **c.doc()} for w, c in self.flipped(k)[:10]],
            }
        out["excluded_after_kept_difference"] = self.excluded
        out["max_kv_scale_rel_difference"] = self.kv_scale_rel_diff
        out["max_kv_scale_rel_difference_at"] = self.kv_scale_where
        return out


_LAYER = re.compile(r"\.layers\.(\d+)\.")


def _decoder_layer(linear: str) -> int | None:
    m = _LAYER.search(linear)
    return int(m.group(1)) if m else None


# ------------------------------------------------------------------ kept-set differences


def score_scale(scores: np.ndarray) -> float:
    """The unit of kept-set margins: the spread of one pruning layer's candidate scores
    (largest minus smallest). Not their magnitude: near-uniform scores (an untrained model's
    attention) differ from each other by a small fraction of their size, and a margin on
    that scale would call any exchange of tokens a tie."""
    return max(float(np.max(scores) - np.min(scores)), 1e-30)


def kept_differences(ref_kept: list[np.ndarray], got_kept: list[np.ndarray], scores: list | None, tolerance: float, source: str) -> list[dict]:
    """One entry per pruning layer (batch of one): ``identical``; ``near_tie`` / ``not_a_tie``
    for the first layer whose kept sets differ (every token in one set only sits within
    ``tolerance`` x the score scale (the spread of the layer's candidate scores: largest minus
    smallest) of the k-th
    largest reference score, or not); ``downstream`` for the layers after it (their
    candidates already differ); ``missing`` for a pruning layer one side did not return.
    ``scores``: the reference's ``(layer, score, candidates)`` per pruning layer
    (:class:`CallRecord`), or None (then a difference cannot be shown to be a tie)."""
    rows, differed = [], False
    for j in range(max(len(ref_kept), len(got_kept))):
        layer = scores[j][0] if scores and j < len(scores) else None
        row = {"pruning_layer": layer, "index": j, "source": source}
        if j >= len(ref_kept) or j >= len(got_kept):
            who = "onnxruntime" if j >= len(got_kept) else "the reference"
            rows.append({**row, "status": "missing", "detail": f"{who} returned no kept indices for it"})
            continue
        r, g = np.asarray(ref_kept[j]), np.asarray(got_kept[j])
        if r.shape == g.shape and np.array_equal(r, g):
            rows.append({**row, "status": "identical"})
            continue
        if differed:
            rows.append({**row, "status": "downstream"})
            continue
        differed = True
        only_ref = sorted(set(r.reshape(-1).tolist()) - set(g.reshape(-1).tolist()))
        only_got = sorted(set(g.reshape(-1).tolist()) - set(r.reshape(-1).tolist()))
        row.update(only_reference=only_ref, only_onnxruntime=only_got)
        if r.shape != g.shape or r.shape[0] != 1 or scores is None or j >= len(scores):
            why = "different numbers of kept tokens" if r.shape != g.shape else "no reference scores to compare with"
            rows.append({**row, "status": "not_a_tie", "margin": None, "detail": why})
            continue
        _, s, candidates = scores[j]
        s, candidates = s[0].astype(np.float64), candidates[0]
        kth = np.sort(s)[::-1][r.shape[1] - 1]
        scale = score_scale(s)
        at = {int(t): i for i, t in enumerate(candidates)}
        if any(t not in at for t in only_ref + only_got):
            rows.append({**row, "status": "not_a_tie", "margin": None, "detail": "a kept token was not a candidate"})
            continue
        margin = max(abs(s[at[t]] - kth) for t in only_ref + only_got) / scale
        rows.append({**row, "status": "near_tie" if margin <= tolerance else "not_a_tie", "margin": float(margin)})
    return rows


def after_rounding_ties(firsts: list[dict]) -> bool:
    """Whether a sample's free-running differences all follow rounding-boundary cases: it had
    some, and each call's first code difference (:meth:`_SameInputs._first_difference`) was a
    tie. What explains a greedy divergence and a kept-set difference alike."""
    return bool(firsts) and all(f["tie"] for f in firsts)


def kept_after_rounding_ties(kept: list[dict], end_to_end: list[dict], firsts: list[dict]) -> int:
    """Mark as ``after_rounding_tie`` the kept-set differences of one sample that a rounding
    tie upstream explains, and return how many. ``kept``: its same-inputs and teacher-forced
    rows (:func:`kept_differences`), ``end_to_end``: its end-to-end rows, ``firsts``: the
    first code difference of each of its calls (:meth:`_SameInputs._first_difference`).

    A free-running difference is explained when the teacher-forced graph, given the
    simulation's codes, kept the same sets at every pruning layer (or near-ties), and each
    call's first code difference was a rounding-boundary case (for the prefill: a code of a
    layer before the pruning layer, one step, at a tie): what the pruning layer ranked then
    differed only because such a code did, as a greedy divergence after a rounding tie
    (``verify.min_greedy_agreement``). Only differences with a margin (the same number of
    kept tokens, all of them candidates) are marked; without teacher-forced rows (no
    observation copies) none is."""
    forced = [r for r in kept if r["source"] == "teacher forced"]
    if not forced or any(r["status"] not in ("identical", "near_tie", "downstream") for r in forced):
        return 0
    if not after_rounding_ties(firsts):
        return 0
    marked = 0
    for r in [*kept, *end_to_end]:
        if r["source"] != "teacher forced" and r["status"] == "not_a_tie" and r.get("margin") is not None:
            r["status"] = "after_rounding_tie"
            marked += 1
    return marked


def _score_difference(ref_scores: list, got_scores: list[np.ndarray]) -> float | None:
    """Largest ``|onnxruntime - reference|`` of a pruning layer's scores, over its score scale,
    up to the first layer whose candidates differ in length."""
    worst = None
    for (_, s, _), g in zip(ref_scores, got_scores):
        if s.shape != g.shape:
            break
        d = float(np.abs(g.astype(np.float64) - s).max()) / score_scale(s)
        worst = d if worst is None else max(worst, d)
    return worst


# ------------------------------------------------------------------ the same inputs on both sides


class _SameInputs:
    """A :class:`~quota_compile.runtime.ort.Backend` that runs the reference and then, on exactly
    the reference's inputs (its image features, its cache, its tokens), the runtime's graph,
    and compares what each call computed. It returns the reference's results, so a greedy
    decode through it is the reference's decode.

    Three runs of each graph call on those inputs: the deployed graph (``got``: its kept
    indices, and its KV codes, counted in :attr:`free`); the free-running observation copy
    (its activation codes, counted in :attr:`free`; its first output must equal the deployed
    graph's bit for bit); the teacher-forced copy (activation and KV codes, counted in
    :attr:`forced`, the figures the gate reads)."""

    def __init__(self, ref, got, probe: CodeProbe | None, tolerance: float, tie_tolerance: float = 0.0):
        self.ref, self.got, self.probe, self.tolerance, self.tie_tolerance = ref, got, probe, tolerance, tie_tolerance
        self.free, self.forced = _Tally(), _Tally()
        self.kept: list[dict] = []
        self.scores: list | None = None  # the reference prefill's pruning scores
        self.score_difference: float | None = None
        self.copy_matches: dict[str, bool] = {}
        # per graph: the teacher-forced copy's first output (features or logits) against the
        # simulation's, relative; what the codes cannot show (the float tail after the last
        # quantizer: norms, lm_head)
        self.forced_output: dict[str, float] = {}
        self.kv_names = getattr(ref, "kv_names", None)
        self.kv_bits = getattr(ref, "kv_bits", None)
        # per call whose free-running codes differ from the simulation's on the same inputs:
        # the first difference in the order the call computes (:meth:`_first_difference`)
        self.firsts: list[dict] = []

    def _kv_by_name(self, kv: list[np.ndarray]) -> dict[str, np.ndarray]:
        per = len(self.kv_names)
        return {kv_name(PRESENT, i // per, self.kv_names[i % per]): x for i, x in enumerate(kv)}

    def _observe(self, graph: str, values: list[np.ndarray], deployed_first: np.ndarray, kv: list[np.ndarray] | None):
        """``(free-running, teacher-forced)`` observations, or Nones without a probe or a record."""
        record = getattr(self.ref, "last", None)
        if self.probe is None or record is None:
            return None, None
        free = self.probe.run(graph, values)
        # the copy computes what the deployed graph computes, bit for bit, or says so
        self.copy_matches[graph] = self.copy_matches.get(graph, True) and bool(np.array_equal(free.first, deployed_first))
        if len(record.codes) != self.probe.quantizers[graph]:
            problem = f"the {graph} graph has {self.probe.quantizers[graph]} activation quantizers, the simulation ran {len(record.codes)}"
            if problem not in self.forced.problems:
                self.forced.problems.append(problem)
            return None, None
        by_name = self._kv_by_name(kv) if kv is not None and self.kv_names is not None else {}
        if any(n not in by_name for n in self.probe.kv_feeds(graph)):
            return free, None
        return free, self.probe.run_forced(graph, values, [c for _, c in record.codes], by_name)

    def _activations(self, tally: _Tally, graph: str, obs: Observation | None, stop_layer: int | None = None) -> None:
        record = getattr(self.ref, "last", None)
        if obs is None or record is None:
            return
        stopped = False
        for i, (linears, codes) in enumerate(record.codes):
            layer = _decoder_layer(linears[0])
            stopped = stopped or (stop_layer is not None and (layer is None or layer >= stop_layer))
            for got in obs.codes.get(i, []):
                if stopped:
                    tally.excluded += codes.size
                else:
                    tally.add(ACTIVATIONS, graph, f"{graph}: {', '.join(linears)}", codes, got)

    def _kv(self, tally: _Tally, graph: str, ref: list[np.ndarray], got: list[np.ndarray], stop_layer: int | None = None) -> None:
        if self.kv_names is None:
            return
        per = len(self.kv_names)
        if len(ref) != len(got):
            problem = f"the {graph} graph returned {len(got)} KV tensors, the simulation {len(ref)}"
            if problem not in tally.problems:
                tally.problems.append(problem)
            return
        for i, (r, g) in enumerate(zip(ref, got)):
            layer, name = i // per, self.kv_names[i % per]
            if stop_layer is not None and layer >= stop_layer:
                tally.excluded += r.size
            elif name.endswith("_scale"):
                where = f"{graph}: layer {layer} {name}"
                if r.shape != g.shape:
                    problem = f"{where} has shape {list(g.shape)}, the simulation's {list(r.shape)}"
                    if problem not in tally.problems:
                        tally.problems.append(problem)
                elif r.size:
                    d = float(np.max(np.abs(g.astype(np.float64) - r) / np.maximum(np.abs(r), 1e-30)))
                    tally.add_scale_difference(where, d)
            elif name.endswith("_zero_point"):
                tally.add(KV_CACHE, graph, f"{graph}: layer {layer} {name}", r, g)
            else:
                tally.add(KV_CACHE, graph, f"{graph}: layer {layer} {name}", unpack_kv(r, self.kv_bits), unpack_kv(g, self.kv_bits))

    def _first_difference(self, graph: str, free: Observation | None, ref_kv: list[np.ndarray] | None,
                          got_kv: list[np.ndarray] | None, stop: int | None = None) -> None:
        """Note where this call's free-running graph first computes other codes than the
        simulation, both on the same inputs, in the order the call computes them: a decoder
        layer's input quantizer (its first), then its key and value, then its other quantizers;
        a kept-set difference at a pruning layer comes before that layer. Everything after the
        first difference may be its consequence; the first one alone is a rounding-boundary
        case (``tie``) when each of its codes moved by one step and each of them was, in the
        simulation, within ``verify.rounding_tie_tolerance`` code steps of a rounding boundary
        (:func:`quota_compile.quant.ops.rounding_margin`), or when it is a near-tie kept set.
        Nothing is noted for a call that computes the same codes."""
        record = getattr(self.ref, "last", None)
        if record is None:
            return
        complete = free is not None and self.probe is not None and self.probe.observed[graph] == self.probe.quantizers[graph]
        events = []  # (order, where, ref codes, [got codes], ref margins)
        starts: set[int] = set()
        for i, (linears, codes) in enumerate(record.codes):
            layer = 0 if graph == "vision" else _decoder_layer(linears[0])
            layer = 10**9 if layer is None else layer
            first_of_layer = graph != "vision" and layer not in starts
            starts.add(layer)
            margins = record.margins[i] if i < len(record.margins) else None
            got = free.codes.get(i, []) if free is not None else []
            events.append(((layer, 0 if first_of_layer else 2, i), f"{graph}: {', '.join(linears)}", codes, got, margins))
        if ref_kv is not None and got_kv is not None and self.kv_names is not None and len(ref_kv) == len(got_kv):
            per = len(self.kv_names)
            for j, (r, g) in enumerate(zip(ref_kv, got_kv)):
                layer, name = j // per, self.kv_names[j % per]
                which = 0 if name.startswith("key") else 1
                margins = record.kv_margins.get((layer, which))
                if name.endswith("_scale"):
                    continue
                if name.endswith("_zero_point"):
                    events.append(((layer, 1, 2 * which + 1), f"{graph}: layer {layer} {name}", r, [g], None if margins is None else margins[1]))
                else:
                    r, g = unpack_kv(r, self.kv_bits), unpack_kv(g, self.kv_bits)
                    events.append(((layer, 1, 2 * which), f"{graph}: layer {layer} {name}", r, [g], None if margins is None else margins[0]))
        first = None
        for order, where, ref, gots, margins in sorted(events, key=lambda e: e[0]):
            if stop is not None and order[0] >= stop:
                break
            flips, step, margin, same_shape = 0, 0, 0.0, True
            for got in gots:
                if got.shape != ref.shape:
                    same_shape = False
                    flips += max(got.size, ref.size)
                    continue
                d = np.abs(ref.astype(np.int32) - got.astype(np.int32))
                n = int(np.count_nonzero(d))
                if n:
                    flips += n
                    step = max(step, int(d.max()))
                    if margins is not None and margins.shape == ref.shape:
                        margin = max(margin, float(margins[d != 0].max()))
                    else:
                        margin = float("inf")
            if flips:
                tie = same_shape and complete and step == 1 and margin <= self.tie_tolerance
                first = {"graph": graph, "where": where, "flips": flips, "max_step": step, "max_margin": margin, "tie": tie}
                break
        if first is None and stop is not None:
            kept = next(r for r in self.kept if r["status"] != "identical")
            first = {"graph": graph, "where": f"kept set at pruning layer {kept['pruning_layer']}", "flips": None, "max_step": None,
                     "max_margin": kept.get("margin"), "tie": kept["status"] == "near_tie"}
        if first is not None:
            self.firsts.append(first)

    def _forced_output(self, graph: str, forced: Observation | None, ref: np.ndarray) -> None:
        if forced is not None:
            self.forced_output[graph] = max(self.forced_output.get(graph, 0.0), _rel(forced.first, ref))

    def vision(self, pixel_values):
        feats = self.ref.vision(pixel_values)
        got = self.got.vision(pixel_values)
        free, forced = self._observe("vision", [pixel_values], got, None)
        self._first_difference("vision", free, None, None)
        self._activations(self.free, "vision", free)
        self._activations(self.forced, "vision", forced)
        self._forced_output("vision", forced, feats)
        return feats

    def _stop(self, kept: list[dict]) -> int | None:
        """The decoder layer from which a prefill's tensors hold other tokens than the
        reference's (its first pruning layer with another kept set), or None."""
        first = next((r for r in kept if r["status"] != "identical"), None)
        return None if first is None else (first["pruning_layer"] if first["pruning_layer"] is not None else 0)

    def prefill(self, input_ids, attention_mask, image_features):
        logits, kv, kept = self.ref.prefill(input_ids, attention_mask, image_features)
        record = getattr(self.ref, "last", None)
        self.scores = record.scores if record is not None else None
        g_logits, g_kv, g_kept = self.got.prefill(input_ids, attention_mask, image_features)
        values = [input_ids, attention_mask, image_features]
        free, forced = self._observe("prefill", values, g_logits, kv)
        self.kept = kept_differences(kept, g_kept, self.scores, self.tolerance, "same inputs")
        stop = self._stop(self.kept)
        self._first_difference("prefill", free, kv, g_kv, stop)
        self._kv(self.free, "prefill", kv, g_kv, stop)
        self._activations(self.free, "prefill", free, stop)
        if free is not None and self.scores:
            self.score_difference = _score_difference(self.scores, free.scores)
        if forced is not None:
            forced_kept = kept_differences(kept, forced.kept(), self.scores, self.tolerance, "teacher forced")
            self.kept += forced_kept
            stop = self._stop(forced_kept)
            self._kv(self.forced, "prefill", kv, forced.kv(), stop)
            self._activations(self.forced, "prefill", forced, stop)
            if stop is None:  # (after a kept-set difference the logits are of other tokens)
                self._forced_output("prefill", forced, logits)
        return logits, kv, kept

    def decode(self, input_ids, position_ids, attention_mask, past):
        logits, cache = self.ref.decode(input_ids, position_ids, attention_mask, past)
        g_logits, g_cache = self.got.decode(input_ids, position_ids, attention_mask, past)
        # what this step wrote: the entries after the given past (either cache protocol)
        new = [c[:, :, p.shape[2] :] for c, p in zip(cache, past)]
        values = [input_ids, position_ids, attention_mask, *past]
        free, forced = self._observe("decode", values, g_logits, new)
        g_new = [c[:, :, p.shape[2] :] for c, p in zip(g_cache, past)]
        self._first_difference("decode", free, new, g_new)
        self._kv(self.free, "decode", new, g_new)
        self._activations(self.free, "decode", free)
        if forced is not None:
            written = forced.kv()  # the graph's own outputs: the whole cache (GroupQueryAttention) or the new entries
            if getattr(self.got, "kv_update", None) == KV_REPLACE:
                written = [c[:, :, p.shape[2] :] for c, p in zip(written, past)]
            self._kv(self.forced, "decode", new, written)
            self._activations(self.forced, "decode", forced)
            self._forced_output("decode", forced, logits)
        return logits, cache


def compare(ref: Generation, got: Generation, scores: list | None = None, tolerance: float = 0.0) -> dict:
    """Figures for one sample (batch of one), end to end (each side decoding on its own).
    ``scores``: the reference's pruning scores (:class:`CallRecord`), for the tie test of a
    kept-set difference (:func:`kept_differences`)."""
    a, b = ref.tokens[0], got.tokens[0]
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
    steps = min(same + 1, len(ref.step_logits))
    errors = [_rel(got.step_logits[i], ref.step_logits[i]) for i in range(steps)]
    kept = kept_differences(ref.kept, got.kept, scores, tolerance, "end to end")
    return {
        # one per pruning layer of the reference or of onnxruntime: a layer missing on one side is a disagreement
        "kept_index_agreement": [r["status"] == "identical" for r in kept],
        "vision_rel_error": _rel(got.image_features, ref.image_features),
        "prefill_logits_rel_error": errors[0],
        "max_logits_rel_error": max(errors),
        "tokens_reference": a,
        "tokens_onnxruntime": b,
        "matching_prefix": same,
        "identical": a == b,
        "kept_end_to_end": kept,
    }


class _SimulationRunner:
    """A Polygraphy runner over one eager program of the simulation (Polygraphy's own
    ``PytRunner`` moves tensors to CUDA, so it cannot run here)."""

    def __new__(cls, program, inputs: dict[str, np.ndarray], output_names: list[str], compared: list[str], name: str):
        from polygraphy.backend.base import BaseRunner
        from polygraphy.common import TensorMetadata

        class Runner(BaseRunner):
            def activate_impl(self):
                pass

            def deactivate_impl(self):
                pass

            def get_input_metadata_impl(self):
                meta = TensorMetadata()
                for n, v in inputs.items():
                    meta.add(n, v.dtype, v.shape)
                return meta

            def infer_impl(self, feed_dict):
                start = time.perf_counter()
                with torch.no_grad():
                    out = program(*[torch.from_numpy(feed_dict[n]) for n in inputs])
                self.inference_time = time.perf_counter() - start
                out = out if isinstance(out, tuple) else (out,)
                named = dict(zip(output_names, out))
                return {n: np.ascontiguousarray(named[n].numpy()) for n in compared}

        return Runner(name=name)


def polygraphy_compare(programs: Programs, bundle, sample: Sample, torch_backend: Backend) -> dict:
    """Compare each graph with its eager program through Polygraphy's Comparator on one
    sample. Kept indices must be identical; float outputs (logits, features, KV scales) must
    agree in mean error within rtol 1e-2 / atol 1e-4. KV codes are not compared here: float
    reassociation between PyTorch and onnxruntime legitimately moves a few values across a
    rounding boundary (one code step), which a tolerance cannot tell from an error; the code
    comparison of :func:`verify` counts them."""
    import onnxruntime as ort
    from polygraphy.backend.onnxrt import OnnxrtRunner
    from polygraphy.comparator import Comparator, CompareFunc
    from polygraphy.logger import G_LOGGER

    from quota_compile.runtime.ort import session_options

    G_LOGGER.module_severity = G_LOGGER.ERROR
    feats = torch_backend.vision(sample.batch.pixel_values)
    _, cache, _ = torch_backend.prefill(sample.batch.input_ids, sample.batch.attention_mask, feats)
    length = sample.batch.attention_mask.sum(axis=1)
    step = [np.array([[1]], dtype=np.int64), length[:, None].astype(np.int64), np.ones((1, cache[0].shape[2] + 1), dtype=np.int64)]
    feeds = {
        "vision": [sample.batch.pixel_values],
        "prefill": [sample.batch.input_ids, sample.batch.attention_mask, feats],
        "decode": step + cache,
    }
    results = {}
    for graph, values in feeds.items():
        # the deployed graph as the runtime opens it (its session options), without the memory arena
        session = functools.partial(ort.InferenceSession, str(bundle / f"{graph}.onnx"), session_options(arena=False),
                                    providers=["CPUExecutionProvider"])
        ort_runner = OnnxrtRunner(session, name=f"onnxruntime-{graph}")
        with ort_runner:
            names_in = [i.name for i in ort_runner.sess.get_inputs()]
            names_out = [o.name for o in ort_runner.sess.get_outputs()]
        feed = {n: np.ascontiguousarray(v) for n, v in zip(names_in, values)}
        program = getattr(programs, graph)
        with torch.no_grad():
            produced = program(*[torch.from_numpy(feed[n]) for n in names_in])
        produced = len(produced) if isinstance(produced, tuple) else 1
        if produced != len(names_out):  # reported here; verify() names what is missing or extra
            results[graph] = {"passed": False, "outputs_compared": 0, "error": f"the graph has {len(names_out)} outputs, the simulation {produced}"}
            continue
        compared = [n for n in names_out if not n.endswith((".key", ".value", "zero_point"))]
        sim = _SimulationRunner(getattr(programs, graph), feed, names_out, compared, name=f"simulation-{graph}")
        kept = [n for n in compared if n.startswith(KEPT)]
        atol = {"": 1e-4, **dict.fromkeys(kept, 0.0)}
        rtol = {"": 1e-2, **dict.fromkeys(kept, 0.0)}
        stat = {"": "mean", **dict.fromkeys(kept, "elemwise")}
        try:
            run = Comparator.run([sim, ort_runner], data_loader=[feed])
        except Exception as e:  # a graph onnxruntime cannot run: reported here, refused by verify()
            if not type(e).__module__.startswith(("onnxruntime", "polygraphy")):
                raise
            results[graph] = {"passed": False, "outputs_compared": 0, "error": (str(e).strip().splitlines() or [type(e).__name__])[0]}
            continue
        with np.errstate(divide="ignore", invalid="ignore"):  # relative error of exact zeros
            acc = Comparator.compare_accuracy(run, compare_func=CompareFunc.simple(rtol=rtol, atol=atol, check_error_stat=stat))
        results[graph] = {"passed": bool(acc), "outputs_compared": len(compared)}
    return results


def verify(torch_backend: Backend, ort_backend: Backend, samples: list[Sample], cfg: VerifySection, graphs: dict | None = None,
           probe: CodeProbe | None = None) -> dict:
    """Run both backends on every sample; return the verify.json document (module docstring).
    ``graphs``: the per-graph Polygraphy comparison (:func:`polygraphy_compare`), reported but
    not gating: its per-tensor tolerances cannot tell a legitimate rounding-boundary step from
    an error. ``probe``: the observation copies of the runtime's graphs (:class:`CodeProbe`);
    without one, activation codes are not compared (the KV codes and kept indices still are,
    through the backend)."""
    observing = torch_backend.observing() if isinstance(torch_backend, TorchBackend) else contextlib.nullcontext()
    rows, tally, free, kept_rows, score_diffs, copy_matches, forced_output = [], _Tally(), _Tally(), [], [], {}, {}
    with observing:
        for s in samples:
            same = _SameInputs(torch_backend, ort_backend, probe, cfg.kept_tie_tolerance, cfg.rounding_tie_tolerance)
            ref = greedy_generate(same, s.batch, cfg.new_tokens, eos_token_id=None, keep_logits=True)
            got = greedy_generate(ort_backend, s.batch, cfg.new_tokens, eos_token_id=None, keep_logits=True)
            row = {"question": s.question, "prompt_length": int(s.batch.attention_mask.sum()), **compare(ref, got, same.scores, cfg.kept_tie_tolerance)}
            row["kept_same_inputs"] = same.kept
            row["codes"] = {k: same.forced.total(k).doc() for k in KINDS}
            row["codes_free_running"] = {k: same.free.total(k).doc() for k in KINDS}
            row["max_score_rel_difference"] = same.score_difference
            # each call's first code difference on the same inputs (_SameInputs._first_difference)
            row["first_differences"] = same.firsts
            row["divergence_at_rounding_tie"] = not row["identical"] and after_rounding_ties(same.firsts)
            kept_after_rounding_ties(same.kept, row["kept_end_to_end"], same.firsts)
            rows.append(row)
            tally.merge(same.forced)
            free.merge(same.free)
            kept_rows += same.kept + row["kept_end_to_end"]
            if same.score_difference is not None:
                score_diffs.append(same.score_difference)
            for g, ok in same.copy_matches.items():
                copy_matches[g] = copy_matches.get(g, True) and ok
            for g, e in same.forced_output.items():
                forced_output[g] = max(forced_output.get(g, 0.0), e)
    worst = max(r["max_logits_rel_error"] for r in rows)
    agreement = sum(r["identical"] for r in rows) / len(rows)
    at_ties = sum(r["divergence_at_rounding_tie"] for r in rows)
    tokens = sum(r["matching_prefix"] for r in rows) / (len(rows) * cfg.new_tokens)
    pairs = [same for r in rows for same in r["kept_index_agreement"]]
    kept = sum(pairs) / len(pairs) if pairs else None
    codes = tally.doc()
    codes["activations"]["observed_quantizers"] = (
        {g: {"observed": probe.observed[g], "in_graph": probe.quantizers[g]} for g in GRAPHS} if probe is not None else None
    )
    codes["kv_cache"]["teacher_forced_tensors"] = {g: probe.kv_forced[g] for g in GRAPHS} if probe is not None else None
    codes_free = free.doc()
    codes_free["observation_copy_matches_deployed"] = copy_matches or None
    status = [r["status"] for r in kept_rows]
    margins = [r["margin"] for r in kept_rows if r.get("margin") is not None]
    kept_doc = {
        "tolerance": cfg.kept_tie_tolerance,
        "tolerance_unit": "spread (max - min) of the reference scores over the pruning layer's candidates",
        "compared": len(kept_rows),
        **{k: status.count(k) for k in ("identical", "near_tie", "not_a_tie", "downstream", "missing", "after_rounding_tie")},
        "max_margin": max(margins) if margins else None,
        "max_score_rel_difference_same_inputs": max(score_diffs) if score_diffs else None,
    }

    failures = []
    for kind, label in ((ACTIVATIONS, "activation"), (KV_CACHE, "KV-cache")):
        c = codes[kind]
        if c["rate"] is not None and c["rate"] > cfg.max_code_flip_rate:
            w = c["tensors_with_flips"][0]
            failures.append(
                f"{label} code-flip rate {c['rate']:.3g} ({c['flips']} of {c['compared']} codes differ; most in {w['where']}) "
                f"exceeds verify.max_code_flip_rate {cfg.max_code_flip_rate:g}"
            )
        bad = [(w, n) for w, n in tally.flipped(kind) if n.flips > max(1, cfg.max_tensor_code_flip_rate * n.compared)]
        if bad:
            w, n = bad[0]
            failures.append(
                f"{label} codes of {len(bad)} tensor(s) flip more than verify.max_tensor_code_flip_rate {cfg.max_tensor_code_flip_rate:g} "
                f"(worst: {w}, {n.flips} of {n.compared})"
            )
    if tally.kv_scale_where is not None and tally.kv_scale_rel_diff > cfg.max_kv_scale_rel_difference:
        failures.append(
            f"KV-cache scale relative difference {tally.kv_scale_rel_diff:.3g} (worst: {tally.kv_scale_where}) "
            f"exceeds verify.max_kv_scale_rel_difference {cfg.max_kv_scale_rel_difference:g}"
        )
    failures += tally.problems + [p for p in free.problems if p not in tally.problems]
    missing = [r for r in kept_rows if r["status"] == "missing"]
    if missing:
        failures.append(
            f"kept indices missing for {len(missing)} (sample, pruning layer) pairs: "
            + "; ".join(f"{r['source']}, pruning layer #{r['index']}: {r['detail']}" for r in missing[:3])
        )
    untied = [r for r in kept_rows if r["status"] == "not_a_tie"]
    if untied:
        r = untied[0]
        why = f"margin {r['margin']:.3g} of the score scale" if r.get("margin") is not None else r.get("detail", "")
        failures.append(
            f"{len(untied)} kept-set difference(s) at a pruning layer are not near-ties of the reference scores "
            f"(first: {r['source']}, layer {r['pruning_layer']}, {why}; verify.kept_tie_tolerance {cfg.kept_tie_tolerance:g})"
        )
    off = {g: e for g, e in forced_output.items() if e > cfg.max_teacher_forced_rel_error}
    if off:
        g = max(off, key=off.get)
        what = "image features" if g == "vision" else "logits"
        failures.append(
            f"teacher-forced {what} of the {g} graph differ from the simulation's by {off[g]:.3g} (relative), "
            f"above verify.max_teacher_forced_rel_error {cfg.max_teacher_forced_rel_error:g}"
        )
    if agreement + at_ties / len(rows) < cfg.min_greedy_agreement:
        unexplained = [r for r in rows if not r["identical"] and not r["divergence_at_rounding_tie"]]
        r = unexplained[0]
        f = next((f for f in r["first_differences"] if not f["tie"]), None)
        why = (f"its first differing codes ({f['where']}) are not a rounding tie" if f is not None
               else "with the same codes in every call (no rounding tie explains it)")
        failures.append(
            f"greedy agreement {agreement:.0%}{f' ({at_ties} more at a rounding tie)' if at_ties else ''} is below "
            f"verify.min_greedy_agreement {cfg.min_greedy_agreement:.0%}: {r['question']!r} diverges at token "
            f"{r['matching_prefix']}, {why}"
        )
    if cfg.max_logits_rel_error is not None and worst > cfg.max_logits_rel_error:
        failures.append(f"logits relative error {worst:.3g} exceeds verify.max_logits_rel_error {cfg.max_logits_rel_error:g}")
    if cfg.min_kept_index_agreement is not None and kept is not None and kept < cfg.min_kept_index_agreement:
        failures.append(
            f"kept-index agreement {kept:.1%} at the pruning layers is below verify.min_kept_index_agreement {cfg.min_kept_index_agreement:.0%}"
        )
    return {
        "reference": "PyTorch quantized simulation (eager)",
        "runtime": "onnxruntime CPUExecutionProvider",
        "samples": len(rows),
        "new_tokens": cfg.new_tokens,
        "seed": cfg.seed,
        "max_logits_rel_error": worst,
        "max_vision_rel_error": max(r["vision_rel_error"] for r in rows),
        # each graph's first output (features, logits) from the teacher-forced copy, against the
        # simulation's on the same inputs (None: the flavour's copy could not be teacher-forced)
        "teacher_forced_rel_error": {g: forced_output.get(g) for g in GRAPHS},
        "greedy_agreement": agreement,
        # samples whose tokens differ only after a rounding-boundary case (each call's first
        # code difference a tie: verify.rounding_tie_tolerance); they count as agreeing
        "greedy_divergences_at_rounding_ties": at_ties,
        "token_agreement": tokens,
        "kept_index_agreement": kept,
        "codes": codes,
        "codes_free_running": codes_free,
        "kept": kept_doc,
        "thresholds": {
            "max_code_flip_rate": cfg.max_code_flip_rate,
            "max_tensor_code_flip_rate": cfg.max_tensor_code_flip_rate,
            "kept_tie_tolerance": cfg.kept_tie_tolerance,
            "min_greedy_agreement": cfg.min_greedy_agreement,
            "rounding_tie_tolerance": cfg.rounding_tie_tolerance,
            "max_kv_scale_rel_difference": cfg.max_kv_scale_rel_difference,
            "max_teacher_forced_rel_error": cfg.max_teacher_forced_rel_error,
            "max_logits_rel_error": cfg.max_logits_rel_error,
            "min_kept_index_agreement": cfg.min_kept_index_agreement,
        },
        "polygraphy": graphs or {},
        "passed": not failures,
        "failures": failures,
        "per_sample": rows,
    }
