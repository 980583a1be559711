"""``quota-compile eval model.yaml``: accuracy and accuracy retention of every deployment variant,
measured through the exported onnxruntime graphs (what is deployed), side by side.

Variants (in this order):

- ``fp``: full precision, all visual tokens (fp32 graphs, float KV cache): the reference;
- ``w4a4kv4``: the config's quantization (W4A4 + quantized KV cache), all visual tokens;
- for every ``eval.keep_ratios`` r and every ``eval.methods`` m, the quantized model pruned by m
  at average keep ratio r:

  - ``fastv`` and ``pdrop``: the stage-wise combinations. Their schedules are fixed by their
    own rules (one cut at ``pruning.fastv_layer``; ``pruning.stages`` geometric stages), i.e.
    designed on the full-precision model (``signals: fp``) and then quantized; at run time they
    rank tokens by the attention cue computed in the deployed (quantized) graph, as a stage-wise
    deployment would;
  - ``quota``: the QUOTA recipe calibrated under the deployed operators (``signals: lowbit``,
    the config's ``pruning.weights`` / ``query_tokens`` / ``first_full_layers``);
  - ``random``: a fixed seeded random subset, one cut after the full layers.

Every variant is calibrated (where it calibrates), traced, lowered to ONNX and run with
onnxruntime on the same questions: the ShapesVQA ``eval.split`` with ``eval.seed``, the first
``eval.questions`` of it, greedy decoding of up to ``eval.max_new_tokens`` tokens. An answer is
right when the generated text, lowercased and stripped of surrounding punctuation, equals the
gold answer (the models answer with one word). Retention is a variant's accuracy divided by the
``fp`` accuracy. As a guard on the graphs, the first ``eval.simulation_check`` questions are
also answered by the eager PyTorch simulation of the same variant; the share of identical
answers is reported (``simulation_agreement``).

Results go to ``OUTPUT_DIR/<name>-eval/``: ``eval.json`` (every number, the settings, versions,
per-question answers), ``eval.md`` (the table) and ``retention.png`` (the chart). The same YAML
and checkpoint give the same numbers: data, calibration and the random baseline are seeded,
and onnxruntime's CPU kernels are deterministic for a fixed thread count.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from quota_compile.bundle.format import atomic_folder, check_destination, versions, write_json
from quota_compile.config import bundle_name, load_config
from quota_compile.errors import ConfigError, UserError, errors_in
from quota_compile.models import load_model
from quota_compile.pruning.methods import pruning_method
from quota_compile.core.statistics import LEVEL, bootstrap_interval, bootstrap_ratio_interval, mcnemar
from quota_compile.core.variants import Variant, quant_name, variants
from quota_compile.core.workbench import Workbench
from quota_compile.calibration.calibrate import quantize_model, settle_quantization
from quota_compile.runtime.ort import OrtBackend, greedy_generate, make_batch
from quota_compile.capture.trace import build_programs
from quota_compile.verify.gate import TorchBackend



def normalise(text: str) -> str:
    """Lowercase, surrounding whitespace and punctuation removed."""
    return text.strip().strip(".,;:!?\"'()").strip().lower()


def is_correct(generated: str, answer: str) -> bool:
    return normalise(generated) == normalise(answer)


@dataclass
class Questions:
    items: list  # shapes.VQAItem
    batches: list  # runtime.Batch, in order


def shapes_questions(vlm, ev, span) -> Questions:
    from quota_compile.data.shapes import vqa_items

    items = vqa_items(ev.split, ev.seed, ev.questions, vlm.image_size, vlm.patch_size)
    batches = []
    for lo in range(0, len(items), ev.batch_size):
        chunk = items[lo : lo + ev.batch_size]
        batches.append(make_batch(vlm.processor, vlm.prompt_template, [i.image for i in chunk], [i.text for i in chunk], span, vlm.image_token_id))
    return Questions(items, batches)


def answer_all(backend, batches, max_new_tokens: int, eos: int, tokenizer) -> list[str]:
    out = []
    for b in batches:
        gen = greedy_generate(backend, b, max_new_tokens, eos)
        out += [tokenizer.decode(t, skip_special_tokens=True).strip() for t in gen.tokens]
    return out


def score(items, answers: list[str]) -> dict:
    """Accuracy overall, per family and per (family, subtype)."""
    right: dict[str, list[bool]] = {}
    sub: dict[str, list[bool]] = {}
    for item, a in zip(items, answers):
        q = item.question
        ok = is_correct(a, q.answer)
        right.setdefault(q.family, []).append(ok)
        sub.setdefault(f"{q.family}/{q.subtype}", []).append(ok)
    total = [x for v in right.values() for x in v]
    return {
        "accuracy": sum(total) / len(total),
        "per_family": {f: sum(v) / len(v) for f, v in sorted(right.items())},
        "per_subtype": {f: sum(v) / len(v) for f, v in sorted(sub.items())},
        "counts": {f: len(v) for f, v in sorted(right.items())},
    }



def evaluate_variant(workbench: Workbench, v: Variant, questions: Questions, work: Path) -> dict:
    cfg, vlm, qm, span = workbench.cfg, workbench.vlm, workbench.qm, workbench.span
    built = workbench.build_into(v, work)
    folder, programs, keep, recipe = built.folder, built.programs, built.keep, built.recipe
    t_cal, t_build = built.seconds_calibrate, built.seconds_build
    t0 = time.perf_counter()
    ev, tok = cfg.eval, vlm.tokenizer
    answers = answer_all(OrtBackend(folder), questions.batches, ev.max_new_tokens, vlm.eos_token_id, tok)
    t_run = time.perf_counter() - t0
    check = None
    n = min(ev.simulation_check, len(questions.items))
    if n:
        first = _first_batches(questions.batches, n)
        with qm.fake_quant(v.quantized):
            sim = answer_all(TorchBackend(programs), first, ev.max_new_tokens, vlm.eos_token_id, tok)
        check = sum(a == b for a, b in zip(sim[:n], answers[:n])) / n
    v_count = span[1]
    return {
        "name": v.name,
        "label": v.label,
        "method": v.method,
        "keep_ratio": v.keep_ratio,
        "quantized": v.quantized,
        "visual_tokens_per_layer": keep,
        "average_keep": sum(keep) / (len(keep) * v_count),
        "recipe": recipe,
        **score(questions.items, answers),
        "simulation_agreement": check,
        "seconds": {"calibrate": round(t_cal, 1), "trace_and_lower": round(t_build, 1), "run": round(t_run, 1)},
        "answers": answers,
    }


def add_statistics(rows: list[dict], gold: list[str], seed: int, resamples: int) -> None:
    """Add to each eval row (``rows[0]`` the full-precision reference, every row with its
    ``answers`` to the questions whose answers are ``gold``) its retention, the 95 %
    percentile-bootstrap intervals of its accuracy (``accuracy_ci95``) and retention
    (``retention_ci95``; questions resampled, the reference recomputed on each resample), and,
    for a pruned variant of another method where ``quota`` was evaluated at the same budget,
    McNemar's exact test against it (``versus_quota``). Every row uses the same resamples."""
    correct = [[is_correct(a, g) for a, g in zip(r["answers"], gold, strict=True)] for r in rows]
    ref = rows[0]
    quota = {r["keep_ratio"]: (r, c) for r, c in zip(rows, correct) if r["method"] == "quota"}
    for r, c in zip(rows, correct):
        fp = ref["accuracy"]
        r["retention"] = r["accuracy"] / fp if fp > 0 else None
        r["retention_per_family"] = {f: (a / ref["per_family"][f] if ref["per_family"][f] > 0 else None) for f, a in r["per_family"].items()}
        r["accuracy_ci95"] = list(bootstrap_interval(c, resamples, LEVEL, seed))
        ratio = bootstrap_ratio_interval(c, correct[0], resamples, LEVEL, seed)
        r["retention_ci95"] = list(ratio) if ratio is not None else None
        other = quota.get(r["keep_ratio"]) if r["method"] not in ("none", "quota") else None
        r["versus_quota"] = {"variant": other[0]["name"], **mcnemar(c, other[1]).as_dict()} if other else None


def check_budgets(cfg, todo: list[Variant], layers: int, v: int) -> None:
    """Every (method, keep ratio) must be reachable on this depth; say which is not, up front."""
    for var in todo:
        try:
            pruning_method(var.method).check_budget(cfg.pruning, layers, v, var.keep_ratio)
        except UserError as e:
            raise ConfigError("eval.keep_ratios", f"{var.method} at {var.keep_ratio:g} cannot be evaluated: {e}") from None


def _visual_share(questions: Questions, v: int) -> float:
    lengths = [int(n) for b in questions.batches for n in b.attention_mask.sum(axis=1)]
    return sum(v / n for n in lengths) / len(lengths)


def _first_batches(batches, n: int) -> list:
    out, seen = [], 0
    for b in batches:
        if seen >= n:
            break
        out.append(b)
        seen += len(b.input_ids)
    return out


def run_eval(config_path: str | Path, force: bool = False, console: Console | None = None) -> tuple[Path, dict]:
    config_file = Path(config_path)
    with errors_in(config_file):
        return _eval(config_file, force, console or Console(stderr=True))


def _eval(config_file: Path, force: bool, console: Console) -> tuple[Path, dict]:
    cfg = load_config(config_file)
    name = f"{bundle_name(cfg, config_file)}-eval"
    final = Path(cfg.output.dir) / name
    check_destination(final, force)
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        vlm = load_model(cfg, stack, config_file.parent)
        cfg = settle_quantization(cfg, vlm)
        span = vlm.visual_span()
        side = vlm.image_size // vlm.patch_size
        if span[1] != side * side:
            raise ConfigError("model.source", f"ShapesVQA evaluation needs one visual token per patch ({side * side}); the model gives {span[1]}.")
        benchmarks = load_benchmarks(cfg, config_file.parent)  # bad benchmark files fail before any work
        todo = variants(cfg)
        check_budgets(cfg, todo, vlm.num_layers, span[1])  # before any long step
        questions = shapes_questions(vlm, cfg.eval, span)
        qm = quantize_model(vlm, cfg, span)
        workbench = Workbench(cfg, vlm, qm, span)
        console.print(f"evaluating {len(todo)} variants on {len(questions.items)} ShapesVQA {cfg.eval.split} questions (seed {cfg.eval.seed})", highlight=False)
        rows = []
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="quota-eval-")))
        for i, v in enumerate(todo, 1):
            t0 = time.perf_counter()
            console.print(f"[{i}/{len(todo)}] {v.label} ...", highlight=False)
            row = evaluate_variant(workbench, v, questions, work)
            rows.append(row)
            console.print(f"      accuracy {row['accuracy']:.1%} ({time.perf_counter() - t0:.0f} s)", style="dim", highlight=False)
        bench = run_benchmarks(cfg, vlm, qm, span, benchmarks, console)
    gold = [i.question.answer for i in questions.items]
    add_statistics(rows, gold, cfg.eval.seed, cfg.eval.bootstrap_resamples)
    doc = {
        "format": "quota-compile eval",
        "config": str(config_file),
        "model": cfg.model.source,
        "dataset": {
            "name": "ShapesVQA", "split": cfg.eval.split, "seed": cfg.eval.seed, "questions": len(questions.items),
            "visual_tokens": span[1],
            # the visual tokens' share of each prompt (prefill) length, averaged over the questions
            "visual_share_of_prefill": _visual_share(questions, span[1]),
        },
        "quantization": cfg.quantization.model_dump(mode="json"),
        "pruning_settings": {k: v for k, v in cfg.pruning.model_dump(mode="json").items() if k not in ("method", "keep_ratio", "signals")},
        "calibration": cfg.calibration.model_dump(mode="json"),
        "max_new_tokens": cfg.eval.max_new_tokens,
        "gold": gold,
        "bootstrap": {"resamples": cfg.eval.bootstrap_resamples, "level": LEVEL, "seed": cfg.eval.seed},
        "variants": rows,
        "benchmarks": bench,
        "seconds": round(time.perf_counter() - start, 1),
        "versions": versions(),
    }
    from quota_compile.bundle.figures import retention_chart

    with atomic_folder(final, force) as tmp:
        write_json(tmp / "eval.json", doc)
        chart = retention_chart(rows, tmp / "retention.png", f"{cfg.model.source}: ShapesVQA retention")
        (tmp / "eval.md").write_text(eval_markdown(doc, chart.name), encoding="utf-8")
    return final, doc


def load_benchmarks(cfg, folder: Path) -> dict:
    """The local benchmark copies named in ``eval.benchmarks`` (paths relative to ``folder``, the
    YAML's); a copy that does not load is a :class:`ConfigError` of its key."""
    from quota_compile.data.benchmarks import BENCHMARKS, load_benchmark

    b = cfg.eval.benchmarks
    out = {}
    for key in BENCHMARKS:
        path = getattr(b, key)
        if not path:
            continue
        p = Path(path).expanduser()
        p = p if p.is_absolute() else (folder / p).resolve()
        try:
            out[key] = load_benchmark(key, p, limit=b.limit)
        except UserError as e:
            raise ConfigError(f"eval.benchmarks.{key}", str(e)) from None
    return out


def run_benchmarks(cfg, vlm, qm, span, benchmarks: dict, console) -> dict:
    """Local copies of public benchmarks (``eval.benchmarks``), answered by the eager PyTorch
    simulation (not the ONNX graphs) of the FP model and of the quantized unpruned model, one
    item at a time, and scored with each benchmark's own metric."""
    if not benchmarks:
        return {}
    out = {}
    programs = build_programs(vlm, qm)
    backend = TorchBackend(programs)
    for key, bench in benchmarks.items():
        console.print(f"benchmark {key}: {len(bench.items)} items", highlight=False)
        out[key] = {}
        for label, quantized in (("fp", False), (quant_name(cfg), True)):
            preds = {}
            with qm.fake_quant(quantized):
                for item in bench.items:  # one at a time: the prompts differ in length a lot
                    batch = make_batch(vlm.processor, vlm.prompt_template, [item.image()], [item.question], span, vlm.image_token_id)
                    gen = greedy_generate(backend, batch, cfg.eval.max_new_tokens, vlm.eos_token_id)
                    preds[item.id] = vlm.tokenizer.decode(gen.tokens[0], skip_special_tokens=True).strip()
            out[key][label] = bench.score(preds)
    return out


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def _interval(ci) -> str:
    return "" if ci is None else f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _versus(r: dict) -> str:
    """McNemar against quota at the same budget: p, then the questions only this variant got
    right (+) and only quota got right (−)."""
    m = r.get("versus_quota")
    if not m:
        return ""
    return f"p = {m['p_value']:.2g} (+{m['only_this']} / −{m['only_other']})"


def eval_markdown(doc: dict, chart: str) -> str:
    rows = doc["variants"]
    fams = list(rows[0]["per_family"])
    ds = doc["dataset"]
    boot = doc["bootstrap"]
    lines = [
        f"# Accuracy retention: {doc['model']}",
        "",
        f"ShapesVQA {ds['split']} split, seed {ds['seed']}, {ds['questions']} questions; every variant runs "
        "through its exported ONNX graphs in onnxruntime (greedy). Accuracy in %; retention = accuracy / FP32 accuracy. "
        f"{ds['visual_tokens']} visual tokens per image, on average {ds['visual_share_of_prefill']:.0%} of the prefill length.",
        "",
        f"In brackets: {boot['level']:.0%} percentile-bootstrap intervals ({boot['resamples']} resamples of the questions, "
        f"seed {boot['seed']}; a retention's resamples recompute the FP32 accuracy too). *vs quota*: McNemar's exact "
        "test against quota at the same budget on the same questions; + questions only this variant answers right, "
        "− questions only quota answers right.",
        "",
        "| variant | avg. keep | accuracy | retention | vs quota | " + " | ".join(fams) + " | sim. agreement |",
        "|---|---|---|---|---|" + "---|" * len(fams) + "---|",
    ]
    for r in rows:
        fam = " | ".join(_pct(r["per_family"][f]) for f in fams)
        agree = "n/a" if r["simulation_agreement"] is None else f"{r['simulation_agreement']:.0%}"
        acc = _pct(r["accuracy"]) + _interval(r.get("accuracy_ci95"))
        ret = _pct(r["retention"]) + _interval(r.get("retention_ci95"))
        lines.append(f"| {r['label']} | {r['average_keep']:.3f} | {acc} | {ret} | {_versus(r)} | {fam} | {agree} |")
    lines += ["", f"![retention]({chart})", ""]
    lines += [
        "Per-layer visual tokens of the pruned variants:",
        "",
        *[f"- {r['label']}: {r['visual_tokens_per_layer']}" for r in rows if r["method"] != "none"],
        "",
    ]
    if doc["benchmarks"]:
        lines += ["## Local benchmarks (eager simulation, unpruned)", "", "| benchmark | variant | metric | value |", "|---|---|---|---|"]
        for name, res in doc["benchmarks"].items():
            for label, s in res.items():
                lines.append(f"| {name} | {label} | {s['main_metric']} | {s['main']:.4g} |")
        lines.append("")
    lines.append(f"Total time {doc['seconds']:.0f} s.")
    return "\n".join(lines) + "\n"


def retention_table(doc: dict) -> list[list[str]]:
    """Rows for the terminal table: variant, avg keep, accuracy with its 95 % interval,
    retention, McNemar against quota at the same budget, worst family."""
    out = []
    for r in doc["variants"]:
        worst = min(r["per_family"].items(), key=lambda kv: kv[1])
        out.append([
            r["label"], f"{r['average_keep']:.3f}", _pct(r["accuracy"]) + _interval(r.get("accuracy_ci95")),
            _pct(r["retention"]), _versus(r), f"{worst[0]} {_pct(worst[1])}",
        ])
    return out


