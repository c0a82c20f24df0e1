"""Does a model read A/B choices? The question behind `evaluate`'s two scores.

Trivially easy questions ("Which one is a fruit? (A) Apple (B) Hammer") are
asked twice, the right answer listed first and then second, in the prompt
`evaluate` uses. A model that reads the choices gives the right letter a high
probability both ways; one that does not shows a letter preference instead
(high when the answer is first, low when it is second). Then the happy vector
is swept over the bundled happy A/B set with both scores: letters can only
move on a model that reads them.

    python benchmarks/ab_readability.py [--model smollm2-135m|gemma3-270m|PATH] [--strengths=-8,0,8]
"""

from __future__ import annotations

import argparse
import math
import os

import llama_steer as ls
from llama_steer.evaluation import _letter_token, ab_prompt, evaluate

EASY = [
    ("Which one is a fruit?", "Apple", "Hammer"),
    ("Which one is a color?", "Red", "Table"),
    ("Which one is an animal?", "Dog", "Spoon"),
    ("Which sentence is happy?", "I love this wonderful day!", "I hate this awful day."),
    ("Which sentence is cheerful?", "What a joyful morning!", "What a miserable morning."),
    ("What is 2+2?", "4", "7"),
    ("Which is bigger?", "An elephant", "A mouse"),
    ("Which is the capital of France?", "Paris", "Berlin"),
]


def p_correct(model: ls.Model, right_first: bool) -> float:
    total = 0.0
    for q, right, wrong in EASY:
        first, second = (right, wrong) if right_first else (wrong, right)
        prompt = ab_prompt(model, f"{q}\n\nChoices:\n(A) {first}\n(B) {second}")
        a, b = (_letter_token(model, x, prompt) for x in ("A", "B"))  # as evaluate reads them
        logits = model.logits(prompt)
        p_a = 1.0 / (1.0 + math.exp(float(logits[b] - logits[a])))
        total += p_a if right_first else 1.0 - p_a
    return total / len(EASY)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--strengths", default="-8,0,8")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    path = args.model if os.path.isfile(args.model) else ls.default_model_path(args.model)
    strengths = [float(s) for s in args.strengths.split(",")]
    with ls.Model(path, n_threads=args.threads) as model:
        first, second = p_correct(model, True), p_correct(model, False)
        print(f"model: {model.name}")
        print(f"easy questions, mean p(right letter): right answer first {first:.2f}, second {second:.2f}")
        print(f"  letter preference (first - second) {first - second:+.2f}, reading (mean) {(first + second) / 2:.2f}")
        vec = ls.extract(model, ls.persona_pairs(model, "happy", max_pairs=120), progress=False)
        for score in ("letter", "answer"):
            r = evaluate(model, vec, "happy", strengths, score=score, progress=False)
            row = ", ".join(f"{s:+g}: {m:.3f}" for s, m in zip(r.strengths, r.mean))
            print(f"happy vector on the bundled happy set, {score} score, mean p(matching): {row}")


if __name__ == "__main__":
    main()
