"""Execution providers: the runtime takes onnxruntime's GPU providers where it has them and says
so in one line when they cannot start."""

from __future__ import annotations

import onnxruntime as ort
import pytest

from quota_compile.cli import main
from quota_compile.errors import UserError
from quota_compile.runtime.ort import BundleRunner, choose_providers

HAS_GPU_PROVIDER = "CUDAExecutionProvider" in ort.get_available_providers()


def test_choose_providers(monkeypatch):
    assert choose_providers("cpu") == ["CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert choose_providers("auto") == ["CPUExecutionProvider"]
    with pytest.raises(UserError, match=r"quota-compile\[gpu\]"):
        choose_providers("cuda")
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    assert choose_providers("auto") == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers("cuda") == choose_providers("auto")
    assert choose_providers("cpu") == ["CPUExecutionProvider"]
    with pytest.raises(UserError, match="expected one of"):
        choose_providers("tpu")


@pytest.mark.skipif(HAS_GPU_PROVIDER, reason="needs an onnxruntime without the CUDA provider")
def test_gpu_providers_that_cannot_start_fall_back_to_the_cpu_with_one_line(tiny_bundle, monkeypatch):
    """As with onnxruntime-gpu on a machine without a GPU: the GPU provider is asked for, the
    sessions run on the CPU, and the runner says so once; the answers are the CPU's."""
    lines: list[str] = []
    cpu = BundleRunner(tiny_bundle, device="cpu", say=lines.append)
    assert lines == [] and cpu.backend.missing == []
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    runner = BundleRunner(tiny_bundle, device="auto", say=lines.append)
    assert runner.backend.missing == ["CUDAExecutionProvider"]
    assert len(lines) == 1 and "CUDAExecutionProvider" in lines[0] and "CPU" in lines[0]
    assert all(s.get_providers() == ["CPUExecutionProvider"] for s in runner.backend.sessions.values())


@pytest.mark.skipif(HAS_GPU_PROVIDER, reason="needs an onnxruntime without the CUDA provider")
def test_run_on_cuda_without_the_provider_is_refused(tiny_bundle, tmp_path, capsys):
    from PIL import Image

    img = tmp_path / "x.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(img)
    assert main(["run", str(tiny_bundle), "--image", str(img), "--prompt", "what colour?", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "device cuda" in err and "quota-compile[gpu]" in err
