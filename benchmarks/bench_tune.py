"""Representation tuning on the bundled model: cost, and what the tuned model does.

For each loss (the paper's: cosine term + token loss; and token loss only,
``cos_weight=0``) the script tunes SmolLM2-135M (Q4_1) with the bundled happy
persona pairs, in a fresh child process, and prints:

- wall time, optimizer steps/s, sequences/s, peak RSS of the tuning process;
- the held-out cosine of the block outputs with the direction (before/after)
  and the held-out token loss;
- the tuned model, run with no steering at all, on six neutral questions
  (greedy, 48 tokens): mean VADER compound (vaderSentiment, a lexicon
  classifier from PyPI), here and through upstream ``llama-completion``
  (unpatched pin); next to runtime steering of the original model at the same
  layers over a grid of strengths;
- perplexity on a neutral text that ships with Python (its LICENSE.txt).

    pip install vaderSentiment
    python benchmarks/bench_tune.py [--layers 8-15] [--lr 1e-3] [--epochs 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, resource, sys, time
import llama_steer as ls
a = json.loads(sys.argv[1])
t0 = time.perf_counter()
r = ls.tune(a["model"], a["vector"], a["out"], progress=False, **a["kw"])
wall = time.perf_counter() - t0
print(json.dumps({
    "wall": wall, "steps": r.steps, "sequences": r.sequences, "heldout": r.heldout,
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "cos_before": r.cos_before, "cos_after": r.cos_after,
    "tok_before": r.token_loss_before, "tok_after": r.token_loss_after,
    "types": sorted({t.type for t in r.tensors}), "trainable_params": r.trainable_params,
    "update_error": {t.name: t.update_error for t in r.tensors[:4]},
}))
"""


def license_text() -> str:
    path = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    return path.read_text(encoding="utf-8")[:2000]


def perplexity(model: object, text: str, steer: object = None) -> float:
    head, rest = text.split("\n", 1)
    per = model.score(head + "\n", rest, per_token=True, steer=steer)[0]  # type: ignore[attr-defined]
    return float(np.exp(-np.mean(per)))


def main() -> int:
    import llama_steer as ls
    from llama_steer.cli import parse_layers
    from llama_steer.plan import NEUTRAL_QUESTIONS

    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        print("needs the vaderSentiment package: pip install vaderSentiment", file=sys.stderr)
        return 2

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=parse_layers, default=parse_layers("8-15"))
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--cos-weight", type=float, default=1.0)
    ap.add_argument("--token-weight", type=float, default=1.0)
    ap.add_argument("--no-token-only", action="store_true", help="skip the token-loss-only comparison")
    ap.add_argument("--targets", default="pairs", choices=["pairs", "steered"])
    ap.add_argument("--teacher-strength", type=float, default=4.0, help="with --targets steered")
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--strengths", default="2,4,6,8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-upstream", action="store_true", help="skip llama-completion")
    args = ap.parse_args()
    layers = list(args.layers)
    vader = SentimentIntensityAnalyzer()
    model_path = ls.default_model_path()
    tmp = Path(tempfile.mkdtemp(prefix="bench-tune-"))
    vec_path = tmp / "happy.gguf"
    with ls.Model(model_path, n_ctx=4096, n_threads=args.threads) as m:
        ls.extract(m, ls.persona_pairs(m, "happy"), progress=False).save(vec_path)
        prompts = [m.apply_chat_template([{"role": "user", "content": q}]) for q in NEUTRAL_QUESTIONS]

    def answers(path: Path, steer: ls.Steer | None = None) -> tuple[list[str], float]:
        with ls.Model(path, n_ctx=2048, n_threads=args.threads) as m:
            outs = [""] * len(prompts)
            for i, tok in m.generate_batch(prompts, [steer] * len(prompts), max_tokens=48, temperature=0):
                outs[i] += tok.text
            ppl = perplexity(m, license_text(), steer)
        return outs, ppl

    def sentiment(texts: list[str]) -> float:
        return float(np.mean([vader.polarity_scores(t)["compound"] for t in texts]))

    rows: list[tuple[str, float, float]] = []
    base_texts, base_ppl = answers(model_path)
    rows.append(("original, no steering", sentiment(base_texts), base_ppl))
    vec = ls.ControlVector.load(vec_path)
    for s in (float(x) for x in args.strengths.split(",")):
        t, ppl = answers(model_path, ls.Steer(vec, s, layers=layers))
        rows.append((f"original, runtime steering {s:+g} at {layers[0]}-{layers[-1]}", sentiment(t), ppl))

    upstream = None
    if not args.no_upstream:
        sys.path.insert(0, str(ROOT / "third_party"))
        from upstream_tools import build_tools

        upstream = build_tools("llama-completion", pristine=True) / "llama-completion"

    kw_common = {
        "layers": layers,
        "lr": args.lr,
        "epochs": args.epochs,
        "n_threads": args.threads,
        "token_weight": args.token_weight,
        "targets": args.targets,
    }
    if args.targets == "steered":
        kw_common["teacher_strength"] = args.teacher_strength
    if args.max_steps:
        kw_common["max_steps"] = args.max_steps
    name = f"tuned (cos_weight {args.cos_weight:g}, token_weight {args.token_weight:g}, {args.targets})"
    configs = {name: {"cos_weight": args.cos_weight}}
    if not args.no_token_only:
        configs["tuned (token loss only, cos_weight 0)"] = {"cos_weight": 0.0}
    for name, kw in configs.items():
        out = tmp / f"tuned-{len(rows)}.gguf"
        child = {"model": str(model_path), "vector": str(vec_path), "out": str(out), "kw": {**kw_common, **kw}}
        t0 = time.perf_counter()
        res = subprocess.run(
            [sys.executable, "-c", CHILD, json.dumps(child)], capture_output=True, text=True, env=os.environ
        )
        if res.returncode != 0:
            print(res.stderr[-3000:], file=sys.stderr)
            return 1
        r = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"\n== {name}: {time.perf_counter() - t0:.1f} s in the child")
        print(
            f"   {r['steps']} steps on {r['sequences']} sequences ({r['heldout']} held out), "
            f"{r['trainable_params'] / 1e6:.1f} M trainable parameters: tuning {r['wall']:.1f} s, "
            f"{r['steps'] / r['wall']:.3f} steps/s, peak RSS {r['peak_rss_mb']:.0f} MB; stored as {r['types']}"
        )
        cb = np.mean(list(r["cos_before"].values()))
        ca = np.mean(list(r["cos_after"].values()))
        print(
            f"   held-out cos to the direction (mean over layers {cb:.3f} -> {ca:.3f}):",
            {k: f"{r['cos_before'][k]:.3f}->{v:.3f}" for k, v in r["cos_after"].items()},
        )
        print(f"   held-out token loss {r['tok_before']:.3f} -> {r['tok_after']:.3f}")
        print(f"   update error by type (first tensors): {r['update_error']}")
        texts, ppl = answers(out)
        rows.append((name, sentiment(texts), ppl))
        print("   answers:", json.dumps(texts[:2]))
        if upstream is not None:
            up = []
            for p in prompts:
                cmd = [str(upstream), "-m", str(out), "-p", p, "-n", "48", "--temp", "0", "-no-cnv"]
                cmd += ["--no-display-prompt", "-t", str(args.threads), "-c", "512", "--simple-io"]
                res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
                up.append(res.stdout)
            rows.append((name + " via upstream llama-completion", sentiment(up), float("nan")))

    print(f"\nVADER compound of greedy answers to {len(prompts)} neutral questions; perplexity on LICENSE.txt")
    print(f"{'model':<62} {'VADER':>7} {'ppl':>8} {'ppl vs orig':>11}")
    for name, s, ppl in rows:
        rel = f"{100 * (ppl / base_ppl - 1):+.1f}%" if np.isfinite(ppl) else ""
        print(f"{name:<62} {s:>+7.3f} {ppl:>8.2f} {rel:>11}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
