"""llama.cpp's own tools as references for the benchmarks (built by
third_party/upstream_tools.py from the same pin, with the same CPU flags)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "third_party"))
from upstream_tools import build_tools, cpu_flags  # noqa: E402

__all__ = ["build_tools", "cpu_flags", "llama_bench_tg"]


def llama_bench_tg(model: Path, n_gen: int, threads: int, reps: int) -> float:
    """Decode tokens/s of upstream llama-bench (tg test, no prompt)."""
    exe = build_tools("llama-bench") / "llama-bench"
    out = subprocess.run(
        [str(exe), "-m", str(model), "-p", "0", "-n", str(n_gen), "-t", str(threads), "-r", str(reps), "-o", "json"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    rows = json.loads(out)
    return float(rows[0]["avg_ts"])
