"""Triton kernels vs their PyTorch references, under Triton's CPU interpreter.

``TRITON_INTERPRET=1`` must be in the environment when triton is first imported: triton 3.8
reads it whenever a ``@triton.jit`` function is decorated, and its own ``triton.language``
helpers (``tl.cdiv``, ``tl.interleave``) are decorated at import. ``tests/__init__.py``, which
pytest imports before anything else of the suite, imports triton that way. The variable is set
again at the top of this module, for the kernel modules imported (or reloaded) below, kept
while this module's tests run (the interpreter consults it at run time too) and restored
otherwise.

When the tests cannot run, they fail, with the reason, rather than skip: triton imported
compiled before ``tests/__init__.py`` could import it is something in the session to fix, and
a missing triton on Linux means the test extra is not installed (``pip install -e '.[test]'``
installs triton there). Only where the test extra does not install triton (not Linux) is a
missing triton a reason to skip.

Tolerances are bounds on float rounding only; the integers are compared exactly.
- W4A4: kernel and reference do the same float32 operations on the same exact integer sums;
  only their order and fusion (FMA on a GPU) may differ: at most ``G + 2`` roundings
  (``G = K / group_size``), each ``<= 2**-24`` relative to the magnitude
  ``B = |x_dq| @ |W_dq| + |bias|`` of the terms. Allowed: ``4 (G + 2) 2**-24 B`` (fp32 out),
  plus one fp16 ulp of the output for fp16 outputs. One activation or weight code off by one
  moves an output by ``|w| ws xs`` or ``|q| ws xs``, about ``B / K`` — 10**4 times more.
- Reference vs the simulation (``qdq_per_token(x) @ dequantize_weight``): a float32 matmul
  of K terms, ``4 (K + G + 2) 2**-24 B``.
- Decode attention: the dequantized K/V are bit-identical; the dot products (D terms), the
  exponentials and the sums (T terms) differ in order: ``1e-4 * max|V|`` absolute (observed
  ~1e-7 * max|V|); a wrong code, zero point, nibble or mask moves outputs by ~1e-1 * max|V|.
  The same with the additive bias and the new entry (its values count in ``max|V|``).
- The PyTorch path against the simulation: logits within ``1e-4`` of their largest magnitude
  (as the verification's relative error), tokens and kept indices equal.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

_PREVIOUS_INTERPRET = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: see the module docstring

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from quota_compile import kernels  # noqa: E402  (imports no kernel module)
from quota_compile.quant import ops  # noqa: E402


def _restore_interpret_env() -> None:
    if _PREVIOUS_INTERPRET is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _PREVIOUS_INTERPRET


def _import_interpreted():
    """The kernel modules, decorated in interpreter mode (reloaded if imported compiled)."""
    mods = []
    for name in ("w4a4_linear", "kv_attention", "w4a4_kmajor"):  # w4a4_kmajor after the module it imports
        mod = importlib.import_module(f"quota_compile.kernels.{name}")
        mods.append(mod if kernels.module_is_interpreted(mod) else importlib.reload(mod))
    return mods


def _cannot_run() -> str | None:
    """Why this module's tests cannot run here (they fail with it), or None; skips the module
    only where the test extra does not install triton."""
    try:
        import triton
    except ImportError as err:
        if not sys.platform.startswith("linux"):
            pytest.skip(f"triton is not installed (the test extra installs it on Linux only): {err}", allow_module_level=True)
        return f"triton is not installed: the test extra installs it on Linux (pip install -e '.[test]'): {err}"
    if not kernels.is_interpreted(triton.language.cdiv):
        return ("triton was imported before TRITON_INTERPRET=1 was set, so its kernels are compiled for a GPU, not "
                "interpreted: something imported it before tests/__init__.py could (a pytest plugin, or PYTHONSTARTUP?); "
                "run pytest without it, or with TRITON_INTERPRET=1 in the environment")
    return None


CANNOT_RUN = _cannot_run()
W, A, KM = _import_interpreted() if CANNOT_RUN is None else (None, None, None)
_restore_interpret_env()
U = 2.0**-24  # float32 unit roundoff
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def _interpreter_env():
    """Fails every test of this module where they cannot run (``CANNOT_RUN``). The interpreter
    consults ``TRITON_INTERPRET`` at run time too: set while this module runs."""
    if CANNOT_RUN is not None:
        pytest.fail(CANNOT_RUN, pytrace=False)
    os.environ["TRITON_INTERPRET"] = "1"
    yield
    _restore_interpret_env()


# ---------------------------------------------------------------------------- helpers


def _weights(n: int, k: int, group: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RTN INT4 codes ``[K, N]``, their ``pack_int4`` bytes and scales ``[K/group, N]``."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    codes, scale = ops.quantize_weight_rtn(w, 4, group)
    return codes, ops.pack_int4(codes), scale


def _magnitude(x, codes, w_scale, group, clip, bias) -> torch.Tensor:
    """``|x_dq| @ |W_dq| + |bias|``: the size of the terms every output sums."""
    x_dq = ops.qdq_per_token(x.float().reshape(-1, x.shape[-1]), 4, clip)
    w_dq = ops.dequantize_weight(codes, w_scale, group)
    mag = x_dq.abs() @ w_dq.abs()
    return mag if bias is None else mag + bias.abs()


def _assert_within(out: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor) -> None:
    err = (out.float() - ref.float()).abs()
    worst = (err - bound).max().item()
    assert worst <= 0, f"max error {err.max().item():.3g} exceeds the bound by {worst:.3g}"


def _tie_rows() -> torch.Tensor:
    """Rows whose ``x / scale`` are exact halves (scales 1, 0.5, 2), padded to K = 32."""
    halves = torch.arange(-6.5, 7.0, 1.0)  # -6.5 ... 6.5: every tie, both signs
    rows = []
    for scale in (1.0, 0.5, 2.0):
        row = torch.zeros(32)
        row[0] = 7.0 * scale  # the row maximum: scale = 7 * scale / 7 exactly
        row[1:1 + halves.numel()] = halves * scale
        row[16:16 + halves.numel()] = -halves * scale
        rows.append(row)
    return torch.stack(rows)


def _division_sensitive_rows(rows: int = 4, k: int = 64) -> torch.Tensor:
    """Rows with elements next to ``(j + 1/2) * scale`` whose code differs between the correctly
    rounded ``x / scale`` and ``x * (1 / scale)``: only an IEEE division gets them all right.
    (For some scales the two never differ; those row maxima are skipped.)"""
    rng = np.random.default_rng(0)
    out = []
    while len(out) < rows:
        amax = np.float32(rng.uniform(0.5, 8.0))
        scale = np.float32(amax / np.float32(7.0))
        inv = np.float32(np.float32(1.0) / scale)
        found = [amax]
        for _ in range(20 * k):
            tie = np.float32((rng.integers(-7, 7) + 0.5) * scale)
            x = np.nextafter(tie, np.float32(rng.choice([-1e9, 1e9])))
            if np.rint(np.float32(x / scale)) != np.rint(np.float32(x * inv)):
                found.append(x)
            if len(found) == k:
                out.append(found)
                break
    return torch.tensor(np.array(out, np.float32))


# ---------------------------------------------------------------------------- activation codes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("clip", [1.0, 0.9])
def test_activation_codes_bit_identical(dtype, clip):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(33, 96, generator=g) * torch.logspace(-3, 3, 33)[:, None]
    x[3] = 0.0  # all-zero row: the scale floor
    x[4] = 1e-12 * torch.randn(96, generator=g)  # below the floor
    x = x.to(dtype)
    codes, scale = W.quantize_activations(x, clip)
    ref_codes, ref_scale = W.quantize_activations_reference(x, clip)
    assert codes.dtype == torch.int8 and scale.dtype == torch.float32
    assert torch.equal(codes, ref_codes)
    assert torch.equal(scale.view(torch.int32), ref_scale.view(torch.int32))


def test_ties_round_half_to_even():
    x = _tie_rows()
    codes, scale = W.quantize_activations(x, 1.0)
    expected = np.clip(np.rint(x.numpy() / np.array([[1.0], [0.5], [2.0]], np.float32)), -8, 7)
    assert torch.equal(scale.flatten(), torch.tensor([1.0, 0.5, 2.0]))
    assert np.array_equal(codes.numpy(), expected.astype(np.int8))
    assert torch.equal(codes, ops.quantize_per_token(x, 4, 1.0)[0])
    assert codes[0, 1:15].tolist() == [-6, -6, -4, -4, -2, -2, 0, 0, 2, 2, 4, 4, 6, 6]


@pytest.mark.parametrize("fused", [False, True], ids=["two-pass", "fused"])
def test_division_is_correctly_rounded(fused):
    x = _division_sensitive_rows()
    ref_codes, ref_scale = ops.quantize_per_token(x, 4, 1.0)
    reciprocal = torch.round(x * (1.0 / ref_scale)).clamp(-8, 7).to(torch.int8)
    assert (reciprocal != ref_codes).sum(dim=1).min().item() == 63  # the rows do discriminate
    codes, _ = W.quantize_activations(x, 1.0)
    assert torch.equal(codes, ref_codes)
    w_codes, packed, w_scale = _weights(16, 64, 64, seed=10)
    out = W.w4a4_linear(x, packed, w_scale, 64, 1.0, fused=fused)
    ref = W.w4a4_linear_reference(x, packed, w_scale, 64, 1.0)
    _assert_within(out, ref, 4 * 3 * U * _magnitude(x, w_codes, w_scale, 64, 1.0, None))


def test_saturation_clips_to_int4_range():
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(2))
    codes, scale = W.quantize_activations(x, 0.5)
    assert torch.equal(codes, ops.quantize_per_token(x, 4, 0.5)[0])
    assert torch.equal(scale, ops.quantize_per_token(x, 4, 0.5)[1])
    assert codes.min().item() == -8 and codes.max().item() == 7
    assert (codes == 7).sum().item() >= 6  # every row's maximum saturates


# ---------------------------------------------------------------------------- W4A4 linear


CASES = [  # (M, N, K, group): odd sizes, every group size, per channel (ragged K tiles too)
    (5, 40, 96, 32), (1, 40, 96, 32), (33, 48, 128, 64), (3, 24, 256, 128), (5, 40, 96, 96), (2, 16, 80, 80),
]


@pytest.mark.parametrize("fused", [False, True], ids=["two-pass", "fused"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "M{}-N{}-K{}-g{}".format(*c))
def test_w4a4_matches_reference(case, fused):
    m, n, k, group = case
    codes, packed, w_scale = _weights(n, k, group, seed=m + n + k)
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(m, k, generator=gen)
    bias = torch.randn(n, generator=gen) if m % 2 else None  # with and without bias
    out = W.w4a4_linear(x, packed, w_scale, group, 0.9, bias, fused=fused)
    ref = W.w4a4_linear_reference(x, packed, w_scale, group, 0.9, bias)
    assert out.shape == (m, n) and out.dtype == torch.float32
    bound = 4 * (k // group + 2) * U * _magnitude(x, codes, w_scale, group, 0.9, bias)
    _assert_within(out, ref, bound)


@pytest.mark.parametrize("fused", [False, True], ids=["two-pass", "fused"])
def test_w4a4_ties_and_saturation_through_the_gemm(fused):
    x = torch.cat([_tie_rows(), 3.0 * torch.randn(2, 32, generator=torch.Generator().manual_seed(3))])
    codes, packed, w_scale = _weights(16, 32, 32, seed=4)
    for clip in (1.0, 0.5):
        out = W.w4a4_linear(x, packed, w_scale, 32, clip, fused=fused)
        ref = W.w4a4_linear_reference(x, packed, w_scale, 32, clip)
        _assert_within(out, ref, 4 * 3 * U * _magnitude(x, codes, w_scale, 32, clip, None))


def test_w4a4_float16_in_and_out():
    codes, packed, w_scale = _weights(40, 64, 32, seed=5)
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 64, generator=gen).to(torch.float16)  # leading dims are flattened
    bias = torch.randn(40, generator=gen).to(torch.float16)
    out = W.w4a4_linear(x, packed, w_scale, 32, 1.0, bias)
    ref = W.w4a4_linear_reference(x, packed, w_scale, 32, 1.0, bias)
    assert out.shape == (2, 3, 40) and out.dtype == torch.float16
    mag = _magnitude(x, codes, w_scale, 32, 1.0, bias).reshape(2, 3, 40)
    _assert_within(out, ref, 4 * 4 * U * mag + 2.0**-10 * ref.float().abs())
    out32 = W.w4a4_linear(x, packed, w_scale, 32, 1.0, bias, out_dtype=torch.float32)
    assert out32.dtype == torch.float32


def test_reference_matches_the_simulation():
    m, n, k, group = 7, 40, 128, 32
    codes, packed, w_scale = _weights(n, k, group, seed=7)
    gen = torch.Generator().manual_seed(8)
    x, bias = torch.randn(m, k, generator=gen), torch.randn(n, generator=gen)
    ref = W.w4a4_linear_reference(x, packed, w_scale, group, 0.9, bias)
    sim = ops.qdq_per_token(x, 4, 0.9) @ ops.dequantize_weight(codes, w_scale, group) + bias
    _assert_within(ref, sim, 4 * (k + k // group + 2) * U * _magnitude(x, codes, w_scale, group, 0.9, bias))


def test_w4a4_rejects_inconsistent_arguments():
    _, packed, w_scale = _weights(40, 96, 32, seed=9)
    with pytest.raises(ValueError, match="group size"):
        W.w4a4_linear(torch.randn(2, 96), packed, w_scale, 64)
    with pytest.raises(ValueError, match="w_packed"):
        W.w4a4_linear(torch.randn(2, 96), packed[:-1], w_scale, 32)


# ---------------------------------------------------------------------------- W4A4 linear, K-major weight


def test_kmajor_layout_by_hand():
    """Byte ``(n, j)`` holds ``codes[j, n]`` (low nibble) and ``codes[j + K/2, n]`` (high)."""
    codes = torch.tensor([[1, -8], [2, 7], [-1, 0], [3, -2]], dtype=torch.int8)  # [K=4, N=2]
    packed = KM.pack_int4_kmajor(codes)
    # n=0: (k0=1, k2=-1 -> 0xF) (k1=2, k3=3); n=1: (k0=-8 -> 0x8, k2=0) (k1=7, k3=-2 -> 0xE)
    assert packed.tolist() == [[0xF1, 0x32], [0x08, 0xE7]]
    assert torch.equal(KM.unpack_int4_kmajor(packed, 4), codes)
    assert torch.equal(KM.kmajor_from_graph_packing(ops.pack_int4(codes), 4, 2), packed)


KMAJOR_CASES = [  # (M, N, K, group): per channel (ragged tiles too), and even numbers of groups
    (5, 40, 96, 96), (1, 40, 96, 48), (33, 48, 128, 32), (3, 24, 256, 256), (2, 16, 80, 40), (7, 24, 128, 16),
]


@pytest.mark.parametrize("fused", [False, True], ids=["two-pass", "fused"])
@pytest.mark.parametrize("case", KMAJOR_CASES, ids=lambda c: "M{}-N{}-K{}-g{}".format(*c))
def test_kmajor_matches_reference(case, fused):
    m, n, k, group = case
    codes, packed, w_scale = _weights(n, k, group, seed=m + n + k)
    gen = torch.Generator().manual_seed(k + 1)
    x = torch.randn(m, k, generator=gen)
    bias = torch.randn(n, generator=gen) if m % 2 else None
    out = KM.w4a4_linear_kmajor(x, KM.pack_int4_kmajor(codes), w_scale, group, 0.9, bias, fused=fused)
    ref = W.w4a4_linear_reference(x, packed, w_scale, group, 0.9, bias)
    assert out.shape == (m, n) and out.dtype == torch.float32
    _assert_within(out, ref, 4 * (k // group + 2) * U * _magnitude(x, codes, w_scale, group, 0.9, bias))


def test_kmajor_float16_and_ties():
    codes, packed, w_scale = _weights(16, 32, 32, seed=4)
    x = torch.cat([_tie_rows(), 3.0 * torch.randn(2, 32, generator=torch.Generator().manual_seed(3))])
    for clip in (1.0, 0.5):
        out = KM.w4a4_linear_kmajor(x, KM.pack_int4_kmajor(codes), w_scale, 32, clip)
        ref = W.w4a4_linear_reference(x, packed, w_scale, 32, clip)
        _assert_within(out, ref, 4 * 3 * U * _magnitude(x, codes, w_scale, 32, clip, None))
    x16 = x.to(torch.float16)
    out = KM.w4a4_linear_kmajor(x16, KM.pack_int4_kmajor(codes), w_scale, 32)
    ref = W.w4a4_linear_reference(x16, packed, w_scale, 32)
    assert out.dtype == torch.float16
    _assert_within(out, ref, 4 * 3 * U * _magnitude(x16, codes, w_scale, 32, 1.0, None) + 2.0**-10 * ref.float().abs())


@pytest.mark.parametrize("splits", [2, 3, 50])
def test_kmajor_split_k_is_bit_identical_to_the_reference(splits):
    """Per output channel, split K: the int32 partial sums are exact whatever their order, so
    the output equals the reference's bit for bit (the one-pass kernel's too), with ragged
    splits and more splits than K steps."""
    m, n, k = 5, 40, 192
    codes, packed, w_scale = _weights(n, k, k, seed=21)
    gen = torch.Generator().manual_seed(22)
    x, bias = torch.randn(m, k, generator=gen), torch.randn(n, generator=gen)
    w = KM.pack_int4_kmajor(codes)
    out = KM.w4a4_linear_kmajor(x, w, w_scale, k, 0.9, bias, split_k=splits)
    assert torch.equal(out, W.w4a4_linear_reference(x, packed, w_scale, k, 0.9, bias))
    assert torch.equal(out, KM.w4a4_linear_kmajor(x, w, w_scale, k, 0.9, bias, split_k=1, fused=False))
    assert KM.split_k_for(m, n, k, torch.device("cpu")) == 1  # no split by default off the GPU


def test_kmajor_refuses_what_its_layout_cannot_hold():
    codes, _, w_scale = _weights(40, 96, 32, seed=9)  # 3 groups: an odd number
    with pytest.raises(ValueError, match="even number of groups"):
        KM.w4a4_linear_kmajor(torch.randn(2, 96), KM.pack_int4_kmajor(codes), w_scale, 32)
    _, _, w_scale = _weights(40, 96, 48, seed=9)
    with pytest.raises(ValueError, match=r"uint8 \[N=40, K/2=48\]"):
        KM.w4a4_linear_kmajor(torch.randn(2, 96), ops.pack_int4(codes).reshape(96, 20), w_scale, 48)
    with pytest.raises(ValueError, match="even K"):
        KM.pack_int4_kmajor(torch.zeros(3, 2, dtype=torch.int8))
    codes, _, w_scale = _weights(40, 96, 48, seed=9)  # 2 groups: no split of K
    with pytest.raises(ValueError, match="per-channel"):
        KM.w4a4_linear_kmajor(torch.randn(2, 96), KM.pack_int4_kmajor(codes), w_scale, 48, split_k=2)


# ---------------------------------------------------------------------------- decode attention


def _cache(x: torch.Tensor, bits: int, granularity: str, valid: torch.Tensor) -> dict:
    """Quantized cache of ``x [B, Hkv, T, D]``: codes, scale, zero point (None per channel)."""
    if granularity == "per_token":
        codes, scale, zp = ops.quantize_kv(x, bits)
        return {"codes": codes, "scale": scale, "zero_point": zp}
    amax = x.masked_fill(~valid[:, None, :, None], 0).abs().amax(dim=(0, 2))[:, None, :]
    scale = ops.kv_static_scale(amax, bits)
    return {"codes": ops.quantize_kv_static(x, scale, bits), "scale": scale, "zero_point": None}


def _attention_inputs(b, h, hkv, t, d, seqlens, bits, granularity, seed, q_dtype=torch.float32, valid=None):
    """Random cache and query; the positions outside ``valid`` (default: ``t >= seqlens[b]``)
    hold large garbage that would dominate the output if attended."""
    gen = torch.Generator().manual_seed(seed)
    if valid is None:
        valid = torch.arange(t)[None, :] < torch.tensor(seqlens)[:, None]
    k, v = (torch.randn(b, hkv, t, d, generator=gen) for _ in range(2))
    pad = ~valid[:, None, :, None]
    k, v = k.masked_fill(pad, 1e3), v.masked_fill(pad, -1e3)  # garbage that would dominate if attended
    kc, vc = _cache(k, bits, granularity, valid), _cache(v, bits, granularity, valid)
    args = (torch.randn(b, h, d, generator=gen).to(q_dtype), kc["codes"], vc["codes"], kc["scale"],
            vc["scale"], torch.tensor(seqlens, dtype=torch.int32))
    kw = {"bits": bits, "granularity": granularity, "k_zero_point": kc["zero_point"],
          "v_zero_point": vc["zero_point"]}
    return args, kw


def _v_max(args, kw) -> float:
    return A.dequantize_cache(args[2], args[4], kw["v_zero_point"], kw["bits"], kw["granularity"]).abs().max().item()


@pytest.mark.parametrize("grouped", [False, True], ids=["per-head", "grouped"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("granularity", ["per_token", "per_channel"])
def test_decode_attention_matches_reference(granularity, bits, grouped):
    # GQA (4 query heads on 2 KV heads), odd T, per-sequence lengths, 3 splits of 16 positions
    # (sequences 1 and 2 leave whole splits empty); one program per query head, or per KV head
    # for its group
    args, kw = _attention_inputs(3, 4, 2, 37, 32, [37, 20, 5], bits, granularity, seed=bits)
    ref = A.kv_decode_attention_reference(*args, **kw)
    assert ref.abs().max().item() < 10  # the 1e3 padding is masked out
    tol = 1e-4 * _v_max(args, kw)
    for splits in (3, None):
        out = A.kv_decode_attention(*args, **kw, num_splits=splits, grouped=grouped)
        assert out.shape == (3, 4, 32) and out.dtype == torch.float32
        torch.testing.assert_close(out, ref, rtol=0, atol=tol)


@pytest.mark.parametrize("h, hkv", [(6, 2), (16, 2), (8, 8)], ids=["3-per-kv", "8-per-kv", "mha"])
def test_grouped_decode_attention_reads_each_kv_head_once_for_its_group(h, hkv, monkeypatch):
    """The grouped split kernel (the default when H > Hkv): one program per KV head and split,
    whatever the group size (3: padded to 4 rows; 8; 1), the same result as the reference and
    as the per-head kernel."""
    calls = []
    kernel = A._decode_split_group_kernel

    class Counting:
        def __getitem__(self, grid):
            calls.append(grid)
            return kernel[grid]

    monkeypatch.setattr(A, "_decode_split_group_kernel", Counting())
    args, kw = _attention_inputs(2, h, hkv, 29, 32, [29, 11], 4, "per_token", seed=h)
    ref = A.kv_decode_attention_reference(*args, **kw)
    out = A.kv_decode_attention(*args, **kw, num_splits=2, grouped=True)
    assert calls == [(2 * hkv, 2)]
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4 * _v_max(args, kw))
    torch.testing.assert_close(out, A.kv_decode_attention(*args, **kw, num_splits=2, grouped=False), rtol=0,
                               atol=1e-4 * _v_max(args, kw))
    A.kv_decode_attention(*args, **kw, num_splits=2)
    assert len(calls) == (2 if h > hkv else 1)  # grouped by default only for grouped-query heads


def test_decode_attention_head_dim_64_mha_float16():
    args, kw = _attention_inputs(2, 2, 2, 21, 64, [21, 9], 4, "per_token", seed=11, q_dtype=torch.float16)
    out = A.kv_decode_attention(*args, **kw, sm_scale=0.2, num_splits=2)
    ref = A.kv_decode_attention_reference(*args, **kw, sm_scale=0.2)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), ref.float(), rtol=2.0**-10, atol=1e-4 * _v_max(args, kw))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_decode_attention_ignores_padding_and_empty_sequences_give_nan():
    args, kw = _attention_inputs(2, 2, 1, 20, 32, [7, 0], 8, "per_token", seed=12)
    out = A.kv_decode_attention(*args, **kw, num_splits=2)
    k_codes = args[1].clone()
    k_codes[0, :, 7:] = 255 - k_codes[0, :, 7:]
    changed = A.kv_decode_attention(args[0], k_codes, *args[2:], **kw, num_splits=2)
    assert torch.equal(out[0], changed[0])
    ref = A.kv_decode_attention_reference(*args, **kw)
    assert torch.isnan(out[1]).all() and torch.isnan(ref[1]).all()


def _holes(b: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(bias [B, T + 1], valid [B, T])`` of three rows, with T = 37 and splits of 16 positions:
    row 0: masked (finfo.min) holes at 5..11 and 36 and a masked new entry, small finite biases
    elsewhere; row 1: positions 0..2 at -inf and 16..31 (the whole second split) at finfo.min;
    row 2: the whole cache masked, only the new entry attended."""
    assert (b, t) == (3, 37)
    fmin = torch.finfo(torch.float32).min
    bias = -torch.rand(b, t + 1, generator=torch.Generator().manual_seed(21))
    bias[0, 5:12] = fmin
    bias[0, 36] = fmin
    bias[0, t] = fmin
    bias[1, 0:3] = float("-inf")
    bias[1, 16:32] = fmin
    bias[2, :t] = fmin
    return bias, bias[:, :t] > fmin


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # row 2 without the new entry
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("granularity", ["per_token", "per_channel"])
@pytest.mark.parametrize("grouped", [False, True], ids=["per-head", "grouped"])
def test_decode_attention_with_mask_bias_and_the_new_entry(granularity, bits, grouped):
    """The decode graph's form: holes in the cache masked by the additive bias (a split with no
    unmasked position, a whole row masked but for the new entry), the new entry merged after
    the cache; GQA, 3 splits and 1, per query head or per group."""
    b, h, hkv, t, d = 3, 4, 2, 37, 32
    bias, valid = _holes(b, t)
    args, kw = _attention_inputs(b, h, hkv, t, d, [t] * b, bits, granularity, seed=20 + bits, valid=valid)
    gen = torch.Generator().manual_seed(22)
    k_new, v_new = torch.randn(b, hkv, d, generator=gen), 2 * torch.randn(b, hkv, d, generator=gen)
    extra = {"bias": bias, "k_new": k_new, "v_new": v_new, "sm_scale": 0.3}
    ref = A.kv_decode_attention_reference(*args, **kw, **extra)
    assert ref.abs().max().item() < 10  # the 1e3 garbage in the holes is masked out
    torch.testing.assert_close(ref[2], v_new[2].repeat_interleave(h // hkv, dim=0), rtol=0, atol=1e-6)
    tol = 1e-4 * max(_v_max(args, kw), v_new.abs().max().item())
    for splits in (3, 1):
        out = A.kv_decode_attention(*args, **kw, **extra, num_splits=splits, grouped=grouped)
        assert out.shape == (b, h, d) and not out.isnan().any()
        torch.testing.assert_close(out, ref, rtol=0, atol=tol)
    # the bias without a new entry: row 2 has no position left (NaN, as the reference's)
    ref = A.kv_decode_attention_reference(*args, **kw, bias=bias[:, :t])
    out = A.kv_decode_attention(*args, **kw, bias=bias[:, :t], num_splits=3, grouped=grouped)
    assert out[2].isnan().all() and ref[2].isnan().all()
    torch.testing.assert_close(out[:2], ref[:2], rtol=0, atol=1e-4 * _v_max(args, kw))


def test_decode_attention_rejects_inconsistent_arguments():
    args, kw = _attention_inputs(1, 3, 2, 8, 32, [8], 4, "per_token", seed=13)
    with pytest.raises(ValueError, match="multiple"):
        A.kv_decode_attention(*args, **kw)
    args, kw = _attention_inputs(1, 2, 2, 8, 32, [8], 4, "per_token", seed=13)
    with pytest.raises(ValueError, match="zero_point"):
        A.kv_decode_attention(*args, **{**kw, "k_zero_point": None})
    new = torch.zeros(1, 2, 32)
    with pytest.raises(ValueError, match="k_new and v_new"):
        A.kv_decode_attention(*args, **kw, k_new=new)
    with pytest.raises(ValueError, match=r"bias must be float32 \[B=1, 9\]"):
        A.kv_decode_attention(*args, **kw, k_new=new, v_new=new, bias=torch.zeros(1, 8))
    with pytest.raises(ValueError, match="v_new must be"):
        A.kv_decode_attention_reference(*args, **kw, k_new=new, v_new=new[:, :1])


# ---------------------------------------------------------------------------- GPU code generation


def test_available():
    assert kernels.available()


def _nvidia_compiler_env() -> dict:
    """The environment of a subprocess that compiles for a GPU (triton compiled, not
    interpreted); skips where triton has no NVIDIA backend (a property of its build)."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def test_kernels_compile_for_hopper_and_orin():
    """The interpreter cannot see the GPU compiler: compile every kernel for sm_90 (H100/H200)
    and sm_87 (Jetson Orin) with Triton's bundled ptxas, no GPU needed, through the benchmark
    script's ``--compile-only`` check. Every kernel a linear or a decode step launches, and the
    K-major GEMM, is among the variants and compiles for both, to PTX of that target; the GEMMs'
    products run on the int8 tensor cores (``wgmma`` with s8 operands on Hopper for the tiles of
    64 rows and more, ``mma.sync`` s8 otherwise and on Orin); the kernels that quantize
    activations (the row quantizer, the fused GEMMs) divide correctly rounded only (the codes
    are bit-identical to ``quant.ops`` only so); each line reports registers and stack bytes."""
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_kernels.py"), "--compile-only", "--quick"],
                         capture_output=True, text=True, env=_nvidia_compiler_env(), cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = [line for line in run.stdout.splitlines() if line.startswith(("ok ", "FAIL"))]
    assert all(line.startswith("ok ") for line in rows), run.stdout
    kinds = {"quantize_rows", "w4a4_gemm", "w4a4_gemm_kmajor", "w4a4_gemm_kmajor_splitk", "w4a4_kmajor_scale"}
    kinds |= {f"decode_{k}" for k in A.DECODE_KERNELS}
    for arch, target in ((90, "sm_90a"), (87, "sm_87")):
        mine = [line for line in rows if f" target={target} " in line]
        assert {re.match(r"ok\s+(\w+)", line).group(1) for line in mine} == kinds, (arch, run.stdout)
        for line in mine:
            kind = re.match(r"ok\s+(\w+)", line).group(1)
            summary = line.split(": ", 1)[1]
            assert re.search(r"regs=\d+ stack=\d+", summary), line
            if kind.startswith("w4a4_gemm"):  # every GEMM, the split-K one too
                big = int(re.search(r"'BLOCK_M': (\d+)", line).group(1)) >= 64
                wanted = "wgmma.mma_async(s8)" if arch == 90 and big else "mma.sync(s8)"
                assert f"mma={wanted} " in summary, line
            if kind == "quantize_rows" or "fused=True" in line:
                assert "div.rn.f32" in summary and "div.full" not in summary and "div.approx" not in summary, line
    assert len(rows) == 2 * len([line for line in rows if " target=sm_87 " in line])


_BIAS_KERNELS_FOR_HOPPER = """
import json, re, struct
from triton.backends.compiler import GPUTarget
from quota_compile.kernels import kv_attention as A
from quota_compile.kernels.trt_aot import compile_kernel
sm90 = GPUTarget("cuda", 90, 32)
masked = "0f%08X" % struct.unpack(">I", struct.pack(">f", A.MASKED))[0]  # PTX's literal of A.MASKED
split = {"q_ptr": "*fp16", "kc_ptr": "*u8", "ks_ptr": "*fp32", "kz_ptr": "*u8", "vc_ptr": "*u8", "vs_ptr": "*fp32",
         "vz_ptr": "*u8", "seqlens_ptr": "*i32", "bias_ptr": "*fp32", "part_m_ptr": "*fp32", "part_l_ptr": "*fp32",
         "part_acc_ptr": "*fp32", "sm_scale": "fp32"}
combine = {"part_m_ptr": "*fp32", "part_l_ptr": "*fp32", "part_acc_ptr": "*fp32", "out_ptr": "*fp16", "q_ptr": "*fp16",
           "kn_ptr": "*fp32", "vn_ptr": "*fp32", "bias_ptr": "*fp32", "sm_scale": "fp32"}
bt, warps = A.SPLIT_TILES[1]
variants = [("split_bias", {"PER_TOKEN": p, "BITS": 4, "BLOCK_T": bt, "BLOCK_D": 128}, split, warps) for p in (True, False)]
variants += [("combine_new", {"HAS_BIAS": b, "BLOCK_S": 8, "BLOCK_D": 128}, combine, 4) for b in (True, False)]
for role, consts, types, w in variants:
    ptx = compile_kernel(A.DECODE_KERNELS[role], types, consts, w, target=sm90).asm["ptx"]
    target = re.search(r"^[.]target\\s+(\\w+)", ptx, re.M).group(1)
    print(json.dumps({"role": role, "consts": consts, "target": target, "masked": masked in ptx}))
"""


def test_bias_and_new_entry_kernels_compile_for_hopper():
    """The kernel variants of the decode graph's op (the bias in the splits, the new entry merged
    in the combine, each with and without a bias; the benchmark script's ``--compile-only``
    covers the others) compile for sm_90 (the PTX's target), and those that read a bias
    compare it with ``kv_attention.MASKED`` (``finfo(float32).min``: the graph's "masked"),
    which a kernel without a bias never needs."""
    run = subprocess.run([sys.executable, "-c", _BIAS_KERNELS_FOR_HOPPER], capture_output=True, text=True,
                         env=_nvidia_compiler_env(), cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    got = [json.loads(line) for line in run.stdout.splitlines()]
    assert [(g["role"], g["consts"].get("PER_TOKEN", g["consts"].get("HAS_BIAS"))) for g in got] == [
        ("split_bias", True), ("split_bias", False), ("combine_new", True), ("combine_new", False)]
    for g in got:
        assert g["target"].startswith("sm_90"), g
        reads_bias = g["role"] == "split_bias" or g["consts"]["HAS_BIAS"]
        assert g["masked"] == reads_bias, g


# ---------------------------------------------------------------------------- the PyTorch path


@pytest.fixture(scope="module")
def torch_path_build(small_folder):
    """``build(granularity) -> (vlm, span, programs, traced)``: the 2-layer model (4 query heads
    on 2 KV heads) W4A4 with an INT4 KV cache of that granularity (``per_channel``: its static
    scales calibrated) and QUOTA-style pruning (fastv), its eager simulation programs and
    traced programs; built once per granularity for this module."""
    import contextlib

    from quota_compile.calibration.calibrate import quantize_model
    from quota_compile.config import parse_config
    from quota_compile.models import load_model
    from quota_compile.core.decisions import decide_pruning
    from quota_compile.capture.trace import build_programs, trace_programs

    built = {}

    def build(granularity: str):
        if granularity not in built:
            doc = {"version": 1, "model": {"source": str(small_folder)},
                   "quantization": {"weights": {"group_size": 16}, "kv_cache": {"bits": 4, "granularity": granularity}},
                   "pruning": {"method": "fastv", "keep_ratio": 0.6, "fastv_layer": 1}}
            cfg = parse_config(doc, Path("t.yaml"))
            vlm = load_model(cfg, contextlib.ExitStack())
            span = vlm.visual_span()
            qm = quantize_model(vlm, cfg, span)
            _, _, spec = decide_pruning(cfg, vlm, qm, span)
            programs = build_programs(vlm, qm, spec)
            built[granularity] = (vlm, span, programs, trace_programs(vlm, qm, programs))
        return built[granularity]

    return build


def _count(gm, *targets) -> int:
    from quota_compile.passes import count_calls

    return sum(count_calls(gm, t) for t in targets)


SOFTMAX = (torch.ops.aten.softmax.int, torch.ops.aten._softmax.default)


def _attention_calls(monkeypatch) -> list:
    """Records every call of the Triton decode-attention kernel (``A.kv_decode_attention``,
    which ``quota.kv_decode_attention`` calls when the kernel runs)."""
    calls = []
    kernel = A.kv_decode_attention

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(A, "kv_decode_attention", spy)
    return calls


def _assert_decode_graph(backend, traced, layers: int) -> None:
    """The traced decode program holds one quota.decode_attention per decoder layer (over the
    dequantized past) and the kernel program one quota.kv_decode_attention in its place (over
    the stored past), neither a softmax; the prefill keeps its attention (QUOTA reads its
    probabilities); the vision program none."""
    attention, semantic = torch.ops.quota.kv_decode_attention.default, torch.ops.quota.decode_attention.default
    assert _count(traced["decode"].module, semantic) == layers and _count(traced["decode"].module, attention) == 0
    assert _count(backend.programs["decode"], attention) == layers and _count(backend.programs["decode"], semantic) == 0
    assert _count(backend.programs["decode"], *SOFTMAX) == _count(traced["decode"].module, *SOFTMAX) == 0
    assert _count(backend.programs["prefill"], *SOFTMAX) == _count(traced["prefill"].module, *SOFTMAX) >= layers
    assert _count(backend.programs["prefill"], attention) == _count(backend.programs["vision"], attention) == 0
    # the past cache is read as stored, never dequantized; the new entries are still quantized
    dequantize = (torch.ops.quota.dequantize_kv.default, torch.ops.quota.dequantize_kv_static.default)
    quantize = (torch.ops.quota.quantize_kv.default, torch.ops.quota.quantize_kv_static.default)
    assert _count(backend.programs["decode"], *dequantize) == _count(backend.programs["decode"], *quantize) == 2 * layers


def _assert_same_generation(got, ref) -> None:
    assert got.tokens == ref.tokens
    assert len(got.kept) == len(ref.kept) == 1 and all(np.array_equal(a, b) for a, b in zip(got.kept, ref.kept))
    for a, b in zip(got.step_logits, ref.step_logits):
        assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max()


def test_torch_path_runs_the_traced_programs_with_the_kernel(torch_path_build, monkeypatch):
    """quota_compile.flavours.torch_path on the 2-layer model with QUOTA-style pruning (fastv):
    every W4A4 Linear of the traced graphs is one quota.w4a4_linear (none left as its pieces)
    and each decode layer's attention becomes one quota.kv_decode_attention, run here by the
    Triton kernels in the interpreter;
    greedy decoding through them matches the simulation (same tokens and kept indices, logits
    within float-summation error)."""
    from quota_compile.passes.fuse_w4a4_linear import w4a4_matmuls
    from quota_compile.config import VerifySection
    from quota_compile.kernels.ops import cpu_uses_kernel
    from quota_compile.flavours.torch_path import KernelBackend
    from quota_compile.runtime.ort import greedy_generate
    from quota_compile.verify.gate import TorchBackend, held_out_samples

    vlm, span, programs, traced = torch_path_build("per_token")
    linears = {g: _count(t.module, torch.ops.quota.w4a4_linear.default) for g, t in traced.items()}
    assert not any(w4a4_matmuls(t.module) for t in traced.values())
    # quota.w4a4_linear and quota.kv_decode_attention run the Triton kernels here, not the simulation's ops
    assert cpu_uses_kernel("w4a4_linear") and cpu_uses_kernel("kv_decode_attention")
    backend = KernelBackend(traced, "cpu")
    for g, gm in backend.programs.items():
        assert _count(gm, torch.ops.quota.w4a4_linear.default) == linears[g] and not w4a4_matmuls(gm), g
    # q, k, v, o, gate, up, down in every decoder layer; the projector's two Linears
    assert linears["prefill"] == 7 * vlm.num_layers and linears["vision"] == 2
    _assert_decode_graph(backend, traced, vlm.num_layers)
    calls = _attention_calls(monkeypatch)
    sample = held_out_samples(vlm, VerifySection(samples=1, new_tokens=6), span)[0]
    ref = greedy_generate(TorchBackend(programs), sample.batch, 6, None, keep_logits=True)
    got = greedy_generate(backend, sample.batch, 6, None, keep_logits=True)
    assert len(calls) == 5 * vlm.num_layers  # every decode step, every layer
    _assert_same_generation(got, ref)


@pytest.mark.parametrize("granularity", ["per_token", "per_channel"])
def test_torch_path_decodes_a_right_padded_batch_like_the_simulation(granularity, torch_path_build, monkeypatch):
    """Two prompts of different lengths, right-padded (masked holes inside every layer's cache
    once tokens are generated), through the kernel path with the ``per_token`` and the
    ``per_channel`` (static scales, codes only) cache: one quota.kv_decode_attention per decode
    layer, run by the Triton kernel in the interpreter; tokens, kept indices and logits as the
    simulation's. The W4A4 Linears run as the simulation's ops here (the W4A4 kernel is the
    test above's), which keeps this test at a few seconds."""
    from quota_compile.kernels.ops import cpu_uses_kernel, simulated_on_cpu
    from quota_compile.flavours.torch_path import KernelBackend
    from quota_compile.runtime.ort import greedy_generate, make_batch
    from quota_compile.data.samples import synthetic_images
    from quota_compile.verify.gate import TorchBackend

    vlm, span, programs, traced = torch_path_build(granularity)
    backend = KernelBackend(traced, "cpu")
    _assert_decode_graph(backend, traced, vlm.num_layers)
    assert ("past.0.key_scale" in traced["decode"].input_names) == (granularity == "per_token")
    calls = _attention_calls(monkeypatch)
    monkeypatch.setattr(vlm.processor.tokenizer, "padding_side", "right")
    batch = make_batch(vlm.processor, vlm.prompt_template, synthetic_images(2, vlm.image_size, 7),
                       ["What is it?", "Is there a red circle on the left side of the picture?"], span, vlm.image_token_id)
    lengths = batch.attention_mask.sum(axis=1)
    assert lengths.min() < lengths.max() == batch.attention_mask.shape[1]
    ref = greedy_generate(TorchBackend(programs), batch, 4, None, keep_logits=True)
    with simulated_on_cpu("w4a4_linear"):
        assert not cpu_uses_kernel("w4a4_linear") and cpu_uses_kernel("kv_decode_attention")
        got = greedy_generate(backend, batch, 4, None, keep_logits=True)
    assert len(calls) == 3 * vlm.num_layers and all(c[0] == 2 for c in calls)
    _assert_same_generation(got, ref)
    # held to the simulation, the op computes the graph's own attention (no kernel call)
    with simulated_on_cpu("w4a4_linear", "kv_decode_attention"):
        plain = greedy_generate(backend, batch, 4, None, keep_logits=True)
    assert len(calls) == 3 * vlm.num_layers
    _assert_same_generation(plain, ref)


def test_kernel_programs_name_only_the_device_they_are_placed_on(torch_path_build):
    """The traced graphs carry the CPU they were traced on as constants (``arange(device=cpu)``,
    a buffer moved ``to(cpu)``); :func:`kernel_programs` places every such constant on its
    device too (``meta`` here: no GPU), so nothing runs back to the CPU on a GPU."""
    from quota_compile.flavours.torch_path import kernel_programs

    _, _, _, traced = torch_path_build("per_token")
    before = {a for t in traced.values() for n in t.module.graph.nodes for a in (*n.args, *n.kwargs.values())
              if isinstance(a, torch.device)}
    assert torch.device("cpu") in before
    for g, gm in kernel_programs(traced, "meta").items():
        devices = {a for n in gm.graph.nodes for a in (*n.args, *n.kwargs.values()) if isinstance(a, torch.device)}
        assert devices <= {torch.device("meta")}, (g, devices)
        assert all(p.device.type == "meta" for p in gm.parameters()), g


def test_the_kmajor_operator_runs_its_kernel_and_matches_its_definition():
    """``quota.w4a4_linear_kmajor`` (the PyTorch path's operator over K-major weights): the
    Triton kernel here (interpreter), the simulation's arithmetic under ``simulated_on_cpu``;
    the two agree within float summation, and the definition equals ``quota.w4a4_linear``'s over
    the same codes in the graphs' packing, bit for bit."""
    from quota_compile.kernels.ops import cpu_uses_kernel, simulated_on_cpu

    m, n, k, group = 3, 24, 64, 16
    codes, packed, w_scale = _weights(n, k, group, seed=31)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(32))
    w = KM.pack_int4_kmajor(codes)
    assert cpu_uses_kernel("w4a4_linear_kmajor")
    kernel = torch.ops.quota.w4a4_linear_kmajor(x, w, w_scale, k, n, group, 0.9)
    with simulated_on_cpu("w4a4_linear_kmajor", "w4a4_linear"):
        assert not cpu_uses_kernel("w4a4_linear_kmajor")
        definition = torch.ops.quota.w4a4_linear_kmajor(x, w, w_scale, k, n, group, 0.9)
        assert torch.equal(definition, torch.ops.quota.w4a4_linear(x, packed, w_scale, k, n, group, 0.9))
    _assert_within(kernel, definition, 4 * (k + k // group + 2) * U * _magnitude(x, codes, w_scale, group, 0.9, None))
