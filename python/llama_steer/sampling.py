"""Sampling parameters: validated once in Python, then handed to llama.cpp's
sampler chain in the core."""

from __future__ import annotations

import codecs
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from . import _core

_MAX_SEED = 0xFFFFFFFE  # 0xFFFFFFFF is llama.cpp's "random seed"


@dataclass(frozen=True)
class SamplingParams:
    """How tokens are drawn. ``temperature=0`` is greedy and deterministic."""

    max_tokens: int = 128
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_int("max_tokens", self.max_tokens, minimum=0)
        _check_float("temperature", self.temperature)
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        _check_int("top_k", self.top_k, minimum=0)
        _check_float("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        _check_float("min_p", self.min_p)
        if not 0 <= self.min_p < 1:
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p}")
        _check_float("repeat_penalty", self.repeat_penalty)
        if self.repeat_penalty <= 0:
            raise ValueError(f"repeat_penalty must be > 0, got {self.repeat_penalty}")
        if self.seed is not None:
            _check_int("seed", self.seed, minimum=0)
            if self.seed > _MAX_SEED:
                raise ValueError(f"seed must be <= {_MAX_SEED}, got {self.seed}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty str, got {s!r}")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> SamplingParams:
        stop = kwargs.pop("stop", None)
        if stop is None:
            stop_t: tuple[str, ...] = ()
        elif isinstance(stop, str):
            stop_t = (stop,)
        else:
            stop_t = tuple(stop)
        unknown = set(kwargs) - set(cls.__dataclass_fields__)
        if unknown:
            raise TypeError(f"unknown sampling argument(s): {', '.join(sorted(unknown))}")
        return cls(stop=stop_t, **kwargs)

    def with_seed_offset(self, offset: int) -> SamplingParams:
        """The same parameters with ``seed + offset`` (sequence i of a batch)."""
        if self.seed is None or offset == 0:
            return self
        return replace(self, seed=(self.seed + offset) % (_MAX_SEED + 1))

    def make_sampler(self, n_vocab: int) -> _core.Sampler:
        """A fresh llama.cpp sampler chain with these settings."""
        p = _core.SamplerParams()
        p.temperature = float(self.temperature)
        p.top_k = int(self.top_k)
        p.top_p = float(self.top_p)
        p.min_p = float(self.min_p)
        p.repeat_penalty = float(self.repeat_penalty)
        p.seed = 0xFFFFFFFF if self.seed is None else int(self.seed)
        return _core.Sampler(p, n_vocab)


def _check_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_float(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")


class TextStream:
    """Turns token bytes into text: whole UTF-8 characters only, and text
    held back while it could still be the start of a stop string."""

    def __init__(self, stop: Sequence[str]) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = list(stop)
        self._pending = ""

    def push(self, piece: bytes) -> tuple[str, bool]:
        self._pending += self._decoder.decode(piece)
        if not self._stop:
            out, self._pending = self._pending, ""
            return out, False
        hits = [i for i in (self._pending.find(s) for s in self._stop) if i >= 0]
        if hits:
            out = self._pending[: min(hits)]
            self._pending = ""
            self._decoder.reset()  # flush() adds nothing after a stop
            return out, True
        hold = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(self._pending)), hold, -1):
                if self._pending.endswith(s[:k]):
                    hold = k
                    break
        cut = len(self._pending) - hold
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out, False

    def flush(self) -> str:
        out = self._pending + self._decoder.decode(b"", final=True)
        self._pending = ""
        return out
