"""Cost of ActAdd injections and CAST conditions.

1. Decode: 128 greedy tokens after a 40-token prompt, with an ActAdd
   injection (rows on the prompt's first positions) vs unsteered. Only
   prompt positions carry rows, so decode should cost nothing (target
   ratio >= 0.98).
2. Prefill: the same prompt's logits (one prompt decode), injected vs not.
3. Construction: building an ActAdd is two prompt decodes; its time vs
   two plain decodes of the same prompts (``logits``).
4. CAST: a conditional Steer captures the prompt's hidden state during the
   prompt's own decode; logits with a condition (mean read) vs without.

Runs are interleaved, repeated, and each comparison is the median of the
paired speed ratios (reference time / variant time of the same repetition:
above 1, the variant is faster) with their min..max spread.

    python benchmarks/bench_actadd.py [--threads 2] [--reps 7] [--model smollm2-135m]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import llama_steer as ls
import numpy as np


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def decode_seconds(stream) -> float:  # type: ignore[no-untyped-def]
    """Seconds from the first yielded token to the last (decode only)."""
    start = None
    for _ in stream:
        if start is None:
            start = time.perf_counter()
    assert start is not None
    return time.perf_counter() - start


def paired(name: str, ref: Callable[[], float], var: Callable[[], float], reps: int, unit: str) -> float:
    """Interleave ``ref`` and ``var`` (each returns seconds), print medians
    and the median paired ratio ref/var (a speed ratio: >1 means var is
    faster) with its spread; return that median."""
    ref(), var()  # warm-up: graphs, reserves
    r_t, v_t, ratios = [], [], []
    for i in range(reps):
        if i % 2:  # alternate the order too
            b, a = var(), ref()
        else:
            a, b = ref(), var()
        r_t.append(a)
        v_t.append(b)
        ratios.append(a / b)
    med = statistics.median(ratios)
    print(
        f"  {name:44s} ref {statistics.median(r_t) * 1e3:8.2f} ms  variant {statistics.median(v_t) * 1e3:8.2f} ms"
        f"  speed ratio {med:.3f} (spread {min(ratios):.3f}..{max(ratios):.3f}) {unit}"
    )
    return med


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--model", default="smollm2-135m")
    args = ap.parse_args()
    path = ls.default_model_path(args.model)
    with ls.Model(path, n_ctx=2048, n_threads=args.threads) as model:
        pos, neg = "I talk about weddings constantly", "I do not talk about weddings constantly"
        layer = model.n_layer // 3
        t_build = []
        for _ in range(3):
            t_build.append(timed(lambda: ls.ActAdd(model, pos, neg, layer)))
        actadd = ls.ActAdd(model, pos, neg, layer)
        prompt = ("I went up to my friend and said that the weather was lovely and that we should go out " * 3)[:200]
        n_prompt = len(model.tokenize(prompt))
        steer = ls.Steer(actadd, 4.0)
        print(
            f"model {path.name}, {args.threads} threads, {args.reps} interleaved pairs; ActAdd {actadd.n_rows} rows "
            f"at layer {layer}, prompt {n_prompt} tokens"
        )

        print("1. decode, 128 greedy tokens (only prompt positions carry rows):")
        r1 = paired(
            "ActAdd vs unsteered",
            lambda: decode_seconds(model.generate(prompt, max_tokens=129, temperature=0)),
            lambda: decode_seconds(model.generate(prompt, max_tokens=129, temperature=0, steer=steer)),
            args.reps,
            "(target >= 0.98)",
        )

        print("2. prefill (logits after the prompt):")
        paired(
            "ActAdd vs unsteered",
            lambda: timed(lambda: model.logits(prompt)),
            lambda: timed(lambda: model.logits(prompt, steer=steer)),
            args.reps,
            "",
        )

        print("3. construction (two prompt decodes, captured at every position):")
        plain = statistics.median(
            [timed(lambda: (model.logits(pos), model.logits(neg))) for _ in range(5)]  # type: ignore[func-returns-value]
        )
        build = statistics.median(t_build)
        print(f"  ActAdd(...) {build * 1e3:.2f} ms; two plain prompt decodes {plain * 1e3:.2f} ms", end="")
        print(f"; ratio {build / plain:.2f}")

        print("4. CAST condition (mean read, captured during the prompt's decode):")
        rng = np.random.default_rng(0)
        cond = ls.Condition(rng.standard_normal(model.n_embd), model.n_layer // 2, -2.0, "above", "mean")
        v = ls.ControlVector({il: rng.standard_normal(model.n_embd).astype(np.float32) for il in range(5, 10)})
        chat = model.apply_chat_template([{"role": "user", "content": "How do I make a good tomato sauce for pasta?"}])
        paired(
            "conditional vs plain steer (prefill)",
            lambda: timed(lambda: model.logits(chat, steer=ls.Steer(v, 1.0, positions="generated"))),
            lambda: timed(lambda: model.logits(chat, steer=ls.Steer(v, 1.0, condition=cond))),
            args.reps,
            "",
        )
        t0 = time.perf_counter()
        match, other = ls.topic_prompts("cooking")
        search = ls.find_condition(model, match, other)
        print(
            f"  find_condition on the bundled cooking set ({len(match)} + {len(other)} prompts, all layers): "
            f"{time.perf_counter() - t0:.1f} s, layer {search.condition.layer}, held-out F1 {search.condition.f1:.3f}"
        )
        print(f"summary: ActAdd decode speed ratio {r1:.3f} (target >= 0.98)")


if __name__ == "__main__":
    main()
