"""Build and run llama.cpp's own tools from the same pinned, patched source,
with the same CPU flags as the extension, to serve as references."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LLAMA_CPP = ROOT / "third_party" / "llama.cpp"
BUILD = ROOT / "build" / "upstream-tools"


def build_tools(*targets: str) -> Path:
    """Configure once and build ``targets`` (e.g. "llama-bench"); returns bin/."""
    subprocess.run([sys.executable, str(ROOT / "third_party" / "fetch_llama_cpp.py")], check=True)
    if not (BUILD / "build.ninja").exists():
        flags = [
            "-DCMAKE_BUILD_TYPE=Release",
            "-DGGML_NATIVE=OFF",
            "-DLLAMA_CURL=OFF",
            "-DLLAMA_OPENSSL=OFF",
            "-DBUILD_SHARED_LIBS=OFF",
            "-DLLAMA_BUILD_TESTS=OFF",
            "-DLLAMA_BUILD_EXAMPLES=ON",
            "-DLLAMA_BUILD_TOOLS=ON",
            "-DLLAMA_BUILD_SERVER=OFF",
            "-DGGML_AMX_TILE=OFF",
            "-DGGML_AMX_INT8=OFF",
            "-DGGML_AMX_BF16=OFF",
        ]
        flags += [f"-DGGML_{f}=ON" for f in cpu_flags()]
        launcher = subprocess.run(["sh", "-c", "command -v ccache"], capture_output=True, text=True).stdout.strip()
        if launcher:
            flags += [f"-DCMAKE_C_COMPILER_LAUNCHER={launcher}", f"-DCMAKE_CXX_COMPILER_LAUNCHER={launcher}"]
        subprocess.run(
            ["cmake", "-S", str(LLAMA_CPP), "-B", str(BUILD), "-G", "Ninja", *flags],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    subprocess.run(["cmake", "--build", str(BUILD), "-j2", "--target", *targets], check=True, stdout=subprocess.DEVNULL)
    return BUILD / "bin"


def cpu_flags() -> list[str]:
    """The same choice CMakeLists.txt makes for LLAMA_STEER_CPU=auto."""
    flags: list[str] = []
    try:
        info = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return ["AVX", "AVX2", "FMA", "F16C"]
    for opt, cpu in (
        ("AVX", "avx"),
        ("AVX2", "avx2"),
        ("FMA", "fma"),
        ("F16C", "f16c"),
        ("BMI2", "bmi2"),
        ("AVX512", "avx512f"),
        ("AVX512_VNNI", "avx512_vnni"),
        ("AVX512_VBMI", "avx512vbmi"),
        ("AVX512_BF16", "avx512_bf16"),
        ("AVX_VNNI", "avx_vnni"),
    ):
        if cpu in info:
            flags.append(opt)
    return flags


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
