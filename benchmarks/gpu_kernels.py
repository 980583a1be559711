"""Check and time the Triton kernels against torch FP16 at LLaVA-1.5-7B shapes.

    python benchmarks/gpu_kernels.py [--quick] [--json PATH]   # NVIDIA GPU (H100 class)
    python benchmarks/gpu_kernels.py --interpret                # CPU: correctness at tiny shapes
    python benchmarks/gpu_kernels.py --compile-only [--quick] [--arch 90,87]   # CPU, no GPU

On a GPU it first MEASURES the machine: FP16 tensor-core rate (a large ``torch.matmul``),
INT8 rate (``torch._int_mm``, where available) and memory bandwidth (a device-to-device
copy). Then, for each shape, it checks the kernel against its reference (activation codes bit
for bit against ``quant.ops`` on the CPU, outputs to a relative error) and times kernel and
FP16 baseline with ``triton.testing.do_bench`` (median of repeated runs, L2 flushed):
- ``w4a4_linear`` (group 128, fp16 in/out) vs ``torch.matmul`` fp16, M in {16, 640, 2048} x
  (K, N) in {(4096, 4096), (4096, 11008), (11008, 4096)}; each shape also through
  ``w4a4_kmajor`` (the K-major weight layout; variants ``kmajor`` and ``kmajor-fused``) where
  the group size fits that layout;
- ``kv_decode_attention`` with INT4 ``per_token`` and ``per_channel`` caches vs
  ``scaled_dot_product_attention`` on an fp16 cache: context 4096, 32 heads, head_dim 128,
  batch 1 and 8; and as the PyTorch path's decode step calls it (``+mask+new``: the additive
  mask bias with masked holes, the new token's entry merged in) vs SDPA with the same mask
  over the fp16 cache and the new entry.
The floor of each row is ``max(FLOPs / measured peak rate, bytes / measured bandwidth)``, with
the INT8 rate for the W4A4 GEMM and the FP16 rate otherwise. Exit status: 0 when every check
passes, 1 when one fails, 2 without a CUDA GPU (unless ``--interpret`` / ``--compile-only``).

``--compile-only`` compiles every kernel variant for each compute capability of ``--arch``
(default sm_90, H100/H200, and sm_87, Jetson AGX Orin) with triton's bundled ptxas and prints,
per variant, the PTX target, the tensor-core instructions (``wgmma`` / ``mma.sync`` with s8
operands), the divisions (the quantizers must divide correctly rounded) and the registers and
stack bytes per thread from the cubin (``cuobjdump -res-usage``; stack above 0 means spills).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GROUP = 128
LINEAR_M = (16, 640, 2048)
LINEAR_KN = ((4096, 4096), (4096, 11008), (11008, 4096))
ATTN = {"heads": 32, "head_dim": 128, "context": 4096, "batches": (1, 8), "gqa_group": 4}
LINEAR_TOL = 2e-3  # relative to max|ref|: fp16 output rounding (1 ulp = 2**-10) + fp32 order
ATTN_TOL = 2e-3  # relative to max|V|: fp16 output + float32 softmax summation order


# ---------------------------------------------------------------------------- environment


def environment(mode: str) -> dict:
    """Device, versions and command of this run."""
    import triton

    cuda = torch.cuda.is_available() and mode == "gpu"
    return {
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({platform.processor() or platform.machine()})",
        "mode": mode,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }


def bench(fn: Callable[[], object]) -> float:
    """Median milliseconds of ``fn`` (``triton.testing.do_bench``: warm-up, L2 flush, ~100 ms)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def measure_peaks() -> dict:
    """Measured FP16 and INT8 matmul rates (FLOP/s) and copy bandwidth (bytes/s)."""
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.float16)
    peaks = {"fp16_flops": 2 * n**3 / (bench(lambda: a @ a) * 1e-3)}
    try:
        a8 = torch.randint(-8, 8, (n, n), device="cuda", dtype=torch.int8)
        peaks["int8_ops"] = 2 * n**3 / (bench(lambda: torch._int_mm(a8, a8)) * 1e-3)
    except (AttributeError, RuntimeError) as err:  # no _int_mm: fall back to the FP16 rate
        print(f"torch._int_mm unavailable ({err}); the W4A4 floor uses the FP16 rate")
        peaks["int8_ops"] = None
    src = torch.empty(2**30, device="cuda", dtype=torch.uint8)
    dst = torch.empty_like(src)
    peaks["bandwidth"] = 2 * src.numel() / (bench(lambda: dst.copy_(src)) * 1e-3)
    del a, src, dst
    torch.cuda.empty_cache()
    return peaks


# ---------------------------------------------------------------------------- W4A4 linear


def linear_case(m: int, k: int, n: int, group: int, device: str, seed: int = 0) -> dict:
    """Random fp16 activations and random INT4 weights (packed) with group scales."""
    from quota_compile.quant import ops

    gen = torch.Generator(device="cpu").manual_seed(seed)
    codes = torch.randint(-8, 8, (k, n), generator=gen, dtype=torch.int8)
    w_scale = torch.rand(k // group, n, generator=gen) * 0.02 + 0.001
    x = torch.randn(m, k, generator=gen).to(torch.float16)
    case = {"x": x.to(device), "codes": codes, "packed": ops.pack_int4(codes).to(device),
            "w_scale": w_scale.to(device), "group": group, "kmajor": None}
    if group == k or (k // 2) % group == 0:  # the layouts the K-major kernel takes
        from quota_compile.kernels.w4a4_kmajor import pack_int4_kmajor

        case["kmajor"] = pack_int4_kmajor(codes).to(device)
    return case


def linear_call(case: dict, variant: str) -> Callable[[], torch.Tensor]:
    """The kernel launch of a variant: ``fused`` / ``two-pass`` (the graph-packing kernel,
    ``w4a4_linear``), ``kmajor-fused`` / ``kmajor`` (the K-major weight, ``w4a4_kmajor``, one
    pass over K) and ``kmajor-splitk`` (per-channel weights, K split over programs)."""
    from quota_compile.kernels import w4a4_kmajor as KM
    from quota_compile.kernels import w4a4_linear as W

    x, w_scale, group = case["x"], case["w_scale"], case["group"]
    fused = variant.endswith("fused")
    if variant == "kmajor-splitk":  # split K by default on a GPU (at least 2 splits here)
        splits = max(2, KM.split_k_for(x.shape[0], w_scale.shape[1], x.shape[1], x.device))
        return lambda: KM.w4a4_linear_kmajor(x, case["kmajor"], w_scale, group, 1.0, split_k=splits)
    if variant.startswith("kmajor"):
        return lambda: KM.w4a4_linear_kmajor(x, case["kmajor"], w_scale, group, 1.0, fused=fused, split_k=1)
    return lambda: W.w4a4_linear(x, case["packed"], w_scale, group, 1.0, fused=fused)


def check_linear(case: dict, variant: str) -> dict:
    """Kernel vs reference: activation codes/scales bit for bit against ``quant.ops`` on the
    CPU (the definition), output relative to a reference built from those codes."""
    from quota_compile.kernels import w4a4_linear as W

    x = case["x"]
    codes, scale = W.quantize_activations(x, 1.0)
    ref_codes, ref_scale = W.quantize_activations_reference(x.cpu(), 1.0)
    out = linear_call(case, variant)()
    ref = W.w4a4_matmul_reference(ref_codes.to(x.device), ref_scale.to(x.device), case["packed"],
                                  case["w_scale"], case["group"]).to(torch.float16)
    err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30)).item()
    result = {
        "code_mismatches": int((codes.cpu() != ref_codes).sum()),
        "scale_mismatches": int((scale.cpu() != ref_scale).sum()),
        "max_rel_err": err,
    }
    if x.is_cuda:  # the simulation's own quantizer on CUDA (torch divides by 7 via a reciprocal)
        sim_codes, sim_scale = W.quantize_activations_reference(x, 1.0)
        result["torch_cuda_scale_mismatches"] = int((sim_scale.cpu() != ref_scale).sum())
        result["torch_cuda_code_mismatches"] = int((sim_codes.cpu() != ref_codes).sum())
    result["ok"] = result["code_mismatches"] == 0 and result["scale_mismatches"] == 0 and err <= LINEAR_TOL
    return result


def time_linear(case: dict, variant: str, peaks: dict) -> dict:
    """Median times of the kernel and of ``torch.matmul`` in fp16, rates, floors."""
    from quota_compile.quant import ops

    x, w_scale, group = case["x"], case["w_scale"], case["group"]
    (m, k), n = x.shape, w_scale.shape[1]
    w16 = ops.dequantize_weight(case["codes"].to(x.device), w_scale, group).to(torch.float16)
    t_kernel = bench(linear_call(case, variant))
    t_fp16 = bench(lambda: x @ w16)
    flops = 2 * m * n * k
    bytes_w4 = m * k * 2 + k * n // 2 + w_scale.numel() * 4 + m * n * 2
    bytes_fp16 = m * k * 2 + k * n * 2 + m * n * 2
    int_rate = peaks["int8_ops"] or peaks["fp16_flops"]
    return {
        "ms": t_kernel, "fp16_ms": t_fp16, "speedup": t_fp16 / t_kernel,
        "tflops": flops / (t_kernel * 1e9), "fp16_tflops": flops / (t_fp16 * 1e9),
        "floor_ms": 1e3 * max(flops / int_rate, bytes_w4 / peaks["bandwidth"]),
        "fp16_floor_ms": 1e3 * max(flops / peaks["fp16_flops"], bytes_fp16 / peaks["bandwidth"]),
    }


def run_linear(shapes: list[tuple[int, int, int]], group: int, device: str, peaks: dict | None) -> list[dict]:
    """Every shape with weight groups of ``group`` and with per-channel weights (group = K)."""
    from quota_compile.kernels.w4a4_kmajor import SPLIT_K_MAX_M
    from quota_compile.kernels.w4a4_linear import FUSED_MAX_M

    rows = []
    for (m, k, n), g in ((shape, g) for shape in shapes for g in (group, shape[1])):
        case = linear_case(m, k, n, g, device)
        variants = ["fused", "two-pass"] if m <= FUSED_MAX_M else ["two-pass"]
        if case["kmajor"] is not None:
            variants += [f"kmajor-{v}" if v == "fused" else "kmajor" for v in variants]
            if g == k and m <= SPLIT_K_MAX_M:
                variants.append("kmajor-splitk")
        for variant in variants:
            row = {"M": m, "K": k, "N": n, "group": case["group"], "variant": variant}
            row.update(check_linear(case, variant))
            if peaks is not None:
                row.update(time_linear(case, variant, peaks))
            rows.append(row)
            print_row("linear", row)
    return rows


# ---------------------------------------------------------------------------- decode attention


def attention_case(b: int, h: int, hkv: int, t: int, d: int, granularity: str, device: str,
                   seed: int = 0, graph: bool = False) -> dict:
    """Random K/V quantized to an INT4 cache of the given granularity; fp16 copies for SDPA.
    ``graph``: as the PyTorch path's decode step calls it (``quota.kv_decode_attention``): an
    additive mask bias with a hole of masked positions in every other sequence (right
    padding) and the new token's key and value after the cache."""
    from quota_compile.quant import ops

    gen = torch.Generator(device="cpu").manual_seed(seed)
    k, v = (torch.randn(b, hkv, t, d, generator=gen).to(device) for _ in range(2))
    q = torch.randn(b, h, d, generator=gen).to(device=device, dtype=torch.float16)
    caches = {}
    for name, x in (("k", k), ("v", v)):
        if granularity == "per_token":
            codes, scale, zp = ops.quantize_kv(x, 4)
        else:
            scale = ops.kv_static_scale(x.abs().amax(dim=(0, 2))[:, None, :], 4)
            codes, zp = ops.quantize_kv_static(x, scale, 4), None
        caches[name] = (codes, scale, zp)
    args = (q, caches["k"][0], caches["v"][0], caches["k"][1], caches["v"][1],
            torch.full((b,), t, dtype=torch.int32, device=device))
    kw = {"bits": 4, "granularity": granularity, "k_zero_point": caches["k"][2], "v_zero_point": caches["v"][2]}
    case = {"args": args, "kw": kw, "k16": k.to(torch.float16), "v16": v.to(torch.float16), "mask16": None}
    if graph:
        bias = torch.zeros(b, t + 1, device=device)
        bias[1::2, t // 2 : min(t // 2 + 64, t)] = torch.finfo(torch.float32).min  # never the new entry
        k_new, v_new = (torch.randn(b, hkv, d, generator=gen).to(device) for _ in range(2))
        kw.update(bias=bias, k_new=k_new, v_new=v_new)
        case["k16"] = torch.cat([case["k16"], k_new[:, :, None].to(torch.float16)], dim=2)
        case["v16"] = torch.cat([case["v16"], v_new[:, :, None].to(torch.float16)], dim=2)
        case["mask16"] = bias.clamp(min=torch.finfo(torch.float16).min).to(torch.float16)[:, None, None, :]
    return case


def check_attention(case: dict) -> dict:
    from quota_compile.kernels import kv_attention as A

    out = A.kv_decode_attention(*case["args"], **case["kw"])
    ref = A.kv_decode_attention_reference(*case["args"], **case["kw"])
    v_max = case["v16"].float().abs().max()
    err = ((out.float() - ref.float()).abs().max() / v_max).item()
    return {"max_rel_err": err, "ok": err <= ATTN_TOL}


def time_attention(case: dict, peaks: dict) -> dict:
    from quota_compile.kernels import kv_attention as A

    q, k16, v16 = case["args"][0], case["k16"], case["v16"]
    b, h, d = q.shape
    t = k16.shape[2]
    q4 = q[:, :, None, :]
    t_kernel = bench(lambda: A.kv_decode_attention(*case["args"], **case["kw"]))
    gqa = {"enable_gqa": True} if k16.shape[1] != h else {}
    t_fp16 = bench(lambda: torch.nn.functional.scaled_dot_product_attention(q4, k16, v16, attn_mask=case["mask16"], **gqa))
    flops = 4 * b * h * t * d
    stats = sum(s.numel() * s.element_size() for s in case["args"][3:5])
    stats += sum(z.numel() for z in (case["kw"]["k_zero_point"], case["kw"]["v_zero_point"]) if z is not None)
    stats += sum(case["kw"][n].numel() * 4 for n in ("bias", "k_new", "v_new") if n in case["kw"])
    bytes_q = 2 * case["args"][1].numel() + stats + 2 * q.numel() * 2
    bytes_fp16 = 2 * k16.numel() * 2 + 2 * q.numel() * 2
    return {
        "ms": t_kernel, "fp16_ms": t_fp16, "speedup": t_fp16 / t_kernel,
        "gbps": bytes_q / (t_kernel * 1e6), "fp16_gbps": bytes_fp16 / (t_fp16 * 1e6),
        "floor_ms": 1e3 * max(flops / peaks["fp16_flops"], bytes_q / peaks["bandwidth"]),
        "fp16_floor_ms": 1e3 * max(flops / peaks["fp16_flops"], bytes_fp16 / peaks["bandwidth"]),
    }


def run_attention(shapes: list[tuple[int, int, int, int, int]], device: str, peaks: dict | None) -> list[dict]:
    rows = []
    for b, h, hkv, t, d in shapes:
        for granularity, graph in (("per_token", False), ("per_channel", False), ("per_token", True)):
            case = attention_case(b, h, hkv, t, d, granularity, device, graph=graph)
            row = {"B": b, "H": h, "Hkv": hkv, "T": t, "D": d,
                   "cache": f"int4 {granularity}" + (" +mask+new" if graph else "")}
            row.update(check_attention(case))
            if peaks is not None:
                row.update(time_attention(case, peaks))
            rows.append(row)
            print_row("attention", row)
    return rows


# ---------------------------------------------------------------------------- output


def print_row(kind: str, row: dict) -> None:
    """One table line: check, then (on a GPU) time, rate, FP16 time, speed-up and floors."""
    if kind == "linear":
        group = "ch" if row["group"] == row["K"] else row["group"]
        shape = f"M={row['M']:<5} K={row['K']:<6} N={row['N']:<6} g={group:<4} {row['variant']:<13}"
        check = f"codes!={row['code_mismatches']} scales!={row['scale_mismatches']} err={row['max_rel_err']:.1e}"
        rate = f"{row['tflops']:7.1f} TFLOP/s" if "tflops" in row else ""
    else:
        shape = f"B={row['B']:<2} H={row['H']} Hkv={row['Hkv']} T={row['T']:<5} D={row['D']:<4} {row['cache']:<16}"
        check = f"err={row['max_rel_err']:.1e}"
        rate = f"{row['gbps']:7.0f} GB/s" if "gbps" in row else ""
    timing = ""
    if "ms" in row:
        timing = (f" | {1e3 * row['ms']:9.1f} us {rate} | fp16 {1e3 * row['fp16_ms']:9.1f} us"
                  f" | x{row['speedup']:5.2f} | floor {1e3 * row['floor_ms']:8.1f} us"
                  f" (fp16 {1e3 * row['fp16_floor_ms']:8.1f})")
    print(f"{'ok  ' if row['ok'] else 'FAIL'} {kind:<9} {shape} | {check}{timing}", flush=True)


# ---------------------------------------------------------------------------- compile-only


# Compute capabilities --compile-only builds for by default: Hopper (H100/H200, sm_90) and
# Jetson AGX Orin (sm_87, Ampere's int8 mma.sync).
ARCHS = (90, 87)


def _compile_for(fn, types: dict[str, str], constexprs: dict, num_warps: int, num_stages: int = 3, arch: int = 90):
    """Compile ``fn`` for ``sm_<arch>`` (``trt_aot.compile_kernel``: pointers 16-byte aligned, as
    the launcher specializes them; every other non-constexpr argument i32 unless typed)."""
    from triton.backends.compiler import GPUTarget

    from quota_compile.kernels.trt_aot import compile_kernel

    return compile_kernel(fn, types, constexprs, num_warps, num_stages, target=GPUTarget("cuda", arch, 32))


def _ptx_summary(ptx: str) -> str:
    target = re.search(r"^[.]target\s+(\w+)", ptx, re.M)
    mma = sorted({".".join(m.split(".")[:2]) + ("(s8)" if ".s8" in m else "")
                  for m in re.findall(r"\b(?:wgmma\.mma_async|mma\.sync)[\w.]*", ptx)})
    divs = {p: len(re.findall(re.escape(p), ptx)) for p in ("div.rn.f32", "div.full.f32", "div.approx.f32")}
    return (f"target={target.group(1) if target else '?'} mma={'+'.join(mma) or '-'} "
            + " ".join(f"{p}={c}" for p, c in divs.items() if c))


def resource_usage(cubin: bytes) -> dict[str, int] | None:
    """Registers per thread and stack bytes per thread (register spills and local arrays) of a
    compiled kernel, read from its cubin by the ``cuobjdump -res-usage`` that triton bundles;
    None where that tool is not there."""
    import subprocess
    import tempfile

    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.is_file():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        text = subprocess.run([str(tool), "-res-usage", str(path)], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", text)
    return {"regs": int(m.group(1)), "stack": int(m.group(2))} if m else None


def compile_variants(quick: bool, arch: int = 90) -> list[tuple[str, Callable[[], object], bool]]:
    """(label, compile thunk, quantizes?) for the kernel variants the GPU run may launch,
    compiled for ``sm_<arch>``."""
    from quota_compile.kernels import kv_attention as A
    from quota_compile.kernels import w4a4_kmajor as KM
    from quota_compile.kernels import w4a4_linear as W

    def _compile(*args, **kw):
        return _compile_for(*args, **kw, arch=arch)

    gemm_types = {"a_scale_ptr": "*fp32", "w_ptr": "*u8", "w_scale_ptr": "*fp32", "bias_ptr": "*fp32",
                  "out_ptr": "*fp16", "clip": "fp32"}
    configs = W._gemm_configs()
    configs = [configs[1], configs[-2]] if quick else configs
    out = [("quantize_rows fp16", lambda: _compile(W._quantize_rows_kernel, {
        "x_ptr": "*fp16", "q_ptr": "*i8", "s_ptr": "*fp32", "clip": "fp32"}, {"BLOCK_M": 4, "BLOCK_K": 128}, 4), True)]
    for c in configs:
        for fused, tile_groups in ((True, True), (False, True), (False, False)):
            consts = {"FUSED": fused, "HAS_BIAS": True, "TILE_GROUPS": tile_groups, "BLOCK_K": 128,
                      "GROUP_M": 8, **c.kwargs}
            types = dict(gemm_types, a_ptr="*fp16" if fused else "*i8")
            label = f"w4a4_gemm {c.kwargs} w{c.num_warps} s{c.num_stages} fused={fused} tile_groups={tile_groups}"
            out.append((label, lambda t=types, k=consts, c=c: _compile(W.w4a4_gemm_kernel, t, k, c.num_warps,
                                                                         c.num_stages), fused))
    kmajor = KM.gemm_kmajor_configs()
    for c in ([kmajor[0], kmajor[-1]] if quick else kmajor):
        for fused, per_channel in ((True, True), (False, True), (False, False)):
            consts = {"FUSED": fused, "HAS_BIAS": True, "PER_CHANNEL": per_channel, "GROUP_M": 8, **c.kwargs}
            types = dict(gemm_types, a_ptr="*fp16" if fused else "*i8")
            label = (f"w4a4_gemm_kmajor {c.kwargs} w{c.num_warps} s{c.num_stages} fused={fused} "
                     f"per_channel={per_channel}")
            out.append((label, lambda t=types, k=consts, c=c: _compile(KM.w4a4_gemm_kmajor_kernel, t, k, c.num_warps,
                                                                         c.num_stages), fused))
    t = KM.SPLIT_K_TILE
    out.append((f"w4a4_gemm_kmajor_splitk {t} w4 s3", lambda: _compile(KM.w4a4_gemm_kmajor_splitk_kernel, {
        "a_ptr": "*i8", "w_ptr": "*u8", "acc_ptr": "*i32"}, dict(t), 4), False))
    out.append(("w4a4_kmajor_scale", lambda: _compile(KM._scale_kernel, {
        "acc_ptr": "*i32", "a_scale_ptr": "*fp32", "w_scale_ptr": "*fp32", "bias_ptr": "*fp32", "out_ptr": "*fp16"},
        {"HAS_BIAS": True, "BLOCK_M": 16, "BLOCK_N": 64}, 4), False))
    attn_types = {"q_ptr": "*fp16", "kc_ptr": "*u8", "ks_ptr": "*fp32", "kz_ptr": "*u8", "vc_ptr": "*u8",
                  "vs_ptr": "*fp32", "vz_ptr": "*u8", "seqlens_ptr": "*i32", "part_m_ptr": "*fp32",
                  "part_l_ptr": "*fp32", "part_acc_ptr": "*fp32", "sm_scale": "fp32"}
    tiles = A._SPLIT_TILES[1:2] if quick else A._SPLIT_TILES
    for per_token in (True, False):
        for bits in ((4,) if quick else (4, 8)):
            for bt, warps in tiles:
                consts = {"PER_TOKEN": per_token, "BITS": bits, "BLOCK_T": bt, "BLOCK_D": 128}
                label = f"decode_split per_token={per_token} bits={bits} BLOCK_T={bt} w{warps}"
                out.append((label, lambda k=consts, w=warps: _compile(A._decode_split_kernel, attn_types, k, w), False))
    for per_token in (True, False):  # the grouped-query splits, 4 query heads per KV head
        warps = 4
        consts = {"PER_TOKEN": per_token, "BITS": 4, "BLOCK_T": A._GROUP_BLOCK_T[4], "BLOCK_D": 128, "BLOCK_R": 4}
        bt = consts["BLOCK_T"]
        out.append((f"decode_split_group per_token={per_token} bits=4 BLOCK_T={bt} w{warps}",
                    lambda k=consts, w=warps: _compile(A._decode_split_group_kernel, attn_types, k, w), False))
        out.append((f"decode_split_group_bias per_token={per_token} bits=4 BLOCK_T={bt} w{warps}",
                    lambda k=consts, w=warps: _compile(A._decode_split_group_bias_kernel, dict(attn_types, bias_ptr="*fp32"),
                                                       k, w), False))
    out.append(("decode_combine", lambda: _compile(A._decode_combine_kernel, {
        "part_m_ptr": "*fp32", "part_l_ptr": "*fp32", "part_acc_ptr": "*fp32", "out_ptr": "*fp16"},
        {"BLOCK_S": 8, "BLOCK_D": 128}, 4), False))
    # the PyTorch path's decode step: the additive mask in the splits, the new entry in the merge
    for bt, warps in tiles:
        consts = {"PER_TOKEN": True, "BITS": 4, "BLOCK_T": bt, "BLOCK_D": 128}
        out.append((f"decode_split_bias per_token=True bits=4 BLOCK_T={bt} w{warps}",
                    lambda k=consts, w=warps: _compile(A._decode_split_bias_kernel, dict(attn_types, bias_ptr="*fp32"), k, w),
                    False))
    out.append(("decode_combine_new", lambda: _compile(A._decode_combine_new_kernel, {
        "part_m_ptr": "*fp32", "part_l_ptr": "*fp32", "part_acc_ptr": "*fp32", "out_ptr": "*fp16", "q_ptr": "*fp16",
        "kn_ptr": "*fp32", "vn_ptr": "*fp32", "bias_ptr": "*fp32", "sm_scale": "fp32"},
        {"HAS_BIAS": True, "BLOCK_S": 8, "BLOCK_D": 128}, 4), False))
    return out


def compile_only(quick: bool, archs: tuple[int, ...] = ARCHS) -> bool:
    """Compile every variant for each of ``archs``; quantizing kernels must use only
    ``div.rn.f32``. Each line gives the PTX's target, the tensor-core instructions, the
    divisions and the registers and stack bytes per thread (stack > 0: spills or local arrays)."""
    ok = True
    for arch in archs:
        for label, thunk, quantizes in compile_variants(quick, arch):
            start = time.perf_counter()
            try:
                compiled = thunk()
            except Exception as err:  # report every failure, not just the first
                print(f"FAIL {label}: sm_{arch}: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
                ok = False
                continue
            summary = _ptx_summary(compiled.asm["ptx"])
            usage = resource_usage(compiled.asm["cubin"])
            if usage is not None:
                summary += f" regs={usage['regs']} stack={usage['stack']}"
            exact = "div.rn.f32" in summary and "div.full" not in summary and "div.approx" not in summary
            good = exact or not quantizes
            ok &= good
            print(f"{'ok  ' if good else 'FAIL'} {label}: {summary} ({time.perf_counter() - start:.1f}s)", flush=True)
    return ok


# ---------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, help="write the environment, peaks and rows here")
    p.add_argument("--quick", action="store_true", help="fewer shapes (GPU) / variants (--compile-only)")
    p.add_argument("--interpret", action="store_true",
                   help="CPU smoke test: TRITON_INTERPRET=1, correctness only, tiny shapes")
    p.add_argument("--compile-only", action="store_true",
                   help="compile the kernel variants with Triton's bundled ptxas (no GPU), for --arch")
    p.add_argument("--arch", default=",".join(str(a) for a in ARCHS),
                   help="--compile-only: compute capabilities, comma-separated (default: 90,87 = H100/H200, Jetson Orin)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernel modules are imported
        mode = "interpret"
    elif args.compile_only:
        mode = "compile-only"
    elif torch.cuda.is_available():
        mode = "gpu"
    else:
        print("gpu_kernels.py: a CUDA GPU is needed (--interpret or --compile-only run on the CPU)")
        return 2
    env = environment(mode)
    print("  ".join(f"{k}={v}" for k, v in env.items() if k != "command"))
    print(f"command: {env['command']}")
    if mode == "compile-only":
        try:
            archs = tuple(int(a) for a in args.arch.split(","))
        except ValueError:
            print(f"gpu_kernels.py: --arch {args.arch!r}: expected compute capabilities such as 90,87")
            return 2
        return 0 if compile_only(args.quick, archs) else 1
    report: dict = {"environment": env}
    if mode == "interpret":
        linear = [(m, k, n) for m in (1, 5, 33) for k, n in ((96, 40), (128, 48))]
        attention = [(2, 4, 2, 37, 32)]
        peaks = None
    else:
        ms = LINEAR_M[:2] if args.quick else LINEAR_M
        kns = LINEAR_KN[:1] if args.quick else LINEAR_KN
        linear = [(m, k, n) for k, n in kns for m in ms]
        h, d, t = ATTN["heads"], ATTN["head_dim"], ATTN["context"]
        batches = ATTN["batches"][-1:] if args.quick else ATTN["batches"]
        # LLaVA-1.5-7B's MHA, and GQA with 4 query heads per KV head (Llama-3-8B-like: the
        # grouped kernel reads each KV head once for its 4 query heads)
        attention = [(b, h, h, t, d) for b in batches] + [(b, h, h // ATTN["gqa_group"], t, d) for b in batches]
        peaks = measure_peaks()
        report["peaks"] = peaks
        print(f"measured: fp16 {peaks['fp16_flops'] / 1e12:.0f} TFLOP/s, int8 "
              f"{(peaks['int8_ops'] or 0) / 1e12:.0f} TOP/s, copy {peaks['bandwidth'] / 1e9:.0f} GB/s")
    device = "cuda" if mode == "gpu" else "cpu"
    report["linear"] = run_linear(linear, 32 if mode == "interpret" else GROUP, device, peaks)
    report["attention"] = run_attention(attention, device, peaks)
    ok = all(r["ok"] for r in report["linear"] + report["attention"])
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    print("all checks passed" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
