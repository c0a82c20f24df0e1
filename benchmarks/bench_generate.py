"""Greedy decode speed of Model.generate against upstream llama-bench.

Prints tokens/s of 128 greedy tokens through the Python API (default model,
2 threads) next to llama-bench -n 128 built from the same pinned source with
the same threads, and their ratio (target >= 0.95).

    python benchmarks/bench_generate.py [--threads 2] [--tokens 128] [--reps 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import llama_steer as ls
from upstream import llama_bench_tg


def generate_tps(model: ls.Model, n_gen: int, reps: int, **kwargs: object) -> float:
    prompt = "Once upon a time"
    rates = []
    for _ in range(reps):
        n = 0
        start = None
        for _tok in model.generate(prompt, max_tokens=n_gen + 1, temperature=0, **kwargs):
            if start is None:  # the clock starts after the prompt: decode only, like tg
                start = time.perf_counter()
                continue
            n += 1
        assert start is not None
        rates.append(n / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    path = ls.default_model_path()
    ref = llama_bench_tg(path, args.tokens, args.threads, args.reps)
    with ls.Model(path, n_ctx=1024, n_threads=args.threads) as model:
        generate_tps(model, 16, 1)  # warm-up
        ours = generate_tps(model, args.tokens, args.reps)
    print(f"model: {path.name}, threads {args.threads}, {args.tokens} tokens, median of {args.reps}")
    print(f"llama-bench tg{args.tokens}:        {ref:8.1f} tok/s")
    print(f"llama_steer Model.generate:  {ours:8.1f} tok/s")
    print(f"ratio: {ours / ref:.3f}  (target >= 0.95)")


if __name__ == "__main__":
    main()
