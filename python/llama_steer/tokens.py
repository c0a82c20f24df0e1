"""Token-level helpers shared by extraction and scoring: batches whose tokens
may belong to several sequences, and shared token prefixes."""

from __future__ import annotations

from collections.abc import Sequence

from . import _core


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    k = 0
    while k < n and a[k] == b[k]:
        k += 1
    return k


class TokenBatch:
    """Tokens of a decode, each tagged with one or more sequences (a shared
    prefix is decoded once and seen by every sequence it is tagged with)."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.pos: list[int] = []
        self.seq: list[int] = []
        self.offsets: list[int] = [0]  # token i's sequences are seq[offsets[i]:offsets[i + 1]]
        self.output: list[int] = []

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, token: int, pos: int, seqs: Sequence[int], output: bool) -> int:
        """Append a token; returns its row in the batch."""
        self.tokens.append(int(token))
        self.pos.append(pos)
        self.seq.extend(seqs)
        self.offsets.append(len(self.seq))
        self.output.append(1 if output else 0)
        return len(self.tokens) - 1

    def build(self, a: int = 0, b: int | None = None) -> _core.BatchTokens:
        """Rows [a, b) (default: all) as one core batch."""
        b = len(self.tokens) if b is None else b
        lo, hi = self.offsets[a], self.offsets[b]
        offsets = [o - lo for o in self.offsets[a : b + 1]]
        return _core.BatchTokens(self.tokens[a:b], self.pos[a:b], self.seq[lo:hi], self.output[a:b], offsets)
