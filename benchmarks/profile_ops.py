"""Where the time goes: onnxruntime's profiler on the graphs ``quota-compile bench`` times.

    python benchmarks/profile_ops.py benchmarks/bench-llava.yaml [--variants ort-fp32 quota] [--runs 3]

For each variant it builds the graphs exactly as ``quota-compile bench`` does (same config,
same prompt), runs ``--runs`` generations of ``bench.new_tokens`` tokens with profiling on,
and prints per graph (vision, prefill, decode) the kernel time per call by operator type, with
the number of nodes and the share of the graph's kernel time. Kernel time excludes the
framework's per-node overhead; the "wall" column is the measured time per call.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", type=Path)
    ap.add_argument("--variants", nargs="+", default=["ort-fp32", "quota"], choices=["ort-fp32", "ort-w4", "ort-quant", "quota"])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()

    import onnxruntime as ort
    import torch

    from quota_compile.bench import bench_prompt
    from quota_compile.calibrate import quantize_model
    from quota_compile.config import load_config
    from quota_compile.evaluate import Variant, build_variant, flavour_of
    from quota_compile.models import load_model
    from quota_compile.runtime import GRAPHS, greedy_generate

    cfg = load_config(args.config)
    threads = cfg.bench.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    flavour = flavour_of(cfg)
    method = cfg.pruning.method if cfg.pruning.method != "none" else "quota"
    kinds = {
        "ort-fp32": (Variant("fp", "none", None, False), "portable"),
        "ort-w4": (Variant("w4", "none", None, True, weight_only=True), "onnxruntime"),
        "ort-quant": (Variant("quant", "none", None, True), flavour),
        "quota": (Variant(f"{method}@{cfg.pruning.keep_ratio:g}", method, cfg.pruning.keep_ratio, True), flavour),
    }
    with contextlib.ExitStack() as stack:
        vlm = load_model(cfg, args.config, stack)
        span = vlm.visual_span()
        batch = bench_prompt(vlm, span, cfg.bench.prompt_tokens)
        qm = quantize_model(vlm, cfg, span)
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="quota-profile-")))
        for name in args.variants:
            variant, flav = kinds[name]
            built = build_variant(cfg, vlm, qm, span, variant, work, args.config, flavour=flav)
            opts = ort.SessionOptions()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
            opts.intra_op_num_threads = threads
            opts.enable_profiling = True
            opts.profile_file_prefix = str(work / f"profile-{name}")
            sessions = {g: ort.InferenceSession(str(built.folder / f"{g}.onnx"), opts, providers=["CPUExecutionProvider"]) for g in GRAPHS}
            wall = collections.defaultdict(float)
            calls = collections.Counter()

            class Timed:
                def _run(self, g, values):
                    names = [i.name for i in sessions[g].get_inputs()]
                    t0 = time.perf_counter()
                    out = sessions[g].run(None, dict(zip(names, values)))
                    wall[g] += time.perf_counter() - t0
                    calls[g] += 1
                    return out

                def vision(self, px):
                    return self._run("vision", [px])[0]

                def prefill(self, ids, mask, feats):
                    out = self._run("prefill", [ids, mask, feats])
                    n_kept = sum(1 for o in sessions["prefill"].get_outputs() if o.name.startswith("kept."))
                    return out[0], out[1 : len(out) - n_kept], out[len(out) - n_kept :]

                def decode(self, ids, pos, mask, past):
                    out = self._run("decode", [ids, pos, mask, *past])
                    return out[0], out[1:]

            for _ in range(args.runs + 1):  # the first run warms up; its time is profiled too
                greedy_generate(Timed(), batch, cfg.bench.new_tokens + 1, eos_token_id=None)
            print(f"\n== {name} ({flav} flavour, visual tokens per layer {built.keep})")
            for g, s in sessions.items():
                events = json.loads(Path(s.end_profiling()).read_text())
                per_op = collections.defaultdict(float)
                nodes = collections.defaultdict(set)
                for e in events:
                    if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                        op = e["args"]["op_name"]
                        per_op[op] += e["dur"] / 1e3
                        nodes[op].add(e["name"])
                total = sum(per_op.values())
                n = calls[g]
                print(f"  {g}: wall {1e3 * wall[g] / n:.2f} ms/call, kernels {total / n:.2f} ms/call, {n} calls")
                for op, ms in sorted(per_op.items(), key=lambda kv: -kv[1])[: args.top]:
                    print(f"    {op:<24} {ms / n:9.3f} ms  {len(nodes[op]):4d} nodes  {100 * ms / total:5.1f} %")
            for p in work.glob(f"profile-{name}*.json"):
                os.remove(p)
            del sessions
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
