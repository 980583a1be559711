"""The bundle format in one place: its names (files, folders, graphs, graph inputs and outputs,
the decode graph's cache protocol) and typed models of its two JSON documents, manifest.json
(:class:`Manifest`) and verify.json (:class:`VerifyReport`).

The compile builds these models and writes them; ``quota-compile run`` and every other reader
validate against the same models. Only pydantic is imported here, nothing of quota_compile, so
any layer at or above ``bundle`` (the runtime, the flavours, the gate, the commands) can import
it.

Two rules hold for every model:

- reading is strict: a key the model does not know, a missing required key or a value of the
  wrong JSON type is refused (the flavour entries of the manifest and the open-ended detail of
  verify.json excepted: there a flavour or the gate may add keys);
- writing gives back exactly what was given: ``model_dump(mode="json")`` writes the keys the
  model was built or read with, in that order, and no default of a key that was not given. A
  manifest read from a bundle therefore dumps to the same JSON, byte for byte, and the
  compiler's JSON is what it was before these models existed (format_version 2; 3 added
  ``weights``).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, PrivateAttr, model_serializer, model_validator
from pydantic_core import PydanticCustomError

__all__ = [
    "FORMAT", "FORMAT_VERSION", "MANIFEST", "VERIFY", "RECIPE", "REPORT", "TOKENIZER", "KV_SCALES", "WEIGHTS",
    "GRAPHS", "PORTABLE_FOLDER", "ORT_FOLDER", "TRT_FOLDER",
    "PAST", "PRESENT", "KEPT", "IMAGE_FEATURES", "kv_name", "kept_name",
    "KV_UPDATE_KEY", "KV_APPEND", "KV_REPLACE",
    "Manifest", "ModelFacts", "QuantizationFacts", "PruningFacts", "GraphEntry", "TensorIO", "FlavourEntry", "WeightsFile", "WeightTensor",
    "KVLayer", "KVCodes", "KVScale", "KVTensor", "KVCacheBytes",
    "VerifyReport", "FlavourVerification", "Thresholds", "KeptSummary",
]

# ---------------------------------------------------------------- names

FORMAT = "quota-compile bundle"
# 2: manifest.json records the sha256 of each of its own keys (``key_sha256``).
# 3: each folder of graphs keeps their weights in one weights.bin, a tensor the graphs share
#    stored once; manifest.json's ``weights`` says which graph reads which tensor.
FORMAT_VERSION = 3

# Files and folders of a bundle (beside the graphs ``<graph>.onnx``).
MANIFEST = "manifest.json"
VERIFY = "verify.json"
RECIPE = "recipe.yaml"
REPORT = "report.md"
TOKENIZER = "tokenizer"  # the processor (tokenizer and image processor), a folder
WEIGHTS = "weights.bin"  # beside a flavour's graphs: their initializers of 1 KiB or more, each distinct tensor once
KV_SCALES = "kv_scales.npy"  # the static per_channel KV scales, [layer, key/value, head, 1, channel]

GRAPHS = ("vision", "prefill", "decode")

# Where each built-in flavour's graphs are inside a bundle.
PORTABLE_FOLDER = "."
ORT_FOLDER = "onnxruntime"
TRT_FOLDER = "tensorrt"  # also its engines and build log

# Graph input and output names: ``past.<layer>.<tensor>`` (the decode graph's cache in),
# ``present.<layer>.<tensor>`` (the cache out), ``kept.<layer>`` (the visual tokens a pruning
# layer keeps, prefill), ``image_features`` (the vision graph's output).
PAST = "past."
PRESENT = "present."
KEPT = "kept."
IMAGE_FEATURES = "image_features"


def kv_name(prefix: str, layer: int, tensor: str) -> str:
    """``past.3.key``, ``present.0.value_scale``: ``prefix`` is :data:`PAST` or :data:`PRESENT`."""
    return f"{prefix}{layer}.{tensor}"


def kept_name(layer: int) -> str:
    """``kept.2``: the prefill output of the visual tokens pruning layer ``layer`` keeps."""
    return f"{KEPT}{layer}"


# The decode graph's cache protocol, stored in its metadata.
KV_UPDATE_KEY = "quota_compile.kv_update"  # decode-graph metadata: how the runtime updates the cache
KV_APPEND = "append"  # present.* hold the new token's entries; the runtime appends them
KV_REPLACE = "replace"  # present.* hold the whole cache (past + the new entries)


# ---------------------------------------------------------------- the models' common rules


def _number(value: Any) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PydanticCustomError("float_type", "Input should be a valid number")
    return value


def _dim(value: Any) -> int | str:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise PydanticCustomError("dim_type", "must be an integer or a string (a named dimension), got {got!r}", {"got": value})
    return value


def _ops(value: Any) -> str | list[str]:
    if isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        return value
    raise PydanticCustomError("ops_type", "must be a string or a list of strings, got {got!r}", {"got": value})


# A JSON number, kept as written (an int stays an int: what is read is what is written back).
Number = Annotated[int | float, PlainValidator(_number)]
# A tensor dimension: a size or a named (dynamic) dimension.
Dim = Annotated[int | str, PlainValidator(_dim)]
# A flavour's ``ops``: a description (portable) or its own op types.
Ops = Annotated[str | list[str], PlainValidator(_ops)]


class _Record(BaseModel):
    """Strict JSON types, unknown keys refused; dumps the keys it was given, in the order given."""

    model_config = ConfigDict(extra="forbid", strict=True, ser_json_inf_nan="constants")

    _keys: list[str] | None = PrivateAttr(default=None)

    @model_validator(mode="wrap")
    @classmethod
    def _remember_keys(cls, data: Any, handler):
        made = handler(data)
        if isinstance(data, dict) and made is not data:
            made._keys = list(data)
        return made

    @model_serializer(mode="wrap")
    def _given_keys(self, handler) -> dict[str, Any]:
        out = handler(self)
        if self._keys is None:  # built without a mapping (model_construct): the keys that are set
            keys = [k for k in out if k in self.model_fields_set or k in (self.model_extra or {})]
        else:
            keys = [k for k in self._keys if k in out]
        return {k: out[k] for k in keys}


class _OpenRecord(_Record):
    """A :class:`_Record` that keeps keys it does not know (with any JSON value)."""

    model_config = ConfigDict(extra="allow")


# ---------------------------------------------------------------- manifest.json


class TensorIO(_Record):
    """One input or output of a graph."""

    name: str
    dtype: str
    shape: list[Dim]


class GraphEntry(_Record):
    """``graphs.<graph>``: a portable graph, its files and what it takes and gives."""

    file: str
    files: list[str]
    bytes: int
    inputs: list[TensorIO]
    outputs: list[TensorIO]
    opset: int
    nodes: int
    quantize_linear: int
    dequantize_linear: int
    int4_initializers: int


class ModelFacts(_Record):
    """``model``: the checkpoint and what the runtime needs of it."""

    source: str
    family: str
    sha256: str
    num_layers: int = Field(ge=1)
    hidden_size: int
    vocab_size: int
    image_size: int
    visual_start: int = Field(ge=0)
    visual_tokens: int = Field(ge=1)
    image_token_id: int
    eos_token_id: int | None
    prompt_template: str
    padding_side: str


class _WeightQuant(_Record):
    bits: int
    granularity: str
    group_size: int | None
    method: str
    gptq_damp: Number
    act_order: bool


class _ActivationQuant(_Record):
    bits: int
    granularity: str
    clip_ratio: Number


class _KVCacheQuant(_Record):
    bits: int
    granularity: str


class _EmbeddingQuant(_Record):
    bits: int | None
    group_size: int | None


class QuantizationFacts(_Record):
    """``quantization``: model.yaml's ``quantization`` section as the compile settled it."""

    weights: _WeightQuant
    activations: _ActivationQuant
    kv_cache: _KVCacheQuant
    embeddings: _EmbeddingQuant
    ignore: list[str]
    rotation: str
    rotation_seed: int
    online_rotation: bool


class PruningFacts(_Record):
    """``pruning``: the visual tokens each decoder layer processes."""

    method: str
    signals: str
    keep_ratio: Number
    visual_tokens_per_layer: list[int]
    pruning_layers: list[int]
    average_fraction: Number


class FlavourEntry(_OpenRecord):
    """``flavours.<name>``: where a flavour's graphs are and what they are. ``folder`` and
    ``graphs`` are every flavour's; the other keys are those of the built-in flavours (typed
    where present), and a registered flavour may add its own."""

    folder: str
    graphs: list[str]
    bytes: dict[str, int] | None = None
    ops: Ops | None = None  # portable: a description; the others: their own op types
    user_passes: list[str] | None = None
    plugins: dict[str, dict[str, int]] | None = None
    plugin_namespace: str | None = None
    plugin_version: str | None = None
    plugin_definitions: str | None = None
    kv_update: str | None = None  # KV_APPEND or KV_REPLACE
    accuracy_level: int | None = None
    arithmetic: dict[str, str] | None = None
    verified_with: str | None = None
    engines: dict[str, Any] | None = None
    used_by_runtime: bool = False  # the flavour ``quota-compile run`` runs (absent: not)


class WeightTensor(_Record):
    """One tensor of a weights file: its byte range and, for each graph that reads it, the
    initializer name it has there."""

    offset: int
    bytes: int
    graphs: dict[str, str]


class WeightsFile(_Record):
    """``weights.<folder>``: the one weights file of a folder of graphs (``.`` for the portable
    graphs, a flavour's folder for its own), every distinct tensor once."""

    file: str
    bytes: int
    tensors: list[WeightTensor]


class KVTensor(_Record):
    dtype: str
    shape: list[Dim]


class KVCodes(KVTensor):
    packing: str


class KVScale(KVTensor):
    where: str | None = None  # per_channel: where the static scales are


class KVLayer(_Record):
    """``kv_cache[<layer>]``: one decoder layer's quantized cache."""

    layer: int
    visual_tokens: int
    length: str
    num_kv_heads: int
    head_dim: int
    bits: int
    granularity: str
    symmetric: bool
    tensors: list[str]
    codes: KVCodes
    scale: KVScale
    zero_point: KVTensor | None = None  # per_token (asymmetric) only
    dequantize: str


class KVCacheBytes(_Record):
    """``kv_cache_bytes_per_sequence``: the cache of one verification-length sequence."""

    prompt_length: int
    generated: int
    bundle: int
    fp16_unpruned: int
    ratio: Number


class Manifest(_Record):
    """manifest.json. ``files`` and ``key_sha256`` are added when the bundle is written
    (:func:`quota_compile.bundle.format.write_manifest`) and required in a written bundle."""

    format: str
    format_version: int
    model: ModelFacts
    quantization: QuantizationFacts
    pruning: PruningFacts
    graphs: dict[str, GraphEntry]
    flavours: dict[str, FlavourEntry]
    weights: dict[str, WeightsFile]
    kv_cache: list[KVLayer]
    kv_cache_bytes_per_sequence: KVCacheBytes
    versions: dict[str, str]
    files: dict[str, str] | None = None
    key_sha256: dict[str, str] | None = None

    def doc(self) -> dict[str, Any]:
        """The JSON document (what manifest.json holds)."""
        return self.model_dump(mode="json")


# ---------------------------------------------------------------- verify.json


class Thresholds(_Record):
    """The tolerances one verification was held to."""

    max_code_flip_rate: Number
    max_tensor_code_flip_rate: Number
    kept_tie_tolerance: Number
    min_greedy_agreement: Number
    rounding_tie_tolerance: Number
    max_kv_scale_rel_difference: Number
    max_teacher_forced_rel_error: Number
    max_logits_rel_error: Number | None
    min_kept_index_agreement: Number | None


class KeptSummary(_Record):
    """The kept-set comparison at the pruning layers, over every sample."""

    tolerance: Number
    tolerance_unit: str
    compared: int
    identical: int
    near_tie: int
    not_a_tie: int
    downstream: int
    missing: int
    # free-running differences after a rounding tie upstream, the teacher-forced sets the
    # same (verify.gate.kept_after_rounding_ties); absent in bundles written before it
    after_rounding_tie: int = 0
    max_margin: Number | None
    max_score_rel_difference_same_inputs: Number | None


class FlavourVerification(_OpenRecord):
    """``flavours.<name>`` of verify.json: a derived flavour's verification. A flavour gives at
    least ``flavour``, ``passed`` and ``failures``; the built-in ones give the gate's whole
    document (typed here where present) and add their own keys (``arithmetic``, ``plugins``,
    ``engines``, ...)."""

    reference: str | None = None
    runtime: str | None = None
    samples: int | None = None
    new_tokens: int | None = None
    seed: int | None = None
    max_logits_rel_error: Number | None = None
    max_vision_rel_error: Number | None = None
    teacher_forced_rel_error: dict[str, Number | None] | None = None
    greedy_agreement: Number | None = None
    greedy_divergences_at_rounding_ties: int | None = None
    token_agreement: Number | None = None
    kept_index_agreement: Number | None = None
    codes: dict[str, Any] | None = None
    codes_free_running: dict[str, Any] | None = None
    kept: KeptSummary | None = None
    thresholds: Thresholds | None = None
    polygraphy: dict[str, dict[str, Any]] | None = None
    passed: bool
    failures: list[str]
    per_sample: list[dict[str, Any]] | None = None
    flavour: str


class VerifyReport(_Record):
    """verify.json: the portable graphs' verification (the gate's document,
    :func:`quota_compile.verify.gate.verify`), each derived flavour's under ``flavours``, and
    the verdict of them all (``passed``, ``failures``). The per-sample rows and the code
    tallies are open-ended detail (any JSON)."""

    reference: str
    runtime: str
    samples: int
    new_tokens: int
    seed: int
    max_logits_rel_error: Number
    max_vision_rel_error: Number
    teacher_forced_rel_error: dict[str, Number | None]
    greedy_agreement: Number
    greedy_divergences_at_rounding_ties: int
    token_agreement: Number
    kept_index_agreement: Number | None
    codes: dict[str, Any]
    codes_free_running: dict[str, Any]
    kept: KeptSummary
    thresholds: Thresholds
    polygraphy: dict[str, dict[str, Any]]
    passed: bool
    failures: list[str]
    per_sample: list[dict[str, Any]]
    flavour: str
    flavours: dict[str, FlavourVerification]

    def doc(self) -> dict[str, Any]:
        """The JSON document (what verify.json holds)."""
        return self.model_dump(mode="json")
