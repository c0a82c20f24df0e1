"""Hundreds of open/close cycles keep memory flat; the model outlives nothing it should not."""

from __future__ import annotations

import gc
from pathlib import Path

import llama_steer as ls


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    import os

    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _cycle(path: Path) -> None:
    with ls.Model(path, n_ctx=256, n_threads=2) as m:
        m.logits("Hi")


def test_open_close_cycles_flat_memory(model_path: Path) -> None:
    for _ in range(20):  # warm-up: allocator pools, lazy init
        _cycle(model_path)
    gc.collect()
    before = _rss_mb()
    for _ in range(200):
        _cycle(model_path)
    gc.collect()
    growth = _rss_mb() - before
    # One leaked model would be ~100 MB, one leaked context several MB:
    # 200 cycles leaking anything per cycle would exceed this by far.
    assert growth < 40, f"RSS grew by {growth:.1f} MB over 200 cycles"


def test_core_model_outlives_context(model_path: Path) -> None:
    # The context holds the weights: dropping every other reference to the
    # core model must not free them under it.
    from llama_steer import _core

    core_model = _core.Model(str(model_path), 0)
    params = _core.ContextParams()
    params.n_ctx = 128
    ctx = _core.Context(core_model, params)
    del core_model
    gc.collect()
    toks = [1, 2, 3]
    ctx.decode(_core.BatchTokens(toks, [0, 1, 2], [0, 0, 0], [0, 0, 1]))
    assert ctx.logits(-1).shape[0] > 0
    ctx.close()


def test_generator_survives_model_drop(model_path: Path) -> None:
    m = ls.Model(model_path, n_ctx=128, n_threads=2)
    gen = m.generate("Hello", max_tokens=5, temperature=0)
    first = next(gen)
    del m
    gc.collect()
    rest = list(gen)  # the generator keeps what it uses alive
    assert first.id >= 0 and len(rest) <= 4
