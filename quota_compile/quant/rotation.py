"""QuaRot-style rotation of the decoder's residual stream (issue 6, first part: offline).

Used by ``quantization.rotation: hadamard`` (:func:`quota_compile.calibrate.quantize_model`,
before the weights are quantized). What it does, to a
LLaVA-family model in place:

1. fold each RMSNorm's scale into the Linears that read it (``q/k/v`` for
   ``input_layernorm``, ``gate/up`` for ``post_attention_layernorm``, ``lm_head`` for the final
   norm) and set the scale to 1; an RMSNorm without scale commutes with any orthogonal
   matrix (it divides by the root mean square, which an orthogonal map keeps);
2. rotate the residual stream by an orthogonal ``Q`` (:func:`random_hadamard`): every writer of
   the stream (the token embeddings, the projector's last Linear, ``o_proj``, ``down_proj``)
   gets ``Q`` on its output side, every reader (``q/k/v``, ``gate/up``, ``lm_head``) ``Qᵀ`` on
   its input side. The full-precision function is unchanged up to rounding.

Not done yet: the online Hadamard before ``down_proj`` (needs a node in the exported graphs),
and the value/output-path rotation.
"""

from __future__ import annotations

import torch


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def random_hadamard(n: int, seed: int = 0) -> torch.Tensor:
    """An ``[n, n]`` orthogonal float64 matrix: ``H_{2^k} diag(±1) / sqrt(2^k)`` for the
    power-of-two part of ``n``, Kronecker-multiplied by a seeded random orthogonal matrix (QR
    of a Gaussian one) for the odd part ``m`` when ``m > 1``."""
    g = torch.Generator().manual_seed(seed)
    p = n & -n  # largest power of two dividing n
    m = n // p
    signs = torch.randint(0, 2, (p,), generator=g, dtype=torch.int64).to(torch.float64) * 2 - 1
    h = _sylvester(p) * signs[None, :] / p**0.5
    if m == 1:
        return h
    q, r = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))[None, :]  # a unique QR: R with a positive diagonal
    return (q[:, None, :, None] * h[None, :, None, :]).reshape(n, n)  # the Kronecker product q ⊗ h


@torch.no_grad()
def _set(linear: torch.nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    linear.weight.copy_(weight.to(linear.weight.dtype))
    if bias is not None:
        linear.bias.copy_(bias.to(linear.bias.dtype))


@torch.no_grad()
def rotate_llava(model: torch.nn.Module, seed: int = 0) -> torch.Tensor:
    """Fold the decoder's RMSNorm scales and rotate its residual stream (see the module
    docstring); ``model`` is a ``LlavaForConditionalGeneration``. Returns ``Q``."""
    lm = model.model.language_model
    d = lm.config.hidden_size
    q = random_hadamard(d, seed)
    f64 = lambda t: t.detach().to(torch.float64)  # noqa: E731

    def fold(norm, readers):
        g = f64(norm.weight)
        for lin in readers:
            _set(lin, f64(lin.weight) * g[None, :])
        norm.weight.fill_(1.0)

    def read(lin):  # input side: x Q  ->  W Q
        _set(lin, f64(lin.weight) @ q)

    def write(lin):  # output side: y Q  ->  Qᵀ W, Qᵀ b
        _set(lin, q.T @ f64(lin.weight), None if lin.bias is None else q.T @ f64(lin.bias))

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
    fold(lm.norm, [model.lm_head])
    read(model.lm_head)
    emb.weight.copy_((f64(emb.weight) @ q).to(emb.weight.dtype))
    write(model.model.multi_modal_projector.linear_2)
    return q
