"""The bundle folder: atomic writing, manifest.json, verify.json and report.md (the format's names and
models are :mod:`quota_compile.bundle.schema`'s)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx
from pydantic import ValidationError

from quota_compile import __version__
from quota_compile.bundle.schema import (  # noqa: F401  (the names are also this module's, as before)
    FORMAT,
    FORMAT_VERSION,
    GRAPHS,
    IMAGE_FEATURES,
    KV_APPEND,
    KV_REPLACE,
    KV_UPDATE_KEY,
    MANIFEST,
    PAST,
    KEPT,
    REPORT,
    VERIFY,
    WEIGHTS,
    Manifest,
    WeightsFile,
    VerifyReport,
    kv_name,
)
from quota_compile.errors import ConfigError, UserError
from quota_compile.pruning.methods import pruning_method


def kv_update_of(model_or_meta) -> str:
    """:data:`KV_APPEND` or :data:`KV_REPLACE` for a decode graph (a ModelProto or the
    ``custom_metadata_map`` of an onnxruntime session)."""
    if isinstance(model_or_meta, onnx.ModelProto):
        meta = {p.key: p.value for p in model_or_meta.metadata_props}
    else:
        meta = dict(model_or_meta)
    return meta.get(KV_UPDATE_KEY, KV_APPEND)

# ``atomic_folder``'s work folders beside the destination: ``.<name>.tmp-<pid>`` (being written)
# and ``.<name>.old-<pid>`` (the replaced bundle, between two renames).
_WORK_FOLDER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>[0-9]+)$")

_DTYPES = {v: k.lower() for k, v in onnx.TensorProto.DataType.items()} | {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.DOUBLE: "float64"}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_destination(final: Path, force: bool) -> None:
    """Refuse to replace an existing bundle without ``--force`` (before any work is done)."""
    if final.exists() and not force:
        raise ConfigError("output", f"{final} already exists; pass --force to replace it.")
    if final.exists() and not final.is_dir():
        raise ConfigError("output", f"{final} exists and is not a folder.")


def is_work_folder(folder: Path) -> bool:
    """A temporary folder of :func:`atomic_folder` (never a bundle, even a complete-looking one)."""
    return _WORK_FOLDER.match(Path(folder).name) is not None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: the process exists but belongs to someone else
        return True
    return True


def remove_stale_work_folders(parent: Path) -> list[Path]:
    """Remove the work folders in ``parent`` left by a compile that was killed (SIGKILL, power
    loss: no ``finally`` ran), i.e. those whose pid is no longer a running process; a running
    compile's folders are left alone. A ``.old-`` folder is removed only once its bundle exists
    again (killed between the two renames, it holds the only copy of the previous bundle).
    (Pids are those of this machine: do not share an output folder between machines.)"""
    removed = []
    if not parent.is_dir():
        return removed
    for p in sorted(parent.iterdir()):
        m = _WORK_FOLDER.match(p.name)
        if m is None or not p.is_dir() or p.is_symlink() or _pid_alive(int(m["pid"])):
            continue
        if m["kind"] == "old" and not (parent / m["name"]).is_dir():
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


@contextlib.contextmanager
def atomic_folder(final: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary folder beside ``final``; on success it replaces ``final``, on any
    error it is removed and ``final`` is left as it was. Work folders that killed runs left in
    ``final``'s parent are removed first (:func:`remove_stale_work_folders`)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_work_folders(final.parent)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if final.exists():
            if not force:
                raise UserError(f"{final} appeared while compiling; pass --force to replace it.")
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            final.rename(old)
        tmp.rename(final)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _shape(t: onnx.TypeProto) -> list[int | str]:
    return [d.dim_param if d.dim_param else d.dim_value for d in t.tensor_type.shape.dim]


def graph_io(model: onnx.ModelProto) -> dict:
    def describe(values):
        return [{"name": v.name, "dtype": _DTYPES[v.type.tensor_type.elem_type], "shape": _shape(v.type)} for v in values]

    ops: dict[str, int] = {}
    for n in model.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return {
        "inputs": describe(model.graph.input),
        "outputs": describe(model.graph.output),
        "opset": max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
        "nodes": len(model.graph.node),
        "quantize_linear": ops.get("QuantizeLinear", 0),
        "dequantize_linear": ops.get("DequantizeLinear", 0),
        "int4_initializers": sum(1 for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT4),
    }


def versions() -> dict[str, str]:
    import onnxruntime
    import torch
    import transformers

    return {
        "quota-compile": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "transformers": transformers.__version__,
    }


def file_hashes(folder: Path, exclude: tuple[str, ...] = (MANIFEST,)) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.relative_to(folder).as_posix() not in exclude
    }


def _canonical_sha256(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")).hexdigest()


def key_hashes(manifest: dict) -> dict[str, str]:
    """sha256 of every top-level key of a manifest and of every key of its mapping sections
    (``model.prompt_template``, ``pruning.visual_tokens_per_layer``, ...), ``key_sha256``
    itself excepted."""
    out = {}
    for k, v in manifest.items():
        if k == "key_sha256":
            continue
        if isinstance(v, dict):
            out.update({f"{k}.{kk}": _canonical_sha256(vv) for kk, vv in v.items()})
        else:
            out[k] = _canonical_sha256(v)
    return out


def write_manifest(folder: Path, manifest: Manifest | dict) -> dict:
    """manifest.json, with the sha256 of every other file of ``folder`` (``files``) and of each
    of its own keys (``key_sha256``); validated as a :class:`~quota_compile.bundle.schema.Manifest`
    and returned as its JSON document.

    Why hash the manifest's keys: the runtime trusts facts only the manifest holds (the prompt
    template, the image-token span, the EOS id, the KV layout, the per-layer visual-token
    counts), and manifest.json cannot hold its own file's hash. Checking each fact against
    something else (the tokenizer, the graphs) covers only some of them and only some edits
    (a reworded template with the same token count passes every such check), while a hash of
    each key catches any edit or damage of any key and names the key. It is a checksum, not a
    signature: whoever rewrites a key and its hash on purpose is not stopped (nothing inside
    a bundle could stop that); :func:`check_bundle` also compares the manifest with the graphs."""
    doc = manifest.doc() if isinstance(manifest, Manifest) else dict(manifest)
    doc = {k: v for k, v in doc.items() if k not in ("files", "key_sha256")}
    doc["files"] = file_hashes(folder)
    doc["key_sha256"] = key_hashes(doc)
    doc = Manifest.model_validate(doc).doc()
    write_json(folder / MANIFEST, doc)
    return doc


def write_verify(folder: Path, report: VerifyReport | dict) -> dict:
    """verify.json: the verification of every flavour of the bundle, validated as a
    :class:`~quota_compile.bundle.schema.VerifyReport`. The compile writes it once, in its
    bundle stage, after every flavour (its engine checks included) has recorded into the
    report; returns the JSON document written."""
    doc = (report if isinstance(report, VerifyReport) else VerifyReport.model_validate(report)).doc()
    write_json(folder / VERIFY, doc)
    return doc


# ---------------------------------------------------------------- reading a bundle


def open_bundle(folder: str | Path) -> Manifest:
    """Everything a reader of a bundle (``quota-compile run``, :class:`~quota_compile.runtime.ort.BundleRunner`)
    checks before loading anything from it; returns the manifest, typed. Bad input is a
    :class:`UserError` naming the file (and the manifest key):

    - the folder is a bundle: not a compile's work folder, has a manifest.json that is JSON, of
      this ``format`` and ``format_version``, and a valid :class:`~quota_compile.bundle.schema.Manifest`
      (no unknown key, none missing, every value of its JSON type);
    - every file the manifest lists is there with its sha256, and there is no other file;
    - the manifest agrees with the graphs: recorded inputs and outputs, layer count, KV layout,
      per-layer visual-token counts and pruning layers (:func:`check_graphs`), and which
      tensors of each weights file every graph reads (:func:`check_weights`);
    - no other key of the manifest changed since it was written (``key_sha256``, :func:`write_manifest`)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such bundle folder.")
    if is_work_folder(folder):
        raise UserError(f"{folder}: the work folder of a running or interrupted compile, not a bundle.")
    manifest = read_manifest(folder)
    doc = manifest.doc()
    check_files(folder, doc)
    check_graphs(folder, doc)
    check_weights(folder, doc)
    check_key_hashes(folder, doc)
    return manifest


def check_bundle(folder: str | Path) -> dict:
    """:func:`open_bundle`, returning the manifest's JSON document."""
    return open_bundle(folder).doc()


def read_manifest(folder: Path) -> Manifest:
    """manifest.json, checked for format and version and validated as a
    :class:`~quota_compile.bundle.schema.Manifest` (a written bundle's: ``files`` and
    ``key_sha256`` included)."""
    path = folder / MANIFEST
    if not path.is_file():
        raise UserError(f"{folder}: not a quota-compile bundle (no {MANIFEST}).")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file; the bundle is damaged.") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); the bundle is damaged.") from None
    if not isinstance(doc, dict):
        raise UserError(f"{path}: expected a JSON object at the top level, got {type(doc).__name__}; the bundle is damaged.")
    if doc.get("format") != FORMAT:
        raise UserError(f"{path}: key 'format' must be {FORMAT!r}, got {doc.get('format')!r}; not a quota-compile bundle.")
    if doc.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{path}: key 'format_version' is {doc.get('format_version')!r}, quota-compile {__version__} reads bundles of "
            f"format_version {FORMAT_VERSION}; compile the bundle again with this version."
        )
    from quota_compile.config import validation_message

    try:
        manifest = Manifest.model_validate(doc)
    except ValidationError as e:
        raise UserError(f"{path}: {validation_message(e)}; the bundle is damaged or was edited.") from None
    for key in ("files", "key_sha256"):  # optional while the compile builds the manifest, required once written
        if key not in doc:
            raise UserError(f"{path}: key '{key}' is required but missing; the bundle is damaged or was edited.")
        if doc[key] is None:
            raise UserError(f"{path}: key '{key}' must be a mapping of keys, got None; the bundle is damaged or was edited.")
    for g in GRAPHS:
        if g not in manifest.graphs:
            raise UserError(f"{path}: key 'graphs.{g}' is required but missing; the bundle is damaged or was edited.")
    return manifest


def check_key_hashes(folder: Path, manifest: dict) -> None:
    """No key of the manifest changed since :func:`write_manifest` wrote it."""
    recorded, actual = manifest["key_sha256"], key_hashes(manifest)
    for key in [*recorded, *(k for k in actual if k not in recorded)]:
        if recorded.get(key) != actual.get(key):
            what = "is missing" if key not in actual else ("was added" if key not in recorded else "was changed")
            raise UserError(
                f"{folder / MANIFEST}: key '{key}' {what} after the bundle was compiled (its sha256 in 'key_sha256' does not match); "
                "the manifest was edited or damaged: restore it or compile the bundle again."
            )


def check_files(folder: Path, manifest: dict) -> None:
    """Every file listed in the manifest exists with its sha256; no other file is there."""
    listed = manifest["files"]
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {MANIFEST}
    for rel in sorted(listed):
        if rel not in present:
            raise UserError(f"{folder / rel}: missing; {MANIFEST} lists it, so the bundle is incomplete.")
    for rel in sorted(present - set(listed)):
        raise UserError(f"{folder / rel}: not listed in {MANIFEST}; the bundle was modified (remove the file or compile the bundle again).")
    for rel in sorted(listed):
        if sha256_file(folder / rel) != listed[rel]:
            raise UserError(f"{folder / rel}: sha256 does not match {MANIFEST}; the bundle was modified or damaged.")


def check_graphs(folder: Path, manifest: dict) -> None:
    """The manifest's description of the graphs is the graphs' own: inputs and outputs (names,
    dtypes, shapes) as :func:`graph_io` reads them, one KV layout per decoder layer, and per-layer
    visual-token counts equal to what the graphs keep (``kept.{l}``'s static size from each
    pruning layer on, all visual tokens before the first). Run after :func:`check_files`: the
    graphs are then the compiled ones, so a disagreement means the manifest is wrong."""
    path = folder / MANIFEST

    def refuse(key: str, what: str):
        raise UserError(f"{path}: key '{key}' {what}; the manifest was edited or damaged.")

    io = {}
    for g in GRAPHS:
        info = manifest["graphs"][g]
        if info["file"] != f"{g}.onnx":
            refuse(f"graphs.{g}.file", f"is {info['file']!r}, expected {g}.onnx")
        actual = graph_io(onnx.load(str(folder / info["file"]), load_external_data=False))
        for side in ("inputs", "outputs"):
            if info[side] != actual[side]:
                i = next((i for i, (a, b) in enumerate(zip(info[side], actual[side])) if a != b), min(len(info[side]), len(actual[side])))
                refuse(f"graphs.{g}.{side}", f"does not describe {g}.onnx (entry {i} differs; the graph has {len(actual[side])} {side})")
        io[g] = {side: {v["name"]: v for v in actual[side]} for side in ("inputs", "outputs")}

    model, pruning, kv = manifest["model"], manifest["pruning"], manifest["kv_cache"]
    layers = sorted({int(n.split(".")[1]) for n in io["decode"]["inputs"] if n.startswith(PAST)})
    if layers != list(range(model["num_layers"])):
        refuse("model.num_layers", f"is {model['num_layers']}, the decode graph takes the KV cache of {len(layers)} layers")
    v = model["visual_tokens"]
    features = io["vision"]["outputs"].get(IMAGE_FEATURES)
    if features is None or features["shape"][1] != v:
        refuse("model.visual_tokens", f"is {v}, the vision graph gives {features['shape'][1] if features else 'no'} visual tokens")
    kept = {int(n.split(".")[1]): o["shape"][1] for n, o in io["prefill"]["outputs"].items() if n.startswith(KEPT)}
    if pruning["pruning_layers"] != sorted(kept):
        refuse("pruning.pruning_layers", f"is {pruning['pruning_layers']}, the prefill graph prunes at layers {sorted(kept)}")
    counts, current = [], v
    for layer in layers:
        current = kept.get(layer, current)
        counts.append(current)
    per_layer = pruning["visual_tokens_per_layer"]
    if len(per_layer) != len(counts):
        refuse("pruning.visual_tokens_per_layer", f"has {len(per_layer)} entries for {len(counts)} decoder layers")
    for layer, (said, real) in enumerate(zip(per_layer, counts)):
        if said != real:
            refuse(f"pruning.visual_tokens_per_layer[{layer}]", f"is {said}, the graphs process {real} visual tokens at layer {layer}")
    if len(kv) != len(counts):
        refuse("kv_cache", f"describes {len(kv)} layers, the graphs have {len(counts)}")
    for layer, (entry, real) in enumerate(zip(kv, counts)):
        if entry["layer"] != layer:
            refuse(f"kv_cache[{layer}].layer", f"is {entry['layer']}, expected {layer}")
        if entry["visual_tokens"] != real:
            refuse(f"kv_cache[{layer}].visual_tokens", f"is {entry['visual_tokens']}, the graphs process {real} visual tokens at layer {layer}")
        names = [n.split(".", 2)[2] for n in io["decode"]["inputs"] if n.startswith(kv_name(PAST, layer, ""))]
        if entry["tensors"] != names:
            refuse(f"kv_cache[{layer}].tensors", f"is {entry['tensors']}, the decode graph takes {names}")
        key = io["decode"]["inputs"][kv_name(PAST, layer, "key")]["shape"]
        if key[1] != entry["num_kv_heads"]:
            refuse(f"kv_cache[{layer}].num_kv_heads", f"is {entry['num_kv_heads']}, the cache of the decode graph has {key[1]} heads")
        codes = entry["codes"]["shape"][-1] if entry["codes"]["shape"] else None
        if key[-1] != codes:
            refuse(f"kv_cache[{layer}].codes.shape", f"ends in {codes}, the decode graph's codes have {key[-1]} bytes per head")


def external_tensors(model: onnx.ModelProto) -> list[tuple[str, str, int, int]]:
    """``(initializer name, file, offset, length)`` of each initializer of ``model`` (loaded
    without its external data) whose bytes are in an external file, in the graph's order."""
    out = []
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            out.append((t.name, info.get("location", ""), int(info.get("offset", "0")), int(info.get("length", "-1"))))
    return out


def weights_table(folder: Path, graphs: list[str]) -> WeightsFile | None:
    """manifest.json's ``weights.<folder>``: every tensor of ``folder``'s weights file, in file
    order, with the graphs (of ``graphs``, written there) that read it and their names for it.
    None when the folder has no weights file."""
    if not (folder / WEIGHTS).is_file():
        return None
    tensors: dict[tuple[int, int], dict[str, str]] = {}
    for g in graphs:
        for name, _, offset, length in external_tensors(onnx.load(str(folder / f"{g}.onnx"), load_external_data=False)):
            tensors.setdefault((offset, length), {})[g] = name
    return WeightsFile(
        file=WEIGHTS,
        bytes=(folder / WEIGHTS).stat().st_size,
        tensors=[{"offset": o, "bytes": n, "graphs": used} for (o, n), used in sorted(tensors.items())],
    )


def graph_bytes(folder: Path, graph: str) -> int:
    """What one graph of ``folder`` takes on disk: its ``.onnx`` file and the bytes it reads from
    the folder's weights file (those it shares with other graphs counted for each)."""
    path = folder / f"{graph}.onnx"
    return path.stat().st_size + sum(n for *_, n in external_tensors(onnx.load(str(path), load_external_data=False)))


def check_weights(folder: Path, manifest: dict) -> None:
    """Every graph of every folder in ``weights`` reads exactly the tensors the manifest says,
    by those names, from that folder's weights file, inside the file."""
    path = folder / MANIFEST

    def refuse(key: str, what: str):
        raise UserError(f"{path}: key '{key}' {what}; the manifest was edited or damaged.")

    for where, entry in manifest["weights"].items():
        if where not in {f["folder"] for f in manifest["flavours"].values()}:
            refuse(f"weights[\"{where}\"]", "is not the folder of a flavour in 'flavours'")
        sub = folder / where
        if entry["file"] != WEIGHTS:
            refuse(f"weights[\"{where}\"].file", f"is {entry['file']!r}, expected {WEIGHTS}")
        size = (sub / WEIGHTS).stat().st_size
        if entry["bytes"] != size:
            refuse(f"weights[\"{where}\"].bytes", f"is {entry['bytes']}, {sub / WEIGHTS} has {size} bytes")
        said: dict[str, list] = {}
        for t in entry["tensors"]:
            if t["offset"] < 0 or t["offset"] + t["bytes"] > size:
                refuse(f"weights[\"{where}\"].tensors", f"has bytes {t['offset']}..{t['offset'] + t['bytes']}, beyond the end of {WEIGHTS}")
            for g, name in t["graphs"].items():
                said.setdefault(g, []).append((name, WEIGHTS, t["offset"], t["bytes"]))
        for g in sorted({p.stem for p in sub.glob("*.onnx")} | set(said)):
            if not (sub / f"{g}.onnx").is_file():
                refuse(f"weights[\"{where}\"].tensors", f"names graph {g!r}, which {sub} does not have")
            actual = sorted(external_tensors(onnx.load(str(sub / f"{g}.onnx"), load_external_data=False)))
            if actual != sorted(said.get(g, [])):
                refuse(f"weights[\"{where}\"].tensors", f"does not describe what {(sub / g).as_posix()}.onnx reads from {WEIGHTS}")


def write_json(path: Path, doc: dict) -> Path:
    path.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return path


def human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _pruning_lines(manifest: dict, verify: dict, recipe, figures: list[str]) -> list[str]:
    p, v = manifest["pruning"], manifest["model"]["visual_tokens"]
    kv = manifest["kv_cache_bytes_per_sequence"]
    lines = [
        "## Token pruning",
        "",
        f"- method: {p['method']} ({p['signals']} signals), budget keep_ratio {p['keep_ratio']}: "
        f"realised average {p['average_fraction']:.4f} of {v} visual tokens per layer",
        f"- pruning layers: {', '.join(map(str, p['pruning_layers'])) or 'none'}",
    ]
    selection = pruning_method(recipe.pruning.method).selection_text(recipe.pruning)
    if selection:
        lines.append(f"- {selection}")
    lines += [
        f"- KV cache per sequence ({kv['prompt_length']} prompt + {kv['generated']} generated tokens): "
        f"{human_size(kv['bundle'])} vs {human_size(kv['fp16_unpruned'])} for an unpruned FP16 cache ({kv['ratio']:.2f}× smaller)",
        "- kept-index agreement, PyTorch vs onnxruntime, every pruning layer and sample: "
        + (f"{verify['kept_index_agreement']:.0%}" if verify.get("kept_index_agreement") is not None else "n/a"),
        "",
        "| layer | visual tokens | KV length |",
        "|---:|---:|---|",
    ]
    lines += [f"| {c['layer']} | {c['visual_tokens']} | {c['length']} |" for c in manifest["kv_cache"]]
    search = recipe.pruning.weight_search
    if search:
        by_answers = search[0].answer_nll is not None  # calibration.objective: answer_nll
        if by_answers:
            lines += ["", "Score-weight search (held-out negative log-likelihood of the gold answer token; KL of the final-token "
                      "distribution, pruned vs unpruned, for reference):", "",
                      "| w_att | w_mag | w_risk | answer NLL | KL | schedule |", "|---:|---:|---:|---:|---:|---|"]
        else:
            lines += ["", "Score-weight search (held-out KL of the final-token distribution, pruned vs unpruned):", "",
                      "| w_att | w_mag | w_risk | KL | schedule |", "|---:|---:|---:|---:|---|"]
        best = min(search, key=lambda pt: pt.answer_nll if by_answers else pt.kl)
        for pt in search:
            cells = [f"{pt.answer_nll:.4g}", f"{pt.kl:.4g}"] if by_answers else [f"{pt.kl:.4g}"]
            cells[0] += " **chosen**" if pt is best else ""
            lines.append(f"| {pt.weights.att:g} | {pt.weights.mag:g} | {pt.weights.risk:g} | {' | '.join(cells)} | {pt.keep} |")
    if figures:
        lines += ["", *[f"![{f}]({f})" for f in figures]]
    return lines + [""]


def _limit(value, fmt: str = "g") -> str:
    return "report only" if value is None else f"limit {value:{fmt}}"


def _gate_lines(v: dict) -> list[str]:
    """The code flips (teacher-forced, the gate; free-running, reported), the kept-set
    differences and the logits error of one verification (verify.json's layout)."""
    t, lines = v["thresholds"], []
    for kind, label in (("activations", "activation"), ("kv_cache", "KV-cache")):
        c = v.get("codes", {}).get(kind)
        if not c:
            continue
        free = v.get("codes_free_running", {}).get(kind, {})
        if c["compared"]:
            lines.append(
                f"- {label} codes, same inputs, teacher-forced: {c['flips']} of {c['compared']} differ ({c['rate']:.2g}; "
                f"limit {t['max_code_flip_rate']:g} overall, {t['max_tensor_code_flip_rate']:g} per tensor); "
                f"free-running (a flip's consequences included): {free.get('flips', 0)} of {free.get('compared', 0)}"
            )
        else:
            lines.append(f"- {label} codes: not observable in these graphs")
    k = v.get("kept")
    if k and k["compared"]:
        margin = f", largest margin {k['max_margin']:.2g}" if k.get("max_margin") is not None else ""
        lines.append(
            f"- kept sets at the pruning layers: {k['identical']} of {k['compared']} comparisons identical, {k['near_tie']} near-ties "
            f"(within {k['tolerance']:g} of the score scale{margin}), {k['not_a_tie']} not ties, {k['missing']} missing"
            + (f", {k['after_rounding_tie']} free-running differences after a rounding tie (teacher-forced sets the same)" if k.get("after_rounding_tie") else "")
        )
    lines.append(f"- worst relative logits error: {v['max_logits_rel_error']:.3g} ({_limit(t['max_logits_rel_error'])})")
    return lines


def _flavour_lines(verify: dict) -> list[str]:
    """The derived flavours' verification (onnxruntime, tensorrt), where the bundle has them."""
    out = []
    used = {"onnxruntime": ", used by `quota-compile run`", "tensorrt": ", plugins run by their references in onnxruntime"}
    for name, v in verify.get("flavours", {}).items():
        t = v["thresholds"]
        out += [
            f"## Verification of the {name} flavour (`{name}/`{used.get(name, '')})",
            "",
            *_gate_lines(v),
            f"- samples with identical greedy tokens: {v['greedy_agreement']:.0%} (required {t['min_greedy_agreement']:.0%}); "
            f"tokens agreeing: {v['token_agreement']:.1%}",
            *(f"- {g}: {a}" for g, a in v.get("arithmetic", {}).items()),
            f"- result: {'passed' if v['passed'] else 'FAILED'}",
            "",
        ]
    return out


def report_markdown(name: str, manifest: Manifest | dict, verify: VerifyReport | dict, passes: dict[str, list], recipe, figures: list[str]) -> str:
    """report.md, from the manifest and the verification (typed or as their JSON documents)."""
    manifest = manifest.doc() if isinstance(manifest, Manifest) else manifest
    verify = verify.doc() if isinstance(verify, VerifyReport) else verify
    m, q = manifest["model"], manifest["quantization"]
    lines = [
        f"# quota-compile bundle `{name}`",
        "",
        f"- model: `{m['source']}` (sha256 `{m['sha256'][:16]}…`), {m['num_layers']} decoder layers, "
        f"{m['visual_tokens']} visual tokens at position {m['visual_start']}",
        f"- weights: INT{q['weights']['bits']} symmetric, "
        f"{'per output channel' if q['weights'].get('granularity') == 'per_channel' else 'group ' + str(q['weights']['group_size'])}, "
        f"{q['weights']['method'].upper()}; "
        f"activations: INT{q['activations']['bits']} per token (clip {q['activations']['clip_ratio']}); "
        f"KV cache: INT{q['kv_cache']['bits']} "
        f"{'symmetric static per_channel' if q['kv_cache']['granularity'] == 'per_channel' else 'asymmetric ' + q['kv_cache']['granularity']}"
        + (f"; token embeddings: INT{q['embeddings']['bits']}" if q.get("embeddings", {}).get("bits") else ""),
        f"- kept in full precision: {', '.join(f'`{p}`' for p in q['ignore']) or 'nothing'}",
        "",
        *_pruning_lines(manifest, verify, recipe, figures),
        "## Graphs",
        "",
        "| graph | size | nodes | QuantizeLinear | DequantizeLinear | INT4 weights | passes that changed it |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for g, info in manifest["graphs"].items():
        changed = ", ".join(n for n, mod in passes[g] if mod) or "none"
        lines.append(
            f"| {g} | {human_size(info['bytes'])} | {info['nodes']} | {info['quantize_linear']} | "
            f"{info['dequantize_linear']} | {info['int4_initializers']} | {changed} |"
        )
    lines += [
        "",
        "## Verification (onnxruntime vs the PyTorch simulation)",
        "",
        f"- held-out samples: {verify['samples']}, greedy tokens each: {verify['new_tokens']} (seed {verify['seed']})",
        *_gate_lines(verify),
        f"- worst relative error of the visual embeddings: {verify['max_vision_rel_error']:.3g}",
        f"- samples with identical greedy tokens: {verify['greedy_agreement']:.0%} (required {verify['thresholds']['min_greedy_agreement']:.0%}"
        + (f"; {verify['greedy_divergences_at_rounding_ties']} more diverge only after a rounding tie, which counts as agreeing"
           if verify.get("greedy_divergences_at_rounding_ties") else "")
        + f"); tokens agreeing: {verify['token_agreement']:.1%}",
        "- Polygraphy comparator, one sample per graph (informational; kept indices exact, float outputs by mean error): "
        + ", ".join(f"{g} {'passed' if r['passed'] else 'FAILED'}" for g, r in verify.get("polygraphy", {}).items()),
        f"- result: {'passed' if verify['passed'] else 'FAILED: ' + '; '.join(verify['failures'])}",
        "",
        *_flavour_lines(verify),
        "## Not verified here",
        "",
        "TensorRT engines and GPU execution are not part of this bundle. Accuracy on a benchmark is",
        "not measured by `quota-compile` compile; verification compares the deployed graphs with the",
        "simulation of the same low-bit arithmetic, not with the full-precision model.",
        "",
    ]
    return "\n".join(lines)
