"""Baking: time against a plain copy of the file, peak memory, file size.

Each bake runs in a fresh child process so that its peak RSS (ru_maxrss,
which counts the memory-mapped model pages it touched) is its own; a child
that only imports llama_steer and builds the steer gives the baseline. Time
is compared with copying the model file (shutil.copyfile) in the same
rounds, interleaved; the figure is the median of paired ratios with its
spread.

    python benchmarks/bench_bake.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, shutil, sys, time
import numpy as np
import llama_steer as ls
what, model, vec_path, out = sys.argv[1:5]
vec = ls.ControlVector.load(vec_path)
steer = {
    "add": ls.Steer(vec, 4.0, layers=range(8, 22)),
    "ablate": ls.Steer(vec.select([15]), 1.0, mode="ablate"),
}.get(what)
t = time.perf_counter()
report = None
if what in ("add", "ablate"):
    report = ls.bake(model, steer, out, overwrite=True, progress=False)
elif what == "copy":
    shutil.copyfile(model, out)
seconds = time.perf_counter() - t
edits = [] if report is None else [(e.name, e.requant_error, e.leak) for e in report.edits if e.action == "ablate"]
print(json.dumps({"seconds": seconds, "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "edits": edits}))
"""


def run_child(what: str, model: Path, vec: Path, out: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, what, str(model), str(vec), str(out)], capture_output=True, text=True, check=True
    )
    result: dict = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main() -> int:
    import llama_steer as ls

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    model = ls.default_model_path()
    size_mb = model.stat().st_size / 1e6
    with tempfile.TemporaryDirectory(prefix="bench-bake-") as tmp_name:
        tmp = Path(tmp_name)
        vec = tmp / "happy.gguf"
        with ls.Model(model, n_threads=2) as m:
            ls.extract(m, ls.persona_pairs(m, "happy", max_pairs=60), progress=False).save(vec)
        base = run_child("none", model, vec, tmp / "none.gguf")
        runs: dict[str, list[dict]] = {"copy": [], "add": [], "ablate": []}
        for _ in range(args.rounds):
            for what in runs:  # interleaved: drift hits all three alike
                runs[what].append(run_child(what, model, vec, tmp / f"{what}.gguf"))
        sizes = {what: (tmp / f"{what}.gguf").stat().st_size / 1e6 for what in runs}

    print(f"model: {model.name}, {size_mb:.1f} MB; {args.rounds} interleaved rounds, each run a fresh process")
    print(f"baseline process (import + vector): peak RSS {base['maxrss_kb'] / 1e3:.1f} MB")
    for what in ("add", "ablate"):
        secs = [r["seconds"] for r in runs[what]]
        ratios = [r["seconds"] / c["seconds"] for r, c in zip(runs[what], runs["copy"])]
        peak = max(r["maxrss_kb"] for r in runs[what]) / 1e3
        extra = peak - base["maxrss_kb"] / 1e3
        print(
            f"bake {what:<6}: {statistics.median(secs):.2f} s (median), "
            f"{statistics.median(ratios):.1f}x a file copy (paired ratios {min(ratios):.1f}..{max(ratios):.1f}); "
            f"peak RSS {peak:.1f} MB = baseline + {extra:.1f} MB "
            f"({'below' if extra < size_mb + 100 else 'ABOVE'} model size + 100 MB = {size_mb + 100:.0f} MB); "
            f"file {sizes[what]:.1f} MB ({100 * (sizes[what] / size_mb - 1):+.2f}%)"
        )
    edits = runs["ablate"][0]["edits"]
    errs = [e[1] for e in edits]
    leaks = [e[2] for e in edits]
    print(
        f"ablation, {len(edits)} tensors requantized: requant error median {statistics.median(errs):.4f} "
        f"(max {max(errs):.4f}); leak (|r^T W_baked| / |r^T W|) median {statistics.median(leaks):.4f} "
        f"(max {max(leaks):.4f})"
    )
    print(f"this process: peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3:.0f} MB (not counted)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
