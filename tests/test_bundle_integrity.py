"""A bundle checks itself on load: format, every file's sha256, the manifest against the graphs
and against the hashes of its own keys; work folders of killed compiles are never bundles and
are removed by the next compile into the same folder."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from quota_compile.bundle.format import atomic_folder, check_bundle, key_hashes
from quota_compile.cli import main

from .conftest import write_config


@pytest.fixture
def bundle(tiny_bundle: Path, tmp_path: Path) -> Path:
    """A private copy of the session's tiny bundle, to damage."""
    return Path(shutil.copytree(tiny_bundle, tmp_path / "b" / "tiny"))


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "red.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(path)
    return path


def _listing(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _run_refused(bundle: Path, image: Path, capsys, words: list[str]) -> str:
    """``quota-compile run`` on a damaged bundle: exit 2, one line naming the file, no
    traceback, no answer, nothing written anywhere near the bundle."""
    before = _listing(bundle.parent)
    rc = main(["run", str(bundle), "--image", str(image), "--prompt", "What colour is it?", "--max-new-tokens", "2"])
    out, err = capsys.readouterr()
    assert rc == 2, err
    assert "Traceback" not in err and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("quota-compile: error: "), err
    for w in words:
        assert w in lines[0], f"{w!r} not in {lines[0]!r}"
    assert _listing(bundle.parent) == before, "a refused bundle must not be changed or written beside"
    return lines[0]


def _edit_manifest(bundle: Path, edit, rehash: bool = False) -> None:
    """Edit manifest.json; with ``rehash`` also recompute its ``key_sha256`` (someone who
    edits on purpose), so that only the check against the graphs can catch the edit."""
    path = bundle / "manifest.json"
    m = json.loads(path.read_text())
    edit(m)
    if rehash:
        m["key_sha256"] = key_hashes(m)
    path.write_text(json.dumps(m, indent=2))


def test_an_intact_copy_runs(bundle: Path, image: Path, capsys):
    """The checks accept what the compiler wrote (the refusals below are not vacuous)."""
    m = check_bundle(bundle)
    assert m["format"] == "quota-compile bundle" and set(m["files"]) == set(_listing(bundle)) - {"manifest.json"}
    assert main(["run", str(bundle), "--image", str(image), "--prompt", "What colour is it?", "--max-new-tokens", "2"]) == 0
    out, err = capsys.readouterr()
    assert len(out.strip().splitlines()) == 1 and "error" not in err


def test_the_graphs_share_one_weights_file_and_the_decoder_weights_are_in_it_once(bundle: Path):
    import onnx

    from quota_compile.bundle.format import external_tensors

    m = check_bundle(bundle)
    table = m["weights"]["."]
    assert table["file"] == "weights.bin" and "weights.bin" in m["files"]
    assert table["bytes"] == (bundle / "weights.bin").stat().st_size
    read = {g: {(t["offset"], t["bytes"]) for t in table["tensors"] if g in t["graphs"]} for g in ("vision", "prefill", "decode")}
    # every weight of the decode graph is one the prefill graph reads too, at the same place
    assert read["decode"] and read["decode"] <= read["prefill"]
    for g in ("vision", "prefill", "decode"):
        refs = external_tensors(onnx.load(str(bundle / f"{g}.onnx"), load_external_data=False))
        assert {(off, n) for _, _, off, n in refs} == read[g] and {loc for _, loc, _, _ in refs} == {"weights.bin"}
        assert m["graphs"][g]["files"] == [f"{g}.onnx", "weights.bin"]
        onnx.checker.check_model(str(bundle / f"{g}.onnx"), full_check=True)
    stored_once = sum(n for _, n in read["vision"] | read["prefill"] | read["decode"])
    assert table["bytes"] < stored_once + 64 * len(table["tensors"]) < sum(n for g in read for _, n in read[g])


def test_a_changed_weights_file_is_refused(bundle: Path, image: Path, capsys):
    data = bytearray((bundle / "weights.bin").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bundle / "weights.bin").write_bytes(bytes(data))
    _run_refused(bundle, image, capsys, [f"{bundle}/weights.bin", "sha256 does not match manifest.json"])


def test_truncated_prefill_graph_is_refused(bundle: Path, image: Path, capsys):
    data = (bundle / "prefill.onnx").read_bytes()
    (bundle / "prefill.onnx").write_bytes(data[: len(data) // 2])
    _run_refused(bundle, image, capsys, [f"{bundle}/prefill.onnx", "sha256 does not match manifest.json"])


def test_missing_decode_graph_is_refused(bundle: Path, image: Path, capsys):
    (bundle / "decode.onnx").unlink()
    _run_refused(bundle, image, capsys, [f"{bundle}/decode.onnx", "missing", "manifest.json lists it"])


def test_a_file_not_in_the_manifest_is_refused(bundle: Path, image: Path, capsys):
    (bundle / "tokenizer" / "extra.json").write_text("{}")
    _run_refused(bundle, image, capsys, [f"{bundle}/tokenizer/extra.json", "not listed in manifest.json"])


def test_a_changed_tokenizer_file_is_refused(bundle: Path, image: Path, capsys):
    path = bundle / "tokenizer" / "tokenizer_config.json"
    path.write_text(path.read_text().replace("<unk>", "<UNK>"))
    _run_refused(bundle, image, capsys, [f"{bundle}/tokenizer/tokenizer_config.json", "sha256 does not match"])


@pytest.mark.parametrize(
    "content, words",
    [
        (b"{\"format\": \"quota-compile bundle\",", ["manifest.json", "not valid JSON"]),
        (b"\xff\xfe\x00garbage", ["manifest.json", "not a UTF-8 text file"]),
        (b"[1, 2]", ["manifest.json", "JSON object", "list"]),
        (b"{}", ["manifest.json", "key 'format'", "quota-compile bundle"]),
    ],
    ids=["truncated-json", "binary", "json-list", "empty-object"],
)
def test_a_manifest_that_is_not_a_manifest_is_refused(bundle: Path, image: Path, capsys, content: bytes, words: list[str]):
    (bundle / "manifest.json").write_bytes(content)
    _run_refused(bundle, image, capsys, [f"{bundle}/manifest.json", *words])


@pytest.mark.parametrize(
    "key, edit",
    [
        ("model.prompt_template", lambda m: m["model"].pop("prompt_template")),
        ("graphs.decode", lambda m: m["graphs"].pop("decode")),
        ("files", lambda m: m.pop("files")),
        ("kv_cache[0].tensors", lambda m: m["kv_cache"][0].pop("tensors")),
        ("model.visual_tokens", lambda m: m["model"].update(visual_tokens="64")),
    ],
    ids=["prompt-template", "decode-graph", "files", "kv-tensors", "string-for-int"],
)
def test_a_manifest_missing_a_required_key_is_refused(bundle: Path, image: Path, capsys, key: str, edit):
    _edit_manifest(bundle, edit)
    _run_refused(bundle, image, capsys, [f"{bundle}/manifest.json", f"key '{key}'"])


def test_another_format_version_is_refused(bundle: Path, image: Path, capsys):
    _edit_manifest(bundle, lambda m: m.update(format_version=1))
    _run_refused(bundle, image, capsys, ["manifest.json", "key 'format_version' is 1", "compile the bundle again"])


def test_an_edited_prompt_template_is_refused(bundle: Path, image: Path, capsys):
    # a rewording that keeps the image tokens where they were: only the key's hash can tell
    _edit_manifest(bundle, lambda m: m["model"].update(prompt_template=m["model"]["prompt_template"].replace("ASSISTANT:", "ASSISTANT: Sure,")))
    _run_refused(bundle, image, capsys, [f"{bundle}/manifest.json", "key 'model.prompt_template'", "was changed"])


def test_a_prompt_template_that_moves_the_image_is_refused_even_with_its_hash(bundle: Path, image: Path, capsys):
    _edit_manifest(bundle, lambda m: m["model"].update(prompt_template="SYSTEM: be brief. " + m["model"]["prompt_template"]), rehash=True)
    _run_refused(bundle, image, capsys, [f"{bundle}/manifest.json", "key 'model.prompt_template'", "64 image tokens at position 4"])


def test_edited_visual_tokens_per_layer_are_refused(bundle: Path, image: Path, capsys):
    _edit_manifest(bundle, lambda m: m["pruning"].update(visual_tokens_per_layer=[64, 64, 32, 32, 32, 32, 32, 32]))
    _run_refused(bundle, image, capsys, [f"{bundle}/manifest.json", "key 'pruning.visual_tokens_per_layer[2]' is 32", "64"])


@pytest.mark.parametrize(
    "key, edit",
    [
        ("pruning.visual_tokens_per_layer[7]", lambda m: m["pruning"]["visual_tokens_per_layer"].__setitem__(7, 16)),
        ("pruning.pruning_layers", lambda m: m["pruning"].update(pruning_layers=[3])),
        ("kv_cache[2].visual_tokens", lambda m: m["kv_cache"][2].update(visual_tokens=20)),
        ("kv_cache[1].num_kv_heads", lambda m: m["kv_cache"][1].update(num_kv_heads=4)),
        ("model.num_layers", lambda m: m["model"].update(num_layers=7)),
        ("model.visual_tokens", lambda m: m["model"].update(visual_tokens=32)),
        ("graphs.prefill.outputs", lambda m: m["graphs"]["prefill"]["outputs"][0].update(name="scores")),
        ('weights["."].tensors', lambda m: m["weights"]["."]["tensors"][-1].update(offset=m["weights"]["."]["tensors"][-1]["offset"] + 64)),
        ('weights["."].tensors', lambda m: m["weights"]["."]["tensors"][0]["graphs"].update(decode="x")),
        ('weights["."].tensors', lambda m: m["weights"]["."]["tensors"][-1].update(bytes=m["weights"]["."]["bytes"])),
        ('weights["."].bytes', lambda m: m["weights"]["."].update(bytes=1)),
        ('weights["../.."]', lambda m: m["weights"].update({"../..": m["weights"]["."]})),
    ],
    ids=["keep-count", "pruning-layers", "kv-visual-tokens", "kv-heads", "layers", "visual-tokens", "io-name",
         "weights-offset", "weights-graph", "weights-beyond-end", "weights-size", "weights-folder"],
)
def test_a_rehashed_manifest_that_disagrees_with_the_graphs_is_refused(bundle: Path, image: Path, capsys, key: str, edit):
    _edit_manifest(bundle, edit, rehash=True)
    _run_refused(bundle, image, capsys, [f"{bundle}/manifest.json", f"key '{key}'", "edited or damaged"])


def test_a_work_folder_is_never_a_bundle(tiny_bundle: Path, tmp_path: Path, image: Path, capsys):
    """A compile killed between writing manifest.json and the final rename leaves a complete
    looking ``.<name>.tmp-<pid>`` folder: it is refused all the same."""
    work = Path(shutil.copytree(tiny_bundle, tmp_path / "out" / ".tiny.tmp-12345"))
    _run_refused(work, image, capsys, [str(work), "work folder", "not a bundle"])


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_work_folders_are_removed_and_live_ones_kept(tmp_path: Path):
    out = tmp_path / "out"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead, live = _dead_pid(), sleeper.pid
        stale = out / f".tiny.tmp-{dead}"
        running = out / f".other.tmp-{live}"
        old_kept = out / f".gone.old-{dead}"  # its bundle 'gone' does not exist: the only copy, kept
        old_done = out / f".tiny.old-{dead}"  # its bundle 'tiny' exists: a leftover, removed
        for f in (stale, running, old_kept, old_done, out / "tiny"):
            (f / "sub").mkdir(parents=True)
            (f / "sub" / "x.onnx").write_bytes(b"partial")
        with atomic_folder(out / "tiny", force=True) as tmp:
            (tmp / "manifest.json").write_text("{}")
            assert not stale.exists(), "a dead compile's folder is removed before the new one is written"
        assert running.is_dir() and (running / "sub" / "x.onnx").read_bytes() == b"partial"
        assert old_kept.is_dir() and not old_done.exists()
        assert sorted(p.name for p in out.iterdir()) == sorted([running.name, old_kept.name, "tiny"])
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_compile_removes_a_stale_work_folder(small_folder: Path, tmp_path: Path):
    """End to end: a compile into a folder where a killed compile left its work folder."""
    out = tmp_path / "exported"
    stale = out / f".small.tmp-{_dead_pid()}"
    stale.mkdir(parents=True)
    (stale / "prefill.onnx").write_bytes(b"half a graph")
    cfg = write_config(tmp_path / "small.yaml", str(small_folder), out, verify={"samples": 1, "new_tokens": 2})
    assert main([str(cfg)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["small"]
    check_bundle(out / "small")
