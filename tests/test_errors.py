"""Bad input raises the package's own exceptions; the process keeps working."""

from __future__ import annotations

import math
from pathlib import Path

import llama_steer as ls
import pytest


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ls.ModelLoadError, match="cannot open"):
        ls.Model(tmp_path / "nope.gguf")


def test_not_a_gguf(tmp_path: Path) -> None:
    p = tmp_path / "fake.gguf"
    p.write_bytes(b"this is not a model" * 100)
    with pytest.raises(ls.ModelLoadError, match="not a GGUF"):
        ls.Model(p)


def test_empty_file(tmp_path: Path) -> None:
    p = tmp_path / "empty.gguf"
    p.write_bytes(b"")
    with pytest.raises(ls.ModelLoadError):
        ls.Model(p)


@pytest.mark.parametrize("keep", [4, 1000, 3_000_000, 50_000_000])
def test_truncated_gguf(tmp_path: Path, model_path: Path, keep: int) -> None:
    p = tmp_path / "truncated.gguf"
    with model_path.open("rb") as f:
        p.write_bytes(f.read(keep))
    with pytest.raises(ls.ModelLoadError):
        ls.Model(p)


def test_load_error_is_oserror_too(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        ls.Model(tmp_path / "nope.gguf")


def test_prompt_longer_than_context(model_path: Path) -> None:
    with ls.Model(model_path, n_ctx=64, n_threads=2) as m:
        with pytest.raises(ls.ContextOverflowError, match="context"):
            m.complete("word " * 2000, max_tokens=4)
        with pytest.raises(ls.ContextOverflowError):
            m.logits("word " * 2000)
        # still usable afterwards
        assert m.complete("Hi", max_tokens=2, temperature=0)


def test_generation_stops_at_context_end(model_path: Path) -> None:
    with ls.Model(model_path, n_ctx=32, n_threads=2) as m:
        n_prompt = len(m.tokenize("Count to one hundred: 1, 2, 3"))
        out = list(m.generate("Count to one hundred: 1, 2, 3", max_tokens=500, temperature=0))
        # llama.cpp pads n_ctx (to 256); generation ends quietly at the real end
        # (counting never emits an end-of-generation token here).
        assert len(out) == m.n_ctx - n_prompt + 1  # the last token needs no cell of its own


@pytest.mark.parametrize("prompt", ["", []])
def test_empty_prompt(model: ls.Model, prompt: str | list[int]) -> None:
    with pytest.raises(ValueError, match="empty"):
        model.complete(prompt)


def test_bad_token_ids(model: ls.Model) -> None:
    with pytest.raises(ValueError, match="out of range"):
        model.complete([1, 2, model.n_vocab + 5], max_tokens=2)
    with pytest.raises(ValueError, match="out of range"):
        model.detokenize([-1])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -1.0},
        {"temperature": math.nan},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"min_p": 1.0},
        {"min_p": -0.1},
        {"top_k": -3},
        {"repeat_penalty": 0.0},
        {"max_tokens": -1},
        {"seed": -5},
        {"seed": 2**40},
        {"stop": [""]},
    ],
)
def test_invalid_sampler_values(model: ls.Model, kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        model.complete("Hi", **kwargs)  # type: ignore[arg-type]


def test_wrong_types(model: ls.Model) -> None:
    with pytest.raises(TypeError):
        model.complete("Hi", max_tokens=2.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        model.complete("Hi", not_a_param=1)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        model.tokenize(123)  # type: ignore[arg-type]


def test_bad_constructor_args(model_path: Path) -> None:
    with pytest.raises(ValueError):
        ls.Model(model_path, n_ctx=0)
    with pytest.raises(ValueError):
        ls.Model(model_path, n_threads=0)


def test_bad_chat_messages(model: ls.Model) -> None:
    with pytest.raises(ValueError):
        model.apply_chat_template([{"content": "no role"}])
    with pytest.raises(ValueError):
        model.apply_chat_template([])


def test_closed_model(model_path: Path) -> None:
    m = ls.Model(model_path, n_ctx=128, n_threads=2)
    gen = m.generate("Hello", max_tokens=10, temperature=0)
    next(gen)
    m.close()
    m.close()  # idempotent
    assert m.closed
    for call in (
        lambda: m.complete("Hi"),
        lambda: m.logits("Hi"),
        lambda: m.tokenize("Hi"),
        lambda: m.detokenize([1]),
        lambda: m.n_layer,
        lambda: next(gen),
    ):
        with pytest.raises(ls.ClosedError):
            call()
    assert "closed" in repr(m)


def test_unknown_bundled_model() -> None:
    with pytest.raises(ValueError, match="unknown bundled model"):
        ls.default_model_path("no-such-model")
