"""The ``quota-compile`` command.

    quota-compile CONFIG.yaml [--force]          compile (same as ``compile CONFIG.yaml``)
    quota-compile eval CONFIG.yaml [--force]     accuracy retention of every variant (ShapesVQA)
    quota-compile bench CONFIG.yaml [--force]    speed of PyTorch eager, onnxruntime fp32 / quantized / bundle
    quota-compile run BUNDLE --image I --prompt P [--image I --prompt P ...]
    quota-compile write-builtin NAME DIR [--seed N]
    quota-compile --version

Results go to stdout; progress lines, warnings and errors to stderr.

Exit codes: 0 success; 1 verification failure or internal error (no bundle is written);
2 bad input (one sentence naming the file and the key).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from quota_compile.environment import check_versions
from quota_compile.errors import UserError, VerificationFailed

COMMANDS = ("compile", "eval", "bench", "run", "write-builtin")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own usage errors are bad input too: exit 2
        self.print_usage(sys.stderr)
        raise UserError(f"command line: {message}.")


class _Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the help of every option that has one (not of flags and repeatable
    options, whose default says nothing); the description and epilog as written."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


class _Version(argparse.Action):
    """``--version``: quota-compile's version and those of the libraries a bundle depends on."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from quota_compile.bundle.format import versions

        v = versions()
        tool = v.pop("quota-compile")
        print(f"quota-compile {tool} ({', '.join(f'{k} {x}' for k, x in v.items())})")
        parser.exit()


USAGE = """\
%(prog)s CONFIG.yaml [--force] [--recipe RECIPE.yaml]   (same as: compile CONFIG.yaml ...)
       %(prog)s {compile,eval,bench,run,write-builtin} ...
       %(prog)s --version"""

EPILOG = """\
quota-compile CONFIG.yaml is short for quota-compile compile CONFIG.yaml.
'%(prog)s COMMAND --help' describes each command's arguments.

Results go to stdout, progress lines and errors to stderr. Exit codes: 0 success;
1 verification failure or internal error (no bundle is written); 2 bad input (one sentence
naming the file and the key, nothing written)."""


def build_parser() -> argparse.ArgumentParser:
    """The command line parser (every command and argument, with help texts)."""
    p = _Parser(
        prog="quota-compile", usage=USAGE, epilog=EPILOG, formatter_class=_Help,
        description="Compile a LLaVA-family VLM into a verified W4A4 + quantized-KV ONNX bundle, run it, evaluate and time it.",
    )
    p.add_argument("--version", action=_Version, help="print the versions of quota-compile, python, torch, onnx, onnxruntime and transformers, and exit")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser, title="commands")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, prog=f"quota-compile {name}", help=help, description=help[0].upper() + help[1:] + ".", formatter_class=_Help)

    c = command("compile", "compile a model.yaml into <output.dir>/<name>/ (the default command)")
    c.add_argument("config", type=Path, help="the model.yaml to compile")
    c.add_argument("--force", action="store_true", help="replace an existing bundle of the same name (after the new one is verified)")
    c.add_argument("--recipe", type=Path, help="export from this recipe.yaml (e.g. another bundle's) instead of calibrating")
    e = command("eval", "accuracy and retention of FP, quantized and pruned variants through their ONNX graphs")
    e.add_argument("config", type=Path, help="the model.yaml (its eval section sets questions, keep ratios, methods)")
    e.add_argument("--force", action="store_true", help="replace an existing <name>-eval folder")
    bb = command("bench", "prefill latency, decode tokens/s, KV bytes and size of PyTorch eager, onnxruntime fp32, quantized and the bundle")
    bb.add_argument("config", type=Path, help="the model.yaml (its bench section sets repeats, tokens, threads)")
    bb.add_argument("--force", action="store_true", help="replace an existing <name>-bench folder")
    r = command("run", "answer questions about images with a compiled bundle (onnxruntime, or PyTorch with --backend torch)")
    r.add_argument("bundle", type=Path, help="the bundle folder (<output.dir>/<name>/); it is checked against its manifest.json first")
    r.add_argument("--image", action="append", required=True, type=Path, help="an image file; repeat for a batch")
    r.add_argument("--prompt", action="append", required=True, help="the question for the image at the same position (fills {question} in the bundle's prompt template)")
    r.add_argument("--max-new-tokens", type=int, default=32, help="generate at most this many tokens per answer (greedy; fewer at EOS)")
    r.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default="auto",
        help="auto: onnxruntime's CUDA/TensorRT providers where installed (quota-compile[gpu]), else the CPU (with --backend torch: CUDA where PyTorch sees a GPU); cuda: refuse to run without them",
    )
    r.add_argument(
        "--backend", choices=["onnxruntime", "torch"], default="onnxruntime",
        help="onnxruntime: the ONNX flavour the manifest marks for the runtime; torch: the bundle's torch flavour (export.targets: [..., torch]), its W4A4 Linears and decode attention as Triton kernels on CUDA",
    )
    w = command("write-builtin", "write a builtin model as a Hugging Face checkpoint folder")
    w.add_argument("name", help="builtin model name, e.g. tiny-llava (an unknown name gets the list)")
    w.add_argument("folder", type=Path, help="the folder to write (created if missing)")
    w.add_argument("--seed", type=int, default=0, help="seed of the random initialisation (random-weight builtins only)")
    return p


def _compile(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from quota_compile.bundle.format import human_size
    from quota_compile.commands.compile import compile_model
    from quota_compile.verify.gate import KINDS

    result = compile_model(args.config, force=args.force, console=Console(stderr=True), recipe_path=args.recipe)
    # the result (stdout): the graphs and the verification; the stage lines went to stderr
    table = Table(title=f"bundle {result.bundle}")
    for col in ("graph", "size", "nodes", "Q", "DQ", "INT4 weights"):
        table.add_column(col, justify="left" if col == "graph" else "right")
    for g, info in result.manifest["graphs"].items():
        table.add_row(g, human_size(info["bytes"]), str(info["nodes"]), str(info["quantize_linear"]), str(info["dequantize_linear"]), str(info["int4_initializers"]))
    Console().print(table)
    v = result.verify
    print(
        f"verified: {v['samples']} samples x {v['new_tokens']} tokens; codes that differ: "
        + ", ".join(f"{kind.replace('_', ' ')} {c['flips']:,} of {c['compared']:,}" for kind, c in ((k, v["codes"][k]) for k in KINDS) if c["compared"])
        + f" (limit {v['thresholds']['max_code_flip_rate']:g}); kept-set differences: {v['kept']['compared'] - v['kept']['identical']}"
        f" of {v['kept']['compared']} (near-ties only allowed"
        + (f"; {v['kept']['after_rounding_tie']} free running after a rounding tie" if v["kept"].get("after_rounding_tie") else "")
        + f"); greedy agreement {v['greedy_agreement']:.0%}"
        + (f" (+{v['greedy_divergences_at_rounding_ties']} diverging after a rounding tie)" if v.get("greedy_divergences_at_rounding_ties") else "")
        + "; "
        f"worst logits rel. error {v['max_logits_rel_error']:.2e} (reported); total {result.seconds:.1f} s"
    )
    return 0


def _eval(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from quota_compile.commands.evaluate import retention_table, run_eval

    console = Console(stderr=True)
    folder, doc = run_eval(args.config, force=args.force, console=console)
    ds = doc["dataset"]
    table = Table(title=f"ShapesVQA {ds['split']} ({ds['questions']} questions): accuracy and retention vs FP32")
    for col in ("variant", "avg keep", "accuracy % [95% CI]", "retention %", "vs quota (McNemar)", "weakest family %"):
        table.add_column(col, justify="left" if col in ("variant", "vs quota (McNemar)", "weakest family %") else "right")
    for row in retention_table(doc):
        table.add_row(*row)
    Console().print(table)
    print(f"results: {folder / 'eval.json'}, {folder / 'eval.md'}, {folder / 'retention.png'} ({doc['seconds']:.0f} s)")
    return 0


def _bench(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from quota_compile.commands.bench import run_bench
    from quota_compile.bundle.format import human_size

    console = Console(stderr=True)
    folder, doc = run_bench(args.config, force=args.force, console=console)
    p = doc["prompt"]
    rows = doc["variants"]
    table = Table(title=f"{doc['model']}: {p['prompt_tokens']}-token prompt ({p['visual_tokens']} visual), {p['new_tokens']} new tokens, "
                        f"{doc['threads']} threads, PyTorch on {doc.get('device', 'cpu')}, median of {doc['repeats']}")
    cols = ("variant", "prefill ms", "decode tok/s", "KV / seq", "on disk", "prefill vs HF", "prefill vs ort-fp32",
            "decode vs HF", "decode vs ort-fp32", "KV vs fp16", "decoder vs fp16")
    for col in cols:
        table.add_column(col, justify="left" if col == "variant" else "right")
    first = {}  # batch size -> the Hugging Face row of that batch size (timed first)
    for r in rows:
        first.setdefault(r.get("batch_size", 1), r["name"])
    for r in rows:
        bs = r.get("batch_size", 1)
        hf, ort = r["ratios"][first[bs]], r["ratios"].get("ort-fp32" if bs == 1 else f"ort-fp32 x{bs}")
        dec = r["decoder_graph_bytes"]
        table.add_row(
            r["name"], f"{1e3 * r['prefill_s']:.1f}", f"{r['decode_tokens_per_s']:.1f}", human_size(r["kv_bytes_per_sequence"]),
            human_size(r["disk_bytes"]) if r["disk_bytes"] is not None else "-", f"{hf['prefill_speedup']:.2f}x",
            f"{ort['prefill_speedup']:.2f}x" if ort else "-", f"{hf['decode_speedup']:.2f}x",
            f"{ort['decode_speedup']:.2f}x" if ort else "-",
            f"{r['kv_fp16_unpruned_bytes'] / r['kv_bytes_per_sequence']:.2f}x",
            f"{r['decoder_fp16_bytes'] / dec:.2f}x" if dec else "-",
        )
    out = Console()
    if not out.is_terminal:
        out = Console(width=160)
    out.print(table)
    print(f"results: {folder / 'bench.json'} ({doc['seconds']:.0f} s)")
    return 0


def _run(args) -> int:
    from quota_compile.runtime.ort import BundleRunner, load_image

    if len(args.image) != len(args.prompt):
        raise UserError(f"command line: {len(args.image)} --image but {len(args.prompt)} --prompt; give one prompt per image.")
    if args.max_new_tokens < 1:
        raise UserError("command line: --max-new-tokens must be at least 1.")
    images = [load_image(img) for img in args.image]  # every image decodes, before the bundle is loaded
    runner = BundleRunner(args.bundle, device=args.device, say=lambda line: print(line, file=sys.stderr), backend=args.backend)
    for warning in runner.prompt_warnings(list(args.prompt)):
        print(f"quota-compile: warning: {warning}", file=sys.stderr)
    for answer in runner.answer(images, list(args.prompt), args.max_new_tokens):
        print(answer)
    return 0


def _write_builtin(args) -> int:
    from quota_compile.models.builtin import write_builtin

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
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as e:  # --help, --version (argparse's errors are UserErrors: see _Parser)
            return e.code if isinstance(e.code, int) else 0
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
