"""QuaRot-style rotations of the decoder: offline, folded into the weights, and
online, computed in the graph.

Used by ``quantization.rotation: hadamard`` (:func:`quota_compile.calibration.calibrate.quantize_model`,
before the weights are quantized). What :func:`rotate_llava` does, to a LLaVA-family model in
place:

1. fold each RMSNorm's scale into the Linears that read it (``q/k/v`` for
   ``input_layernorm``, ``gate/up`` for ``post_attention_layernorm``, ``lm_head`` for the final
   norm) and set the scale to 1; an RMSNorm without scale commutes with any orthogonal
   matrix (it divides by the root mean square, which an orthogonal map keeps);
2. rotate the residual stream by an orthogonal ``Q`` (:func:`random_hadamard`): every writer of
   the stream (the token embeddings, the projector's last Linear, ``o_proj``, ``down_proj``)
   gets ``Q`` on its output side, every reader (``q/k/v``, ``gate/up``, ``lm_head``) ``Qᵀ`` on
   its input side;
3. with ``online=True`` (``quantization.online_rotation``, the default):

   - ``down_proj``'s input is rotated in the graph by ``R_I`` (the MLP's intermediate size) and
     its weight by the same ``R_I`` offline, so the product is unchanged while the per-token
     INT4 quantizer, which the passes put after the rotation, sees the spread-out activations;
   - the value path: each value head is rotated by ``H_d`` (head size) offline, on ``v_proj``'s
     output side and ``o_proj``'s input side (so the value cache holds rotated values), and
     ``o_proj``'s input is rotated in the graph by ``R_D`` (all heads) as ``down_proj``'s is;
   - the query and key heads are rotated by the same ``H_d`` after RoPE, in the graph
     (:class:`quota_compile.capture.programs` applies ``self_attn.qk_rotation``); the scores do not
     change and the key cache holds rotated keys. Hugging Face's own attention does not apply
     it, which changes nothing in full precision.

The full-precision function is unchanged up to rounding. The online rotations are
:class:`KroneckerRotation` modules: ``x @ R`` for ``R = (A ⊗ H₁ ⊗ H₂) · diag(s)``, with ``H₁``,
``H₂`` normalised Sylvester–Hadamard matrices whose product is the power-of-two part of the
size, ``A`` a seeded random orthogonal matrix for the odd part (11008 = 43 · 256) and ``s``
random signs. In the graph that is a Reshape, one small MatMul per factor and a Mul: about
``n · (m + p₁ + p₂)`` multiply-adds per token instead of ``n²`` for a dense matrix.
"""

from __future__ import annotations

import torch


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _odd_orthogonal(m: int, g: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]  # a unique QR: R with a positive diagonal


class KroneckerRotation(torch.nn.Module):
    """``x -> x @ R`` along the last axis, ``R = (A ⊗ H₁ ⊗ H₂) · diag(s)`` orthogonal ``[n, n]``
    (see the module docstring), computed factor by factor. Deterministic in ``(n, seed)``.
    The factors are float32 buffers; a float64 input is rotated with float64 copies."""

    def __init__(self, n: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        p = n & -n  # largest power of two dividing n
        self.n, self.m = n, n // p
        k = p.bit_length() - 1
        self.p1, self.p2 = 2 ** (k // 2), 2 ** (k - k // 2)
        signs = torch.randint(0, 2, (n,), generator=g, dtype=torch.int64).to(torch.float64) * 2 - 1
        odd = _odd_orthogonal(self.m, g) if self.m > 1 else torch.ones(1, 1, dtype=torch.float64)
        self._f64 = {
            "signs": signs,
            "odd_t": odd.T.contiguous(),
            "h1_t": (_sylvester(self.p1) / self.p1**0.5).T.contiguous(),
            "h2": _sylvester(self.p2) / self.p2**0.5,
        }
        for name, t in self._f64.items():
            self.register_buffer(name, t.to(torch.float32))

    def _factor(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        return self._f64[name] if dtype == torch.float64 else getattr(self, name).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = x.reshape(*lead, self.m, self.p1, self.p2)
        y = torch.matmul(y, self._factor("h2", x.dtype))
        if self.p1 > 1:
            y = torch.matmul(self._factor("h1_t", x.dtype), y)  # acts on the p1 axis
        y = y.reshape(*lead, self.m, self.p1 * self.p2)
        if self.m > 1:
            y = torch.matmul(self._factor("odd_t", x.dtype), y)  # acts on the m axis
        return y.reshape(*lead, self.n) * self._factor("signs", x.dtype)

    def matrix(self) -> torch.Tensor:
        """``R`` as a dense float64 matrix (what the weights are multiplied by offline)."""
        f = self._f64
        dense = torch.kron(f["odd_t"].T.contiguous(), torch.kron(f["h1_t"].T.contiguous(), f["h2"]))
        return dense * f["signs"][None, :]


def random_hadamard(n: int, seed: int = 0) -> torch.Tensor:
    """An ``[n, n]`` orthogonal float64 matrix: :class:`KroneckerRotation`'s ``R``."""
    return KroneckerRotation(n, seed).matrix()


class RotatedLinear(torch.nn.Linear):
    """``nn.Linear`` whose input is first rotated by ``input_rotation`` (an online rotation; the
    weight already holds its inverse). :func:`quota_compile.quant.simulate.quantize` keeps the
    rotation when it swaps in the quantized Linear, and quantizes the rotated input."""

    input_rotation: KroneckerRotation

    @classmethod
    def wrap(cls, linear: torch.nn.Linear, rotation: KroneckerRotation) -> RotatedLinear:
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        new.weight, new.bias = linear.weight, linear.bias
        new.input_rotation = rotation
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(self.input_rotation(x), self.weight, self.bias)


# seeds of the online rotations, offset from the residual rotation's (``rotation_seed``)
_SEED_MLP, _SEED_OUT, _SEED_HEAD = 1, 2, 3


@torch.no_grad()
def _set(linear: torch.nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    linear.weight.copy_(weight.to(linear.weight.dtype))
    if bias is not None:
        linear.bias.copy_(bias.to(linear.bias.dtype))


@torch.no_grad()
def rotate_llava(model: torch.nn.Module, seed: int = 0, online: bool = True) -> torch.Tensor:
    """Fold the decoder's RMSNorm scales and rotate its residual stream, and with ``online``
    the MLP's and attention's inner activations (see the module docstring); ``model`` is a
    ``LlavaForConditionalGeneration``. Returns the residual rotation ``Q``."""
    lm = model.model.language_model
    d = lm.config.hidden_size
    q = random_hadamard(d, seed)
    f64 = lambda t: t.detach().to(torch.float64)  # noqa: E731

    def fold(norm, readers):
        g = f64(norm.weight)
        for lin in readers:
            _set(lin, f64(lin.weight) * g[None, :])
        norm.weight.fill_(1.0)

    def read(lin, r=q):  # input side: x R  ->  W R
        _set(lin, f64(lin.weight) @ r)

    def write(lin, r=q):  # output side: y R  ->  Rᵀ W, Rᵀ b
        _set(lin, r.T @ f64(lin.weight), None if lin.bias is None else r.T @ f64(lin.bias))

    emb = lm.embed_tokens
    if model.lm_head.weight.data_ptr() == emb.weight.data_ptr():  # tied: the rotation unties them
        model.lm_head.weight = torch.nn.Parameter(emb.weight.detach().clone())
    for layer in lm.layers:
        attn, mlp = layer.self_attn, layer.mlp
        fold(layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj])
        fold(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj])
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
            read(lin)
        for lin in (attn.o_proj, mlp.down_proj):
            write(lin)
        if online:
            _rotate_inner(layer, seed)
    fold(lm.norm, [model.lm_head])
    read(model.lm_head)
    emb.weight.copy_((f64(emb.weight) @ q).to(emb.weight.dtype))
    write(model.model.multi_modal_projector.linear_2)
    return q


@torch.no_grad()
def _rotate_inner(layer: torch.nn.Module, seed: int) -> None:
    """Step 3 of the module docstring for one decoder layer."""
    attn, mlp = layer.self_attn, layer.mlp
    head_dim = attn.head_dim
    head = KroneckerRotation(head_dim, seed + _SEED_HEAD)
    f64 = lambda t: t.detach().to(torch.float64)  # noqa: E731
    # The weights are multiplied by the rotations through their factors (``rot(W) = W @ R``
    # row by row), not by dense matrices: 11008² float64 would be 0.97 GB and 5·10¹¹
    # multiply-adds per 7B layer.
    # the value heads: v_h -> v_h H on v_proj's output side (W_h -> Hᵀ W_h), o_h H read on
    # o_proj's input side
    v, o = attn.v_proj, attn.o_proj
    blocks_v = v.out_features // head_dim
    wv = f64(v.weight).reshape(blocks_v, head_dim, -1).transpose(1, 2)  # [block, input, head_dim]
    _set(v, head(wv).transpose(1, 2).reshape(v.out_features, -1),
         None if v.bias is None else head(f64(v.bias).reshape(blocks_v, head_dim)).reshape(-1))
    _set(o, head(f64(o.weight).reshape(o.out_features, o.in_features // head_dim, head_dim)).reshape(o.out_features, o.in_features))
    attn.qk_rotation = head
    # o_proj and down_proj: rotated input, in the graph; the weight holds the inverse
    for parent, name, s in ((attn, "o_proj", _SEED_OUT), (mlp, "down_proj", _SEED_MLP)):
        lin = getattr(parent, name)
        rot = KroneckerRotation(lin.in_features, seed + s)
        _set(lin, rot(f64(lin.weight)))
        setattr(parent, name, RotatedLinear.wrap(lin, rot))
