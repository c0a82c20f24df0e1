"""Scoring continuations: how likely a model finds given texts after a prompt.

Each prompt is decoded once, with one sequence per continuation branching
off it in the KV cache (the prompt's tokens are tagged with all of them), so
scoring two answers to a question costs the question once. Many prompts go
into one batch, each steered on its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from .errors import ContextOverflowError
from .steer import Steer
from .tokens import TokenBatch, common_prefix_len

if TYPE_CHECKING:
    from .engine import Engine
    from .model import Model


@dataclass(frozen=True)
class ScoreJob:
    """A prompt (token ids), the continuations to score after it (token ids,
    each non-empty) and the steering of all of them; ``branch_steers[i]``
    (optional) steers continuation i alone, on its own tokens only
    (``positions="generated"``: the prompt is decoded once for all)."""

    prompt: Sequence[int]
    continuations: Sequence[Sequence[int]]
    steers: Sequence[Steer] = ()
    branch_steers: Sequence[Sequence[Steer]] = ()

    @property
    def n_cells(self) -> int:
        """KV cells the job occupies: the prompt once, and each continuation
        but its last token (which is only predicted)."""
        return len(self.prompt) + sum(len(c) - 1 for c in self.continuations)


def split_at_seam(model: Model, prompt: str, continuations: Sequence[str]) -> tuple[list[int], list[list[int]]]:
    """Token ids of ``prompt`` and of each continuation as the model reads
    them together: ``(prompt tokens, [continuation tokens, ...])``.

    Each ``prompt + continuation`` is tokenized whole (chat markup parsed),
    so a continuation reads exactly as in the full text. Where a tokenizer
    merges across the seam (a prompt ending in a space before "Paris"), the
    prompt keeps only the tokens every full text starts with, and each
    continuation starts where they end: it then also holds the prompt's
    last few characters, the same for every continuation.
    """
    if not isinstance(prompt, str):
        raise TypeError("prompt must be a str")
    if not continuations:
        raise ValueError("no continuations to score")
    for c in continuations:
        if not isinstance(c, str):
            raise TypeError(f"continuations must be str, got {type(c).__name__}")
        if not c:
            raise ValueError("a continuation is empty")
    head = model.engine.prompt_tokens(prompt)
    wholes = [model.tokenize(prompt + c, add_special=True, parse_special=True) for c in continuations]
    keep = len(head)
    for whole in wholes:
        keep = min(keep, common_prefix_len(whole, head), len(whole) - 1)  # every continuation keeps a token
    if keep < 1:
        raise ValueError("the prompt and a continuation share no leading token; nothing to condition on")
    return head[:keep], [whole[keep:] for whole in wholes]


def pack(sizes: Sequence[Sequence[int]], limits: Sequence[int]) -> Iterator[range]:
    """Consecutive index ranges whose summed ``sizes`` stay within
    ``limits`` in every dimension; an item over a limit alone is its own
    range (the caller reports it)."""
    start = 0
    used = [0] * len(limits)
    for i, size in enumerate(sizes):
        if i > start and any(u + x > lim for u, x, lim in zip(used, size, limits)):
            yield range(start, i)
            start, used = i, [0] * len(limits)
        used = [u + x for u, x in zip(used, size)]
    if start < len(sizes):
        yield range(start, len(sizes))


# Every row of a ubatch attends over all the cells in use (other sequences'
# masked), so a group's cost grows with its cache: packing groups up to 1k
# cells scores 57 steered 92-token texts 20% faster than filling 8k.
_GROUP_CELLS = 1024


def _groups(jobs: Sequence[ScoreJob], n_seq: int, n_ctx: int) -> Iterator[range]:
    """Consecutive ranges of jobs that share one KV cache: at most ``n_seq``
    continuations and ``_GROUP_CELLS`` cells (a job larger than that alone;
    one larger than ``n_ctx`` is an error)."""
    for job in jobs:
        if len(job.continuations) > n_seq:
            raise ValueError(f"{len(job.continuations)} continuations of one prompt exceed n_seq_max {n_seq}")
        if job.n_cells > n_ctx:
            raise ContextOverflowError(
                f"a prompt and its continuations hold {job.n_cells} tokens; the context holds {n_ctx}"
            )
    cells = min(n_ctx, _GROUP_CELLS)
    return pack([(len(job.continuations), job.n_cells) for job in jobs], (n_seq, cells))


def score_jobs(
    model: Model, jobs: Sequence[ScoreJob], *, on_group: Callable[[int], None] | None = None
) -> list[list[npt.NDArray[np.float64]]]:
    """Per job, per continuation: the log-probability of each of its tokens
    (float64 [len(continuation)]), under that job's steering.

    Steering applies to the prompt and the continuation alike (positions
    ``"generated"`` mean the continuation's tokens). Scheduled strengths are
    refused: a continuation is read in one pass, not generated step by step.
    ``on_group(n)`` is called after each batch with the tokens it decoded (progress).

    A job's continuations share one KV cache, so they are at most
    ``n_seq_max``; the distinct vectors of the jobs in one batch must fit the
    context's steering slots (``n_steer_slots``; one vector at many
    strengths takes one slot).
    """
    eng = model.engine
    for job in jobs:
        if not job.prompt:
            raise ValueError("a prompt is empty")
        if not job.continuations:
            raise ValueError("no continuations to score")
        if any(not c for c in job.continuations):
            raise ValueError("a continuation is empty")
        if job.branch_steers and len(job.branch_steers) != len(job.continuations):
            raise ValueError("branch_steers needs one list of steers per continuation")
        branch = [s for b in job.branch_steers for s in b]
        if any(s.positions != "generated" for s in branch):
            raise ValueError("a branch's steering must act on generated positions only: the prompt is shared")
        for s in [*job.steers, *branch]:
            if s.scheduled:
                raise ValueError("scoring takes constant strengths, not a schedule")
            if s.condition is not None:
                raise ValueError("scoring takes no conditional steering (a condition gates generated tokens)")
            if s.actadd is not None and s.actadd.pad_prompt:
                raise ValueError("scoring takes no ActAdd with pad_prompt (the prompt and continuation are fixed)")
        eng.check_steers([*job.steers, *branch])
    out: list[list[npt.NDArray[np.float64]]] = []
    for group in _groups(jobs, eng.ctx.n_seq_max, eng.n_ctx):
        batch = [jobs[i] for i in group]
        out.extend(_score_group(eng, batch))
        if on_group is not None:
            on_group(sum(job.n_cells for job in batch))
    return out


def _score_group(eng: Engine, jobs: Sequence[ScoreJob]) -> list[list[npt.NDArray[np.float64]]]:
    seqs_of: list[range] = []
    per_seq: dict[int, list[Steer]] = {}
    n_prompt: dict[int, int] = {}
    n_seqs = 0
    for job in jobs:
        seqs = range(n_seqs, n_seqs + len(job.continuations))
        n_seqs += len(job.continuations)
        seqs_of.append(seqs)
        for i, s in enumerate(seqs):
            n_prompt[s] = len(job.prompt)
            steers = [*job.steers, *(job.branch_steers[i] if job.branch_steers else ())]
            if steers:
                per_seq[s] = steers

    # Head: every prompt but its last token, shared by its sequences.
    head = TokenBatch()
    for job, seqs in zip(jobs, seqs_of):
        for p, t in enumerate(job.prompt[:-1]):
            head.add(t, p, seqs, False)
    # Tail: each prompt's last token (shared) and the continuations, every
    # row but a continuation's last giving the logits of the next token.
    tail = TokenBatch()
    rows: list[int] = []
    targets: list[int] = []
    for job, seqs in zip(jobs, seqs_of):
        n = len(job.prompt)
        last_row = tail.add(job.prompt[-1], n - 1, seqs, True)
        for seq, cont in zip(seqs, job.continuations):
            prev = last_row
            for k, t in enumerate(cont):
                rows.append(prev)
                targets.append(int(t))
                if k + 1 < len(cont):
                    prev = tail.add(t, n + k, [seq], True)

    lp = np.empty(len(targets), dtype=np.float64)
    with eng.call(per_seq, n_prompt):
        ctx = eng.ctx
        ctx.clear()
        width = min(_MAX_ROWS, ctx.n_batch)  # outputs must sit in one decode chunk
        for a, b in _spans(len(head), width):
            ctx.decode(head.build(a, b))
        by_row = np.argsort(rows, kind="stable")  # pairs in the order their rows are decoded
        sorted_rows = np.asarray(rows)[by_row]
        for a, b in _spans(len(tail), width):
            ctx.decode(tail.build(a, b))
            # A row's logits last until the next decode: read them now.
            lo, hi = np.searchsorted(sorted_rows, [a, b])
            pick = by_row[lo:hi]
            local = [int(rows[i]) - a for i in pick]
            lp[pick] = ctx.token_logprobs(local, [targets[i] for i in pick])
    out: list[list[npt.NDArray[np.float64]]] = []
    k = 0
    for job in jobs:
        per_cont = []
        for cont in job.continuations:
            per_cont.append(lp[k : k + len(cont)])
            k += len(cont)
        out.append(per_cont)
    return out


# ggml's CPU flash attention switches from a per-row kernel (f16 queries) to
# a tiled one (f32 queries) at 64 query rows in a ubatch (GGML_FA_TILE_Q),
# which moves log-probabilities by up to ~0.3 nats on small models. Decoding
# at most 63 rows at a time keeps every row on the per-row kernel, so a
# score does not depend on what else shares its batch.
_MAX_ROWS = 63


def _spans(n: int, width: int) -> Iterator[tuple[int, int]]:
    for a in range(0, n, width):
        yield a, min(a + width, n)
