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

    import torch

    from quota_compile.commands.bench import bench_variants, prepared
    from quota_compile.config import load_config
    from quota_compile.runtime.ort import OrtBackend, greedy_generate

    cfg = load_config(args.config)
    threads = cfg.bench.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    # bench's onnxruntime variants, in its order: fp32, INT4 weight-only, quantized, the bundle
    kinds = dict(zip(("ort-fp32", "ort-w4", "ort-quant", "quota"), bench_variants(cfg)))
    with contextlib.ExitStack() as stack:
        workbench, batch = prepared(cfg, args.config, stack)
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="quota-profile-")))
        for name in args.variants:
            variant, _, _, flav = kinds[name]
            built = workbench.build_into(variant, work, flavour=flav)
            wall = collections.defaultdict(float)
            calls = collections.Counter()

            class Timed(OrtBackend):
                """The runtime's backend, profiled, with each graph's wall time per call."""

                def _run(self, graph, values):
                    t0 = time.perf_counter()
                    out = super()._run(graph, values)
                    wall[graph] += time.perf_counter() - t0
                    calls[graph] += 1
                    return out

            backend = Timed(built.folder, threads=threads, profile_prefix=str(work / f"profile-{name}"))
            for _ in range(args.runs + 1):  # the first run warms up; its time is profiled too
                greedy_generate(backend, batch, cfg.bench.new_tokens + 1, eos_token_id=None)
            print(f"\n== {name} ({flav} flavour, visual tokens per layer {built.keep})")
            for g, s in backend.sessions.items():
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
            del backend
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
