"""find_steering against a brute-force generation sweep.

The plan (effect on held-out A/B replies, damage on a reference text) is
checked against what users see: greedy answers to neutral questions at every
cell of the same grid (layer bands x relative strengths, both signs), scored
by VADER (the vaderSentiment package, an independent lexicon classifier).
Prints the sweep's table (VADER separation = mean compound at +s minus at -s),
where the plan's cell ranks in it, and the time of the plan against the sweep.

    pip install vaderSentiment
    python benchmarks/find_steering.py [--model smollm2-135m] [--max-tokens 48]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def main() -> int:
    import llama_steer as ls
    from llama_steer.plan import NEUTRAL_QUESTIONS as QUESTIONS

    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        print("needs the vaderSentiment package: pip install vaderSentiment", file=sys.stderr)
        return 2

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    vader = SentimentIntensityAnalyzer()
    with ls.Model(ls.default_model_path(args.model), n_ctx=8192, n_threads=args.threads) as model:
        vec = ls.extract(model, ls.persona_pairs(model, "happy"), progress=False)
        model.residual_norms()  # measured once per model; not part of either timing

        t0 = time.perf_counter()
        plan = ls.find_steering(model, vec, "happy")
        t_plan = time.perf_counter() - t0

        prompts = [model.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]
        cells = sorted({(c.layers, c.relative_strength) for c in plan.table})
        runs = [(band, sign * s) for band, s in cells for sign in (1.0, -1.0)]
        t0 = time.perf_counter()
        texts: dict[tuple[tuple[int, int], float], list[str]] = {}
        seqs = [(run, q) for run in runs for q in range(len(prompts))]
        chunk = 60  # sequences per batch (n_seq_max 64)
        for k in range(0, len(seqs), chunk):
            part = seqs[k : k + chunk]
            steers = [ls.Steer(vec, s, layers=range(band[0], band[1] + 1), unit="relative") for (band, s), _ in part]
            outs = [""] * len(part)
            for i, tok in model.generate_batch(
                [prompts[q] for _, q in part], steers, max_tokens=args.max_tokens, temperature=0
            ):
                outs[i] += tok.text
            for (run, _), text in zip(part, outs):
                texts.setdefault(run, []).append(text)
        base = [model.complete(p, max_tokens=args.max_tokens, temperature=0) for p in prompts]
        t_sweep = time.perf_counter() - t0

    def score(ts: list[str]) -> float:
        return float(np.mean([vader.polarity_scores(t)["compound"] for t in ts]))

    unsteered = score(base)
    sep = {(band, s): score(texts[(band, s)]) - score(texts[(band, -s)]) for band, s in cells}
    damage = {(c.layers, c.relative_strength): c.damage for c in plan.table}
    strengths = sorted({s for _, s in cells})
    bands = sorted({b for b, _ in cells})
    print(f"model {args.model}; {len(QUESTIONS)} neutral questions, greedy, {args.max_tokens} tokens; VADER compound")
    print(f"unsteered mean compound {unsteered:+.2f}")
    print("VADER separation (+s minus -s), relative strengths; '!' = over the plan's damage bound, '*' = the plan")
    print("layers   " + "".join(f"{s:>10g}" for s in strengths))
    chosen = ((plan.layers[0], plan.layers[-1]), plan.relative_strength)
    for b in bands:
        row = f"{b[0]:>2}-{b[1]:<5}"
        for s in strengths:
            mark = "*" if (b, s) == chosen else ("!" if damage[(b, s)] > plan.max_damage else " ")
            row += f"{sep[(b, s)]:>9.2f}{mark}"
        print(row)
    ranked = sorted(sep, key=lambda c: -sep[c])
    within = [c for c in ranked if damage[c] <= plan.max_damage]
    print(
        f"plan: layers {chosen[0][0]}-{chosen[0][1]}, relative strength {chosen[1]:g}: VADER separation "
        f"{sep[chosen]:.2f}, rank {ranked.index(chosen) + 1} of {len(ranked)} "
        f"({within.index(chosen) + 1 if chosen in within else '-'} of {len(within)} within the damage bound)"
    )
    best, best_ok = ranked[0], within[0] if within else ranked[0]
    print(f"sweep's best cell {best}: {sep[best]:.2f}; best within the bound {best_ok}: {sep[best_ok]:.2f}")
    print(f"time: plan {t_plan:.1f} s, sweep {t_sweep:.1f} s, ratio {t_plan / t_sweep:.3f}")
    for s in (plan.relative_strength,):
        for sign in (1, -1):
            print(f"\n--- plan at {sign * s:+g}: {texts[(chosen[0], sign * s)][0][:160]!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
