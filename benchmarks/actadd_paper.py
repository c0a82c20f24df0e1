"""The ActAdd demonstrations of Turner et al., "Activation Addition"
(arXiv 2308.10248), on the bundled small models.

For four prompt pairs of the paper (its settings, from ``results/save_tables.py``
of its code, GPT-2-XL, 48 layers):

    pair                                          paper layer  coeff
    "Love" / "Hate"                                      6        5
    "Anger" / "Calm"                                    20       10
    "Intent to praise" / "Intent to hurt"                6       15
    "I talk about weddings constantly" /
    "I do not talk about weddings constantly"           20        4

we sample completions of neutral, unchatted sentence starts with and without
the injection (same prompts, same seeds) and count the words of the positive
side's concept in them. The paper's layer is scaled to our depth
(``round(L * n_layer / 48)``, at least 1, in the paper's convention: the input
of block L, our layer L - 1), plus layers at 25 %, 50 % and 75 % of depth.
The full coefficient sweep (``--coeffs`` plus the paper's coefficient) runs at
the scaled paper layer; the other layers get a moderate and a strong one
(``--other-coeffs``, 4 and 16) to keep the default run under 6 minutes on 2
cores (about 61k sampled tokens at ~200 tokens/s for smollm2-135m: 5.5 min).

Sampling as in the paper: temperature 1, top-p 0.3 (top-k and min-p off). The
paper used an OpenAI-style frequency penalty of 1; llama_steer exposes only
llama.cpp's multiplicative repeat penalty, so we use ``--repeat-penalty``
(1.1 by default) as the nearest stand-in.

    python benchmarks/actadd_paper.py [--model smollm2-135m|gemma3-270m]
        [--samples 32] [--max-tokens 40] [--seed 0] [--quick] [--threads 2]
"""

from __future__ import annotations

import argparse
import math
import re
import time
from dataclasses import dataclass, field

import llama_steer as ls

PAPER_N_LAYER = 48  # GPT-2-XL

# Concept word lists. The wedding list is the paper's (results/save_tables.py);
# the others are ours. Matching is on whole words of the lowercased text after
# re.sub(r"\W", " ", text), as in the paper.
WEDDING_WORDS = ["wedding", "weddings", "wed", "marry", "married", "marriage", "bride", "groom", "honeymoon"]
LOVE_WORDS = [
    "love", "loves", "loved", "loving", "lovely", "beautiful", "happy", "happiness", "kind", "kindness",
    "wonderful", "care", "caring", "heart", "sweet", "joy", "adore", "dear", "darling", "affection",
]  # fmt: skip
ANGER_WORDS = [
    "angry", "anger", "angrily", "hate", "hated", "hates", "furious", "fury", "rage", "raging", "mad",
    "annoyed", "irritated", "frustrated", "frustration", "upset", "outraged", "outrage", "yell", "yelled",
    "yelling", "scream", "screamed", "screaming", "shout", "shouted", "shouting", "damn", "hell",
]  # fmt: skip
PRAISE_WORDS = [
    "great", "amazing", "wonderful", "brilliant", "proud", "excellent", "awesome", "fantastic", "impressive",
    "impressed", "incredible", "talented", "beautiful", "best", "admire", "praise", "praised", "congratulations",
    "congratulate", "thank", "thanks", "grateful", "appreciate", "love", "good", "perfect", "outstanding",
]  # fmt: skip
# The negative side of "praise" (ours); not counted, the table counts the positive side.
HURT_WORDS = ["hurt", "stupid", "idiot", "ugly", "hate", "worthless", "pathetic", "dumb", "kill", "loser"]

# Neutral, unchatted sentence starts (the first is the paper's wedding prompt).
# Sample j uses prompt j % len(PROMPTS) and seed + j, steered or not.
PROMPTS = [
    "I went up to my friend and said",
    "Yesterday my neighbour told me that",
    "The best thing about this town is",
    "When I think about the future,",
]


@dataclass(frozen=True)
class Pair:
    name: str
    positive: str
    negative: str
    paper_layer: int
    coeff: float
    words: frozenset[str]


PAIRS = [
    Pair("love", "Love", "Hate", 6, 5, frozenset(LOVE_WORDS)),
    Pair("anger", "Anger", "Calm", 20, 10, frozenset(ANGER_WORDS)),
    Pair("praise", "Intent to praise", "Intent to hurt", 6, 15, frozenset(PRAISE_WORDS)),
    Pair(
        "weddings",
        "I talk about weddings constantly",
        "I do not talk about weddings constantly",
        20,
        4,
        frozenset(WEDDING_WORDS),
    ),
]


# -- text metrics ---------------------------------------------------------------
def words_of(text: str) -> list[str]:
    return re.sub(r"\W", " ", text.lower()).split()


def concept_count(text: str, words: frozenset[str]) -> int:
    return sum(w in words for w in words_of(text))


def distinct_ratio(text: str) -> float:
    ws = re.findall(r"[a-z']+", text.lower())
    return len(set(ws)) / len(ws) if ws else 1.0


def is_broken(text: str) -> bool:
    """Crude: a loop (few distinct words) or mostly non-letters."""
    ws = re.findall(r"[a-z']+", text.lower())
    if len(ws) >= 8 and len(set(ws)) / len(ws) < 0.3:
        return True
    chars = [c for c in text if not c.isspace()]
    return len(chars) >= 10 and sum(c.isalpha() for c in chars) / len(chars) < 0.5


@dataclass
class Result:
    layer: int | None  # ours; None: baseline
    coeff: float
    texts: list[str]
    words: frozenset[str]
    counts: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.counts = [concept_count(t, self.words) for t in self.texts]

    @property
    def mean(self) -> float:
        return sum(self.counts) / len(self.counts)

    @property
    def frac(self) -> float:
        return sum(c > 0 for c in self.counts) / len(self.counts)

    @property
    def distinct(self) -> float:
        return sum(distinct_ratio(t) for t in self.texts) / len(self.texts)

    @property
    def broken_frac(self) -> float:
        return sum(is_broken(t) for t in self.texts) / len(self.texts)

    @property
    def broken(self) -> bool:
        """Half the completions broken, or degenerate on average (mostly one
        word repeated, e.g. "Love and Love and Love is Love": normal text of
        40 tokens has a distinct-word ratio near 0.9)."""
        return self.broken_frac >= 0.5 or self.distinct < 0.6


# -- sampling -------------------------------------------------------------------
def sample(
    model: ls.Model,
    steer: ls.Steer | None,
    n: int,
    args: argparse.Namespace,
    chunk: int,
) -> list[str]:
    """n completions: sample j of PROMPTS[j % len] with seed + j."""
    texts = [""] * n
    for start in range(0, n, chunk):
        k = min(chunk, n - start)
        prompts = [PROMPTS[(start + i) % len(PROMPTS)] for i in range(k)]
        steers = None if steer is None else [steer] * k
        for i, tok in model.generate_batch(
            prompts,
            steers,
            max_tokens=args.max_tokens,
            temperature=1.0,
            top_p=0.3,
            top_k=0,
            min_p=0.0,
            repeat_penalty=args.repeat_penalty,
            seed=args.seed + start,  # sequence i samples with seed + start + i
        ):
            texts[start + i] += tok.text
    return texts


def scaled_paper_layer(paper_layer: int, n_layer: int) -> int:
    """The paper's layer (GPT-2-XL, 48 layers) at our depth, paper convention."""
    return min(n_layer, max(1, math.floor(paper_layer * n_layer / PAPER_N_LAYER + 0.5)))


def depth_layer(frac: float, n_layer: int) -> int:
    """Paper-convention layer at ``frac`` of depth."""
    return min(n_layer, max(1, math.floor(frac * n_layer + 0.5)))


def fmt_coeff(c: float) -> str:
    return f"{c:g}"


def short(text: str, n: int = 100) -> str:
    t = text.replace("\n", " / ")
    return repr(t[:n] + ("..." if len(t) > n else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["smollm2-135m", "gemma3-270m"], default="smollm2-135m")
    ap.add_argument("--samples", type=int, default=32, help="completions per setting (default 32)")
    ap.add_argument("--max-tokens", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="2 layers, 2 coefficients, 8 samples")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat-penalty", type=float, default=1.1, help="stand-in for the paper's freq_penalty=1")
    ap.add_argument("--coeffs", type=float, nargs="+", default=[1, 2, 4, 8, 16], help="sweep at the paper layer")
    ap.add_argument("--other-coeffs", type=float, nargs="+", default=[4, 16], help="sweep at the other layers")
    ap.add_argument("--batch", type=int, default=32, help="sequences per generate_batch call (<= 64)")
    args = ap.parse_args()
    if args.quick:
        args.samples = 8
    if args.samples < 1 or args.max_tokens < 1 or not 1 <= args.batch <= 64:
        ap.error("--samples and --max-tokens must be >= 1, --batch in 1..64")

    t_all = time.perf_counter()
    path = ls.default_model_path(args.model)
    t0 = time.perf_counter()
    # The context is shared by the sequences of a call: size it for one chunk.
    chunk = min(args.batch, args.samples)
    probe = ls.Model(path, n_threads=args.threads, n_ctx=512)
    max_prompt = max(len(probe.tokenize(p)) for p in PROMPTS)
    max_rows = max(len(probe.tokenize(s)) for pr in PAIRS for s in (pr.positive, pr.negative))
    probe.close()
    need = chunk * (max_prompt + max_rows + args.max_tokens) + 64
    n_ctx = max(1024, -(-need // 256) * 256)
    model = ls.Model(path, n_threads=args.threads, n_ctx=n_ctx)
    n_layer = model.n_layer
    prompt_lens = [len(model.tokenize(p)) for p in PROMPTS]
    print(
        f"model {model.name} ({args.model}): {n_layer} layers, n_embd {model.n_embd}; loaded in "
        f"{time.perf_counter() - t0:.1f}s; n_ctx {n_ctx}, {args.threads} threads"
    )
    print(
        f"{args.samples} samples/setting over {len(PROMPTS)} prompts ({min(prompt_lens)}-{max(prompt_lens)} tokens), "
        f"{args.max_tokens} tokens, temperature 1, top-p 0.3, repeat penalty {args.repeat_penalty}, seed {args.seed}"
    )
    print("layers: ours = output of block N; paper = input of block L = ours + 1")

    # Baseline: the same prompts and seeds for every pair, sampled once.
    t0 = time.perf_counter()
    base_texts = sample(model, None, args.samples, args, chunk)
    t_base = time.perf_counter() - t0
    print(f"baseline: {args.samples} completions in {t_base:.1f}s")

    summaries: list[str] = []
    for pair in PAIRS:
        base = Result(None, 0.0, base_texts, pair.words)
        paper_l = scaled_paper_layer(pair.paper_layer, n_layer)
        if args.quick:
            fracs = [0.5]
            main_coeffs = sorted({float(pair.coeff), float(2 * pair.coeff)})
            other_coeffs = main_coeffs
        else:
            fracs = [0.25, 0.5, 0.75]
            main_coeffs = sorted({float(c) for c in args.coeffs} | {float(pair.coeff)})
            other_coeffs = sorted({float(c) for c in args.other_coeffs})
        plan: dict[int, list[float]] = {paper_l: main_coeffs}  # paper-convention layer -> coeffs
        for f in fracs:
            plan.setdefault(depth_layer(f, n_layer), other_coeffs)

        print()
        print(
            f"== {pair.name}: {pair.positive!r} - {pair.negative!r}; paper: layer {pair.paper_layer} of "
            f"{PAPER_N_LAYER}, coeff {fmt_coeff(pair.coeff)} -> layer {paper_l} of {n_layer} here (paper convention)"
        )
        print(f"   counting {len(pair.words)} words: {', '.join(sorted(pair.words))}")
        results: list[Result] = []
        build_times: list[str] = []
        t_pair = time.perf_counter()
        for pl in sorted(plan):
            t0 = time.perf_counter()
            a = ls.ActAdd(model, pair.positive, pair.negative, paper_layer=pl)
            dt = time.perf_counter() - t0
            padded = False
            if min(prompt_lens) < a.n_rows:  # the rows would run past a prompt's end: pad the prompts
                t0 = time.perf_counter()
                a = ls.ActAdd(model, pair.positive, pair.negative, paper_layer=pl, pad_prompt=True)
                dt = time.perf_counter() - t0
                padded = True
            build_times.append(f"L{a.layer}: {dt * 1000:.0f}ms" + (" (pad_prompt)" if padded else ""))
            for c in plan[pl]:
                texts = sample(model, ls.Steer(a, c), args.samples, args, chunk)
                results.append(Result(a.layer, c, texts, pair.words))
        t_pair = time.perf_counter() - t_pair
        print(f"   ActAdd: {a.n_rows} rows; build {', '.join(build_times)}; sampling {t_pair:.1f}s")

        hdr = (
            f"   {'layer':>5} {'paper':>5} {'coeff':>5} | {'mean':>5} {'base':>5} {'ratio':>6} | "
            f"{'frac>0':>6} {'base':>5} | {'distinct':>8} {'broken':>6}"
        )
        print(hdr)
        print("   " + "-" * (len(hdr) - 3))
        print(
            f"   {'-':>5} {'-':>5} {'0':>5} | {base.mean:5.2f} {base.mean:5.2f} {'':>6} | "
            f"{base.frac:6.2f} {base.frac:5.2f} | {base.distinct:8.2f} {base.broken_frac:6.2f}"
        )
        for r in results:
            assert r.layer is not None
            ratio = f"{r.mean / base.mean:6.1f}" if base.mean > 0 else ("   inf" if r.mean > 0 else "     -")
            star = "*" if (r.layer + 1 == paper_l and r.coeff == pair.coeff) else " "
            mark = " BROKEN" if r.broken else ""
            print(
                f"  {star}{r.layer:>5} {r.layer + 1:>5} {fmt_coeff(r.coeff):>5} | {r.mean:5.2f} {base.mean:5.2f} "
                f"{ratio} | {r.frac:6.2f} {base.frac:5.2f} | {r.distinct:8.2f} {r.broken_frac:6.2f}{mark}"
            )
        print(
            "   (* = the paper's setting scaled to this depth; broken: fraction of completions that loop\n"
            "    (distinct-word ratio < 0.3) or are mostly non-letters; BROKEN: >= half of them or mean distinct < 0.6)"
        )

        ok = [r for r in results if not r.broken]
        if ok:
            best = max(ok, key=lambda r: (r.mean, r.frac))
            assert best.layer is not None
            line = (
                f"best {pair.name}: layer {best.layer} (paper {best.layer + 1}) coeff {fmt_coeff(best.coeff)}: "
                f"{best.mean:.2f} words/completion, {best.frac:.0%} with one or more, vs baseline "
                f"{base.mean:.2f}, {base.frac:.0%}" + ("" if best.mean > base.mean else " (no gain)")
            )
            # Same prompt and seed: the first sample where the injection shows.
            j = next((k for k, c in enumerate(best.counts) if c > base.counts[k]), 0)
            print(f"   example (sample {j}, prompt {PROMPTS[j % len(PROMPTS)]!r}):")
            print(f"     baseline: {short(base.texts[j])}")
            print(f"     steered : {short(best.texts[j])}")
        else:
            line = f"best {pair.name}: every setting broken; baseline {base.mean:.2f}, {base.frac:.0%}"
        print("   " + line)
        summaries.append(line)

    print()
    print("summary")
    for s in summaries:
        print("  " + s)
    print(f"total wall time {time.perf_counter() - t_all:.1f}s")
    model.close()


if __name__ == "__main__":
    main()
