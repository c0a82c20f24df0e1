"""Soak: run a bounded mix of everything a model does and watch RSS and open
file descriptors over time.

Each round runs, in a shuffled order: generate (with a strength schedule),
generate_batch (per-sequence steering, an ActAdd, a conditional steer),
logits_batch, score, capture, a small extraction, an interrupted
generation (a KeyboardInterrupt raised inside the token loop, after which
the model must still give the same answer as before), and the close and
reopen of a second model. RSS and fds are sampled after every round; the
first rounds warm caches, so growth is measured from the end of the warm-up.

    python scripts/soak.py [--seconds 120] [--threads 2] [--warmup 3]

Exits 1 if RSS grows by more than --max-rss-mb (default 30) or the fd count
changes after the warm-up.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import signal
import sys
import threading
import time

import llama_steer as ls
import numpy as np


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def n_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=3, help="rounds before the baseline is taken")
    ap.add_argument("--max-rss-mb", type=float, default=30)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rnd = random.Random(args.seed)
    path = ls.default_model_path()
    model = ls.Model(path, n_ctx=2048, n_threads=args.threads)
    rng = np.random.default_rng(args.seed)
    vec = ls.ControlVector({il: rng.standard_normal(model.n_embd).astype(np.float32) for il in range(3, 20)})
    actadd = ls.ActAdd(model, "Love", "Hate", 6)
    cond = ls.Condition(rng.standard_normal(model.n_embd), 12, 0.0, "above")
    pairs = ls.persona_pairs(model, "happy", max_pairs=24)
    prompt = model.apply_chat_template([{"role": "user", "content": "Tell me about your weekend."}])
    reference = model.complete(prompt, max_tokens=12, temperature=0)

    def generate() -> None:
        sched = [rnd.uniform(-4, 4) for _ in range(8)]
        model.complete(prompt, steer=ls.Steer(vec, sched), max_tokens=16, temperature=0.7, seed=rnd.randrange(99))

    def batch() -> None:
        steers = [ls.Steer(vec, 2.0), ls.Steer(actadd, 4.0), ls.Steer(vec, 1.0, condition=cond), None]
        list(model.generate_batch(["I hate you because", "Once upon a time"] * 2, steers, max_tokens=12))

    def logits() -> None:
        model.logits_batch(["A", "The weather is", "Hello there"], [ls.Steer(vec, -1.0), None, ls.Steer(actadd, 1.0)])

    def score() -> None:
        model.score("The capital of France is", [" Paris", " Rome", " a city"], steer=ls.Steer(vec, 0.5))

    def capture() -> None:
        model.capture(["One prompt", "Another, longer prompt"], layers=[2, 10, 20], read="mean")

    def extract() -> None:
        ls.extract(model, pairs, method=rnd.choice(["mean_diff", "pca_diff"]))

    def interrupted() -> None:
        # a real Ctrl-C: SIGINT while the decode loop runs (Python raises it
        # when the decode returns the GIL)
        timer = threading.Timer(rnd.uniform(0.02, 0.2), lambda: os.kill(os.getpid(), signal.SIGINT))
        timer.start()
        try:
            model.complete(prompt, max_tokens=200, temperature=0, steer=ls.Steer(vec, 2.0))
            timer.join()
        except KeyboardInterrupt:
            pass
        got = model.complete(prompt, max_tokens=12, temperature=0)
        if got != reference:
            raise AssertionError(f"after an interrupt the model answers {got!r}, before {reference!r}")

    def reopen() -> None:
        with ls.Model(path, n_ctx=512, n_threads=args.threads) as other:
            other.complete("Hi", max_tokens=4, temperature=0)

    ops = [generate, batch, logits, score, capture, extract, interrupted, reopen]
    t_end = time.monotonic() + args.seconds
    rounds = 0
    base_rss = base_fds = None
    print("round  seconds  rss_mb  fds")
    t0 = time.monotonic()
    while rounds < args.warmup or time.monotonic() < t_end:
        rnd.shuffle(ops)
        for op in ops:
            op()
        rounds += 1
        gc.collect()
        rss, fds = rss_mb(), n_fds()
        print(f"{rounds:5d}  {time.monotonic() - t0:7.1f}  {rss:6.1f}  {fds:3d}", flush=True)
        if rounds == args.warmup:
            base_rss, base_fds = rss, fds
    model.close()
    assert base_rss is not None and base_fds is not None
    growth, fd_change = rss - base_rss, fds - base_fds
    ok = growth <= args.max_rss_mb and fd_change == 0
    print(
        f"{rounds} rounds ({rounds * len(ops)} operations) in {time.monotonic() - t0:.0f} s; after the warm-up "
        f"RSS {base_rss:.1f} -> {rss:.1f} MB ({growth:+.1f}), fds {base_fds} -> {fds} ({fd_change:+d}): "
        f"{'flat' if ok else 'GROWING'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
