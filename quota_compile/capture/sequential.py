"""Where calibration computes: the whole model on ``calibration.device``, or (``calibration.
sequential: true``) one decoder layer at a time.

Sequential calibration is layer-major. Every prefill pass that calibration needs (the signal
passes, the score-weight search's passes, the KV-scale passes, GPTQ's) is started with
:meth:`~quota_compile.capture.programs.PrefillProgram.begin`; then for each decoder layer in turn the
layer's weights are moved to the device, every pass is advanced through that layer
(:meth:`~quota_compile.capture.programs.PrefillProgram.step`, one pass at a time: its state is moved
to the device for the step and back to the host after it), and the layer goes back to the
host. ``finish`` runs the final norm and ``lm_head``. A pass computes exactly the tensors of
the whole-model run (``run`` is ``begin``, the steps and ``finish``), so both modes give the
same recipe; ``tests/test_sequential.py`` checks that.

What stays on the device for the whole calibration ("resident"): the vision tower, the
projector, the token embeddings, the rotary embedding, the final norm and ``lm_head``. For
LLaVA-1.5-7B in float16 that is about 1.2 GB (CLIP ViT-L 0.3 B parameters, embeddings and
``lm_head`` 0.13 B each), against 0.4 GB for one decoder layer (4 · 4096² + 3 · 4096 · 11008
≈ 0.2 B parameters); the decoder's other 31 layers wait in host memory. State tensors move with ``accelerate.utils.send_to_device``.

Not done: offloading the waiting layers to disk (they stay in host memory, so the host needs
the model's size in RAM). Only ``device: cpu`` is exercised here (this machine has no GPU);
with ``cpu`` the moves are no-ops and the layer-major order is what the tests check.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator

import torch

from quota_compile.errors import UserError

HOST = torch.device("cpu")


# The fields of a PrefillState that a step reads. Its outputs so far (``kv``, ``kept``) are
# only appended to, so they stay where they are while a pass goes to the device and come back
# with it; sending them at every step would move each layer's cache L times.
_STEP_INPUTS = ("h", "position_ids", "mask", "visual_index", "cos", "sin", "bias", "probs")


def send(value, device: torch.device):
    """``value`` (a tensor, a :class:`~quota_compile.capture.programs.PrefillState`, or tuples and lists
    of them) on ``device``; a state's outputs so far move only when it goes to the host."""
    from accelerate.utils import send_to_device

    from quota_compile.capture.programs import PrefillState

    if isinstance(value, PrefillState):
        names = _STEP_INPUTS + (("kv", "kept") if device == HOST else ())
        return dataclasses.replace(value, **send_to_device({n: getattr(value, n) for n in names}, device))
    return send_to_device(value, device)


class Placement:
    """Where the model computes during calibration (see the module docstring). ``streaming``
    is true for ``sequential: true``."""

    def __init__(self, model: torch.nn.Module, device: str, sequential: bool):
        self.model = model  # the LlavaForConditionalGeneration
        self.device = torch.device(device)
        self.streaming = sequential
        self.layers = model.model.language_model.layers

    def _resident(self) -> list[torch.nn.Module]:
        hf = self.model
        lm = hf.model.language_model
        return [hf.model.vision_tower, hf.model.multi_modal_projector, lm.embed_tokens, lm.rotary_emb, lm.norm, hf.lm_head]

    @contextlib.contextmanager
    def active(self) -> Iterator[Placement]:
        """Calibration runs inside this: the model (or its resident parts) on the device, and
        everything back on the host afterwards, where tracing and export run."""
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"calibration.device is {self.device}, but torch sees no CUDA device; use cpu.")
        modules = self._resident() if self.streaming else [self.model]
        try:
            for m in modules:
                m.to(self.device)
            yield self
        finally:
            self.model.to(HOST)

    @contextlib.contextmanager
    def layer(self, i: int) -> Iterator[None]:
        """Decoder layer ``i`` on the device while inside (streaming only)."""
        self.layers[i].to(self.device)
        try:
            yield
        finally:
            self.layers[i].to(HOST)

    def prefill(self, jobs: list[tuple], before_layer: Callable[[int, list], None] | None = None) -> list[tuple]:
        """Outputs of every job ``(program, input_ids, attention_mask, image_features[,
        observe])``, in order, on the host. Whole-model: one ``run`` per job. Streaming: all
        jobs layer-major. ``before_layer(i, states)``, streaming only, is called with layer
        ``i`` on the device before the jobs step through it (GPTQ quantizes the layer there)."""
        if not self.streaming:
            return [send(job[0].run(*send(job[1:4], self.device), *job[4:]), HOST) for job in jobs]
        programs = [job[0] for job in jobs]
        states = [send(p.begin(*send(job[1:4], self.device), *job[4:]), HOST) for p, job in zip(programs, jobs)]
        for i in range(len(self.layers)):
            with self.layer(i):
                if before_layer is not None:
                    before_layer(i, list(zip(programs, states)))
                states = [self.step_on_device(p, s) for p, s in zip(programs, states)]
        return [send(p.finish(send(s, self.device)), HOST) for p, s in zip(programs, states)]

    def step_on_device(self, program, state):
        """One step of ``state`` through its layer (on the device), result on the host; for
        ``before_layer`` callbacks that need the layer's inputs without advancing."""
        return send(program.step(send(state, self.device)), HOST)
