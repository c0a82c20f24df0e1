"""Cost of steering at decode time.

1. Greedy decode of 128 tokens, one sequence: a vector on every layer vs
   unsteered (target ratio >= 0.97), and a strength that changes every
   token vs a constant one (the steering buffer only re-uploads a small
   input).
2. 8 sequences decoded together, each with its own strength, vs the same 8
   unsteered (target >= 0.95); llama.cpp's llama-batched-bench built from the
   same source gives the upstream reference for the same shape
   (32-token prompts, 64 generated, 2 threads).

    python benchmarks/bench_steering.py [--threads 2] [--reps 5] [--no-upstream]
"""

from __future__ import annotations

import argparse
import math
import statistics
import subprocess
import time

import llama_steer as ls
import numpy as np


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


def interleaved(fns: dict[str, object], reps: int) -> dict[str, float]:
    """Median rate of each function, runs interleaved so drift hits all alike."""
    rates: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            rates[k].append(fn()[0])  # type: ignore[operator]
    return {k: statistics.median(v) for k, v in rates.items()}


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-upstream", action="store_true", help="skip llama-batched-bench")
    args = ap.parse_args()
    path = ls.default_model_path()
    with ls.Model(path, n_ctx=2048, n_threads=args.threads) as model:
        v = random_vector(model)
        n_steered = len(v)
        prompt = "Once upon a time"
        sched = [math.sin(i / 3.0) for i in range(200)]
        one = {
            "unsteered": lambda: decode_rate(model.generate(prompt, max_tokens=129, temperature=0)),
            "all layers": lambda: decode_rate(model.generate(prompt, max_tokens=129, temperature=0, steer=ls.Steer(v))),
            "schedule": lambda: decode_rate(
                model.generate(prompt, max_tokens=129, temperature=0, steer=ls.Steer(v, strength=sched))
            ),
        }
        one["unsteered"]()  # warm-up
        r1 = interleaved(one, args.reps)

        ids = model.tokenize("The history of the region is long and complicated, and " * 8, add_special=False)[:32]
        prompts = [ids] * 8
        strengths = [-4, -2, -1, 0.5, 1, 2, 3, 4]
        steers = [ls.Steer(v, s) for s in strengths]
        batch = {
            "8 seqs unsteered": lambda: decode_rate(model.generate_batch(prompts, max_tokens=64, temperature=0)),
            "8 seqs, own strengths": lambda: decode_rate(
                model.generate_batch(prompts, steers, max_tokens=64, temperature=0)
            ),
        }
        r8 = interleaved(batch, args.reps)

    print(f"model {path.name}, {args.threads} threads, median of {args.reps} interleaved runs")
    print("1 sequence, 128 greedy tokens:")
    print(f"  unsteered                  {r1['unsteered']:7.1f} tok/s")
    ratio = r1["all layers"] / r1["unsteered"]
    print(f"  vector on all {n_steered} layers   {r1['all layers']:7.1f} tok/s   ratio {ratio:.3f} (target >= 0.97)")
    print(f"  new strength every token   {r1['schedule']:7.1f} tok/s   ratio {r1['schedule'] / r1['unsteered']:.3f}")
    print("8 sequences x 64 tokens (32-token prompts), aggregate decode:")
    print(f"  unsteered                  {r8['8 seqs unsteered']:7.1f} tok/s")
    print(
        f"  each its own strength      {r8['8 seqs, own strengths']:7.1f} tok/s   ratio "
        f"{r8['8 seqs, own strengths'] / r8['8 seqs unsteered']:.3f} (target >= 0.95)"
    )
    if not args.no_upstream:
        print("upstream llama-batched-bench, same source and threads (S_TG = generation tok/s):")
        print(upstream_batched(str(path), args.threads))


if __name__ == "__main__":
    main()
