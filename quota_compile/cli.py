"""The ``quota-compile`` command.

    quota-compile CONFIG.yaml [--force]          compile (same as ``compile CONFIG.yaml``)
    quota-compile eval CONFIG.yaml [--force]     accuracy retention of every variant (ShapesVQA)
    quota-compile bench CONFIG.yaml [--force]    speed of PyTorch eager, onnxruntime fp32 / quantized / bundle
    quota-compile run BUNDLE --image I --prompt P [--image I --prompt P ...]
    quota-compile write-builtin NAME DIR [--seed N]

Exit codes: 0 success; 1 verification failure or internal error (no bundle is written);
2 bad input (one sentence naming the file and the key).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from .environment import check_versions
from .errors import UserError, VerificationFailed

COMMANDS = ("compile", "eval", "bench", "run", "write-builtin")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own usage errors are bad input too: exit 2
        self.print_usage(sys.stderr)
        raise UserError(f"command line: {message}.")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="quota-compile", description="Compile a LLaVA-family VLM into a verified W4A4 + quantized-KV ONNX bundle.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    c = sub.add_parser("compile", help="compile a model.yaml into exported/<name>/")
    c.add_argument("config", type=Path, help="the model.yaml to compile")
    c.add_argument("--force", action="store_true", help="replace an existing bundle of the same name")
    c.add_argument("--recipe", type=Path, help="export from this recipe.yaml instead of calibrating")
    e = sub.add_parser("eval", help="accuracy and retention of FP, quantized and pruned variants through their ONNX graphs")
    e.add_argument("config", type=Path, help="the model.yaml (its eval section sets questions, keep ratios, methods)")
    e.add_argument("--force", action="store_true", help="replace an existing <name>-eval folder")
    bb = sub.add_parser("bench", help="prefill latency, decode tokens/s, KV bytes and size of PyTorch eager, onnxruntime fp32, quantized and the bundle")
    bb.add_argument("config", type=Path, help="the model.yaml (its bench section sets repeats, tokens, threads)")
    bb.add_argument("--force", action="store_true", help="replace an existing <name>-bench folder")
    r = sub.add_parser("run", help="answer questions about images with a compiled bundle (onnxruntime)")
    r.add_argument("bundle", type=Path)
    r.add_argument("--image", action="append", required=True, type=Path, help="an image file; repeat for a batch")
    r.add_argument("--prompt", action="append", required=True, help="the question for the image at the same position")
    r.add_argument("--max-new-tokens", type=int, default=32)
    r.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default="auto",
        help="auto: onnxruntime's CUDA/TensorRT providers where installed (quota-compile[gpu]), else the CPU; cuda: refuse to run without them",
    )
    w = sub.add_parser("write-builtin", help="write a builtin model as a Hugging Face checkpoint folder")
    w.add_argument("name", help="builtin model name, e.g. tiny-llava")
    w.add_argument("folder", type=Path)
    w.add_argument("--seed", type=int, default=0)
    return p


def _compile(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from .bundle import human_size
    from .pipeline import compile_model

    console = Console(stderr=True)
    result = compile_model(args.config, force=args.force, console=console, recipe_path=args.recipe)
    table = Table(title=f"bundle {result.bundle}")
    for col in ("graph", "size", "nodes", "Q", "DQ", "INT4 weights"):
        table.add_column(col, justify="left" if col == "graph" else "right")
    for g, info in result.manifest["graphs"].items():
        table.add_row(g, human_size(info["bytes"]), str(info["nodes"]), str(info["quantize_linear"]), str(info["dequantize_linear"]), str(info["int4_initializers"]))
    console.print(table)
    v = result.verify
    console.print(
        f"verified: {v['samples']} samples x {v['new_tokens']} tokens, greedy agreement {v['greedy_agreement']:.0%}, "
        f"worst logits rel. error {v['max_logits_rel_error']:.2e} (limit {v['thresholds']['max_logits_rel_error']:g}); "
        f"total {result.seconds:.1f} s",
        highlight=False,
    )
    return 0


def _eval(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from .evaluate import retention_table, run_eval

    console = Console(stderr=True)
    folder, doc = run_eval(args.config, force=args.force, console=console)
    ds = doc["dataset"]
    table = Table(title=f"ShapesVQA {ds['split']} ({ds['questions']} questions): accuracy and retention vs FP32")
    for col in ("variant", "avg keep", "accuracy %", "retention %", "weakest family %"):
        table.add_column(col, justify="left" if col in ("variant", "weakest family %") else "right")
    for row in retention_table(doc):
        table.add_row(*row)
    Console().print(table)
    console.print(f"results: {folder / 'eval.json'}, {folder / 'eval.md'}, {folder / 'retention.png'} ({doc['seconds']:.0f} s)", highlight=False)
    return 0


def _bench(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from .bench import run_bench
    from .bundle import human_size

    console = Console(stderr=True)
    folder, doc = run_bench(args.config, force=args.force, console=console)
    p = doc["prompt"]
    rows = doc["variants"]
    table = Table(title=f"{doc['model']}: {p['prompt_tokens']}-token prompt ({p['visual_tokens']} visual), {p['new_tokens']} new tokens, "
                        f"{doc['threads']} threads, median of {doc['repeats']}")
    cols = ("variant", "prefill ms", "decode tok/s", "KV / seq", "on disk", "prefill vs torch", "prefill vs ort-fp32",
            "decode vs ort-fp32", "KV vs fp16", "decoder vs fp16")
    for col in cols:
        table.add_column(col, justify="left" if col == "variant" else "right")
    for r in rows:
        dec = r["decoder_graph_bytes"]
        table.add_row(
            r["name"], f"{1e3 * r['prefill_s']:.1f}", f"{r['decode_tokens_per_s']:.1f}", human_size(r["kv_bytes_per_sequence"]),
            human_size(r["disk_bytes"]), f"{r['ratios']['pytorch-fp32']['prefill_speedup']:.2f}x",
            f"{r['ratios']['ort-fp32']['prefill_speedup']:.2f}x", f"{r['ratios']['ort-fp32']['decode_speedup']:.2f}x",
            f"{r['kv_fp16_unpruned_bytes'] / r['kv_bytes_per_sequence']:.2f}x",
            f"{r['decoder_fp16_bytes'] / dec:.2f}x" if dec else "-",
        )
    out = Console()
    if not out.is_terminal:
        out = Console(width=160)
    out.print(table)
    console.print(f"results: {folder / 'bench.json'} ({doc['seconds']:.0f} s)", highlight=False)
    return 0


def _run(args) -> int:
    from .runtime import BundleRunner

    if len(args.image) != len(args.prompt):
        raise UserError(f"command line: {len(args.image)} --image but {len(args.prompt)} --prompt; give one prompt per image.")
    for img in args.image:
        if not img.is_file():
            raise UserError(f"{img}: no such image file (option --image).")
    if args.max_new_tokens < 1:
        raise UserError("command line: --max-new-tokens must be at least 1.")
    runner = BundleRunner(args.bundle, device=args.device, say=lambda line: print(line, file=sys.stderr))
    for answer in runner.answer(list(args.image), list(args.prompt), args.max_new_tokens):
        print(answer)
    return 0


def _write_builtin(args) -> int:
    from .models.builtin import write_builtin

    folder = write_builtin(args.name, args.folder, args.seed)
    print(folder)
    return 0


def _quiet_libraries() -> None:
    """Progress bars and advice from transformers would interleave with the stage lines."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        argv.insert(0, "compile")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _quiet_libraries()
    try:
        args = _parser().parse_args(argv)
        for note in check_versions():
            print(note, file=sys.stderr)
        handlers = {"compile": _compile, "eval": _eval, "bench": _bench, "run": _run, "write-builtin": _write_builtin}
        return handlers[args.command](args)
    except UserError as e:
        print(f"quota-compile: error: {e}", file=sys.stderr)
        return 2
    except VerificationFailed as e:
        print(f"quota-compile: verification failed, no bundle written: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("quota-compile: interrupted, no bundle written", file=sys.stderr)
        return 1
    except Exception:
        traceback.print_exc()
        print("quota-compile: internal error (a bug; please report it with the traceback above)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
