"""Build llama.cpp's own tools (llama-completion, llama-bench, ...) from the
pinned source, with the same CPU flags as the extension, to serve as
references for tests and benchmarks.

``pristine=True`` builds from the unpatched tree: what a user's stock
llama.cpp runs (a baked GGUF must work there). ``pristine=False`` builds from
the patched tree the extension uses (same code, for speed comparisons).
Build directories persist under ``build/`` (plus ccache when present), so
only the first call pays for the build.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from fetch_llama_cpp import read_pin  # this folder: the one reader of the pin

ROOT = Path(__file__).resolve().parents[1]
FETCH = ROOT / "third_party" / "fetch_llama_cpp.py"
PATCHED_SRC = ROOT / "third_party" / "llama.cpp"
PRISTINE_SRC = ROOT / "build" / "llama.cpp-pristine"
STAMP = ".llama-steer-pristine"


def source_tree(pristine: bool) -> Path:
    """The llama.cpp tree to build from, fetched (and patched) on first use."""
    if not pristine:
        subprocess.run([sys.executable, str(FETCH)], check=True)
        return PATCHED_SRC
    stamp = PRISTINE_SRC / STAMP
    commit = read_pin()["commit"]
    if not (stamp.is_file() and stamp.read_text() == commit):
        subprocess.run([sys.executable, str(FETCH), "--pristine", str(PRISTINE_SRC)], check=True)
        stamp.write_text(commit)
    return PRISTINE_SRC


def _tool(name: str) -> str:
    """cmake or ninja: the pip package's (the test extra installs them, and a
    venv's bin/ need not be on PATH), else whatever PATH has."""
    try:
        if name == "cmake":
            import cmake  # type: ignore[import-not-found]

            return str(Path(cmake.CMAKE_BIN_DIR) / "cmake")
        import ninja  # type: ignore[import-not-found]

        return str(Path(ninja.BIN_DIR) / "ninja")
    except ImportError:
        found = shutil.which(name)
        if found is None:
            raise RuntimeError(f"{name} is needed to build llama.cpp's tools: pip install {name}") from None
        return found


def build_tools(*targets: str, pristine: bool = False) -> Path:
    """Configure once and build ``targets`` (e.g. "llama-completion"); returns bin/."""
    src = source_tree(pristine)
    build = ROOT / "build" / ("upstream-pristine" if pristine else "upstream-tools")
    if not (build / "build.ninja").exists():
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
            # ggml's AMX path crashes on the AMX Xeons we run on (see CMakeLists.txt)
            "-DGGML_AMX_TILE=OFF",
            "-DGGML_AMX_INT8=OFF",
            "-DGGML_AMX_BF16=OFF",
        ]
        flags += [f"-DGGML_{f}=ON" for f in cpu_flags()]
        flags.append(f"-DCMAKE_MAKE_PROGRAM={_tool('ninja')}")
        launcher = subprocess.run(["sh", "-c", "command -v ccache"], capture_output=True, text=True).stdout.strip()
        if launcher:
            flags += [f"-DCMAKE_C_COMPILER_LAUNCHER={launcher}", f"-DCMAKE_CXX_COMPILER_LAUNCHER={launcher}"]
        subprocess.run(
            [_tool("cmake"), "-S", str(src), "-B", str(build), "-G", "Ninja", *flags],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    subprocess.run(
        [_tool("cmake"), "--build", str(build), "-j2", "--target", *targets], check=True, stdout=subprocess.DEVNULL
    )
    return build / "bin"


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
