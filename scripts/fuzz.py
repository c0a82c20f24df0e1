"""Coverage-guided fuzzing (atheris, libFuzzer) of every parser llama-steer owns.

    pip install ".[dev]"                          # brings atheris
    python scripts/fuzz.py TARGET [--seconds 60] [--corpus DIR] [libFuzzer flags...]
    python scripts/fuzz.py all --seconds 60        # every target in turn, a summary line each

Targets and what a bad input may raise (anything else, or a crash, is a bug):

- ``controlvector``: ``ControlVector.load`` on a mutated control-vector GGUF -> VectorFileError
- ``actadd``: ``ActAdd.load`` on a mutated ActAdd GGUF -> VectorFileError
- ``pairs-jsonl`` / ``pairs-csv``: ``load_pairs`` -> DatasetError
- ``ab-dataset``: ``load_ab_dataset`` on mutated CAA-format JSON -> DatasetError
- ``model-header``: ``Model(path)`` on a model GGUF whose first 64 KiB (the
  header and metadata) are mutated -> ModelLoadError; llama.cpp's own loader
  runs, so an abort there kills the process and libFuzzer reports it.

The corpus is seeded from files the package writes or ships; libFuzzer writes
crashing, out-of-memory and slow inputs to ``build/fuzz/found/`` (each found
so far is a regression test in tests/test_fuzz_regressions.py).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ("controlvector", "actadd", "pairs-jsonl", "pairs-csv", "ab-dataset", "model-header")
HEADER_BYTES = 64 * 1024


def _scratch(suffix: str) -> Path:
    d = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    return d / f"llama-steer-fuzz-{os.getpid()}{suffix}"


def seed_corpus(target: str, corpus: Path) -> None:
    """Write seed inputs for ``target`` into ``corpus`` (kept if present)."""
    import llama_steer as ls

    corpus.mkdir(parents=True, exist_ok=True)
    if any(corpus.iterdir()):
        return
    rng = np.random.default_rng(0)
    if target == "controlvector":
        for i, n in enumerate((8, 64)):
            p = corpus / f"seed{i}"
            ls.ControlVector({k: rng.standard_normal(n).astype(np.float32) for k in (1, 2, 5)}, "llama").save(p)
    elif target == "actadd":
        with ls.Model(ls.default_model_path(), n_ctx=256, n_threads=2) as m:
            ls.ActAdd(m, "Love", "Hate", 3).save(corpus / "seed0")
    elif target == "pairs-jsonl":
        lines = [json.dumps({"positive": f"happy {i}", "negative": f"sad {i}"}) for i in range(3)]
        (corpus / "seed0").write_text("\n".join(lines) + "\n")
    elif target == "pairs-csv":
        (corpus / "seed0").write_text('positive,negative\nhappy,sad\n"a, b","c ""d"""\n')
    elif target == "ab-dataset":
        data = ls.load_ab_dataset("happy")
        items = [
            {
                "question": it.question,
                "answer_matching_behavior": it.matching,
                "answer_not_matching_behavior": it.not_matching,
            }
            for it in list(data)[:3]
        ]
        (corpus / "seed0").write_text(json.dumps(items))
    elif target == "model-header":
        (corpus / "seed0").write_bytes(ls.default_model_path().read_bytes()[:HEADER_BYTES])
    else:
        raise SystemExit(f"unknown target {target!r}; targets: {', '.join(TARGETS)}")


def make_harness(target: str) -> Callable[[bytes], None]:
    import llama_steer as ls
    from llama_steer.errors import DatasetError, ModelLoadError, VectorFileError

    scratch = _scratch({"pairs-jsonl": ".jsonl", "pairs-csv": ".csv", "ab-dataset": ".json"}.get(target, ".gguf"))

    def file_harness(load: Callable[[Path], object], allowed: type[BaseException]) -> Callable[[bytes], None]:
        def run(data: bytes) -> None:
            scratch.write_bytes(data)
            with contextlib.suppress(allowed):
                load(scratch)

        return run

    if target == "controlvector":
        return file_harness(ls.ControlVector.load, VectorFileError)
    if target == "actadd":
        return file_harness(ls.ActAdd.load, VectorFileError)
    if target in ("pairs-jsonl", "pairs-csv"):
        return file_harness(ls.load_pairs, DatasetError)
    if target == "ab-dataset":
        return file_harness(ls.load_ab_dataset, DatasetError)
    if target == "model-header":
        tail = ls.default_model_path().read_bytes()[HEADER_BYTES:]

        def run(data: bytes) -> None:
            scratch.write_bytes(data[:HEADER_BYTES] + tail)
            with contextlib.suppress(ModelLoadError):
                ls.Model(scratch, n_ctx=256, n_threads=1).close()

        return run
    raise SystemExit(f"unknown target {target!r}")


def fuzz(target: str, seconds: int, corpus: Path, extra: list[str]) -> None:
    import atheris

    with atheris.instrument_imports(include=["llama_steer", "gguf"]):
        import gguf  # noqa: F401
        import llama_steer  # noqa: F401
    seed_corpus(target, corpus)
    harness = make_harness(target)
    # inputs up to twice the largest seed (libFuzzer's default cuts at 512 bytes)
    max_len = 2 * max(p.stat().st_size for p in corpus.iterdir())
    argv = [sys.argv[0], str(corpus), f"-max_total_time={seconds}", f"-max_len={max_len}", "-print_final_stats=1"]
    found = ROOT / "build" / "fuzz" / "found"
    found.mkdir(parents=True, exist_ok=True)
    argv += [f"-artifact_prefix={found}/{target}-", *extra]
    atheris.Setup(argv, harness)
    atheris.Fuzz()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("target", choices=[*TARGETS, "all"])
    ap.add_argument("--seconds", type=int, default=60)
    ap.add_argument("--corpus", type=Path, default=None, help="corpus dir (default build/fuzz/TARGET)")
    args, extra = ap.parse_known_args()
    if args.target != "all":
        fuzz(args.target, args.seconds, args.corpus or ROOT / "build" / "fuzz" / args.target, extra)
        return 0
    failed = 0
    for target in TARGETS:
        # each target in its own process: libFuzzer exits the process when done
        proc = subprocess.run(
            [sys.executable, __file__, target, "--seconds", str(args.seconds), *extra],
            capture_output=True,
            text=True,
        )
        out = proc.stdout + proc.stderr
        runs = re.findall(r"stat::number_of_executed_units:\s*(\d+)", out)
        cov = re.findall(r"cov: (\d+)", out)
        crash = "crash" if proc.returncode != 0 else "no crash"
        n_runs, n_cov = runs[-1] if runs else "?", cov[-1] if cov else "?"
        print(f"{target:14s} {n_runs:>8s} executions in {args.seconds} s, cov {n_cov}: {crash}")
        if proc.returncode != 0:
            failed += 1
            print(io.StringIO(out).read()[-3000:])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
