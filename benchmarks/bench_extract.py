"""Extraction speed and memory on the quantized model.

Default model, 2 threads, 178 repeng-style persona pairs (persona
instruction x progressively longer sentence prefixes, in the chat template),
pca_diff over all layers. Two sets: one happy/sad persona pair (repeng's
classic emotion set) and the bundled five pairs of synonyms (more distinct
prefixes, so more to decode). Prints pairs/s end to end (pairs in, vector out) and the
peak RSS of a fresh process that loads the model and extracts, next to the
figures of repeng 0.4.0 and llama.cpp's cvector-generator. repeng is run in
the same script only when it is installed (it needs torch, transformers and
the HF weights); otherwise the reference figures measured on this machine
for the issue are printed and labelled as such.

With ``--scaling``: 100, 1,000 and 10,000 pairs synthesized from the bundled
personas and sentences (every behaviour, each sentence's progressive
prefixes, every positive persona against every negative one), each size in a
fresh process, on SmolLM2 and Gemma 3 270M: wall time, distinct prefix
tokens decoded, time per distinct token, and peak RSS next to the RSS before
extracting (model loaded, pairs built), so growth with the number of pairs
shows.

    python benchmarks/bench_extract.py [--pairs 178] [--threads 2] [--reps 3]
    python benchmarks/bench_extract.py --scaling [--sizes 100,1000,10000]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import subprocess
import sys
import time

import llama_steer as ls
from llama_steer.directions import PairStats

REPENG_PAIRS_S, REPENG_RSS_MB = 12.1, 2400  # repeng 0.4.0, fp32, torch 2.13 CPU (issue's measurement here)
CVECTOR_PAIRS_S, CVECTOR_RSS_MB = 4.9, 760  # llama.cpp cvector-generator (issue's measurement here)

CHILD = r"""
import json, resource, sys, time
import llama_steer as ls
n_pairs, threads, share, n_personas = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4])
t0 = time.perf_counter()
m = ls.Model(ls.default_model_path(), n_ctx=4096, n_threads=threads)
t_load = time.perf_counter() - t0
pairs = ls.persona_pairs(m, "happy", n_personas=n_personas, max_pairs=n_pairs)
t1 = time.perf_counter()
v = ls.extract(m, pairs, method="pca_diff", progress=False, share_prefixes=share)
t_extract = time.perf_counter() - t1
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"load_s": t_load, "extract_s": t_extract, "rss_mb": rss, "n_pairs": len(pairs)}))
"""


SCALING_CHILD = r"""
import json, resource, sys, time
import llama_steer as ls
from llama_steer.extraction import _Trie
name, n_pairs, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
m = ls.Model(ls.default_model_path(name), n_ctx=4096, n_threads=threads)
personas = ls.extraction._personas()
pairs = []
def wrap(persona, text):
    instr = personas["template"].format(persona=persona)
    return m.apply_chat_template([{"role": "user", "content": instr}], add_generation_prompt=True) + text
def synthesize():
    # every positive persona against every negative one, for each prefix of each
    # sentence (repeats of a prompt stay close together, as persona_pairs orders them)
    for b in sorted(personas["behaviours"]):
        pos, neg = personas["behaviours"][b]["positive"], personas["behaviours"][b]["negative"]
        for sentence in personas["suffixes"]:
            ids = m.tokenize(sentence, add_special=False)
            for k in range(1, len(ids) + 1):
                text = m.detokenize(ids[:k])
                for p in pos:
                    for q in neg:
                        yield ls.Pair(wrap(p, text), wrap(q, text))
for pair in synthesize():
    pairs.append(pair)
    if len(pairs) >= n_pairs:
        break
if len(pairs) < n_pairs:
    raise SystemExit(f"only {len(pairs)} pairs can be synthesized")
trie = _Trie()
for p in pairs:
    for t in (p.positive, p.negative):
        trie.insert(m.engine.prompt_tokens(t))
n_nodes = len(trie.token) - 1
del trie
m.residual_norms()  # a one-time per-model measurement, not part of what scales
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t0 = time.perf_counter()
v = ls.extract(m, pairs, method="pca_diff", progress=False)
wall = time.perf_counter() - t0
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"wall_s": wall, "rss_mb": rss, "rss_before_mb": rss0, "nodes": n_nodes,
                  "n_embd": m.n_embd, "n_layer": m.n_layer}))
"""


def scaling(sizes: list[int], threads: int) -> None:
    print(f"pca_diff over all layers, {threads} threads, each size in a fresh process")
    print("| model | pairs | prefix tokens | wall s | pairs/s | ms per token | RSS before MB | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|")
    for name in ("smollm2-135m", "gemma3-270m"):
        for n in sizes:
            out = subprocess.run(
                [sys.executable, "-c", SCALING_CHILD, name, str(n), str(threads)],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(
                f"| {name} | {n} | {r['nodes']} | {r['wall_s']:.1f} | {n / r['wall_s']:.1f} | "
                f"{1000 * r['wall_s'] / r['nodes']:.2f} | {r['rss_before_mb']:.0f} | {r['rss_mb']:.0f} |",
                flush=True,
            )


def time_split(m: ls.Model, pairs: list[ls.Pair]) -> dict[str, float]:
    """Where a warm extract's time goes (one run under cProfile, so a little
    slower than unprofiled): the capture-only decodes (native, the GIL
    released), the solver (PairStats: moments, held-out fits), and the rest
    (tokenizing, the prefix tree, batches, row copies and hand-over)."""
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.runcall(ls.extract, m, pairs, method="pca_diff", progress=False)
    total = time.perf_counter() - t0
    solver = {(fn.__code__.co_filename, fn.__code__.co_firstlineno) for fn in (PairStats.add, PairStats.solve)}
    cum: dict[str, float] = {"decode": 0.0, "solver": 0.0}
    for (file, line, func), row in pstats.Stats(prof).stats.items():  # type: ignore[attr-defined]
        if "decode_capture" in func:
            cum["decode"] += row[3]  # cumulative time
        elif (file, line) in solver:
            cum["solver"] += row[3]
    return {"total": total, **cum, "rest": total - cum["decode"] - cum["solver"]}


def run_child(n_pairs: int, threads: int, n_personas: int, share: bool = True) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(n_pairs), str(threads), "1" if share else "0", str(n_personas)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    result: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=178)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-sharing-run", action="store_true", help="skip the run without prefix sharing")
    ap.add_argument("--scaling", action="store_true", help="the 100 / 1,000 / 10,000-pair table instead")
    ap.add_argument("--sizes", default="100,1000,10000")
    args = ap.parse_args()
    if args.scaling:
        scaling([int(x) for x in args.sizes.split(",")], args.threads)
        return

    from llama_steer.extraction import _Trie

    fresh_rates = []
    for n_personas in (1, 5):
        with ls.Model(ls.default_model_path(), n_ctx=4096, n_threads=args.threads) as m:
            pairs = ls.persona_pairs(m, "happy", n_personas=n_personas, max_pairs=args.pairs)
            prompts = [m.engine.prompt_tokens(s) for p in pairs for s in (p.positive, p.negative)]
            trie = _Trie()
            for t in prompts:
                trie.insert(t)
            tokens, nodes = sum(map(len, prompts)), len(trie.token) - 1
            ls.extract(m, pairs[:20], progress=False)  # warm-up: graph reserve with capture
            times = []
            for _ in range(args.reps):
                t0 = time.perf_counter()
                ls.extract(m, pairs, method="pca_diff", progress=False)
                times.append(time.perf_counter() - t0)
            split = time_split(m, pairs)
        warm = len(pairs) / statistics.median(times)
        fresh = run_child(args.pairs, args.threads, n_personas)
        fresh_rate = fresh["n_pairs"] / fresh["extract_s"]
        fresh_rates.append(fresh_rate)
        print(
            f"{n_personas} persona pair(s): {len(pairs)} pairs, {tokens} prompt tokens "
            f"({tokens / (2 * len(pairs)):.1f} a prompt), {nodes} distinct prefix nodes; pca_diff, 29 layers, "
            f"{args.threads} threads"
        )
        print(f"  warm process (median of {args.reps}):   {warm:7.1f} pairs/s")
        print(
            "  warm split (one profiled run, {total:.2f} s): capture-only decode {decode:.2f} s, "
            "solver {solver:.2f} s, rest (tokenize, prefix tree, batches, row copies) {rest:.2f} s".format(**split)
        )
        print(
            f"  fresh process (first call): {fresh_rate:7.1f} pairs/s, peak RSS {fresh['rss_mb']:.0f} MB "
            f"(model load {fresh['load_s']:.2f} s)"
        )
        if not args.no_sharing_run and n_personas == 1:
            flat = run_child(args.pairs, args.threads, n_personas, share=False)
            print(f"  without prefix sharing:     {flat['n_pairs'] / flat['extract_s']:7.1f} pairs/s")
    fresh_rate = min(fresh_rates)
    try:
        import repeng  # noqa: F401
    except ImportError:
        print(
            f"repeng not installed: reference measured here for the issue: {REPENG_PAIRS_S} pairs/s, "
            f"{REPENG_RSS_MB} MB -> ratio {fresh_rate / REPENG_PAIRS_S:.1f}x (not re-measured in this run)"
        )
    else:
        print(
            "repeng is installed, but running it needs the HF weights of the model, which this script "
            "cannot fetch; reference figure as above"
        )
    print(
        f"cvector-generator reference (issue): {CVECTOR_PAIRS_S} pairs/s, {CVECTOR_RSS_MB} MB -> ratio "
        f"{fresh_rate / CVECTOR_PAIRS_S:.1f}x (not re-measured in this run)"
    )
    print("targets: >= 100 pairs/s end to end, peak RSS <= 400 MB")


if __name__ == "__main__":
    main()
