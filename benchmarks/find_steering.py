"""find_steering against a brute-force generation sweep.

The plan (effect on held-out A/B replies, damage on a reference text, each
band's strength searched) is checked against what users see: greedy answers
to neutral questions at every cell of a grid (the plan's layer bands x
relative strengths 0.02..0.16, both signs), scored by VADER (the
vaderSentiment package, an independent lexicon classifier). Prints the
sweep's table (VADER separation = mean compound at +s minus at -s), the
plan's cell scored the same way, and the time of the plan against the
sweep. The best of 28 noisy cells is biased upward (it won on those six
questions), so the plan's cell and the sweep's best within the damage bound
are then scored again on 24 other neutral questions, paired.

    pip install vaderSentiment
    python benchmarks/find_steering.py [--model smollm2-135m] [--max-tokens 48]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

Run = tuple[tuple[int, int], float]  # (band, signed relative strength)
# Neutral questions none of the package's code uses: the second, independent sample.
CONFIRM_QUESTIONS = (
    "What did you have for breakfast?",
    "Tell me about your commute.",
    "What are you reading these days?",
    "How do you spend a quiet evening?",
    "What is the weather like where you are?",
    "Describe the room you are in.",
    "What did you do last Sunday?",
    "How was your day?",
    "What are your plans for tomorrow?",
    "Tell me about your neighbourhood.",
    "What kind of music do you listen to?",
    "How do you usually start your week?",
    "What do you think of Mondays?",
    "Describe a typical lunch break.",
    "What is on your mind right now?",
    "Tell me about the last trip you took.",
    "How do you feel about cooking?",
    "What did you learn this week?",
    "Describe your favourite chair.",
    "How was your last appointment?",
    "What do you do when it snows?",
    "Tell me about your morning routine.",
    "What do you think about public transport?",
    "How are things at home?",
)


def main() -> int:
    import llama_steer as ls
    from llama_steer.plan import GRID_STRENGTHS, REFERENCE_TOKENS, probe_damage
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

    def compound(text: str) -> float:
        return float(vader.polarity_scores(text)["compound"])

    with ls.Model(ls.default_model_path(args.model), n_ctx=8192, n_threads=args.threads) as model:
        vec = ls.extract(model, ls.persona_pairs(model, "happy"), progress=False)
        model.residual_norms()  # measured once per model; not part of either timing

        def chat(q: str) -> str:
            return model.apply_chat_template([{"role": "user", "content": q}])

        def generate(runs: list[Run], questions: tuple[str, ...]) -> dict[Run, list[str]]:
            """Greedy answers to ``questions`` at each (band, signed strength)."""
            prompts = [chat(q) for q in questions]
            texts: dict[Run, list[str]] = {}
            seqs = [(run, q) for run in runs for q in range(len(prompts))]
            chunk = 60  # sequences per batch (n_seq_max 64)
            for k in range(0, len(seqs), chunk):
                part = seqs[k : k + chunk]
                steers = [ls.Steer(vec, s, layers=range(b[0], b[1] + 1), unit="relative") for (b, s), _ in part]
                outs = [""] * len(part)
                for i, tok in model.generate_batch(
                    [prompts[q] for _, q in part], steers, max_tokens=args.max_tokens, temperature=0
                ):
                    outs[i] += tok.text
                for (run, _), text in zip(part, outs):
                    texts.setdefault(run, []).append(text)
            return texts

        def signed(cells: list[Run]) -> list[Run]:
            return [(band, sign * s) for band, s in cells for sign in (1.0, -1.0)]

        t0 = time.perf_counter()
        plan = ls.find_steering(model, vec, "happy")
        t_plan = time.perf_counter() - t0
        chosen = ((plan.layers[0], plan.layers[-1]), plan.relative_strength)

        bands = sorted({c.layers for c in plan.table})
        cells = [(b, s) for b in bands for s in GRID_STRENGTHS]
        t0 = time.perf_counter()
        texts = generate(signed(cells), QUESTIONS)
        base = [model.complete(chat(q), max_tokens=args.max_tokens, temperature=0) for q in QUESTIONS]
        t_sweep = time.perf_counter() - t0
        texts.update(generate(signed([chosen]), QUESTIONS))
        # the grid's damage as the plan measures it (untimed)
        probes = probe_damage(model, vec, signed(cells), n_tokens=REFERENCE_TOKENS)
        damage = {c: max(probes[2 * k], probes[2 * k + 1]) for k, c in enumerate(cells)}

        def score(ts: list[str]) -> float:
            return float(np.mean([compound(t) for t in ts]))

        sep = {(band, s): score(texts[(band, s)]) - score(texts[(band, -s)]) for band, s in [*cells, chosen]}
        print(f"model {args.model}; {len(QUESTIONS)} neutral questions, greedy, {args.max_tokens} tokens; VADER")
        print(f"unsteered mean compound {score(base):+.2f}")
        print(plan.as_table())
        print("sweep: VADER separation (+s minus -s), relative strengths; '!' = over the damage bound")
        print("layers   " + "".join(f"{s:>10g}" for s in GRID_STRENGTHS))
        for b in bands:
            row = f"{b[0]:>2}-{b[1]:<5}"
            for s in GRID_STRENGTHS:
                row += f"{sep[(b, s)]:>9.2f}" + ("!" if damage[(b, s)] > plan.max_damage else " ")
            print(row)
        within = sorted((c for c in cells if damage[c] <= plan.max_damage), key=lambda c: -sep[c])
        best = within[0] if within else max(cells, key=lambda c: sep[c])
        print(
            f"plan: layers {chosen[0][0]}-{chosen[0][1]}, relative strength {chosen[1]:g} (damage "
            f"{100 * plan.damage:.1f}%): VADER separation {sep[chosen]:.2f}; sweep's best within the bound "
            f"{best[0][0]}-{best[0][1]} at {best[1]:g}: {sep[best]:.2f}"
        )
        print(f"time: plan {t_plan:.1f} s, sweep {t_sweep:.1f} s, ratio {t_plan / t_sweep:.3f}")

        # Fresh questions, paired: the plan's cell against the sweep's best.
        fresh = generate(signed(list(dict.fromkeys([chosen, best]))), CONFIRM_QUESTIONS)

    def gap(c: Run) -> np.ndarray:
        plus, minus = fresh[(c[0], c[1])], fresh[(c[0], -c[1])]
        return np.array([compound(p) - compound(m) for p, m in zip(plus, minus)])

    g_plan, g_best = gap(chosen), gap(best)
    diff = g_plan - g_best
    print(
        f"{len(CONFIRM_QUESTIONS)} fresh questions: plan {g_plan.mean():.2f}, "
        f"sweep's best {g_best.mean():.2f}; plan minus best {diff.mean():+.2f} "
        f"(standard error {diff.std(ddof=1) / np.sqrt(len(diff)):.2f})"
    )
    for sign in (1, -1):
        print(f"\n--- plan at {sign * chosen[1]:+g}: {texts[(chosen[0], sign * chosen[1])][0][:160]!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
