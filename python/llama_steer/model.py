"""``Model``: a GGUF model and its llama.cpp context, sampled token by token."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np
import numpy.typing as npt

from . import _core
from .engine import Engine, Prompt
from .extraction import Read, capture
from .rpc import rpc_endpoints
from .sampling import SamplingParams, TextStream
from .scoring import ScoreJob, score_jobs, split_at_seam
from .steer import Steer, SteeringSession, as_steers, prepare_prompt

Message = Mapping[str, str]


@dataclass(frozen=True)
class ConditionResult:
    """What a conditional Steer's condition decided for one sequence:
    CAST's similarity of the prompt's hidden state, and whether it held
    (so the steering applied to the generated tokens)."""

    seq: int
    steer: Steer
    similarity: float
    held: bool


@dataclass(frozen=True)
class Token:
    """One sampled token.

    ``text`` is the text this token completes: empty while a multi-byte UTF-8
    character is still split across tokens, and never a broken character.
    ``logprob`` is the token's log-probability under the model's own
    (untempered) distribution at that step.
    """

    id: int
    text: str
    logprob: float


class Model:
    """A quantized GGUF model loaded through llama.cpp.

    ``n_ctx`` is the context window shared by all sequences, ``n_threads``
    defaults to every core, ``n_gpu_layers`` offloads layers on a CUDA or
    Metal build. ``rpc=["host:port", ...]`` puts layers on ggml RPC workers
    on other machines (``llama-steer rpc-worker``), their devices first, as
    llama.cpp's ``--rpc`` does; ``n_gpu_layers`` then defaults to every
    layer (-1) instead of 0. A worker that is lost while the model runs
    makes the next call raise :class:`~llama_steer.errors.WorkerLostError`.
    ``kv_cache="f32"`` keeps keys and values in float32 and
    attends without flash attention (which works in float16): slower, for
    exactness checks on full-precision models. Use as a context manager or
    call :meth:`close`; after that every method raises
    :class:`~llama_steer.errors.ClosedError`.

    Safe to share between threads: every call holds the model's lock (a
    streamed generation, one step at a time; see :attr:`lock`).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        n_gpu_layers: int | None = None,
        n_batch: int = 512,
        n_seq_max: int = 64,
        n_steer_slots: int = 8,
        kv_cache: str = "f16",
        rpc: Sequence[str] | str | None = None,
    ) -> None:
        for name, value in (
            ("n_ctx", n_ctx),
            ("n_batch", n_batch),
            ("n_seq_max", n_seq_max),
            ("n_steer_slots", n_steer_slots),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if n_threads is not None and (not isinstance(n_threads, int) or n_threads < 1):
            raise ValueError(f"n_threads must be a positive int or None, got {n_threads!r}")
        workers = rpc_endpoints(rpc)
        if n_gpu_layers is None:
            n_gpu_layers = -1 if workers else 0
        if isinstance(n_gpu_layers, bool) or not isinstance(n_gpu_layers, int) or n_gpu_layers < -1:
            raise ValueError(f"n_gpu_layers must be an int >= -1, got {n_gpu_layers!r}")
        if kv_cache not in ("f16", "f32"):
            raise ValueError(f"kv_cache must be 'f16' or 'f32', got {kv_cache!r}")
        self._path = Path(path)
        self._conditions: list[ConditionResult] = []
        self._engine = Engine(
            self._path,
            n_ctx=n_ctx,
            n_threads=n_threads,
            n_gpu_layers=n_gpu_layers,
            n_batch=n_batch,
            n_seq_max=n_seq_max,
            n_steer_slots=n_steer_slots,
            kv_cache=kv_cache,
            rpc=workers,
        )

    @classmethod
    def default(cls, name: str = "smollm2-135m", **kwargs: Any) -> Model:
        """Load a bundled model (see :func:`llama_steer.default_model_path`)."""
        from .weights import default_model_path

        return cls(default_model_path(name), **kwargs)

    # -- lifetime -----------------------------------------------------------
    def close(self) -> None:
        """Free the context and the weights. Idempotent; from another thread
        it waits for the running call's current step."""
        self._engine.close()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has run (every call then raises ``ClosedError``)."""
        return self._engine.closed

    @property
    def lock(self) -> threading.RLock:
        """The model's re-entrant lock. Every call holds it (a generator, per
        step); hold it yourself to make a streamed generation atomic:
        ``with model.lock: for tok in model.generate(...)``."""
        return self._engine.lock

    @property
    def engine(self) -> Engine:
        """The decode layer under this model (its lock, call protocol and
        core objects), for modules built on ``Model``; see :mod:`llama_steer.engine`."""
        return self._engine

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.arch}, {self.n_layer} layers, n_embd {self.n_embd}"
        return f"Model({str(self._path)!r}, {state})"

    @property
    def _m(self) -> _core.Model:
        return self._engine.model

    @property
    def _c(self) -> _core.Context:
        return self._engine.ctx

    # -- metadata -----------------------------------------------------------
    @property
    def path(self) -> Path:
        """The GGUF file this model was loaded from."""
        return self._path

    @property
    def n_layer(self) -> int:
        """Number of transformer blocks."""
        return self._engine.n_layer

    @property
    def n_embd(self) -> int:
        """Width of the residual stream (a steering vector's length)."""
        return self._engine.n_embd

    @property
    def n_vocab(self) -> int:
        """Vocabulary size (the length of a logits row)."""
        return self._engine.n_vocab

    @property
    def n_ctx(self) -> int:
        """Tokens the context holds (llama.cpp pads the asked size to a multiple of 256)."""
        return self._engine.n_ctx

    @property
    def arch(self) -> str:
        """The GGUF's ``general.architecture`` (``"llama"``, ``"gemma3"``, ...)."""
        return self._engine.arch

    @property
    def name(self) -> str:
        """The GGUF's ``general.name``, or the file's stem."""
        return str(self._m.meta("general.name")) or self._path.stem

    @property
    def chat_template(self) -> str | None:
        """The GGUF's Jinja chat template, or None when it has none."""
        return str(self._m.chat_template) or None

    # -- text ---------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids of ``text``; ``add_special`` adds BOS where the model wants it."""
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        return list(self._m.tokenize(text, add_special, parse_special))

    def detokenize(self, ids: Sequence[int], *, special: bool = False) -> str:
        """Text of token ids; special tokens are dropped unless ``special``."""
        raw = self._m.detokenize([int(i) for i in ids], not special, special)
        return bytes(raw).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """Format ``[{"role": ..., "content": ...}, ...]`` with the model's template."""
        pairs = []
        for i, msg in enumerate(messages):
            try:
                pairs.append((str(msg["role"]), str(msg["content"])))
            except (KeyError, TypeError) as exc:
                raise ValueError(f"message {i} needs 'role' and 'content' keys") from exc
        if not pairs:
            raise ValueError("messages is empty")
        return str(self._m.apply_chat_template(pairs, add_generation_prompt))

    # -- evaluation ---------------------------------------------------------
    def _start(
        self, token_lists: Sequence[Sequence[int]], steers: Sequence[list[Steer]]
    ) -> tuple[int, SteeringSession]:
        """Begin a call (the lock held): bind sequence i to ``steers[i]`` and
        decode the prompts (batch row i: the logits after prompt i). A
        conditional Steer (CAST) is bound for generated positions and dropped
        from the sequences whose prompt does not meet its condition, decided
        on the residual stream captured during the prompt's own decode.
        Returns the call id and its steering; on failure the steering is undone."""
        eng = self._engine
        per_seq = {i: s for i, s in enumerate(steers) if s}
        call_id, session = eng.begin(per_seq, {i: len(t) for i, t in enumerate(token_lists)})
        try:
            conditional = [(i, s) for i, sl in per_seq.items() for s in sl if s.condition is not None]
            results: list[ConditionResult] = []
            if not conditional:
                eng.prefill(token_lists)
            else:
                layers = sorted({s.condition.layer for _, s in conditional})  # type: ignore[union-attr]
                mean_seqs = {i for i, s in conditional if s.condition.read == "mean"}  # type: ignore[union-attr]
                cap = eng.prefill(token_lists, layers, all_rows=mean_seqs)
                assert cap is not None
                for i, s in conditional:
                    cond = s.condition
                    assert cond is not None
                    sim = float(cond.similarity(cap.read(i, cond.layer, cond.read)))
                    held = cond.meets(sim)
                    results.append(ConditionResult(i, s, sim, held))
                    if not held:
                        session.drop(i, s)
            self._conditions = results
        except BaseException:
            eng.end()
            raise
        return call_id, session

    @property
    def last_conditions(self) -> list[ConditionResult]:
        """What the conditions of the latest generate/logits call on this
        model (from any thread) decided: one :class:`ConditionResult`
        (sequence, steer, similarity, held) per conditional Steer and
        sequence; empty when it had none. Read it under :attr:`lock` when
        several threads share the model."""
        return list(self._conditions)

    def residual_norms(self) -> dict[int, float]:
        """The model's scale: mean L2 norm of the residual stream at each
        layer N >= 1 over a bundled neutral text, measured once and cached.
        ``Steer(..., unit="relative")`` is in these units."""
        return self._engine.residual_norms()

    def capture(
        self,
        prompts: Sequence[Prompt],
        layers: Iterable[int] | None = None,
        read: Read = "last",
        *,
        steer: Steer | Sequence[Steer] | None = None,
        **kwargs: Any,
    ) -> npt.NDArray[np.float32]:
        """Residual stream of ``prompts``: float32 [n_prompts, n_layers, n_embd].

        Index N along the layer axis (with the default ``layers``, all of
        them) is the output of block N, where steering adds. ``read`` is
        ``"last"``, ``"mean"`` or a callable (see :func:`llama_steer.extraction.capture`).
        """
        return capture(self, prompts, layers, read, steer=steer, **kwargs)

    def logits(self, prompt: Prompt, *, steer: Steer | Sequence[Steer] | None = None) -> npt.NDArray[np.float32]:
        """Next-token logits after ``prompt``: float32 array of shape [n_vocab]."""
        steers = as_steers(steer)
        tokens = prepare_prompt(self._engine.prompt_tokens(prompt), steers)
        self._engine.check_steers(steers)
        with self._engine.lock:
            self._start([tokens], [steers])
            try:
                return np.asarray(self._c.logits(-1), dtype=np.float32)
            finally:
                self._engine.end()

    def logits_batch(
        self,
        prompts: Sequence[Prompt],
        steers: Sequence[Steer | Sequence[Steer] | None] | None = None,
    ) -> npt.NDArray[np.float32]:
        """Next-token logits of several prompts in one batch: float32
        [n_prompts, n_vocab]; ``steers[i]`` steers prompt i only."""
        token_lists, steer_lists = self._batch_args(prompts, steers)
        with self._engine.lock:
            self._start(token_lists, steer_lists)
            try:
                ctx = self._c
                return np.stack([np.asarray(ctx.logits(i), dtype=np.float32) for i in range(len(token_lists))])
            finally:
                self._engine.end()

    @overload
    def score(
        self,
        prompt: str,
        continuations: str | Sequence[str],
        *,
        steer: Steer | Sequence[Steer] | None = None,
        per_token: Literal[False] = False,
    ) -> npt.NDArray[np.float64]: ...

    @overload
    def score(
        self,
        prompt: str,
        continuations: str | Sequence[str],
        *,
        steer: Steer | Sequence[Steer] | None = None,
        per_token: Literal[True],
    ) -> list[npt.NDArray[np.float64]]: ...

    def score(
        self,
        prompt: str,
        continuations: str | Sequence[str],
        *,
        steer: Steer | Sequence[Steer] | None = None,
        per_token: bool = False,
    ) -> npt.NDArray[np.float64] | list[npt.NDArray[np.float64]]:
        """Log-probability of each continuation right after ``prompt``.

        Returns float64 [n_continuations], the sum over each continuation's
        tokens (``per_token=True``: a list of per-token float64 arrays). The
        prompt is decoded once and every continuation branches off it in
        the KV cache, so scoring the answers to one question costs the
        question once; at most ``n_seq_max`` continuations a call. ``steer``
        applies to the prompt and the continuations alike (constant
        strengths only). One str scores one continuation. Tokenization at
        the seam: see :func:`llama_steer.scoring.split_at_seam`.
        """
        conts = [continuations] if isinstance(continuations, str) else list(continuations)
        head, tails = split_at_seam(self, prompt, conts)
        per = score_jobs(self, [ScoreJob(head, tails, as_steers(steer))])[0]
        if per_token:
            return per
        return np.array([float(x.sum()) for x in per], dtype=np.float64)

    def _batch_args(
        self, prompts: Sequence[Prompt], steers: Sequence[Steer | Sequence[Steer] | None] | None
    ) -> tuple[list[list[int]], list[list[Steer]]]:
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of prompts, not one str")
        token_lists = [self._engine.prompt_tokens(p) for p in prompts]
        if not token_lists:
            raise ValueError("no prompts")
        width = min(self._c.n_seq_max, self._c.n_batch)
        if len(token_lists) > width:
            raise ValueError(
                f"{len(token_lists)} prompts exceed what one batch holds here ({width}: min of n_seq_max "
                f"{self._c.n_seq_max} and n_batch {self._c.n_batch}); split them"
            )
        if steers is None:
            steer_lists: list[list[Steer]] = [[] for _ in token_lists]
        else:
            if len(steers) != len(token_lists):
                raise ValueError(f"{len(steers)} steers for {len(token_lists)} prompts")
            steer_lists = [as_steers(s) for s in steers]
        for sl in steer_lists:
            self._engine.check_steers(sl)
        token_lists = [prepare_prompt(t, sl) for t, sl in zip(token_lists, steer_lists)]
        return token_lists, steer_lists

    def generate(
        self, prompt: Prompt, *, steer: Steer | Sequence[Steer] | None = None, **sampling: Any
    ) -> Iterator[Token]:
        """Sample from ``prompt`` token by token.

        ``steer`` is a :class:`Steer` or a list of them (they compose), applied
        for this call only. Other keyword arguments are those of
        :class:`SamplingParams` (``max_tokens``, ``temperature``, ``top_k``,
        ``top_p``, ``min_p``, ``repeat_penalty``, ``seed``, ``stop``). Stops at
        an end-of-generation token, a stop string (not included in the
        output), ``max_tokens`` or the end of the context. Breaking out of the
        loop leaves the model usable; starting another call ends this one.
        """
        params = SamplingParams.from_kwargs(**sampling)
        steers = as_steers(steer)
        tokens = prepare_prompt(self._engine.prompt_tokens(prompt), steers)
        # Mistakes surface here, not at the first next().
        self._engine.check_steers(steers)
        return (tok for _, tok in self._run([tokens], [steers], params))

    def generate_batch(
        self,
        prompts: Sequence[Prompt],
        steers: Sequence[Steer | Sequence[Steer] | None] | None = None,
        **sampling: Any,
    ) -> Iterator[tuple[int, Token]]:
        """Sample every prompt as its own sequence in one decode loop.

        ``steers[i]`` (a :class:`Steer`, a list or None) steers sequence i
        only: e.g. one prompt at several strengths is a sweep in one batch.
        Yields ``(i, token)`` as tokens are sampled; each sequence stops on
        its own. With ``seed`` set, sequence i samples with ``seed + i``.
        """
        token_lists, steer_lists = self._batch_args(prompts, steers)
        params = SamplingParams.from_kwargs(**sampling)
        return self._run(token_lists, steer_lists, params)

    def chat(
        self,
        messages: Sequence[Message],
        *,
        steer: Steer | Sequence[Steer] | None = None,
        **sampling: Any,
    ) -> Iterator[Token]:
        """The assistant's reply to ``messages`` (``[{"role", "content"}, ...]``),
        formatted with the model's chat template, token by token."""
        return self.generate(self.apply_chat_template(messages), steer=steer, **sampling)

    def complete(self, prompt: Prompt, *, steer: Steer | Sequence[Steer] | None = None, **sampling: Any) -> str:
        """The text :meth:`generate` produces, joined: one call under the
        model's lock, so another thread's call waits instead of ending it."""
        with self._engine.lock:
            return "".join(t.text for t in self.generate(prompt, steer=steer, **sampling))

    def _run(
        self, token_lists: list[list[int]], steers: list[list[Steer]], params: SamplingParams
    ) -> Iterator[tuple[int, Token]]:
        """The decode loop behind generate and generate_batch.

        Native work runs under the model's lock, one step at a time (sample
        every active sequence, then decode their tokens); the lock is not
        held while the caller holds a yielded token, so a suspended
        generator never blocks another thread. A call that took the model in
        between ends this one: the next step raises SupersededError."""
        eng = self._engine
        model, n_vocab = eng.model, eng.n_vocab
        session: SteeringSession | None = None
        try:
            with eng.lock:
                call_id, session = self._start(token_lists, steers)
            seqs = [
                _Sequence(i, len(t), params.with_seed_offset(i).make_sampler(n_vocab), TextStream(params.stop))
                for i, t in enumerate(token_lists)
            ]
            rows = list(range(len(token_lists)))
            used = sum(len(t) for t in token_lists)
            active = seqs if params.max_tokens > 0 else []
            decode_first = False  # the prompt's logits are there already
            while active:
                out: list[tuple[int, Token]] = []
                step: list[_Sequence] = []
                with eng.lock:
                    eng.check_current(call_id)
                    ctx = eng.ctx
                    if decode_first:
                        session.update(active[0].n_generated)  # sequences advance in lockstep
                        ctx.decode_step(
                            [sq.held[0] for sq in active],  # type: ignore[index]
                            [sq.n_prompt + sq.n_generated - 1 for sq in active],
                            [sq.index for sq in active],
                        )
                        used += len(active)
                        rows = {sq.index: j for j, sq in enumerate(active)}  # type: ignore[assignment]
                    for sq in active:
                        token_id, logprob = sq.sampler.sample(ctx, rows[sq.index])
                        if model.is_eog(token_id):
                            out.extend(sq.finish())
                            continue
                        text, stopped = sq.stream.push(model.token_to_piece(token_id, False))
                        # A token is yielded once the next one is sampled (or its
                        # sequence ends), so text held back at the end (a split
                        # character, a possible stop string) joins the last token.
                        if sq.held is not None:
                            out.append((sq.index, Token(*sq.held)))
                        sq.held = (token_id, text, float(logprob))
                        sq.n_generated += 1
                        if stopped or sq.n_generated >= params.max_tokens:
                            out.extend(sq.finish())
                            continue
                        step.append(sq)
                    if used + len(step) > ctx.n_ctx:  # the cache is full: nothing more can be decoded
                        for sq in step:
                            out.extend(sq.finish())
                        step = []
                yield from out
                active, decode_first = step, True
        finally:
            if session is not None:
                with eng.lock:
                    eng.end(session)


class _Sequence:
    """Sampling state of one sequence of a call."""

    __slots__ = ("index", "n_prompt", "sampler", "stream", "held", "n_generated")

    def __init__(self, index: int, n_prompt: int, sampler: _core.Sampler, stream: TextStream) -> None:
        self.index = index
        self.n_prompt = n_prompt
        self.sampler = sampler
        self.stream = stream
        self.held: tuple[int, str, float] | None = None
        self.n_generated = 0

    def finish(self) -> Iterator[tuple[int, Token]]:
        if self.held is not None:
            token_id, text, logprob = self.held
            self.held = None
            yield self.index, Token(token_id, text + self.stream.flush(), logprob)
