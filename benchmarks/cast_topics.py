"""CAST on the bundled topic prompts: how well a found condition picks out
prompts it never saw, decided the way generation decides it.

Per topic (cooking, health) and read ("mean", "last"): ``find_condition``
searches on the first 40 + 40 prompts (its own train / held-out split), then
the condition gates a behaviour vector in ``generate_batch`` on the last
20 + 20 prompts, and ``model.last_conditions`` gives the decisions. Prints
the layer, threshold, held-out F1 of the search, and F1 / accuracy on the
unseen prompts, with the search time.

    python benchmarks/cast_topics.py [--model smollm2-135m] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import llama_steer as ls
import numpy as np
from llama_steer.conditions import f1_score


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    with ls.Model(ls.default_model_path(args.model), n_threads=args.threads) as m:
        rng = np.random.default_rng(0)
        behaviour = ls.ControlVector({5: rng.standard_normal(m.n_embd).astype(np.float32)})
        print(f"model {m.name}: search on 40 + 40 prompts, test on the 20 + 20 unseen")
        print("topic    read  layer  compare  threshold  search-F1  test-F1  test-acc  search-s")
        for topic in ("cooking", "health"):
            match, other = ls.topic_prompts(topic)
            for read in ("mean", "last"):
                t0 = time.perf_counter()
                cond = ls.find_condition(m, match[:40], other[:40], read=read).condition  # type: ignore[arg-type]
                dt = time.perf_counter() - t0
                users = match[40:] + other[40:]
                truth = np.array([True] * len(match[40:]) + [False] * len(other[40:]))
                prompts = [m.apply_chat_template([{"role": "user", "content": u}]) for u in users]
                pred: list[bool] = []
                for i in range(0, len(prompts), 20):
                    chunk = prompts[i : i + 20]
                    steers = [ls.Steer(behaviour, 1.0, condition=cond)] * len(chunk)
                    list(m.generate_batch(chunk, steers, max_tokens=1, temperature=0))
                    pred += [r.held for r in sorted(m.last_conditions, key=lambda r: r.seq)]
                p = np.array(pred)
                print(
                    f"{topic:8s} {read:4s}  {cond.layer:5d}  {cond.compare:7s}  {cond.threshold:9.4f}  "
                    f"{cond.f1:9.3f}  {f1_score(p, truth):7.3f}  {np.mean(p == truth):8.3f}  {dt:8.1f}"
                )


if __name__ == "__main__":
    main()
