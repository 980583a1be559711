"""The torch flavour (``export.targets: [..., torch]``): the PyTorch execution path saved in the
bundle as torch.export archives, verified against the simulation by loading them back, and run
by ``quota-compile run --backend torch``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from quota_compile.cli import main
from quota_compile.flavours import torch_path
from quota_compile.passes import count_calls
from quota_compile.runtime.torch_programs import load_programs

from .conftest import write_config

VERIFY = {"samples": 2, "new_tokens": 6}
PRUNING = {"method": "fastv", "keep_ratio": 0.6, "fastv_layer": 1}
IMAGE = Path(__file__).parents[1] / "examples" / "shapes.png"


def _config(tmp_path: Path, folder: Path, targets: list[str]) -> Path:
    return write_config(tmp_path / "m.yaml", str(folder), tmp_path / "out", verify=VERIFY, pruning=PRUNING,
                        quantization={"weights": {"group_size": 16}}, export={"targets": targets})


@pytest.fixture(scope="module")
def torch_bundle(tmp_path_factory, small_folder: Path) -> Path:
    work = tmp_path_factory.mktemp("torch-flavour")
    assert main([_config(work, small_folder, ["portable", "torch"]).as_posix()]) == 0
    return work / "out" / "m"


def test_the_bundle_carries_the_kernel_programs_and_their_verification(torch_bundle: Path):
    files = sorted(p.name for p in (torch_bundle / "torch").iterdir())
    assert files == ["decode.pt2", "prefill.pt2", "vision.pt2"]
    manifest = json.loads((torch_bundle / "manifest.json").read_text())
    entry = manifest["flavours"]["torch"]
    assert entry["folder"] == "torch" and entry["used_by_runtime"] is False
    assert entry["bytes"] == {g: (torch_bundle / "torch" / f"{g}.pt2").stat().st_size for g in ("decode", "prefill", "vision")}
    assert all(f"torch/{n}" in manifest["files"] for n in files)  # hashed like every other file
    report = json.loads((torch_bundle / "verify.json").read_text())["flavours"]["torch"]
    assert report["passed"] and report["failures"] == [] and report["greedy_agreement"] == 1.0
    kv = report["codes_free_running"]["kv_cache"]
    assert kv["compared"] > 0 and kv["flips"] == 0  # the simulation's own operators on the CPU
    assert report["kept_index_agreement"] == 1.0


def test_the_saved_programs_run_each_w4a4_linear_and_decode_attention_as_one_operator(torch_bundle: Path):
    programs = load_programs(torch_bundle / "torch", "cpu")
    layers = 2
    linear, attention = torch.ops.quota.w4a4_linear.default, torch.ops.quota.kv_decode_attention.default
    # q, k, v, o, gate, up, down per decoder layer; the projector's two Linears
    assert count_calls(programs["prefill"], linear) == count_calls(programs["decode"], linear) == 7 * layers
    assert count_calls(programs["vision"], linear) == 2
    assert count_calls(programs["decode"], attention) == layers
    assert count_calls(programs["prefill"], attention) == 0  # QUOTA reads the prefill's probabilities
    assert count_calls(programs["decode"], torch.ops.quota.qdq_per_token.default) == 0


def test_run_with_the_torch_backend_answers_as_the_onnxruntime_runner(torch_bundle: Path, capsys):
    args = ["run", str(torch_bundle), "--image", str(IMAGE), "--prompt", "What is in the image?",
            "--image", str(IMAGE), "--prompt", "How many shapes are there?", "--max-new-tokens", "8"]
    assert main(args) == 0
    ort = capsys.readouterr().out.splitlines()
    assert main(args + ["--backend", "torch", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.splitlines() == ort and len(ort) == 2


def test_run_with_the_torch_backend_is_refused_without_the_flavour_or_the_device(tmp_path: Path, small_folder: Path, torch_bundle: Path, capsys):
    assert main([write_config(tmp_path / "p.yaml", str(small_folder), tmp_path / "out", verify={"samples": 1, "new_tokens": 2}).as_posix()]) == 0
    capsys.readouterr()
    assert main(["run", str(tmp_path / "out" / "p"), "--image", str(IMAGE), "--prompt", "?", "--backend", "torch"]) == 2
    err = capsys.readouterr().err
    assert "key 'flavours' has no torch flavour" in err and "Traceback" not in err
    if torch.cuda.is_available():
        return  # (the refusal below needs a machine without a CUDA device)
    assert main(["run", str(torch_bundle), "--image", str(IMAGE), "--prompt", "?", "--backend", "torch", "--device", "cuda"]) == 2
    assert "--device cuda: PyTorch sees no CUDA device" in capsys.readouterr().err


def test_a_wrong_saved_program_is_refused_and_leaves_no_bundle(tmp_path: Path, small_folder: Path, monkeypatch, capsys):
    """One W4A4 weight scale of the decode program doubled before it is saved: the torch
    flavour's verification (the archives loaded back and run) refuses the compile."""
    right = torch_path.kernel_programs

    def wrong(traced, device="cuda"):
        programs = right(traced, device)
        gm = programs["decode"]
        node = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target == torch.ops.quota.w4a4_linear.default)
        gm.get_buffer(node.args[2].target).mul_(2.0)
        return programs

    monkeypatch.setattr(torch_path, "kernel_programs", wrong)
    code = main([_config(tmp_path, small_folder, ["portable", "torch"]).as_posix()])
    err = capsys.readouterr().err
    assert code == 1 and "torch flavour: KV-cache code-flip rate" in err and "verification failed" in err, err
    assert not (tmp_path / "out" / "m").exists()


def test_the_saved_programs_move_to_another_device(torch_bundle: Path):
    """A traced graph holds the device it was traced on as constants (``arange(device=cpu)``,
    RoPE's ``inv_freq.to(cpu)``), which ``Module.to`` leaves alone: loaded for a device, every
    device the graphs name is that one, and the programs run there end to end. Shown on the
    ``meta`` device (no GPU here), with the inputs a CPU run of the bundle gave each program."""
    from PIL import Image

    from quota_compile.runtime.ort import BundleRunner
    from quota_compile.runtime.torch_programs import retarget_devices

    fresh = torch.export.load(torch_bundle / "torch" / "prefill.pt2").module()
    assert retarget_devices(fresh, "meta") > 0  # the trace did write the CPU into the graph
    runner = BundleRunner(torch_bundle, device="cpu", backend="torch")
    seen = {}
    for g, program in list(runner.backend.programs.items()):
        def recording(*args, _g=g, _p=program):
            seen.setdefault(_g, args)
            return _p(*args)
        runner.backend.programs[g] = recording
    runner.answer([Image.open(IMAGE)], ["What colour is the circle?"], max_new_tokens=2)
    assert set(seen) == {"vision", "prefill", "decode"}
    moved = load_programs(torch_bundle / "torch", "meta")
    for g, program in moved.items():
        devices = {a for n in program.graph.nodes for a in (*n.args, *n.kwargs.values()) if isinstance(a, torch.device)}
        assert devices <= {torch.device("meta")}, (g, devices)
        out = program(*(a.to("meta") for a in seen[g]))
        out = out if isinstance(out, (tuple, list)) else (out,)
        assert out and all(o.device.type == "meta" for o in out), g
