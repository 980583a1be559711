"""What onnxruntime sessions of a bundle's graphs hold in memory, with and without the CPU arena.

    python benchmarks/session_memory.py BUNDLE_FOLDER [--new-tokens 8] [--threads N]

``BUNDLE_FOLDER`` holds ``vision.onnx``, ``prefill.onnx`` and ``decode.onnx`` (a bundle, or a
flavour's folder inside one). For each setting of ``enable_cpu_mem_arena`` (on: how
``quota-compile run`` opens a bundle; off: how verification does), a fresh Python process opens
the three graphs with the bundle's session options, runs the vision graph, the prefill and
``--new-tokens`` greedy decode steps on one random image and prompt, and prints its resident
memory (RSS) after each call and how long each call took. Both processes must compute the same
logits bit for bit; the script says whether they did. Random inputs: only memory and time mean
anything here.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def rss_gib() -> float:
    """This process's resident memory, as the compile's progress lines measure it (psutil)."""
    import psutil

    return psutil.Process().memory_info().rss / 2**30


class _Recorder:
    """An OrtBackend whose calls note the process's RSS and their own time."""

    def __init__(self, backend):
        self.backend, self.rows, self.digest = backend, [], hashlib.sha256()

    def _note(self, what: str, t0: float, logits=None) -> None:
        self.rows.append({"call": what, "seconds": round(time.perf_counter() - t0, 3), "rss_gib": round(rss_gib(), 3)})
        if logits is not None:
            self.digest.update(np.ascontiguousarray(logits).tobytes())

    def vision(self, pixel_values):
        t0 = time.perf_counter()
        out = self.backend.vision(pixel_values)
        self._note("vision", t0)
        return out

    def prefill(self, input_ids, attention_mask, image_features):
        t0 = time.perf_counter()
        out = self.backend.prefill(input_ids, attention_mask, image_features)
        self._note("prefill", t0, out[0])
        return out

    def decode(self, input_ids, position_ids, attention_mask, past):
        t0 = time.perf_counter()
        out = self.backend.decode(input_ids, position_ids, attention_mask, past)
        self._note(f"decode {sum(r['call'].startswith('decode') for r in self.rows) + 1}", t0, out[0])
        return out


def measure(folder: Path, arena: bool, new_tokens: int, threads: int | None) -> dict:
    """One setting, in this process (run by :func:`main` in a fresh one per setting)."""
    from quota_compile.runtime.ort import Batch, OrtBackend, greedy_generate

    rng = np.random.default_rng(0)
    start = rss_gib()
    t0 = time.perf_counter()
    backend = _Recorder(OrtBackend(folder, threads=threads, arena=arena))
    backend._note("open", t0)
    vision = backend.backend.sessions["vision"].get_inputs()[0]
    features = backend.backend.sessions["prefill"].get_inputs()[2]
    if not all(isinstance(d, int) for d in vision.shape[1:]) or not isinstance(features.shape[1], int):
        raise SystemExit(f"{folder}: the vision graph's input or the prefill's image features have no static size")
    pixel_values = rng.standard_normal([1, *vision.shape[1:]], dtype=np.float32)
    length = features.shape[1] + 24
    vocab = backend.backend.sessions["prefill"].get_outputs()[0].shape[-1]
    ids = rng.integers(3, vocab if isinstance(vocab, int) else 1000, (1, length)).astype(np.int64)
    batch = Batch(ids, np.ones((1, length), dtype=np.int64), pixel_values)
    greedy_generate(backend, batch, new_tokens + 1, eos_token_id=None)
    return {"arena": arena, "rss_before_gib": round(start, 3), "calls": backend.rows, "logits_sha256": backend.digest.hexdigest()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--new-tokens", type=int, default=8, help="greedy decode steps after the prefill (default 8)")
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: onnxruntime's)")
    ap.add_argument("--one", choices=("on", "off"), help=argparse.SUPPRESS)  # internal: measure one setting, print JSON
    args = ap.parse_args()
    folder = args.folder.resolve()
    missing = [g for g in ("vision", "prefill", "decode") if not (folder / f"{g}.onnx").is_file()]
    if missing:
        print(f"{folder}: no {', '.join(g + '.onnx' for g in missing)}; give a bundle folder (or a flavour's folder in one).", file=sys.stderr)
        return 2
    if args.one:
        print(json.dumps(measure(folder, args.one == "on", args.new_tokens, args.threads)))
        return 0
    results = []
    for setting in ("on", "off"):
        cmd = [sys.executable, __file__, str(folder), "--new-tokens", str(args.new_tokens), "--one", setting]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        print(f"arena {setting}: measuring in a fresh process ...", file=sys.stderr)
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            sys.stderr.write(done.stderr)
            return done.returncode
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    on, off = results
    print(f"{folder}: resident memory (GiB) after each call, and its seconds; arena on = how `quota-compile run` opens the graphs, off = how verification does")
    print(f"{'call':<10} {'arena on':>16} {'arena off':>16}")
    print(f"{'(start)':<10} {on['rss_before_gib']:>16.2f} {off['rss_before_gib']:>16.2f}")
    for a, b in zip(on["calls"], off["calls"]):
        print(f"{a['call']:<10} {a['rss_gib']:>8.2f} {a['seconds']:>6.2f} s {b['rss_gib']:>8.2f} {b['seconds']:>6.2f} s")
    same = on["logits_sha256"] == off["logits_sha256"]
    print(f"logits of every call bit-identical: {'yes' if same else 'NO'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
