"""The PyTorch execution path: the traced, pass-processed programs (what the ONNX graphs are
lowered from) run by PyTorch on a GPU, each W4A4 Linear and each decode layer's attention over
the quantized KV cache as a Triton kernel.

What a user without TensorRT runs on an NVIDIA GPU. :func:`kernel_programs` copies the traced
vision / prefill / decode graph modules (:func:`quota_compile.capture.trace.trace_programs`), whose
W4A4 Linears already are ``quota.w4a4_linear`` operators (the ``fuse_w4a4_linear`` pass of the
trace), applies ``passes/use_kv_decode_attention.py`` to the decode graph with a quantized cache
(each layer's ``quota.decode_attention`` over the dequantized past, as the decode program
traced it, becomes one ``quota.kv_decode_attention``: the flash-decoding kernel of
:mod:`quota_compile.kernels.kv_attention` reading the stored past in place, with the mask as an
additive bias and the new token's entry merged in) and moves them to the device. The prefill keeps its own
attention (QUOTA reads its softmax probabilities); a float cache keeps the graph's attention.
:class:`KernelBackend` runs them behind the :class:`~quota_compile.runtime.ort.Backend` interface,
so ``greedy_generate`` and the verification take it like the onnxruntime sessions.

Verified here (``tests/test_kernels.py``), on the CPU, with triton in its interpreter
(``TRITON_INTERPRET=1``): the decode graph holds one ``quota.kv_decode_attention`` per decoder
layer and no softmax; the kernel path's logits, greedy tokens and kept indices match the
simulation's, for the ``per_token`` cache with every kernel in the interpreter, and for the
``per_channel`` cache and a right-padded batch of two prompts (masked holes inside the cache)
with the attention kernel in the interpreter and the W4A4 Linears as the simulation's ops.
Not verified: a CUDA run (no GPU on this machine).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import fx

from quota_compile.bundle.schema import GRAPHS, KEPT, PAST, FlavourEntry
from quota_compile.flavours.base import Flavour, FlavourBuild
from quota_compile.runtime.torch_programs import PROGRAM_SUFFIX, ProgramBackend, load_programs, retarget_devices


WEIGHT_LAYOUTS = ("graph", "kmajor")


def kernel_programs(traced: dict, device: str | torch.device = "cuda", weight_layout: str = "graph") -> dict[str, fx.GraphModule]:
    """Copies of the traced programs with the Triton W4A4 Linear and, in the decode program
    with a quantized cache, the Triton decode attention, on ``device``. ``weight_layout``:
    ``graph`` (the INT4 weights as the graphs pack them, ``quota.w4a4_linear``) or ``kmajor``
    (converted once to the K-major layout where it fits, ``quota.w4a4_linear_kmajor``:
    ``passes/use_kmajor_weights.py``)."""
    from quota_compile.passes.use_kmajor_weights import UseKMajorWeights
    from quota_compile.passes.use_kv_decode_attention import UseKVDecodeAttention, quantized_past

    if weight_layout not in WEIGHT_LAYOUTS:
        raise ValueError(f"weight_layout {weight_layout!r}: expected one of {WEIGHT_LAYOUTS}")
    out = {}
    for name, t in traced.items():
        gm = copy.deepcopy(t.module)
        if name == "decode" and quantized_past(gm):
            layers = {n.split(".")[1] for n in t.input_names if n.startswith(PAST)}
            gm = UseKVDecodeAttention(len(layers))(gm).graph_module
        if weight_layout == "kmajor":
            gm = UseKMajorWeights()(gm).graph_module
        retarget_devices(gm, device)  # the devices the trace wrote into the graph
        out[name] = gm.to(device).eval()
    return out


class KernelBackend(ProgramBackend):
    """:func:`kernel_programs` behind the runtime's Backend interface (numpy in and out)."""

    def __init__(self, traced: dict, device: str | torch.device = "cuda", weight_layout: str = "graph"):
        kept = sum(1 for n in traced["prefill"].output_names if n.startswith(KEPT))
        super().__init__(kernel_programs(traced, device, weight_layout), kept, device)


def save_programs(traced: dict, folder: Path) -> dict[str, Path]:
    """:func:`kernel_programs` (on the CPU) exported again, with the traced programs' example
    inputs and dynamic shapes, and saved as ``folder/<graph>.pt2`` (``torch.export.save``)."""
    programs = kernel_programs(traced, "cpu")
    paths = {}
    for g in GRAPHS:
        t = traced[g]
        with torch.no_grad():
            ep = torch.export.export(programs[g], tuple(t.args), dynamic_shapes=tuple(t.dynamic_shapes), strict=False)
        paths[g] = folder / f"{g}{PROGRAM_SUFFIX}"
        torch.export.save(ep, paths[g])
    return paths


class TorchFlavour(Flavour):
    """``export.targets: [..., torch]``: the PyTorch execution path in the bundle, ``torch/{vision,
    prefill,decode}.pt2``; ``quota-compile run --backend torch`` runs it. Its programs are the
    traced ones (not a lowering of the portable ONNX graphs). Verified on the CPU: the saved
    archives are loaded back and run (the two kernels' operators as their PyTorch definitions)
    through the gate against the simulation, without an observation copy (the activation codes
    stay inside ``quota.w4a4_linear``): KV codes, kept indices, greedy tokens and the logits."""

    name = "torch"
    folder = "torch"
    derived = True  # a folder of its own; no ONNX graphs in it
    runtime_rank = None  # eval, bench and the default runner use the ONNX flavours
    reads_traced_programs = True  # its verification saves and runs them

    def lower(self, cfg, models, quantized_kv: bool = True, semantic=None) -> dict:
        return {}

    def verify(self, build: FlavourBuild) -> dict:
        from quota_compile.verify.gate import verify

        folder = build.folder / self.folder
        build.note("the torch flavour: torch.export of the kernel programs ...")
        save_programs(build.traced, folder)
        kept = sum(1 for n in build.traced["prefill"].output_names if n.startswith(KEPT))
        backend = ProgramBackend(load_programs(folder, "cpu"), kept, "cpu")
        cfg = build.cfg.verify
        report = verify(build.reference, backend, build.samples, cfg)
        # No observation copy here, so the gate's teacher-forced code counts are empty; on the
        # CPU these programs run the simulation's own operators, so the KV codes each call
        # writes on the simulation's inputs are held to the same flip rate instead.
        kv = report["codes_free_running"]["kv_cache"]
        if kv["rate"] is not None and kv["rate"] > cfg.max_code_flip_rate:
            where = kv["tensors_with_flips"][0]["where"] if kv["tensors_with_flips"] else "?"
            report["failures"].append(
                f"KV-cache code-flip rate {kv['rate']:.3g} ({kv['flips']} of {kv['compared']} codes differ on the simulation's inputs; "
                f"most in {where}) exceeds verify.max_code_flip_rate {cfg.max_code_flip_rate:g}"
            )
            report["passed"] = False
        report["runtime"] = "PyTorch (torch.export programs, CPU)"
        report["flavour"] = self.name
        return report

    def manifest_entry(self, build: FlavourBuild) -> dict:
        folder = build.folder / self.folder
        entry = FlavourEntry(
            folder=self.folder,
            graphs=sorted(GRAPHS),
            bytes={g: (folder / f"{g}{PROGRAM_SUFFIX}").stat().st_size for g in sorted(GRAPHS)},
            used_by_runtime=False,
        ).model_dump(mode="json")
        entry["format"] = "torch.export archive (.pt2); quota.w4a4_linear and quota.kv_decode_attention: Triton kernels on CUDA, their PyTorch definitions on the CPU"
        return entry
