"""The decode step with and without GroupQueryAttention, on the same cache.

    python benchmarks/decode_attention.py benchmarks/bench-llava.yaml [--steps 64] [--runs 5]

Builds the bundle's graphs as ``quota-compile bench`` does (same config, same prompt; the
config's KV cache must be INT4 ``per_channel``), lowers the decode graph to the onnxruntime
flavour twice, with the graph's own attention arithmetic and with
``com.microsoft.GroupQueryAttention``, runs one prefill, then decodes ``--steps`` greedy tokens
from that cache with each decode graph. It prints the median time per decode step of
``--runs`` repetitions, run alternately, including the runtime's cache update (append for the
first, replace for the second), and how far the two graphs' results differ when both step
from the same cache (at ``accuracy_level: 0``, see the comment in the code).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", type=Path)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()

    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch

    from quota_compile.commands.bench import bench_variants, prepared
    from quota_compile.config import load_config
    from quota_compile.export.onnx import save_graphs
    from quota_compile.flavours.onnxruntime.lower import lower_flavour, lower_graph, uses_group_query_attention
    from quota_compile.runtime.ort import OrtBackend

    cfg = load_config(args.config)
    if not uses_group_query_attention(cfg):
        print(f"{args.config}: the KV cache must be {{bits: 4, granularity: per_channel}} for GroupQueryAttention", file=sys.stderr)
        return 2
    threads = cfg.bench.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    options = cfg.export.onnxruntime
    with contextlib.ExitStack() as stack:
        workbench, batch = prepared(cfg, args.config, stack)
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="quota-decode-")))
        bundle = bench_variants(cfg)[-1][0]
        built = workbench.build(bundle, keep_semantic=True)
        plain = lower_flavour(built.semantic, options)  # the graph's own attention
        fused = lower_graph(built.semantic["decode"], options.accuracy_level, "decode" in options.integer_graphs, group_query=True)
        # two copies of the flavour that differ only in the decode graph; the runtime's backend
        # appends or replaces the cache as each decode graph's metadata says
        backends = {}
        for name, decode in (("graph attention", plain["decode"]), ("GroupQueryAttention", fused)):
            folder = work / name.replace(" ", "_")
            folder.mkdir()
            save_graphs({**plain, "decode": decode}, folder)
            backends[name] = OrtBackend(folder, threads=threads)
        first = backends["graph attention"]
        logits0, cache0, _ = first.prefill(batch.input_ids, batch.attention_mask, first.vision(batch.pixel_values))
        length = int(batch.attention_mask.sum())

        def generate(backend):
            cache, mask, logits, tokens = list(cache0), batch.attention_mask, logits0, []
            t0 = time.perf_counter()
            for step in range(args.steps):
                nxt = logits.argmax(-1)[:, None].astype(np.int64)
                tokens.append(int(nxt[0, 0]))
                mask = np.concatenate([mask, np.ones((1, 1), np.int64)], axis=1)
                logits, cache = backend.decode(nxt, np.array([[length + step]], np.int64), mask, cache)
            return (time.perf_counter() - t0) / args.steps, tokens

        for backend in backends.values():  # warm-up
            generate(backend)
        times = {name: [] for name in backends}
        tokens = {}
        for _ in range(args.runs):
            for name, backend in backends.items():
                t, tokens[name] = generate(backend)
                times[name].append(t)
        # One step from the same cache, with each layer's attention output exposed, and the
        # decode graphs lowered at accuracy_level 0: MatMulNBits' level 4 requantizes its input
        # to int8 per block, which turns a float-rounding difference (summation order) in one
        # layer's attention into different codes in the next layers of a random-weight model.
        # Level 0 isolates what the attention rewrite itself changes.
        exact = lower_graph(built.semantic["decode"], 0, "decode" in options.integer_graphs)
        exact_fused = lower_graph(built.semantic["decode"], 0, "decode" in options.integer_graphs, group_query=True)
        # each layer's attention output [B, H, 1, D]: the semantic node's output, which both graphs keep by name
        attn = [n.output[0] for n in built.semantic["decode"].model.graph.node if n.domain == "quota" and n.op_type == "decode_attention"]

        def exposed(model):
            m = onnx.ModelProto()
            m.CopyFrom(model)
            m.graph.output.extend(onnx.helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None) for o in attn)
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            return ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])

        nxt = logits0.argmax(-1)[:, None].astype(np.int64)
        mask = np.concatenate([batch.attention_mask, np.ones((1, 1), np.int64)], axis=1)
        names = [i.name for i in first.sessions["decode"].get_inputs()]
        feed = dict(zip(names, [nxt, np.array([[length]], np.int64), mask, *cache0]))
        a, b = exposed(exact).run(None, feed), exposed(exact_fused).run(None, feed)
        n = len(a) - len(attn)
        attn_diff = [float(np.abs(x - y).max() / np.abs(x).max()) for x, y in zip(a[n:], b[n:])]
        code_diff = [int((a[1 + 2 * i] != b[1 + 2 * i][:, :, -1:]).sum() + (a[2 + 2 * i] != b[2 + 2 * i][:, :, -1:]).sum()) for i in range(len(attn))]
        print(f"{args.steps} decode steps after a {batch.input_ids.shape[1]}-token prompt, visual tokens per layer {built.keep}, {threads} threads")
        print(f"first step from the same cache (accuracy_level 0), logits relative difference {np.abs(a[0] - b[0]).max() / np.abs(a[0]).max():.1e}; per layer: attention output relative difference "
              + " ".join(f"{d:.1e}" for d in attn_diff) + "; new K/V code bytes differing " + " ".join(map(str, code_diff)))
        print(f"free runs of {args.steps} steps: same greedy tokens {tokens['graph attention'] == tokens['GroupQueryAttention']}")
        base = statistics.median(times["graph attention"])
        for name, ts in times.items():
            med = statistics.median(ts)
            print(f"  {name:<20} {1e3 * med:7.2f} ms/step  {1 / med:6.1f} tok/s  {base / med:5.2f}x")
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
