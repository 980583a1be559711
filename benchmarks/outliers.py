"""The synthetic outlier experiment (benchmarks/outlier_experiment.py): W4A4 with an
INT4 KV cache on builtin:tiny-llava with injected outlier channels, for RTN, the rotation
(offline only, and with its online part), GPTQ and GPTQ with the rotation.

    python benchmarks/outliers.py [--where norm mlp] [--prompts 16] [--steps 8]

Prints the mean KL divergence of the next-token distributions from full precision and the
greedy agreement, per variant, for the injection asked for and for none.
"""

from __future__ import annotations

import argparse
import time

from outlier_experiment import run_experiment  # benchmarks/ is on sys.path when run as a script


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--where", nargs="*", default=["norm", "mlp"], choices=["norm", "mlp"], help="where to inject outlier channels")
    ap.add_argument("--factor", type=float, default=50.0)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=16)
    args = ap.parse_args()
    for where in (tuple(args.where), ()):
        t = time.perf_counter()
        res = run_experiment(where=where, factor=args.factor, prompts=args.prompts, steps=args.steps, group_size=args.group_size)
        label = " + ".join(where) if where else "none"
        print(f"\ninjected outliers: {label} (x{args.factor:g}); {args.prompts} prompts x {args.steps} tokens; {time.perf_counter() - t:.0f} s")
        print(f"| variant | KL (nats) | greedy agreement |\n|---|---|---|")
        for name, r in res.items():
            print(f"| {name} | {r.kl:.4f} | {100 * r.agreement:.1f} % |")


if __name__ == "__main__":
    main()
