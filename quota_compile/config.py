"""``model.yaml``: the compile configuration (pydantic, versioned, unknown keys rejected).

Every key carries a ``description``; docs/config.md, the key reference, is generated from this
schema by ``python -m quota_compile.config_reference --write``.
Paths in ``model.source`` are relative to the YAML file; ``output.dir`` is relative to the
working directory.
"""

from __future__ import annotations

import re
from pathlib import Path
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, PlainValidator, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from .errors import UserError

CONFIG_VERSION = 1
DEFAULT_PROMPT = "USER: <image>\n{question} ASSISTANT:"
DEFAULT_IGNORE = ["re:.*vision_tower.*", "lm_head"]
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_PASS = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSection(_Section):
    source: str = Field(description="`builtin:shapes-llava`, `builtin:tiny-llava`, `builtin:bench-llava` (random weights, LLaVA-1.5 shaped, for speed), or a local Hugging Face LLaVA checkpoint folder, relative to the YAML file (`~` is expanded)")
    family: Literal["llava"] = Field("llava", description="model adapter")
    seed: int = Field(0, ge=0, description="seed for `builtin:tiny-llava`'s random weights (a checkpoint folder and the trained builtin ignore it)")
    prompt_template: str = Field(DEFAULT_PROMPT, description="must contain `<image>` exactly once and `{question}`; stored in `manifest.json` and used by `run` and verification")

    @field_validator("prompt_template")
    @classmethod
    def _template(cls, v: str) -> str:
        if v.count("<image>") != 1 or "{question}" not in v:
            raise ValueError("must contain '<image>' once and '{question}'")
        return v


class WeightQuant(_Section):
    bits: Literal[4] = Field(4, description="weight bits")
    # group: one scale per output channel and group_size inputs; per_channel: one scale per
    # output channel (the group is the whole input), which the onnxruntime flavour runs as an
    # exact integer product on its uint8 x int8 kernels.
    granularity: Literal["group", "per_channel"] = Field("group", description="`group`: one scale per output channel and `group_size` inputs; `per_channel`: one scale per output channel (`group_size` is then ignored), which the onnxruntime flavour runs as exact integer products")
    # Unset: the largest of 128, 64, 32, 16 that divides every quantized Linear's input size
    # (chosen when the model is loaded, said in the compile's progress, written in the recipe).
    group_size: int | None = Field(None, gt=0, description="weights per scale along the input dimension; a value given must divide the input size of every quantized Linear (checked when the model loads). null: the largest of 128, 64, 32, 16 that divides every quantized Linear's input size (the compile's progress line says which; the recipe and manifest record it)")
    # rtn: round to nearest. gptq: GPTQ on the calibration set (quota_compile/quant/gptq.py),
    # decoder layer by decoder layer, each seeing the inputs of the already-quantized layers
    # before it; same grid and layout as rtn.
    method: Literal["rtn", "gptq"] = Field("rtn", description="`rtn`: round to nearest; `gptq`: GPTQ on the calibration set, same grid and layout (docs/quantization.md)")
    # GPTQ only: dampening of the Hessian, as a fraction of its mean diagonal.
    gptq_damp: float = Field(0.01, gt=0.0, le=1.0, description="only with `method: gptq` (refused otherwise): dampening added to the Hessian's diagonal, as a fraction of its mean")
    # GPTQ only: visit the input channels by decreasing Hessian diagonal (group scales then
    # come from the original weights: "static groups").
    act_order: bool = Field(False, description="only with `method: gptq` (refused otherwise): quantize the input channels by decreasing Hessian diagonal, with group scales from the original weights")

    @model_validator(mode="after")
    def _gptq_options_need_gptq(self) -> WeightQuant:
        # (values other than the defaults: a recipe writes every key back, defaults included)
        given = [k for k in ("gptq_damp", "act_order") if getattr(self, k) != type(self).model_fields[k].default]
        if self.method != "gptq" and given:
            raise ValueError(f"sets {' and '.join(given)}, which only GPTQ uses; add method: gptq or remove {'them' if len(given) > 1 else 'it'}")
        return self


class ActivationQuant(_Section):
    bits: Literal[4, 8] = Field(4, description="activation bits at the input of every quantized Linear")
    granularity: Literal["per_token"] = Field("per_token", description="one dynamic scale per token")
    clip_ratio: float = Field(1.0, gt=0.0, le=1.0, description="scale = `clip_ratio · max|x| / qmax`")


class KVCacheQuant(_Section):
    bits: Literal[4, 8] = Field(4, description="KV-cache bits (INT4 needs an even head dim)")
    # per_token: asymmetric, a dynamic scale and zero point per token and head (stored beside
    # the codes); per_channel: symmetric, static scales per KV head and channel calibrated on
    # the calibration set (codes only in the cache; onnxruntime GroupQueryAttention's format).
    granularity: Literal["per_token", "per_channel"] = Field("per_token", description="`per_token`: a dynamic scale and zero point per token and KV head, stored beside the codes; `per_channel`: symmetric, one static scale per KV head and channel, calibrated on the calibration set (`calibration.*`, always run for it), so the cache holds codes only")


class EmbeddingQuant(_Section):
    # The decoder's token-embedding table: null keeps it in full precision; 4 stores it as INT4
    # codes, symmetric, in groups of group_size along the hidden dimension (RTN), one table
    # row dequantized per token (onnxruntime: GatherBlockQuantized).
    bits: Literal[4] | None = Field(None, description="`4`: the decoder's token-embedding table as INT4 codes (symmetric RTN, groups along the hidden dimension); null: float32")
    group_size: int | None = Field(None, gt=0, description="table entries per scale; null: `quantization.weights.group_size`")  # default: quantization.weights.group_size


class QuantizationSection(_Section):
    weights: WeightQuant = Field(WeightQuant(), description="the weights of every quantized Linear (signed INT4, symmetric)")
    activations: ActivationQuant = Field(ActivationQuant(), description="the activations at the input of every quantized Linear (signed, symmetric, dynamic)")
    kv_cache: KVCacheQuant = Field(KVCacheQuant(), description="the KV cache")
    embeddings: EmbeddingQuant = Field(EmbeddingQuant(), description="the decoder's token-embedding table")
    ignore: list[str] = Field(default_factory=lambda: list(DEFAULT_IGNORE), description="modules kept in full precision: `re:REGEX` (matched with `re.fullmatch`) or a module name (that module and every module inside it); a list you give replaces the defaults (docs/config-guide.md)")
    # hadamard: fold the decoder's RMSNorm scales into the Linears that read them and rotate its
    # residual stream by a seeded randomised Hadamard matrix, offline, before quantizing
    # (quota_compile/quant/rotation.py); the full-precision function does not change.
    rotation: Literal["none", "hadamard"] = Field("none", description="`hadamard`: fold the decoder's RMSNorm scales into the Linears that read them and rotate its residual stream by a randomised Hadamard matrix before quantizing (docs/quantization.md); the full-precision function does not change")
    rotation_seed: int = Field(0, ge=0, description="seed of the rotation's random signs (and, for sizes that are not powers of two, of its orthogonal factor)")
    # with rotation: hadamard, also QuaRot's inner rotations: down_proj's and o_proj's inputs
    # rotated in the graph (Kronecker-factored Hadamard MatMuls before the activation
    # quantizer), the value heads rotated offline and the query/key heads after RoPE in the
    # graph, so the KV cache holds rotated keys and values.
    online_rotation: bool = Field(True, description="only with `rotation: hadamard` (`false` is refused otherwise): also rotate `down_proj`'s and `o_proj`'s inputs and the query/key heads in the graphs, and the value heads offline (docs/quantization.md); `false` keeps the offline residual rotation only")

    @model_validator(mode="after")
    def _online_needs_rotation(self) -> QuantizationSection:
        # (only a value other than the default is refused: a recipe writes every key back)
        if self.rotation == "none" and not self.online_rotation:
            raise ValueError("sets online_rotation: false, which only rotation: hadamard uses; add rotation: hadamard or remove it")
        return self

    @field_validator("ignore")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        for p in v:
            if p.startswith("re:"):
                try:
                    re.compile(p[3:])
                except re.error as e:
                    raise ValueError(f"{p[3:]!r} is not a valid regular expression ({e})") from None
        return v


class ScoreWeightsSection(_Section):
    att: float = Field(1.0, ge=0.0, description="weight of the attention cue `att`")
    mag: float = Field(0.0, ge=0.0, description="weight of the hidden-state norm `mag`")
    risk: float = Field(0.0, ge=0.0, description="weight of the quantization risk `risk` (subtracted); at least one of the three weights must be positive")

    @model_validator(mode="after")
    def _not_all_zero(self) -> ScoreWeightsSection:
        if self.att == self.mag == self.risk == 0.0:
            raise ValueError("at least one of att, mag, risk must be positive (all zero would keep the first tokens)")
        return self


# Pruning methods. quota_compile.pruning.methods holds the methods themselves, one object each,
# in a registry; this module sits below it and only needs their names, which that module hands
# over with set_pruning_method_names. Until it does (or if it is never imported) the built-in
# names below are the registered ones. `pruning.method` (in model.yaml and in a recipe) accepts
# every registered name, `eval.methods` every one but `none`; the Literal types stay the
# built-in names so that docs/config.md lists those.
BUILTIN_PRUNING_METHODS = ("none", "quota", "quota-fp", "fastv", "pdrop", "random", "dart")
EVAL_METHODS = ("fastv", "pdrop", "dart", "quota-fp", "quota", "random")  # the default of eval.methods
_method_names: Callable[[], Sequence[str]] = lambda: BUILTIN_PRUNING_METHODS


def set_pruning_method_names(names: Callable[[], Sequence[str]]) -> None:
    """Where validation reads the registered pruning methods' names from (called once by
    :mod:`quota_compile.pruning.methods` with its registry)."""
    global _method_names
    _method_names = names


def pruning_method_names() -> tuple[str, ...]:
    """The names ``pruning.method`` accepts, built-in ones first."""
    return tuple(_method_names())


def _one_of(value: Any, allowed: Sequence[str]) -> str:
    if isinstance(value, str) and value in allowed:
        return value
    shown = [repr(n) for n in allowed]
    expected = shown[0] if len(shown) == 1 else f"{', '.join(shown[:-1])} or {shown[-1]}"
    # the same error as a Literal's, so that messages read "must be one of 'none', ..., got ..."
    raise PydanticCustomError("literal_error", "Input should be {expected}", {"expected": expected})


def _pruning_method(value: Any) -> str:
    return _one_of(value, pruning_method_names())


def _evaluated_method(value: Any) -> str:
    names = pruning_method_names()
    return _one_of(value, [n for n in EVAL_METHODS if n in names] + [n for n in names if n not in BUILTIN_PRUNING_METHODS])


# A registered pruning method's name (validated against the registry, not the Literal).
PruningMethodName = Annotated[Literal["none", "quota", "quota-fp", "fastv", "pdrop", "random", "dart"], PlainValidator(_pruning_method)]
# The same, `none` excepted: what eval.methods lists.
EvaluatedMethodName = Annotated[Literal["fastv", "pdrop", "dart", "quota-fp", "quota", "random"], PlainValidator(_evaluated_method)]


class PruningSection(_Section):
    """What model.yaml asks for: a method and its options. The decision taken from it is a
    :class:`quota_compile.pruning.recipe.PruningRecipe`."""

    method: PruningMethodName = Field("none", description="visual-token pruning (docs/pruning.md)")
    signals: Literal["lowbit", "fp"] = Field("lowbit", description="`quota` only (`quota-fp` always uses `fp`): calibrate on the quantized simulation (`lowbit`) or on the full-precision model (`fp`, the stage-wise combination)")
    keep_ratio: float = Field(0.3, gt=0.0, le=1.0, description="budget: average over all decoder layers of the fraction of the V visual tokens a layer processes")
    first_full_layers: int = Field(2, ge=1, description="`quota`, `quota-fp`, `pdrop`: layers that keep all V tokens; `random`, `dart`: their cut layer. Must be below the layer count")
    query_tokens: int = Field(32, ge=1, description="the attention cue averages the attention of the last this-many real text tokens")
    weights: Literal["auto"] | ScoreWeightsSection = Field("auto", description="`quota`, `quota-fp`: score weights, `auto` (searched during calibration) or a mapping `{att, mag, risk}` (omitted keys 1, 0, 0)")
    fastv_layer: int = Field(2, ge=1, description="`fastv` only: the layer where the single cut happens; below the layer count")
    stages: int = Field(4, ge=1, description="`pdrop` only: number of geometric stages; at most layers − `first_full_layers`")
    seed: int = Field(0, ge=0, description="`random` only: seed of the per-token random scores")
    pivots: int = Field(8, ge=1, description="`dart` only: pivot tokens (largest hidden-state norm at the cut), always kept; the other visual tokens are ranked by least cosine similarity to a pivot. The default suits a few hundred visual tokens (LLaVA-1.5: 576); scale it with the model's count (docs/pruning.md)")


class CalibrationSection(_Section):
    # synthetic: generated images with generic questions; shapesvqa: the ShapesVQA calibration
    # split (the data builtin:shapes-llava was trained for).
    dataset: Literal["synthetic", "shapesvqa"] = Field("synthetic", description="`synthetic`: seeded generated images (coloured shapes) with fixed generic questions, from a stream separate from verification's; `shapesvqa`: the ShapesVQA calibration split (and verification then uses ShapesVQA test-split samples drawn with `verify.seed`, apart from `eval.seed`'s)")
    num_samples: int = Field(16, ge=2, description="calibration samples")
    seed: int = Field(0, ge=0, description="calibration seed")
    holdout: float = Field(0.25, gt=0.0, lt=1.0, description="fraction of the samples (at least one) held out for the weight search; signals come from the rest")
    objective: Literal["kl", "answer_nll"] = Field("kl", description="what QUOTA's score-weight search minimises on the held-out samples: `kl`, the KL divergence of the pruned model's final-token distribution from the unpruned one's; `answer_nll`, the pruned model's negative log-likelihood of each question's gold answer token (teacher-forced; needs `dataset: shapesvqa`, whose questions have answers; docs/pruning.md)")
    # where calibration (GPTQ, the per_channel KV scales, QUOTA's passes) computes: cpu, cuda,
    # cuda:N. With sequential: true only one decoder layer at a time is on that device (the
    # others wait in host memory; quota_compile/capture/sequential.py); the recipe is the same.
    device: str = Field("cpu", description="where calibration (GPTQ, the `per_channel` KV scales, QUOTA's passes) computes: `cpu`, `cuda` or `cuda:N`; `cuda` without a GPU torch can use is refused (exit 2). Tracing and export stay on the CPU")
    sequential: bool = Field(False, description="`true`: layer-by-layer calibration, only one decoder layer (plus the vision tower, projector, embeddings, final norm and `lm_head`) on `calibration.device` at a time, the others in host memory; the recipe and weights are the same as with `false` (docs/quantization.md)")

    @model_validator(mode="after")
    def _answers_need_shapesvqa(self) -> CalibrationSection:
        if self.objective == "answer_nll" and self.dataset != "shapesvqa":
            raise ValueError("sets objective: answer_nll, which needs gold answers; add dataset: shapesvqa (the synthetic questions have none) or use objective: kl")
        return self

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        try:
            d = torch.device(v)
        except RuntimeError:
            raise ValueError(f"{v!r} is not a torch device (cpu, cuda or cuda:N)") from None
        if d.type not in ("cpu", "cuda"):
            raise ValueError(f"{v!r}: calibration runs on cpu or cuda")
        return v


class OnnxruntimeExport(_Section):
    # MatMulNBits accuracy_level: 4 = int8 x int4 dot products (activations requantized to int8
    # per weight block; fast), 0 = float32 arithmetic (exactly the deployed W4A4 up to summation
    # order; about the speed of an fp32 MatMul).
    accuracy_level: Literal[0, 4] = Field(4, description="`MatMulNBits` arithmetic in the onnxruntime flavour: `4` int8 × int4 dot products (activations requantized to int8 per weight block; fast), `0` float32 (the deployed W4A4 up to summation order)")
    # Graphs whose per-channel W4A4 Linears run as exact integer products (MatMulIntegerToFloat,
    # uint8 x int8); the others use MatMulNBits. Measured on builtin:bench-llava (docs/speed.md):
    # integer is 2.6x faster on the prefill's large products, MatMulNBits faster per decode step.
    integer_graphs: list[Literal["vision", "prefill", "decode"]] = Field(default_factory=lambda: ["vision", "prefill"], description="with `weights.granularity: per_channel`: graphs whose W4A4 Linears run as exact integer products (`MatMulIntegerToFloat`, uint8 × int8); the others use `MatMulNBits` (a measured choice, docs/speed.md)")
    # The decode graph's attention as com.microsoft.GroupQueryAttention over the quantized cache
    # (used with kv_cache {bits: 4, granularity: per_channel}, the op's INT4 layout; with any
    # other KV cache the graph's own attention arithmetic stays).
    group_query_attention: bool = Field(True, description="with `kv_cache: {bits: 4, granularity: per_channel}`: the decode graph's attention over the cache as `com.microsoft.GroupQueryAttention` (its INT4 cache is this layout); ignored with any other KV cache")


# The names export.targets accepts: the built-in flavours, and any registered with
# quota_compile.flavours.registry.register_flavour (which adds its name here).
TARGETS: list[str] = ["portable", "onnxruntime", "tensorrt", "torch"]


def _alternatives(names: list[str]) -> str:
    quoted = [repr(n) for n in names]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"


class ExportSection(_Section):
    opset: int = Field(21, ge=21, le=23, description="ONNX opset of the graphs")
    # portable: standard ONNX ops only (always written: the reference lowering);
    # onnxruntime: also the onnxruntime CPU flavour in <bundle>/onnxruntime/, which the
    # runtime then uses; tensorrt: also the TensorRT flavour in <bundle>/tensorrt/ (plugin
    # nodes for the W4A4 Linears and the quantized KV cache; quota_compile/flavours/tensorrt/lower.py),
    # verified through onnxruntime-extensions, and its engines where TensorRT and a GPU are.
    targets: list[str] = Field(default_factory=lambda: ["portable"], min_length=1, description="graph flavours: `portable` (standard ONNX ops; always required, it is the reference the others are derived from), `onnxruntime` (in `onnxruntime/`, docs/onnxruntime.md) and `tensorrt` (in `tensorrt/`, plugin nodes; needs `activations.bits: 4` and onnxruntime-extensions; docs/gpu.md), `torch` (in `torch/`, the PyTorch path as torch.export archives for `quota-compile run --backend torch`; docs/gpu.md), and any flavour registered with `quota_compile.flavours.registry.register_flavour` (docs/architecture.md)")
    onnxruntime: OnnxruntimeExport = Field(default_factory=OnnxruntimeExport, description="settings of the onnxruntime flavour")
    # Functions applied to the portable graphs after export, before the flavours and the
    # verification (quota_compile/export/user_passes.py): "module:function", the module importable
    # from sys.path or the YAML file's folder.
    passes: list[str] = Field(default_factory=list, description="your own passes over the exported portable graphs, as `module:function`, in order, before verification: they edit the portable graphs only (the onnxruntime and tensorrt flavours are translated from the semantic graphs and do not see them); each function is called as `function(model, graph)` (an `onnx.ModelProto`, and `vision`, `prefill` or `decode`) and edits the model in place or returns a new one; the module is imported from `sys.path` or the YAML file's folder. `compile` only (eval and bench measure the compiler's own graphs). The gate holds their result to the same checks: a pass that changes what a graph computes gets exit code 1")

    @field_validator("passes")
    @classmethod
    def _pass_names(cls, v: list[str]) -> list[str]:
        for spec in v:
            if not _PASS.match(spec):
                raise ValueError(f"{spec!r} is not of the form module:function (e.g. my_passes:fuse_gelu)")
        return v

    @field_validator("targets")
    @classmethod
    def _portable_first(cls, v: list[str]) -> list[str]:
        for name in v:
            if name not in TARGETS:
                raise ValueError(f"{name!r} is not a flavour; the flavours are {_alternatives(TARGETS)}")
        if "portable" not in v:
            raise ValueError("must include portable (the onnxruntime and tensorrt flavours are derived from the portable graphs, which every bundle carries)")
        if len(set(v)) != len(v):
            raise ValueError("lists a target twice")
        return v


class FlavourTolerances(_Section):
    """Tolerances for the onnxruntime flavour; unset keys take the portable ones. At
    ``accuracy_level: 4`` MatMulNBits requantizes the activations to int8, which flips codes
    after it by design (builtin:shapes-llava version 1, 4 samples: 1.8e-3 of the activation codes,
    1.1e-2 of the KV codes, up to 4.6 % of one tensor; greedy agreement 75 %); such a config sets its
    own (e.g. max_code_flip_rate 0.05, max_tensor_code_flip_rate 0.1, min_greedy_agreement
    below 1) or uses accuracy_level 0."""

    max_code_flip_rate: float | None = Field(None, ge=0.0, le=1.0, description="the onnxruntime flavour's `verify.max_code_flip_rate`; null: the portable value")
    max_tensor_code_flip_rate: float | None = Field(None, ge=0.0, le=1.0, description="the onnxruntime flavour's `verify.max_tensor_code_flip_rate`; null: the portable value")
    kept_tie_tolerance: float | None = Field(None, ge=0.0, description="the onnxruntime flavour's `verify.kept_tie_tolerance`; null: the portable value")
    max_kv_scale_rel_difference: float | None = Field(None, gt=0.0, description="the onnxruntime flavour's `verify.max_kv_scale_rel_difference`; null: the portable value, or 0.05 at `export.onnxruntime.accuracy_level: 4`")
    max_teacher_forced_rel_error: float | None = Field(None, gt=0.0, description="the onnxruntime flavour's `verify.max_teacher_forced_rel_error`; null: the portable value, or 0.05 at `export.onnxruntime.accuracy_level: 4`")
    min_greedy_agreement: float | None = Field(None, ge=0.0, le=1.0, description="the onnxruntime flavour's `verify.min_greedy_agreement`; null: the portable value")
    max_logits_rel_error: float | None = Field(None, gt=0.0, description="the onnxruntime flavour's `verify.max_logits_rel_error`; null: the portable value")
    min_kept_index_agreement: float | None = Field(None, ge=0.0, le=1.0, description="the onnxruntime flavour's `verify.min_kept_index_agreement`; null: the portable value")


class VerifySection(_Section):
    samples: int = Field(4, ge=1, description="held-out samples (seeded synthetic images and questions)")
    new_tokens: int = Field(16, ge=1, description="greedy tokens generated per sample (EOS ignored)")
    seed: int = Field(1234, ge=0, description="seed for the held-out samples")
    # The gate (quota_compile/verify/gate.py): every graph call is repeated in onnxruntime on the
    # simulation's very inputs, in a verification-only copy of the graph whose quantizers'
    # readers are fed the simulation's codes (teacher forcing, so one difference does not
    # cascade), and the INT4/INT8 codes both sides compute are compared: every activation
    # quantizer's, and the KV cache's (codes and zero points). Float reassociation moves a value
    # across a rounding boundary now and then (one code step). Measured: builtin:shapes-llava
    # (examples/shapes-llava.yaml, 16 samples) 1 of 5.7e6 activation codes (1.7e-7), 2 of 9.4e5
    # KV codes (2e-6); its 6-layer version 1 without rotation 12 of 3.0e6 (4e-6) and 0 of 4.7e5;
    # builtin:tiny-llava 0 of 5.7e5 and 1.2e5. A wrong graph flips a large fraction
    # (a wrong activation scale: most of that quantizer's codes). The rate is per kind, over
    # every compared code of the verification.
    max_code_flip_rate: float = Field(1e-3, ge=0.0, le=1.0, description="largest allowed fraction of differing codes, per kind (activation quantizers; KV cache codes and zero points), when every graph call is repeated in onnxruntime on the simulation's inputs with teacher forcing (docs/verification.md); measured on `builtin:shapes-llava` 2e-6, on `builtin:tiny-llava` 0")
    # The same for each tensor alone (one activation quantizer, or one layer's key, value or
    # their zero points, over every call and sample): a wrong weight or scale shows where it
    # is. One flip in a tensor always passes (a decode tensor over a few steps has few codes).
    max_tensor_code_flip_rate: float = Field(1e-2, ge=0.0, le=1.0, description="the same for each tensor alone (one quantizer, or one layer's key / value / zero points, over all calls); one flip in a tensor always passes")
    # A pruning layer may keep another set of visual tokens than the simulation only at a
    # near-tie: every token kept by one side only must have a reference score within this
    # fraction of the score scale (the spread, largest minus smallest, of the layer's candidate scores) of the
    # k-th largest reference score. Measured on builtin:shapes-llava (16 samples): all 96
    # (sample, pruning layer) kept sets identical, onnxruntime's scores on the same inputs within
    # 1.1e-4 of that scale. Its version 1 (6 layers, no rotation): scores up to 9.4e-3 apart
    # (after a code flip in an earlier layer), and the one pair of 32 whose kept sets differed
    # had a margin of 8.4e-4; a swap within twice the largest score difference is a tie. On an
    # untrained model's near-uniform attention, the lowest-k instead of the top-k is a margin
    # of 0.54.
    kept_tie_tolerance: float = Field(2e-2, ge=0.0, description="with pruning: a kept set may differ from the simulation's only in tokens whose reference score is within this fraction of the score scale (the spread, largest minus smallest, of the layer's candidate scores) of the k-th largest score")
    # The KV cache's float scales (per_token caches store one per token and head), computed on
    # the same inputs (teacher-forced): largest relative difference to the simulation's. Float
    # reassociation moves them by about 1e-6 (builtin:tiny-llava: 4.5e-7, builtin:shapes-llava
    # version 1: 8.0e-7); a stored scale that
    # is wrong (dropped, or from another tensor) changes every value read back from the cache.
    max_kv_scale_rel_difference: float = Field(1e-3, gt=0.0, description="largest allowed relative difference of a stored KV-cache scale from the simulation's (same inputs, teacher-forced); float reassociation moves them by about 1e-6")
    # The float tail after the last quantizer (final norm, lm_head; the projector's output):
    # each graph's first output (image features, logits) from the teacher-forced copy, whose
    # quantizers read the simulation's codes, against the simulation's on the same inputs
    # (relative L2 error). Only float reassociation separates them: measured builtin:tiny-llava
    # 2.8e-7, builtin:shapes-llava 1.0e-6 (16 samples); a logit raised by three standard
    # deviations of its row is 0.15. (The onnxruntime flavour at accuracy_level 4: see
    # LEVEL4_FLOAT_TOLERANCES.)
    max_teacher_forced_rel_error: float = Field(1e-3, gt=0.0, description="largest allowed relative (L2) error of each graph's first output (image features, logits) computed by the teacher-forced copy (the simulation's codes fed to every quantizer's reader) against the simulation's: the float tail after the last quantizer")
    # Every sample's greedy tokens identical (the end-to-end check, each side decoding alone).
    min_greedy_agreement: float = Field(1.0, ge=0.0, le=1.0, description="smallest allowed fraction of samples whose greedy tokens are all identical (a sample that diverges only after a rounding tie counts as agreeing: `rounding_tie_tolerance`)")
    # One code flip at a rounding boundary can change every later code of a small or untrained
    # model and so its greedy tokens (examples/tiny-llava.yaml under torch 2.10: in one prefill,
    # one activation code of 2,112 one step off, the simulation's value exactly on the
    # boundary (x / scale = n + 0.5 in float32); 4.8 % logits error after it, tokens differ from
    # the 9th on). A sample whose tokens differ still agrees when,
    # in every call on the same inputs, the first codes that differ (in the order the call
    # computes them) moved by one step and lay within this many code steps of a rounding
    # boundary in the simulation (or were a near-tie kept set); a wrong graph's first
    # difference is not that close (a uniform margin is below 1e-3 one time in 500).
    rounding_tie_tolerance: float = Field(1e-3, ge=0.0, le=0.5, description="a sample whose greedy tokens differ still agrees if each call's first differing codes (same inputs, in the order computed) moved one step and were within this many code steps of a rounding boundary in the simulation (docs/verification.md); 0: tokens must be identical")
    # Reported figures (verify.json), which gate only as far as set here: the worst relative
    # logits error up to the first differing token, and the share of (sample, pruning layer)
    # pairs with identical kept sets. One code flip on a confident trained model moves the
    # logits visibly without changing a token (builtin:shapes-llava version 1: up to 0.33), so the logits
    # error is not a gate; its default is only a sanity bound (an error as large as the logits
    # themselves), which no correct graph approaches.
    max_logits_rel_error: float = Field(1.0, gt=0.0, description="`‖ort − torch‖ / ‖torch‖` of the logits at any step up to the first token where the two disagree: a reported figure, gating only above this sanity bound")
    min_kept_index_agreement: float | None = Field(None, ge=0.0, le=1.0, description="with pruning: if set, smallest allowed fraction of (sample, pruning layer) pairs whose kept indices are identical (reported either way)")
    onnxruntime: FlavourTolerances = Field(default_factory=FlavourTolerances, description="the onnxruntime flavour's own tolerances (its `accuracy_level: 4` arithmetic differs from the simulation by design: on `builtin:shapes-llava` version 1, 1.8e-3 of the activation codes and 1.1e-2 of the KV codes flip, up to 4.6 % of one tensor)")

    def for_flavour(self, flavour: str, accuracy_level: int | None = None) -> "VerifySection":
        """These settings with the flavour's own tolerances where it sets them. The onnxruntime
        flavour at ``accuracy_level: 4`` gets :data:`LEVEL4_FLOAT_TOLERANCES` for the float
        comparisons it does not set itself."""
        if flavour != "onnxruntime":
            return self
        level4 = LEVEL4_FLOAT_TOLERANCES if accuracy_level == 4 else {}
        return self.model_copy(update={**level4, **self.onnxruntime.model_dump(exclude_none=True)})


# MatMulNBits at accuracy_level 4 requantizes each W4A4 Linear's activations to int8 per weight
# block, so the onnxruntime flavour's float outputs and KV scales differ from the simulation by
# design even with the simulation's codes fed in (builtin:shapes-llava version 1, examples/shapes-llava.yaml
# with both targets, 8 samples: teacher-forced logits 9.1e-3, image features 1.6e-3, KV scales
# 1.4e-2; at accuracy_level 0: 9.3e-7 and 6.6e-7). Unless verify.onnxruntime sets them, that
# flavour's two float bounds are these (a dropped scale or a wrong logit is 10x to 1000x more).
LEVEL4_FLOAT_TOLERANCES = {"max_teacher_forced_rel_error": 0.05, "max_kv_scale_rel_difference": 0.05}


BENCHMARK_NAMES = ("pope", "mme", "gqa", "scienceqa_img", "mmbench", "seed_bench_img")


class BenchmarksSection(_Section):
    """Folders holding local copies of public benchmarks in their official formats."""

    pope: str | None = Field(None, description="folder with a local copy of POPE in its official layout, relative to the YAML (docs/eval.md); null: not scored")
    mme: str | None = Field(None, description="the same for MME")
    gqa: str | None = Field(None, description="the same for GQA")
    scienceqa_img: str | None = Field(None, description="the same for ScienceQA-IMG")
    mmbench: str | None = Field(None, description="the same for MMBench")
    seed_bench_img: str | None = Field(None, description="the same for SEED-Bench-IMG")
    limit: int | None = Field(None, ge=1, description="only the first this-many items of each benchmark; null: all")


class EvalSection(_Section):
    """``quota-compile eval``: accuracy and retention of every variant through its ONNX graphs."""

    split: Literal["test", "calibration"] = Field("test", description="ShapesVQA split that `quota-compile eval` answers")
    questions: int = Field(1000, ge=1, description="the first this-many questions of the split")
    seed: int = Field(0, ge=0, description="ShapesVQA seed of the evaluated questions")
    keep_ratios: list[float] = Field(default_factory=lambda: [0.5, 0.3, 0.2], min_length=1, description="budgets at which every method is evaluated, each between 0 and 1 (exclusive)")
    methods: list[EvaluatedMethodName] = Field(default_factory=lambda: list(EVAL_METHODS), description="pruning methods evaluated at every budget (the other `pruning.*` keys apply to them)")
    batch_size: int = Field(100, ge=1, description="questions per onnxruntime batch")
    max_new_tokens: int = Field(4, ge=1, description="greedy tokens per answer (up to EOS)")
    simulation_check: int = Field(32, ge=0, description="questions also answered by the eager PyTorch simulation of each variant; the share of identical answers is reported")
    bootstrap_resamples: int = Field(2000, ge=100, description="resamples of the questions behind each accuracy's and retention's 95 % percentile-bootstrap interval (seeded by `eval.seed`; docs/eval.md)")
    benchmarks: BenchmarksSection = Field(BenchmarksSection(), description="local copies of public benchmarks to score as well (docs/eval.md)")

    @field_validator("keep_ratios")
    @classmethod
    def _ratios(cls, v: list[float]) -> list[float]:
        for r in v:
            if not 0.0 < r < 1.0:
                raise ValueError(f"every keep ratio must be between 0 and 1 (exclusive), got {r}")
        return v


class BenchSection(_Section):
    """``quota-compile bench``: speed of the deployment variants."""

    repeats: int = Field(5, ge=1, description="timed repetitions per variant (medians reported)")
    warmup: int = Field(1, ge=0, description="untimed repetitions first")
    new_tokens: int = Field(64, ge=1, description="decode steps timed after the prefill (EOS ignored)")
    prompt_tokens: int = Field(64, ge=1, description="the question text is lengthened to at least this many tokens")
    threads: int | None = Field(None, ge=1, description="intra-op threads of PyTorch and onnxruntime; null: torch's default")
    paths: list[Literal["onnxruntime", "torch"]] = Field(["onnxruntime"], min_length=1, description="which execution paths are timed besides the Hugging Face model: `onnxruntime` (the fp32, weight-only, quantized and bundle graphs, on the CPU) and/or `torch` (the quantized and the bundle's traced programs through the PyTorch path on `bench.device`: the Triton kernels on CUDA, their PyTorch definitions on the CPU)")
    device: str = Field("cpu", description="where the Hugging Face model and the `torch` path run: `cpu`, `cuda` or `cuda:N` (refused, exit 2, without a GPU torch can use); onnxruntime always runs on the CPU")
    dtype: Literal["float16", "bfloat16", "float32"] = Field("float16", description="the Hugging Face model's dtype on a CUDA `bench.device` (on the CPU it runs in float32)")
    torch_weight_layouts: list[Literal["graph", "kmajor"]] = Field(["graph"], min_length=1, description="with `torch` in `bench.paths`: the INT4 weight layouts the PyTorch path is timed with, each a row per build: `graph` (the graphs' packing, the `w4a4_linear` kernel) and/or `kmajor` (converted once to the K-major layout where it fits, the `w4a4_kmajor` kernel; rows named `<variant> kmajor`)")
    batch_sizes: list[int] = Field([1], min_length=1, description="batch sizes timed, each a row per variant (the bench prompt repeated); rows of batch B > 1 are named `<variant> xB`")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        try:
            d = torch.device(v)
        except RuntimeError:
            raise ValueError(f"{v!r} is not a torch device (cpu, cuda or cuda:N)") from None
        if d.type not in ("cpu", "cuda"):
            raise ValueError(f"{v!r}: the bench runs on cpu or cuda")
        return v

    @field_validator("paths", "batch_sizes", "torch_weight_layouts")
    @classmethod
    def _distinct(cls, v: list) -> list:
        if len(set(v)) != len(v):
            raise ValueError(f"{v} lists an entry twice")
        if any(isinstance(x, int) and x < 1 for x in v):
            raise ValueError(f"{v}: batch sizes must be at least 1")
        return v


class OutputSection(_Section):
    dir: str = Field("exported", description="parent folder of the bundle, relative to the current working directory")
    name: str | None = Field(None, description="bundle folder name: letters, digits, `.`, `_`, `-`; null: the YAML file's stem")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and not _NAME.match(v):
            raise ValueError("must be a plain folder name (letters, digits, '.', '_', '-')")
        return v


class CompileConfig(_Section):
    version: Literal[1] = Field(description="config format version")
    model: ModelSection = Field(description="the model to compile")
    quantization: QuantizationSection = Field(QuantizationSection(), description="W4A4 weights and activations, the KV cache, the token embeddings, rotations (docs/quantization.md)")
    pruning: PruningSection = Field(PruningSection(), description="visual-token pruning: QUOTA and the baselines (docs/pruning.md)")
    calibration: CalibrationSection = Field(CalibrationSection(), description="the calibration data used by GPTQ, `pruning.method: quota` and the `per_channel` KV cache")
    export: ExportSection = Field(ExportSection(), description="the ONNX graphs and their flavours")
    verify: VerifySection = Field(VerifySection(), description="the gate between the graphs and the PyTorch simulation (docs/verification.md)")
    eval: EvalSection = Field(EvalSection(), description="`quota-compile eval`: accuracy and retention (docs/eval.md)")
    bench: BenchSection = Field(BenchSection(), description="`quota-compile bench`: speed (benchmarks/README.md)")
    output: OutputSection = Field(OutputSection(), description="where the bundle is written")


def _describe(err: dict[str, Any]) -> str:
    kind, ctx, got = err["type"], err.get("ctx") or {}, err.get("input")
    if kind == "extra_forbidden":
        return "is not a known key"
    if kind == "missing":
        return "is required but missing"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}, got {got!r}"
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return f"must be an integer, got {got!r}"
    if kind in ("float_parsing", "float_type"):
        return f"must be a number, got {got!r}"
    if kind in ("string_type",):
        return f"must be a string, got {got!r}"
    if kind in ("list_type",):
        return f"must be a list, got {got!r}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"must be a mapping of keys, got {got!r}"
    if kind == "greater_than":
        return f"must be greater than {ctx.get('gt')}, got {got!r}"
    if kind == "greater_than_equal":
        return f"must be at least {ctx.get('ge')}, got {got!r}"
    if kind == "less_than_equal":
        return f"must be at most {ctx.get('le')}, got {got!r}"
    if kind == "too_short":
        return "must not be empty"
    if kind == "value_error":
        return f"is invalid: {ctx.get('error', err['msg'])}"
    return err["msg"][0].lower() + err["msg"][1:]


def _key(loc: tuple) -> str:
    return ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in loc).replace(".[", "[")


def parse_config(data: Any, path: Path) -> CompileConfig:
    """Validate a parsed YAML document; raise :class:`UserError` naming the first bad key."""
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of sections at the top level, got {type(data).__name__}.")
    if "version" in data and data["version"] != CONFIG_VERSION:
        raise UserError(f"{path}: key 'version' must be {CONFIG_VERSION}, got {data['version']!r}.")
    try:
        return CompileConfig.model_validate(data)
    except ValidationError as e:
        raise UserError(f"{path}: {validation_message(e)}.") from None


def validation_message(e: ValidationError) -> str:
    """The first bad key of a pydantic error and what was expected, as ``key 'a.b' ...``
    (for model.yaml, recipe.yaml and manifest.json alike)."""
    err = _most_specific(e.errors())
    key = _key(err["loc"])
    return f"key '{key}' {_describe(err)}" if key else _describe(err)


def _is_branch(part) -> bool:
    """Pydantic names the alternatives of a union in the error location (``literal['auto']``,
    ``ScoreWeightsSection``); they are not keys of the file."""
    return isinstance(part, str) and (part.startswith(("literal[", "function-")) or part[:1].isupper())


def _most_specific(errors: list[dict]) -> dict:
    """For a union (``weights: auto | {att, mag, risk}``) given a mapping, report the mapping's
    own error rather than "must be 'auto'"."""
    first = errors[0]
    if isinstance(first.get("input"), dict):
        nested = [e for e in errors if any(_is_branch(p) and not p.startswith("literal[") for p in e["loc"])]
        first = nested[0] if nested else first
    return {**first, "loc": tuple(p for p in first["loc"] if not _is_branch(p))}


def load_config(path: str | Path) -> CompileConfig:
    """Read and validate ``model.yaml``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file (expected a model.yaml).")
    return parse_config(read_yaml(path), path)


def read_yaml(path: Path) -> Any:
    """Parse a YAML file; anything that is not YAML text is a :class:`UserError` naming the
    file and, where the parser knows it, the line and column."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file.") from None
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror or e}).") from None
    try:
        return yaml.safe_load(text)
    except yaml.reader.ReaderError as e:  # a character YAML does not allow (a NUL byte, a control character)
        line = text.count("\n", 0, e.position) + 1
        column = e.position - (text.rfind("\n", 0, e.position) + 1) + 1
        raise UserError(f"{path}: malformed YAML at line {line}, column {column} (character {chr(e.character)!r} is not allowed in a YAML file).") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"{path}: malformed YAML{where} ({getattr(e, 'problem', None) or e}).") from None


def resolve_source(cfg: CompileConfig, folder: Path) -> str | Path:
    """``builtin:NAME`` stays a string; a folder path is resolved against ``folder`` (the YAML's)."""
    src = cfg.model.source
    if src.startswith("builtin:"):
        return src
    p = Path(src).expanduser()
    return p if p.is_absolute() else (folder / p).resolve()


def bundle_name(cfg: CompileConfig, config_path: Path) -> str:
    return cfg.output.name or config_path.stem
