"""Running a bundle's PyTorch programs: the ``torch`` flavour's ``torch.export`` archives.

The flavour (:mod:`quota_compile.flavours.torch_path`) saves the traced, pass-processed
programs with each W4A4 Linear as one ``quota.w4a4_linear`` and each decode layer's attention
over the quantized cache as one ``quota.kv_decode_attention``, as ``torch/{vision,prefill,
decode}.pt2`` (``torch.export.save``). Here they are loaded (``torch.export.load``, after the
``quota`` operators are registered) and run behind the same Backend interface as the
onnxruntime sessions, so ``greedy_generate``, the verification and ``quota-compile run`` take
them alike. On a CUDA device the two operators run the Triton kernels; on the CPU they run their
PyTorch definitions (the simulation's arithmetic).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from quota_compile.bundle.schema import GRAPHS
from quota_compile.runtime.ort import append_kv

PROGRAM_SUFFIX = ".pt2"


def register_operators() -> None:
    """Register every ``torch.ops.quota.*`` operator the saved programs may call."""
    from quota_compile.kernels import ops as _kernels  # noqa: F401  (w4a4_linear, kv_decode_attention)
    from quota_compile.pruning import score as _score  # noqa: F401  (select_topk)
    from quota_compile.quant import ops as _quant  # noqa: F401  (the quantizers)


def retarget_devices(gm: torch.fx.GraphModule, device: str | torch.device) -> int:
    """Make ``gm``'s graph create and move its tensors on ``device``: a traced graph holds the
    device it was traced on as a constant argument (``aten.arange(..., device=cpu)``, a
    ``to(cpu)`` of a buffer such as RoPE's ``inv_freq``), which ``.to(device)`` leaves as it
    is. Every ``torch.device`` argument of a call in the graph becomes ``device``; returns how
    many were changed."""
    target = torch.device(device)
    changed = 0

    def swap(a):
        nonlocal changed
        if isinstance(a, torch.device) and a != target:
            changed += 1
            return target
        return a

    for node in gm.graph.nodes:
        if node.op == "call_function":
            node.args = torch.fx.node.map_aggregate(node.args, swap)
            node.kwargs = torch.fx.node.map_aggregate(node.kwargs, swap)
    if changed:
        gm.recompile()
    return changed


def load_programs(folder: Path, device: str | torch.device = "cpu") -> dict[str, torch.nn.Module]:
    """The three programs saved in ``folder``, on ``device``."""
    import warnings

    register_operators()
    with warnings.catch_warnings():
        # (torch 2.10 reads the archive's weights from a read-only buffer and says so; they are
        # never written)
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        programs = {g: torch.export.load(folder / f"{g}{PROGRAM_SUFFIX}").module() for g in GRAPHS}
    for gm in programs.values():
        retarget_devices(gm, device)
    return {g: gm.to(device) for g, gm in programs.items()}


class ProgramBackend:
    """Programs (one callable module per graph, plain positional tensors in and a flat tuple
    out) behind the runtime's Backend interface (numpy in and out). ``kept``: how many of the
    prefill's outputs are pruning layers' kept indices (its last ones)."""

    def __init__(self, programs: dict[str, torch.nn.Module], kept: int, device: str | torch.device = "cpu"):
        self.programs = programs
        self.device = torch.device(device)
        self._kept = kept

    def _run(self, name: str, values: list[np.ndarray]) -> list[np.ndarray]:
        with torch.no_grad():
            out = self.programs[name](*(torch.from_numpy(np.ascontiguousarray(v)).to(self.device) for v in values))
        out = out if isinstance(out, (tuple, list)) else (out,)
        return [o.cpu().numpy() for o in out]

    def vision(self, pixel_values):
        return self._run("vision", [pixel_values])[0]

    def prefill(self, input_ids, attention_mask, image_features):
        out = self._run("prefill", [input_ids, attention_mask, image_features])
        return out[0], out[1 : len(out) - self._kept], out[len(out) - self._kept :]

    def decode(self, input_ids, position_ids, attention_mask, past):
        out = self._run("decode", [input_ids, position_ids, attention_mask, *past])
        return out[0], append_kv(past, out[1:])


def torch_device(device: str) -> torch.device:
    """``auto``: CUDA where PyTorch sees a GPU, else the CPU; ``cuda`` refuses to run without one."""
    from quota_compile.errors import UserError

    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("command line: --device cuda: PyTorch sees no CUDA device here (use --device cpu or auto).")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
