"""Greedy decode speed of Model.generate against upstream llama-bench.

For each bundled model (2 threads): llama-bench tg (built from the same pin
with the same CPU flags, one run per round) and 128 greedy tokens through
Model.generate (sampling, text streaming, the Python loop) and through a
bare ``decode_step`` loop (the binding alone, no sampling), interleaved for
--reps rounds. Prints the median rates and the median of the paired
per-round ratios to llama-bench with their range (target: generate >= 0.97),
and the decode graph's size.

    python benchmarks/bench_generate.py [--threads 2] [--tokens 128] [--reps 9] [--models smollm2-135m,gemma3-270m]
"""

from __future__ import annotations

import argparse
import time

import llama_steer as ls
from paired import rate_line, rounds
from upstream import llama_bench_tg

PROMPT = "Once upon a time"


def generate_tps(model: ls.Model, n_gen: int) -> float:
    n = 0
    start = None
    for _tok in model.generate(PROMPT, max_tokens=n_gen + 1, temperature=0):
        if start is None:  # the clock starts after the prompt: decode only, like tg
            start = time.perf_counter()
            continue
        n += 1
    assert start is not None and n == n_gen, f"stopped after {n} tokens"
    return n / (time.perf_counter() - start)


def decode_loop_tps(model: ls.Model, n_gen: int) -> float:
    """Decode steps through the binding with a fixed token: no sampling."""
    ctx = model._c
    with model.engine.lock:
        model.engine.end()
        ctx.clear()
        ids = model.tokenize(PROMPT)
        ctx.decode_step(ids, list(range(len(ids))), [0] * len(ids))
        start = time.perf_counter()
        for i in range(n_gen):
            ctx.decode_step([ids[-1]], [len(ids) + i], [0])
        rate = n_gen / (time.perf_counter() - start)
        ctx.clear()
    return rate


def bench_model(name: str, threads: int, tokens: int, reps: int) -> None:
    path = ls.default_model_path(name)
    with ls.Model(path, n_ctx=1024, n_threads=threads) as model:
        generate_tps(model, 16)  # warm-up
        ops = model._c.steer_stats().n_graph_ops
        res = rounds(
            {
                "llama-bench": lambda: llama_bench_tg(path, tokens, threads, 1),
                "generate": lambda: generate_tps(model, tokens),
                "decode_step": lambda: decode_loop_tps(model, tokens),
            },
            reps,
        )
    print(f"{path.name} (decode graph: {ops} computing nodes)")
    print(rate_line(f"  llama-bench tg{tokens}", res, "llama-bench"))
    print(rate_line("  Model.generate (greedy)", res, "generate", "llama-bench", 0.97))
    print(rate_line("  decode_step loop", res, "decode_step", "llama-bench"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    args = ap.parse_args()
    print(f"{args.threads} threads, {args.tokens} tokens, {args.reps} interleaved rounds; ratios: median (range)")
    for name in args.models.split(","):
        bench_model(name, args.threads, args.tokens, args.reps)


if __name__ == "__main__":
    main()
