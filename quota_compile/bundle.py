"""The bundle folder (DESIGN §5): atomic writing, manifest.json and report.md."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
from collections.abc import Iterator
from pathlib import Path

import onnx

from . import __version__
from .errors import UserError

_DTYPES = {v: k.lower() for k, v in onnx.TensorProto.DataType.items()} | {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.DOUBLE: "float64"}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_destination(final: Path, force: bool, config_file: Path) -> None:
    """Refuse to replace an existing bundle without ``--force`` (before any work is done)."""
    if final.exists() and not force:
        raise UserError(f"{config_file}: key 'output': {final} already exists; pass --force to replace it.")
    if final.exists() and not final.is_dir():
        raise UserError(f"{config_file}: key 'output': {final} exists and is not a folder.")


@contextlib.contextmanager
def atomic_folder(final: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary folder beside ``final``; on success it replaces ``final``, on any
    error it is removed and ``final`` is left as it was."""
    final.parent.mkdir(parents=True, exist_ok=True)
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


def file_hashes(folder: Path, exclude: tuple[str, ...] = ("manifest.json",)) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.relative_to(folder).as_posix() not in exclude
    }


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
    w = recipe.pruning.weights
    if recipe.pruning.method == "random":
        lines.append(f"- selection: a fixed random score per visual token (seed {recipe.pruning.random_seed})")
    elif w is not None:
        lines.append(f"- score: {w.att:g}·att + {w.mag:g}·mag − {w.risk:g}·risk (signals normalised per sample and layer)")
    lines += [
        f"- KV cache per sequence ({kv['prompt_length']} prompt + {kv['generated']} generated tokens): "
        f"{human_size(kv['bundle'])} vs {human_size(kv['fp16_unpruned'])} for an unpruned FP16 cache ({kv['ratio']:.2f}× smaller)",
        f"- kept-index agreement, PyTorch vs onnxruntime, every pruning layer and sample: "
        + (f"{verify['kept_index_agreement']:.0%}" if verify.get("kept_index_agreement") is not None else "n/a"),
        "",
        "| layer | visual tokens | KV length |",
        "|---:|---:|---|",
    ]
    lines += [f"| {c['layer']} | {c['visual_tokens']} | {c['length']} |" for c in manifest["kv_cache"]]
    if recipe.pruning.weight_search:
        lines += ["", "Score-weight search (held-out KL of the final-token distribution, pruned vs unpruned):", "",
                  "| w_att | w_mag | w_risk | KL | schedule |", "|---:|---:|---:|---:|---|"]
        best = min(recipe.pruning.weight_search, key=lambda pt: pt.kl)
        for pt in recipe.pruning.weight_search:
            mark = " **chosen**" if pt is best else ""
            lines.append(f"| {pt.weights.att:g} | {pt.weights.mag:g} | {pt.weights.risk:g} | {pt.kl:.4g}{mark} | {pt.keep} |")
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


def report_markdown(name: str, manifest: dict, verify: dict, passes: dict[str, list], recipe, figures: list[str]) -> str:
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
        f"- samples with identical greedy tokens: {verify['greedy_agreement']:.0%} (required {verify['thresholds']['min_greedy_agreement']:.0%}); "
        f"tokens agreeing: {verify['token_agreement']:.1%}",
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
