"""Decode over ggml RPC: the bundled model local vs split across two loopback workers.

Greedy decode of 128 tokens, one sequence, unsteered and with a vector on
every layer, for: the model on this machine (--threads), and the same model
with --remote of its layers on two `llama-steer rpc-worker` processes on
127.0.0.1 (1 thread each; the local part keeps --threads). Runs interleave;
each figure is the median over --reps, ratios are medians of the paired
per-rep ratios with their range. On loopback the split pays the RPC round
trips (one graph per device per token) without gaining compute: it measures
the protocol's overhead, the floor of what a real network adds.

    python benchmarks/bench_rpc.py [--threads 2] [--reps 5] [--remote 20]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import llama_steer as ls
from bench_steering import random_vector  # this directory is on sys.path when run as a script
from llama_steer import rpc


def decode_rate(model: ls.Model, steer: ls.Steer | None, n: int) -> float:
    """Tokens/s from the first generated token to the last (decode only)."""
    start, count = None, 0
    for _ in model.generate("Once upon a time", max_tokens=n, temperature=0, steer=steer, stop=[]):
        if start is None:
            start = time.perf_counter()
            continue
        count += 1
    assert start is not None
    return count / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--remote", type=int, default=20, help="n_gpu_layers: layers on the workers (output included)")
    ap.add_argument("--tokens", type=int, default=128)
    args = ap.parse_args()

    path = ls.default_model_path()
    with rpc.local_workers(2, threads=1) as procs:
        eps = [p.endpoint for p in procs]  # type: ignore[attr-defined]
        with (
            ls.Model(path, n_threads=args.threads) as local,
            ls.Model(path, n_threads=args.threads, rpc=eps, n_gpu_layers=args.remote) as split,
        ):
            vec = random_vector(local)
            steer = ls.Steer(vec, 1.0)
            runs: dict[str, Callable[[], float]] = {
                "local": lambda: decode_rate(local, None, args.tokens),
                "local steered": lambda: decode_rate(local, steer, args.tokens),
                "split": lambda: decode_rate(split, None, args.tokens),
                "split steered": lambda: decode_rate(split, steer, args.tokens),
            }
            for fn in runs.values():
                fn()  # warm-up
            rates: dict[str, list[float]] = {k: [] for k in runs}
            for _ in range(args.reps):
                for k, fn in runs.items():
                    rates[k].append(fn())
    print(
        f"SmolLM2-135M Q4_1, greedy {args.tokens} tokens, local {args.threads} threads; split: "
        f"{args.remote} layers (output included) on 2 loopback workers x 1 thread; median of {args.reps}"
    )
    for k, v in rates.items():
        print(f"  {k:<14} {statistics.median(v):7.1f} tok/s")

    def ratio(a: str, b: str) -> str:
        r = [x / y for x, y in zip(rates[a], rates[b])]
        return f"{statistics.median(r):.3f} ({min(r):.3f}-{max(r):.3f})"

    print(f"  split / local            {ratio('split', 'local')}")
    print(f"  split steered / split    {ratio('split steered', 'split')}")
    print(f"  local steered / local    {ratio('local steered', 'local')}")


if __name__ == "__main__":
    main()
