"""The quantized simulation: the model running the deployed low-bit operators in PyTorch.

``quantize(vlm, spec)`` swaps every ``nn.Linear`` that no ``ignore`` pattern matches for a
:class:`QuantLinear`: its input is quantized per token (INT4/INT8), its weight is the
dequantized INT4 group-wise weight. The codes are computed once, here, and are the very codes
the ``pack_int4_weights`` pass writes into the graph. The KV-cache quantizer is applied by
the programs (:mod:`quota_compile.capture.programs`), which read ``kv_bits`` from the result.

``QuantizedModel.fake_quant(False)`` turns the simulation off (the module then computes the
full-precision function with the same parameter names): that is what gets traced, and the
passes put the quantizers back into the graph.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from quota_compile.config import QuantizationSection
from quota_compile.errors import ConfigError
from quota_compile.quant import ops

# Group sizes tried, largest first, when model.yaml leaves quantization.weights.group_size
# unset: the largest one that divides every quantized Linear's input size is used.
GROUP_SIZES = (128, 64, 32, 16)


@dataclass(frozen=True)
class QuantizedWeight:
    """INT4 codes ``[K, N]`` (int8) and scales ``[K/g, N]`` of one Linear."""

    codes: torch.Tensor
    scale: torch.Tensor
    group_size: int


# The simulation keeps dequantized float weights of the quantized Linears in memory up to
# this many bytes in all (the first ones computed; never evicted, so a pass over the model
# finds the same ones every time) and dequantizes the others at each call. Small models run as
# fast as with every weight dequantized once; a large one does not hold a second float copy.
DEQUANTIZED_CACHE_BYTES = 2 << 30


@dataclass
class _State:
    enabled: bool = True
    cached_bytes: int = 0  # dequantized weights held by the Linears (DEQUANTIZED_CACHE_BYTES)


class QuantLinear(torch.nn.Linear):
    """``nn.Linear`` with W4 group-wise weights and per-token A4/A8 activations."""

    def __init__(self, linear: torch.nn.Linear, qweight: QuantizedWeight, act_bits: int, clip_ratio: float, state: _State):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        self.weight = linear.weight
        self.bias = linear.bias
        self.qweight = qweight
        self.act_bits = act_bits
        self.clip_ratio = clip_ratio
        self._state = state
        # codes and scales copied to the device the module was moved to (None: use qweight's)
        self._placed: tuple[torch.Tensor, torch.Tensor] | None = None
        self._dequantized: torch.Tensor | None = None  # within DEQUANTIZED_CACHE_BYTES
        # (device, dtype) of the float weight once :meth:`release_float_weight` dropped it
        self._released: tuple[torch.device, torch.dtype] | None = None
        # an online rotation of the input (quantization.online_rotation; the weight holds its
        # inverse): applied before the activation quantizer, in the simulation and the graph
        self.input_rotation = getattr(linear, "input_rotation", None)

    def _apply(self, fn, recurse=True):
        # .to(device) and friends: the codes are copied to the new device on first use
        super()._apply(fn, recurse)
        if self._released is not None:  # where the weight would have gone (it is a meta tensor now)
            moved = fn(torch.empty(0, device=self._released[0], dtype=self._released[1]))
            self._released = (moved.device, moved.dtype)
        self._forget()
        return self

    def release_float_weight(self) -> None:
        """Drop the float weight once nothing traces the module any more: the simulation reads
        the INT4 codes, and the float copy is the largest thing a large model holds (4 bytes per
        weight). A meta tensor of its shape and dtype takes its place, so that anything still
        computing with it (the full-precision path, :meth:`QuantizedModel.fake_quant` ``(False)``)
        fails instead of reading stale values."""
        if self._released is None:
            w = self.weight
            self._released = (w.device, w.dtype)
            self.weight = torch.nn.Parameter(torch.empty(w.shape, dtype=w.dtype, device="meta"), requires_grad=False)

    @property
    def _home(self) -> tuple[torch.device, torch.dtype]:
        """Device and dtype of the float weight (kept after it was released)."""
        return self._released or (self.weight.device, self.weight.dtype)

    def _forget(self) -> None:
        self._placed = None
        if self._dequantized is not None:
            self._state.cached_bytes -= self._dequantized.nbytes
            self._dequantized = None

    def set_qweight(self, qweight: QuantizedWeight) -> None:
        """Replace the INT4 weight (e.g. by GPTQ's codes for the same grid)."""
        self.qweight = qweight
        self._forget()

    def dequantized_weight(self) -> torch.Tensor:
        """The ``[K, N]`` weight the simulation multiplies by, in the float weight's dtype and on its
        device: computed from the INT4 codes (``codes * scale``, the same values at every call) and
        kept only while the model's kept ones stay within ``DEQUANTIZED_CACHE_BYTES``, so a large
        model does not hold a second float copy of its weights."""
        if self._dequantized is not None:
            return self._dequantized
        w = self._dequantize()
        if self._state.cached_bytes + w.nbytes <= DEQUANTIZED_CACHE_BYTES:
            self._dequantized = w
            self._state.cached_bytes += w.nbytes
        return w

    def _dequantize(self) -> torch.Tensor:
        q = self.qweight
        device, dtype = self._home
        if q.codes.device == device:
            codes, scale = q.codes, q.scale
        else:
            if self._placed is None:  # (reset by every move, so on this device when set)
                self._placed = (q.codes.to(device), q.scale.to(device))
            codes, scale = self._placed
        return ops.dequantize_weight(codes, scale, q.group_size).to(dtype)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """The activations as the deployed product sees them: rotated where the Linear has an
        online rotation, then per-token fake-quant."""
        if self.input_rotation is not None:
            x = self.input_rotation(x)
        return torch.ops.quota.qdq_per_token(x, self.act_bits, self.clip_ratio)

    def input_codes(self, x: torch.Tensor) -> torch.Tensor:
        """The per-token integer codes (int8) that :meth:`quantize_input` puts on ``x``: what the
        graph's activation QuantizeLinear outputs (for verification, which compares them)."""
        if self.input_rotation is not None:
            x = self.input_rotation(x)
        return ops.quantize_per_token(x, self.act_bits, self.clip_ratio)[0]

    def input_margins(self, x: torch.Tensor) -> torch.Tensor:
        """How far (in code steps) each value :meth:`input_codes` rounds lies from a rounding
        boundary (:func:`~quota_compile.quant.ops.rounding_margin`; for verification)."""
        if self.input_rotation is not None:
            x = self.input_rotation(x)
        return ops.per_token_margins(x, self.act_bits, self.clip_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._state.enabled:
            if self._released is not None:
                raise RuntimeError("this quantized Linear's float weight was released (release_float_weight): only the simulation can run")
            if self.input_rotation is not None:
                x = self.input_rotation(x)
            return F.linear(x, self.weight, self.bias)
        y = self.quantize_input(x) @ self.dequantized_weight()
        return y if self.bias is None else y + self.bias


class QuantEmbedding(torch.nn.Embedding):
    """``nn.Embedding`` whose table is read through its INT4 group-wise codes."""

    def __init__(self, emb: torch.nn.Embedding, codes: torch.Tensor, scale: torch.Tensor, group_size: int, state: _State):
        super().__init__(emb.num_embeddings, emb.embedding_dim, padding_idx=emb.padding_idx, device="meta")
        self.weight = emb.weight
        self.codes, self.scale, self.group_size = codes, scale, group_size
        self._state = state

    def _apply(self, fn, recurse=True):
        # .to(device) and friends also move the codes and scales (plain attributes)
        super()._apply(fn, recurse)
        if self.codes.device != self.weight.device:
            self.codes, self.scale = self.codes.to(self.weight.device), self.scale.to(self.weight.device)
        return self

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not self._state.enabled:
            return F.embedding(ids, self.weight, self.padding_idx)
        # only the rows looked up are dequantized (element-wise, so the same values as the whole
        # table dequantized and then indexed), never a float copy of the table
        rows = F.embedding(ids, self.codes).to(torch.float32) * F.embedding(ids, self.scale).repeat_interleave(self.group_size, dim=-1)
        return rows.to(self.weight.dtype)


def matches(name: str, patterns: list[str]) -> bool:
    """``re:REGEX`` matches a module name by ``re.fullmatch``; a plain string matches the module
    of that exact name and everything inside it."""
    for p in patterns:
        if p.startswith("re:"):
            if re.fullmatch(p[3:], name):
                return True
        elif name == p or name.startswith(p + "."):
            return True
    return False


@dataclass
class QuantizedModel:
    """The model with quantized Linears swapped in, plus the quantization facts."""

    model: torch.nn.Module
    spec: QuantizationSection
    weights: dict[str, QuantizedWeight] = field(default_factory=dict)  # module name -> codes
    embeddings: dict[str, QuantEmbedding] = field(default_factory=dict)  # module name -> quantized table
    # per_channel KV cache: static scales ``[layers, 2 (key, value), Hkv, 1, head_dim]``, set by
    # :func:`quota_compile.calibration.calibrate.calibrate_kv_scales`.
    kv_scales: torch.Tensor | None = None
    _state: _State = field(default_factory=_State)

    @property
    def kv_bits(self) -> int:
        return self.spec.kv_cache.bits

    @property
    def kv_granularity(self) -> str:
        return self.spec.kv_cache.granularity

    def kv_scale(self, layer: int, which: int) -> torch.Tensor:
        """Static scale of layer ``layer``'s key (``which`` 0) or value (1) cache."""
        if self.kv_scales is None:
            raise RuntimeError("the per_channel KV scales have not been calibrated")
        return self.kv_scales[layer, which]

    def release_float_weights(self) -> int:
        """:meth:`QuantLinear.release_float_weight` for every quantized Linear: for a compile
        whose graphs are traced and written (the verification runs the simulation, which reads
        the codes). Returns the bytes released."""
        released = 0
        for m in self.model.modules():
            if isinstance(m, QuantLinear) and m._released is None:
                released += m.weight.nbytes
                m.release_float_weight()
        return released

    @property
    def simulating(self) -> bool:
        """True while the quantizers are on (the default); see :meth:`fake_quant`."""
        return self._state.enabled

    @contextlib.contextmanager
    def fake_quant(self, enabled: bool) -> Iterator[None]:
        old, self._state.enabled = self._state.enabled, enabled
        try:
            yield
        finally:
            self._state.enabled = old


def quantizable_linears(model: torch.nn.Module, ignore: list[str]) -> dict[str, torch.nn.Linear]:
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and not isinstance(m, QuantLinear) and not matches(name, ignore)
    }


def settle_group_size(model: torch.nn.Module, spec: QuantizationSection) -> QuantizationSection:
    """``spec`` with ``weights.group_size`` a number: the YAML's, checked against the input size
    of every Linear it quantizes, or, where the YAML leaves it unset, the largest of
    :data:`GROUP_SIZES` that divides all of them."""
    linears = quantizable_linears(model, spec.ignore)
    sizes = sorted({lin.in_features for lin in linears.values()})
    g = spec.weights.group_size
    grouped = spec.weights.granularity == "group"
    if g is not None:
        bad = next((name for name, lin in linears.items() if lin.in_features % g), None)
        if grouped and bad is not None:
            raise ConfigError(
                "quantization.weights.group_size", f"{g} does not divide the input size "
                f"{linears[bad].in_features} of {bad}; choose a divisor of every quantized Linear's input size "
                f"({', '.join(map(str, sizes))}), or leave the key out to have one chosen."
            )
        return spec
    g = next((c for c in GROUP_SIZES if all(n % c == 0 for n in sizes)), None)
    if g is None and (grouped or (spec.embeddings.bits and spec.embeddings.group_size is None)):
        raise ConfigError(
            "quantization.weights.group_size", f"none of {', '.join(map(str, GROUP_SIZES))} divides "
            f"every quantized Linear's input size ({', '.join(map(str, sizes))}); set a group_size that does, "
            "or granularity: per_channel."
        )
    weights = spec.weights.model_copy(update={"group_size": g})
    return spec.model_copy(update={"weights": weights})


def quantize(model: torch.nn.Module, spec: QuantizationSection) -> QuantizedModel:
    """Swap the quantized Linears in place (RTN weights) and return the simulation handle."""
    spec = settle_group_size(model, spec)
    qm = QuantizedModel(model=model, spec=spec)
    g = spec.weights.group_size
    for name, lin in quantizable_linears(model, spec.ignore).items():
        gl = lin.in_features if spec.weights.granularity == "per_channel" else g
        codes, scale = ops.quantize_weight_rtn(lin.weight, spec.weights.bits, gl)
        qw = QuantizedWeight(codes=codes, scale=scale, group_size=gl)
        qm.weights[name] = qw
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QuantLinear(lin, qw, spec.activations.bits, spec.activations.clip_ratio, qm._state))
    if spec.embeddings.bits:
        ge = spec.embeddings.group_size or g
        emb = model.get_input_embeddings()
        name = next(n for n, m in model.named_modules() if m is emb)
        codes, scale = ops.quantize_rows_rtn(emb.weight, spec.embeddings.bits, ge)
        qe = QuantEmbedding(emb, codes, scale, ge, qm._state)
        qm.embeddings[name] = qe
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, qe)
    return qm
