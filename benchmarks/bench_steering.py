"""Cost of steering at decode time.

1. Greedy decode of 128 tokens, one sequence: a vector on every layer vs
   unsteered (target ratio >= 0.98), and a strength that changes every
   token (the steering buffer only re-uploads a small input). The computing
   nodes of a decode step's graph, unsteered and steered, are printed
   beside: on the CPU each costs a thread barrier.
2. 8 sequences decoded together, each with its own strength, vs the same 8
   unsteered (target >= 0.95); llama.cpp's llama-batched-bench built from the
   same source gives the upstream reference for the same shape
   (32-token prompts, 64 generated, 2 threads).

3. Decode steps through the binding, steered and unsteered in alternating
   bursts of 16 tokens: the tightest paired figure for the per-token cost.

Both bundled models; every comparison is interleaved over --reps rounds
and reported as the median of the paired per-round ratios with their range.

    python benchmarks/bench_steering.py [--threads 2] [--reps 9] [--models ...] [--no-upstream]
"""

from __future__ import annotations

import argparse
import math
import subprocess
import time

import llama_steer as ls
import numpy as np
from llama_steer.steer import apply_steering
from paired import rate_line, rounds


def random_vector(model: ls.Model, seed: int = 0, norm: float = 2.0) -> ls.ControlVector:
    rng = np.random.default_rng(seed)
    dirs = {}
    for k in range(1, model.n_layer):
        v = rng.standard_normal(model.n_embd).astype(np.float32)
        dirs[k] = v * np.float32(norm / np.linalg.norm(v))
    return ls.ControlVector(dirs)


def decode_rate(stream, n_seqs: int = 1) -> tuple[float, int]:  # type: ignore[no-untyped-def]
    """Tokens/s from the first yielded token to the last (decode only)."""
    start = None
    n = 0
    for _ in stream:
        if start is None:
            start = time.perf_counter()
            continue
        n += 1
    assert start is not None
    return n / (time.perf_counter() - start), n


def upstream_batched(model_path: str, threads: int) -> str:
    from upstream import build_tools

    exe = build_tools("llama-batched-bench") / "llama-batched-bench"
    out = subprocess.run(
        [
            str(exe),
            "-m",
            model_path,
            "-c",
            "2048",
            "-b",
            "512",
            "-ub",
            "512",
            "-npp",
            "32",
            "-ntg",
            "64",
            "-npl",
            "1,8",
            "-t",
            str(threads),
            "-tb",
            str(threads),
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return "\n".join(line for line in out.splitlines() if line.startswith("|"))


def burst_ratio(model: ls.Model, v: ls.ControlVector, bursts: int, length: int = 16) -> tuple[float, float, float]:
    """Steered vs unsteered decode steps through the binding, alternating
    bursts of ``length`` tokens (the order flipping each pair; the first step
    after a switch, which builds the graph, is not timed): drift between
    bursts a fraction of a second apart is small, so the paired ratios are
    much tighter than whole runs'. Returns the median speed ratio
    steered/unsteered and its interquartile range."""
    ctx = model._c
    with model.engine.lock:
        model.engine.end()
        ctx.clear()
        ids = model.tokenize("Once upon a time")
        n = len(ids)
        ctx.decode_step(ids, list(range(n)), [0] * n)
        pos, ratios = n, []
        for b in range(bursts):
            t: dict[bool, float] = {}
            for steered in (b % 2 == 0, b % 2 == 1):
                if pos + length + 1 > 512:  # keep the cache short, as in a chat turn
                    ctx.seq_rm(0, n, -1)
                    pos = n
                bound = {0: [ls.Steer(v)]} if steered else {}
                session = apply_steering(ctx, model.n_layer, model.n_embd, bound, {0: n})
                try:
                    ctx.decode_step([ids[-1]], [pos], [0])
                    start = time.perf_counter()
                    for i in range(length):
                        ctx.decode_step([ids[-1]], [pos + 1 + i], [0])
                    t[steered] = time.perf_counter() - start
                finally:
                    session.close()
                pos += length + 1
            ratios.append(t[False] / t[True])
        ctx.clear()
    q = np.quantile(ratios, [0.25, 0.5, 0.75])
    return float(q[1]), float(q[0]), float(q[2])


def decode_ops(model: ls.Model, steer: ls.Steer | None) -> int:
    """Computing nodes of the graph of one greedy decode step."""
    model.complete("Once upon a time", max_tokens=2, temperature=0, steer=steer)
    return int(model._c.steer_stats().n_graph_ops)


def bench_model(name: str, threads: int, reps: int, bursts: int) -> None:
    path = ls.default_model_path(name)
    with ls.Model(path, n_ctx=2048, n_threads=threads) as model:
        v = random_vector(model)
        n_steered = len(v)
        prompt = "Once upon a time"
        sched = [math.sin(i / 3.0) for i in range(200)]
        ops = {"unsteered": decode_ops(model, None), "steered": decode_ops(model, ls.Steer(v))}
        burst = burst_ratio(model, v, bursts)
        one = rounds(
            {
                "unsteered": lambda: decode_rate(model.generate(prompt, max_tokens=129, temperature=0))[0],
                "all layers": lambda: decode_rate(
                    model.generate(prompt, max_tokens=129, temperature=0, steer=ls.Steer(v))
                )[0],
                "schedule": lambda: decode_rate(
                    model.generate(prompt, max_tokens=129, temperature=0, steer=ls.Steer(v, strength=sched))
                )[0],
            },
            reps,
        )
        ids = model.tokenize("The history of the region is long and complicated, and " * 8, add_special=False)[:32]
        prompts = [ids] * 8
        strengths = [-4, -2, -1, 0.5, 1, 2, 3, 4]
        steers = [ls.Steer(v, s) for s in strengths]
        eight = rounds(
            {
                "unsteered": lambda: decode_rate(model.generate_batch(prompts, max_tokens=64, temperature=0))[0],
                "own strengths": lambda: decode_rate(
                    model.generate_batch(prompts, steers, max_tokens=64, temperature=0)
                )[0],
            },
            reps,
        )
    print(f"{path.name}: decode step graph {ops['unsteered']} computing nodes unsteered, {ops['steered']} steered")
    print("  1 sequence, 128 greedy tokens:")
    print(rate_line("    unsteered", one, "unsteered"))
    print(rate_line(f"    vector on all {n_steered:2d} layers", one, "all layers", "unsteered", 0.98))
    print(rate_line("    new strength every token", one, "schedule", "unsteered"))
    print(
        f"  decode steps, {bursts} alternating bursts of 16: steered/unsteered speed {burst[0]:.3f} "
        f"(interquartile {burst[1]:.3f}-{burst[2]:.3f})"
    )
    print("  8 sequences x 64 tokens (32-token prompts), aggregate decode:")
    print(rate_line("    unsteered", eight, "unsteered"))
    print(rate_line("    each its own strength", eight, "own strengths", "unsteered", 0.95))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--bursts", type=int, default=200)
    ap.add_argument("--no-upstream", action="store_true", help="skip llama-batched-bench")
    args = ap.parse_args()
    print(f"{args.threads} threads, {args.reps} interleaved rounds; ratios: median of the paired ratios (range)")
    for name in args.models.split(","):
        bench_model(name, args.threads, args.reps, args.bursts)
    if not args.no_upstream:
        print("upstream llama-batched-bench, default model, same source and threads (S_TG = generation tok/s):")
        print(upstream_batched(str(ls.default_model_path()), args.threads))


if __name__ == "__main__":
    main()
