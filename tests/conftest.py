"""Shared fixtures: real bundled models, loaded once per session (no mocks)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import llama_steer as ls
import pytest

N_THREADS = 2


@pytest.fixture(scope="session")
def model_path() -> Path:
    return ls.default_model_path()


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    return ls.default_model_path("gemma3-270m")


@pytest.fixture(scope="session")
def model(model_path: Path) -> Iterator[ls.Model]:
    with ls.Model(model_path, n_ctx=2048, n_threads=N_THREADS) as m:
        yield m


@pytest.fixture(scope="session")
def gemma(gemma_path: Path) -> Iterator[ls.Model]:
    with ls.Model(gemma_path, n_ctx=2048, n_threads=N_THREADS) as m:
        yield m


@pytest.fixture(params=["smollm2", "gemma3"])
def any_model(request: pytest.FixtureRequest) -> ls.Model:
    """Each test using it runs on both architectures."""
    name = "model" if request.param == "smollm2" else "gemma"
    m: ls.Model = request.getfixturevalue(name)
    return m


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    from llama_steer import _core

    if _core.supports_gpu_offload():
        return
    skip = pytest.mark.skip(reason="needs a CUDA/Metal build with a GPU (build with -DGGML_CUDA=ON)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def gpu_model(model_path: Path) -> Iterator[ls.Model]:
    with ls.Model(model_path, n_ctx=2048, n_threads=N_THREADS, n_gpu_layers=-1) as m:
        yield m


@pytest.fixture(scope="session")
def f32_path(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A full-precision copy of the bundled model (F32 weights, written by
    ls.dequantize_model): where exact-arithmetic invariants can be tested."""
    out = tmp_path_factory.mktemp("f32") / "smollm2-f32.gguf"
    ls.dequantize_model(model_path, out, dtype="f32", progress=False)
    return out


@pytest.fixture(scope="session")
def f32_model(f32_path: Path) -> Iterator[ls.Model]:
    with ls.Model(f32_path, n_ctx=512, n_threads=N_THREADS, kv_cache="f32") as m:
        yield m
