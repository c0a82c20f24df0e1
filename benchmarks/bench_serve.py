"""Throughput of ``llama-steer serve`` under load, against ``llama-batched-bench``.

Starts ``llama-steer serve`` (bundled SmolLM2-135M Q4_1) as a process on
loopback and drives it with N = 1, 4, 16, 32 concurrent streaming clients
(asyncio + httpx in this process; each client sends ``--rounds`` requests of
``--max-tokens`` greedy tokens, one after another). Prints, per N: aggregate
generated tokens/s, time to first token p50/p95, inter-token latency
p50/p95. Then at N = 16, interleaved and repeated: unsteered vs every client
steered with a different vector (16 slots), the median paired ratio and its
spread. Last, ``llama-batched-bench`` built from the same pin (pristine,
``third_party/upstream_tools.py``) for 16 sequences with the same prompt and
generation lengths, and the ratio of the server's 16-client rate to it.

    python benchmarks/bench_serve.py [--threads 2] [--max-tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "third_party"))

TOPICS = ["the sea", "a city at night", "an old library", "a mountain village", "a train journey", "a garden"]


async def one_client(client, i: int, rounds: int, max_tokens: int, steer: list) -> list[dict]:  # type: ignore[no-untyped-def,type-arg]
    out = []
    for r in range(rounds):
        body = {
            "messages": [{"role": "user", "content": f"Write a long story about {TOPICS[(i + r) % len(TOPICS)]}."}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
            "steer": steer,
        }
        t0 = time.perf_counter()
        stamps: list[float] = []
        n_tokens = 0
        async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                raise RuntimeError(f"HTTP {resp.status_code}: {await resp.aread()!r}")
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    n_tokens = chunk["usage"]["completion_tokens"]
                elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    stamps.append(time.perf_counter())
        out.append({"ttft": stamps[0] - t0 if stamps else float("nan"), "gaps": np.diff(stamps).tolist(),
                    "tokens": n_tokens})  # fmt: skip
    return out


async def load(url: str, n: int, rounds: int, max_tokens: int, steers: list[list]) -> dict:  # type: ignore[type-arg]
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=n + 4)) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one_client(client, i, rounds, max_tokens, steers[i]) for i in range(n)))
        wall = time.perf_counter() - t0
    reqs = [r for rs in results for r in rs]
    gaps = [g for r in reqs for g in r["gaps"]]
    ttft = [r["ttft"] for r in reqs]
    tokens = sum(r["tokens"] for r in reqs)
    return {
        "n": n,
        "tokens": tokens,
        "wall": wall,
        "rate": tokens / wall,
        "ttft": (np.percentile(ttft, 50), np.percentile(ttft, 95)),
        "itl": (np.percentile(gaps, 50), np.percentile(gaps, 95)) if gaps else (float("nan"),) * 2,
    }


def batched_bench(model: Path, threads: int, npp: int, ntg: int, npl: int) -> float:
    """llama-batched-bench's aggregate generation rate: npl*ntg tokens over the
    whole run (prompts included), as the server's rate is measured."""
    from upstream_tools import build_tools

    tool = build_tools("llama-batched-bench", pristine=True) / "llama-batched-bench"
    cmd = [str(tool), "-m", str(model), "-c", str(npl * (npp + ntg) + 256), "-b", "512", "-ub", "512",
           "-npp", str(npp), "-ntg", str(ntg), "-npl", str(npl), "-t", str(threads)]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=True)
    # |    PP |     TG |    B |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |      T s |    S t/s |
    for line in res.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 10 and cells[0] == str(npp) and cells[2] == str(npl):
            return npl * ntg / float(cells[8])
    raise RuntimeError(f"no result row in llama-batched-bench's output:\n{res.stdout}\n{res.stderr}")


def main() -> int:
    import llama_steer as ls
    from server_util import server_process

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2, help="requests per client, one after another")
    ap.add_argument("--clients", default="1,4,16,32")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved pairs for the steering cost")
    ap.add_argument("--no-upstream", action="store_true", help="skip llama-batched-bench")
    args = ap.parse_args()
    clients = [int(x) for x in args.clients.split(",")]
    model_path = ls.default_model_path()
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    with ls.Model(model_path, n_threads=args.threads) as m:
        happy = ls.extract(m, ls.persona_pairs(m, "happy"), progress=False)
        calm = ls.extract(m, ls.persona_pairs(m, "calm"), progress=False)
        prompt_len = len(m.tokenize(m.apply_chat_template([{"role": "user", "content": "Write a long story about "
                                                                              "a mountain village."}])))  # fmt: skip
    for k in range(16):  # 16 different vectors: one slot each
        (happy + calm * (k / 8 - 1)).save(tmp / f"v{k:02d}.gguf")
    n_max = max(clients + [16])
    n_ctx = n_max * (prompt_len + 8 + args.max_tokens) + 256
    serve_args = ["--vectors", str(tmp), "--parallel", str(n_max), "--slots", "16", "--max-queue", "64"]
    serve_args += ["-t", str(args.threads), "-c", str(n_ctx)]
    none: list[list] = [[] for _ in range(n_max)]  # type: ignore[type-arg]
    each = [[{"vector": f"v{i % 16:02d}", "strength": 4, "layers": "8-21"}] for i in range(n_max)]
    print(f"llama-steer serve: {model_path.name}, {args.threads} threads, --parallel {n_max}, "
          f"{args.max_tokens} tokens x {args.rounds} requests per client, prompts ~{prompt_len} tokens")  # fmt: skip
    with server_process(*serve_args) as url:
        asyncio.run(load(url, 2, 1, 8, none))  # warm-up
        print(f"\n{'clients':>7} {'tokens':>7} {'wall s':>7} {'tok/s':>7} {'TTFT p50':>9} {'p95':>7} "
              f"{'ITL p50':>8} {'p95':>7}   (ms)")  # fmt: skip
        rates = {}
        for n in clients:
            r = asyncio.run(load(url, n, args.rounds, args.max_tokens, none))
            rates[n] = r["rate"]
            print(f"{n:>7} {r['tokens']:>7} {r['wall']:>7.1f} {r['rate']:>7.1f} {1e3 * r['ttft'][0]:>9.0f} "
                  f"{1e3 * r['ttft'][1]:>7.0f} {1e3 * r['itl'][0]:>8.1f} {1e3 * r['itl'][1]:>7.1f}")  # fmt: skip
        ratios, plain_rates, steered_rates = [], [], []
        for _ in range(args.repeats):
            plain = asyncio.run(load(url, 16, args.rounds, args.max_tokens, none))["rate"]
            steered = asyncio.run(load(url, 16, args.rounds, args.max_tokens, each))["rate"]
            plain_rates.append(plain)
            steered_rates.append(steered)
            ratios.append(steered / plain)
        print(f"\n16 clients, each steered with its own vector vs unsteered, {args.repeats} interleaved pairs:")
        plain_med, steered_med = statistics.median(plain_rates), statistics.median(steered_rates)
        print(f"  unsteered {plain_med:.1f} tok/s, steered {steered_med:.1f} tok/s; ratio median "
              f"{statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f})")  # fmt: skip
        metrics = asyncio.run(_get(url + "/metrics"))
        leaked = [x for x in metrics.splitlines() if re.match(r"llama_steer_(active_sequences|steer_slots_in_use) ", x)]
        print("  after the runs:", ", ".join(leaked))
    if not args.no_upstream:
        upstream = batched_bench(model_path, args.threads, prompt_len, args.max_tokens, 16)
        ours = statistics.median(plain_rates)
        print(f"\nllama-batched-bench (same pin), 16 sequences, pp {prompt_len}, tg {args.max_tokens}: "
              f"{upstream:.1f} generated tok/s over its whole run")  # fmt: skip
        print(f"server, 16 clients (median of the unsteered runs): {ours:.1f} tok/s -> ratio {ours / upstream:.3f}")
    return 0


async def _get(url: str) -> str:
    import httpx

    async with httpx.AsyncClient() as c:
        return (await c.get(url)).text


if __name__ == "__main__":
    raise SystemExit(main())
