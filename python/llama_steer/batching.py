"""Continuous batching: requests join a running decode and leave it on their own.

A :class:`Batcher` owns a :class:`~llama_steer.Model` from one scheduler
thread. Each request gets its own KV sequence, sampler and steering (bound
through a :class:`~llama_steer.steer.SlotPool`, so requests with different
vectors and strengths share one ``llama_decode``). Every step:

1. requests queued in arrival order are admitted while a sequence, the
   steering slots they need and room in the KV cache are free (the room is
   reserved up front: prompt plus ``max_tokens``, so a running request never
   meets a full cache);
2. one chunk (``prefill_chunk`` tokens) of one admitted prompt is decoded on
   its own, so a long prompt delays the running streams by one chunk per step,
   not by its whole length;
3. one token of every sequence whose prompt is in is decoded together and
   each samples its next token. A prompt's last token joins this step, as in
   :meth:`Model.generate_batch`. A conditional Steer (CAST) is decided on the
   rows captured while its prompt decodes, before its first generated token.

A request computes what it computes alone, but its KV cells land wherever
the shared cache has room, so the attention sums run in another order: on a
full-precision model the text is the same (the tests check it exactly); on a
quantized one that last-bit difference can change a greedy token, as any
two runs that differ in op order can.

Events go to each request's callback outside the model's lock; a callback
must be quick (the server's puts them on an asyncio queue). The model must
not be used by other threads while the batcher runs; exclusive work (e.g.
extracting a vector) goes through :meth:`Batcher.run_exclusive`, which waits
for the running requests to finish and holds new ones back meanwhile.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

from . import _core
from .errors import BusyError, ClosedError, LlamaSteerError, SupersededError
from .sampling import SamplingParams, TextStream
from .steer import SlotPool, Steer, check_fits, prepare_prompt

if TYPE_CHECKING:
    from .model import Model
    from .steer import _Binding

FinishReason = Literal["stop", "length", "cancelled", "error"]
_MAX_CAPTURE_OUTPUTS = 64  # rows per capture chunk, as Model's prefill (the same numbers)


@dataclass(frozen=True)
class TokenEvent:
    """A sampled token: its id, the text it completes (may be empty while a
    UTF-8 character or a possible stop string is pending), its log-probability
    and, when asked for, the top alternatives ``[(id, logprob), ...]``."""

    token: int
    text: str
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class ConditionOutcome:
    """What a conditional Steer's condition decided on the prompt."""

    steer: int  # index into the request's steers
    similarity: float
    held: bool


@dataclass(frozen=True)
class DoneEvent:
    """The request ended: why, text still held back, token counts, and what
    its conditions (CAST) decided."""

    finish_reason: FinishReason
    text: str
    n_prompt: int
    n_generated: int
    error: BaseException | None = None
    conditions: tuple[ConditionOutcome, ...] = ()


Event = TokenEvent | DoneEvent


@dataclass
class Request:
    """One completion: prompt tokens, steering, sampling, and where events go."""

    tokens: Sequence[int]
    on_event: Callable[[Event], None]
    steers: Sequence[Steer] = ()
    params: SamplingParams = field(default_factory=SamplingParams)
    top_logprobs: int = 0


class Ticket:
    """A submitted request; :meth:`cancel` frees its sequence at the next step."""

    def __init__(self) -> None:
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


@dataclass
class _Running:
    req: Request
    ticket: Ticket
    tokens: list[int]
    sampler: _core.Sampler
    stream: TextStream
    seq: int = -1
    pos: int = 0  # prompt tokens decoded so far (the last one is decoded with the step)
    n_generated: int = 0
    last: int = -1  # the sampled token the next step decodes
    bindings: list[_Binding] = field(default_factory=list)
    # CAST: layers its conditions read, running sums of the prompt's rows
    # there (for "mean" reads), and what they decided
    cond_layers: list[int] = field(default_factory=list)
    cond_sums: dict[int, np.ndarray[Any, Any]] = field(default_factory=dict)
    conditions: list[ConditionOutcome] = field(default_factory=list)

    @property
    def mean_reads(self) -> bool:
        return any(s.condition is not None and s.condition.read == "mean" for s in self.req.steers)

    @property
    def need(self) -> int:
        """KV cells reserved: the prompt plus every token it may generate."""
        return len(self.tokens) + self.req.params.max_tokens


@dataclass
class BatcherStats:
    """Counters since start, and the state now."""

    requests: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    steps: int = 0
    queued: int = 0
    active: int = 0
    slots_in_use: int = 0
    n_slots: int = 0
    kv_reserved: int = 0
    n_ctx: int = 0
    started: float = field(default_factory=time.monotonic)


class Batcher:
    """Continuous batching over ``model`` (see the module docstring).

    ``n_parallel``: sequences decoded together (at most the model's
    ``n_seq_max`` and ``n_batch``); ``max_queue``: requests waiting beyond
    those before :meth:`submit` raises :class:`BusyError`.
    """

    def __init__(self, model: Model, *, n_parallel: int = 4, prefill_chunk: int = 128, max_queue: int = 64) -> None:
        eng = model.engine
        ctx = eng.ctx
        limit = min(ctx.n_seq_max, ctx.n_batch)
        if not 1 <= n_parallel <= limit:
            raise ValueError(
                f"n_parallel must be in [1, {limit}] (the model's n_seq_max and n_batch), got {n_parallel}"
            )
        if not 1 <= prefill_chunk <= ctx.n_batch:
            raise ValueError(f"prefill_chunk must be in [1, {ctx.n_batch}] (n_batch), got {prefill_chunk}")
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self._model = model
        self._eng = eng
        # read once: submit() runs on other threads and must not enter the
        # context while the scheduler decodes
        with eng.lock:
            self._n_slots = ctx.steer_n_slots
            self._hooked = frozenset(il for il in range(eng.n_layer) if ctx.steer_layer_hooked(il))
        self._arch, self._n_ctx, self._n_vocab = eng.arch, eng.n_ctx, eng.n_vocab
        self._n_parallel, self._chunk, self._max_queue = n_parallel, prefill_chunk, max_queue
        self._cv = threading.Condition()
        self._queue: deque[_Running] = deque()
        self._jobs: deque[tuple[Callable[[Model], Any], concurrent.futures.Future[Any]]] = deque()
        self._active: dict[int, _Running] = {}
        self._free = list(range(n_parallel - 1, -1, -1))
        self._reserved = 0
        self._pool: SlotPool | None = None
        self._call_id: int | None = None
        self._stats = BatcherStats(n_ctx=ctx.n_ctx, n_slots=ctx.steer_n_slots)
        self._thread: threading.Thread | None = None
        self._stopping = False

    # -- lifetime ---------------------------------------------------------------
    def start(self) -> Batcher:
        """Run the scheduler in a daemon thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="llama-steer-batcher", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop the scheduler; queued and running requests end with
        ``finish_reason="cancelled"`` and pending jobs are cancelled."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        events: list[tuple[_Running, Event]] = []
        with self._eng.lock:
            for r in [*self._queue, *self._active.values()]:
                events.append((r, self._finish(r, "cancelled")))
            self._queue.clear()
            if self._pool is not None and not self._eng.closed:
                self._pool.close()
                self._eng.ctx.clear()
            self._pool = None
        for _, fut in self._jobs:
            fut.cancel()
        self._deliver(events)

    def __enter__(self) -> Batcher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- submitting -------------------------------------------------------------
    def submit(self, req: Request) -> Ticket:
        """Queue ``req``; raises ValueError/SteeringError for a request that
        could never run here, :class:`BusyError` when the queue is full."""
        tokens = prepare_prompt(list(req.tokens), list(req.steers))
        if not tokens:
            raise ValueError("the prompt is empty")
        check_fits(None, req.steers, self._eng.n_layer, self._eng.n_embd, self._arch, self._hooked)
        if not 0 <= req.top_logprobs <= 20:
            raise ValueError(f"top_logprobs must be in [0, 20], got {req.top_logprobs}")
        r = _Running(req, Ticket(), tokens, req.params.make_sampler(self._n_vocab), TextStream(req.params.stop))
        r.cond_layers = sorted({s.condition.layer for s in req.steers if s.condition is not None})
        if r.need > self._n_ctx:
            raise ValueError(
                f"the prompt ({len(tokens)} tokens) plus max_tokens ({req.params.max_tokens}) exceed "
                f"the context of {self._n_ctx} tokens"
            )
        if len(req.steers) > self._n_slots:  # it would wait forever
            raise ValueError(f"{len(req.steers)} steers, more than the {self._n_slots} steering slots of the model")
        with self._cv:
            if self._stopping:
                raise ClosedError("the batcher is closed")
            if len(self._queue) >= self._max_queue + max(0, self._n_parallel - len(self._active)):
                raise BusyError(f"{len(self._queue)} requests are waiting; try again later")
            self._queue.append(r)
            self._cv.notify_all()
        return r.ticket

    def run_exclusive(self, fn: Callable[[Model], Any]) -> concurrent.futures.Future[Any]:
        """Run ``fn(model)`` in the scheduler thread once no request is
        running (new ones wait meanwhile); its result or exception lands in
        the returned future."""
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._cv:
            if self._stopping:
                raise ClosedError("the batcher is closed")
            self._jobs.append((fn, fut))
            self._cv.notify_all()
        return fut

    def stats(self) -> BatcherStats:
        """A snapshot of the counters."""
        with self._cv:
            s = BatcherStats(**vars(self._stats))
            s.queued, s.active, s.kv_reserved = len(self._queue), len(self._active), self._reserved
            s.slots_in_use = self._pool.in_use if self._pool is not None else 0
        return s

    # -- the scheduler ------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not (self._queue or self._active or self._jobs):
                    self._cv.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as exc:  # noqa: BLE001 - the thread must survive; requests get the error
                self._fail_all(exc)

    def step(self) -> None:
        """One scheduling step (what the thread runs; callable directly when
        no thread was started)."""
        events: list[tuple[_Running, Event]] = []
        with self._eng.lock:
            self._own()
            if self._jobs and not self._active:
                self._run_job()
                return
            self._reap(events)
            if not self._jobs:
                self._admit(events)
            if self._active:
                self._prefill()
                self._decode(events)
                self._stats.steps += 1
        self._deliver(events)

    def _own(self) -> None:
        """Take the model's context (again, after a job or another call)."""
        eng = self._eng
        if self._call_id is not None:
            try:
                eng.check_current(self._call_id)
                return
            except SupersededError as exc:
                # another caller used the model: our KV and slots are gone
                self._fail_all(exc)
        norms = None
        with contextlib.suppress(LlamaSteerError):
            norms = eng.residual_norms()  # cached; decodes once, before anything is bound
        self._call_id, _ = eng.begin({}, {})
        eng.ctx.clear()
        self._pool = SlotPool(eng.ctx, eng.n_layer, eng.n_embd, norms)

    def _run_job(self) -> None:
        fn, fut = self._jobs.popleft()
        if not fut.set_running_or_notify_cancel():
            return
        if self._pool is not None:
            self._pool.close()
        self._call_id = None  # the job's own calls take the context; re-own afterwards
        try:
            fut.set_result(fn(self._model))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            fut.set_exception(exc)

    def _reap(self, events: list[tuple[_Running, Event]]) -> None:
        for r in [r for r in self._active.values() if r.ticket.cancelled]:
            events.append((r, self._finish(r, "cancelled")))
        with self._cv:
            for r in [r for r in self._queue if r.ticket.cancelled]:
                self._queue.remove(r)
                events.append((r, self._finish(r, "cancelled")))

    def _admit(self, events: list[tuple[_Running, Event]]) -> None:
        assert self._pool is not None
        ctx = self._eng.ctx
        while self._free:
            with self._cv:
                if not self._queue:
                    return
                r = self._queue[0]
                if self._reserved + r.need > self._eng.n_ctx or not self._pool.fits(r.req.steers):
                    return  # in order: the head waits for room
                self._queue.popleft()
            r.seq = self._free.pop()
            self._reserved += r.need
            self._active[r.seq] = r
            self._stats.requests += 1
            self._stats.prompt_tokens += len(r.tokens)
            try:
                ctx.seq_rm(r.seq, 0, -1)
                r.bindings = self._pool.bind(r.seq, r.req.steers, len(r.tokens))
            except LlamaSteerError as exc:
                events.append((r, self._finish(r, "error", exc)))

    def _prefill(self) -> None:
        r = next((r for r in self._active.values() if r.pos < len(r.tokens) - 1), None)
        if r is None:
            return
        k = min(self._chunk, len(r.tokens) - 1 - r.pos)
        span = range(r.pos, r.pos + k)
        capture = r.mean_reads
        batch = _core.BatchTokens(r.tokens[r.pos : r.pos + k], list(span), [r.seq] * k, [int(capture)] * k)
        if capture:  # a condition reads the mean over the prompt: every row, as Model's prefill does
            rows = self._captured(batch, r.cond_layers)
            for j, layer in enumerate(r.cond_layers):
                part = rows[:, j].sum(axis=0, dtype=np.float64)
                r.cond_sums[layer] = r.cond_sums[layer] + part if layer in r.cond_sums else part
        else:
            self._eng.ctx.decode(batch)
        r.pos += k

    def _captured(
        self, batch: _core.BatchTokens, layers: list[int], max_outputs: int = _MAX_CAPTURE_OUTPUTS
    ) -> npt.NDArray[np.float32]:
        """Decode ``batch`` capturing ``layers``: [n_outputs, n_layers, n_embd]."""
        ctx = self._eng.ctx
        ctx.set_capture_layers(layers)
        try:
            flat = np.asarray(ctx.decode_capture(batch, max_outputs), dtype=np.float32)
        finally:
            ctx.set_capture_layers([])
        return flat.reshape(-1, len(layers), self._eng.n_embd)

    def _decide(self, r: _Running, last: npt.NDArray[np.float32], layers: list[int]) -> None:
        """Decide ``r``'s conditions from its prompt's captured rows (``last``:
        the last token's row at ``layers``); unbind the steers whose condition
        does not hold, before the first generated token is decoded."""
        assert self._pool is not None
        for i, s in enumerate(r.req.steers):
            cond = s.condition
            if cond is None:
                continue
            row = last[layers.index(cond.layer)]
            if cond.read == "mean":
                total = r.cond_sums.get(cond.layer, 0.0) + row.astype(np.float64)
                row = (total / len(r.tokens)).astype(np.float32)
            sim = float(cond.similarity(row))
            held = cond.meets(sim)
            r.conditions.append(ConditionOutcome(i, sim, held))
            if not held:
                gone = [b for b in r.bindings if b.steer is s]
                self._pool.unbind(gone)
                r.bindings = [b for b in r.bindings if b.steer is not s]

    def _decode(self, events: list[tuple[_Running, Event]]) -> None:
        assert self._pool is not None
        ready = [r for r in self._active.values() if r.pos >= len(r.tokens) - 1]
        if not ready:
            return
        ctx, model = self._eng.ctx, self._eng.model
        tokens, pos = [], []
        for r in ready:
            if r.n_generated == 0:
                tokens.append(r.tokens[-1])
                pos.append(len(r.tokens) - 1)
            else:
                self._pool.update(r.bindings, r.n_generated)
                tokens.append(r.last)
                pos.append(len(r.tokens) + r.n_generated - 1)
        batch = _core.BatchTokens(tokens, pos, [r.seq for r in ready], [1] * len(ready))
        deciding = [(j, r) for j, r in enumerate(ready) if r.cond_layers and r.n_generated == 0]
        if deciding:
            layers = sorted({layer for _, r in deciding for layer in r.cond_layers})
            # one chunk (every row's logits survive), as Model's prefill decodes the last tokens
            rows = self._captured(batch, layers, max(len(ready), _MAX_CAPTURE_OUTPUTS))
            for j, r in deciding:
                self._decide(r, rows[j], layers)
        else:
            ctx.decode(batch)
        for j, r in enumerate(ready):
            token, logprob = r.sampler.sample(ctx, j)
            if model.is_eog(token):
                events.append((r, self._finish(r, "stop")))
                continue
            top: tuple[tuple[int, float], ...] = ()
            if r.req.top_logprobs:
                top = _top_logprobs(ctx.logits(j), r.req.top_logprobs)
            text, stopped = r.stream.push(model.token_to_piece(token, False))
            r.n_generated += 1
            r.last = token
            self._stats.generated_tokens += 1
            events.append((r, TokenEvent(token, text, float(logprob), top)))
            if stopped:
                events.append((r, self._finish(r, "stop")))
            elif r.n_generated >= r.req.params.max_tokens:
                events.append((r, self._finish(r, "length")))

    def _finish(self, r: _Running, reason: FinishReason, error: BaseException | None = None) -> DoneEvent:
        """Free ``r``'s sequence, steering and KV room (the lock held)."""
        if r.seq >= 0 and self._active.get(r.seq) is r:
            del self._active[r.seq]
            if self._pool is not None:
                self._pool.unbind(r.bindings)
            r.bindings = []
            if not self._eng.closed:
                self._eng.ctx.seq_rm(r.seq, 0, -1)
            self._free.append(r.seq)
            self._reserved -= r.need
        return DoneEvent(reason, r.stream.flush(), len(r.tokens), r.n_generated, error, tuple(r.conditions))

    def _fail_all(self, exc: BaseException) -> None:
        """End every running and queued request with ``exc`` (a step failed:
        their KV state can no longer be trusted)."""
        with self._eng.lock:  # re-entrant: also called with it held
            events = [(r, self._finish(r, "error", exc)) for r in list(self._active.values())]
            with self._cv:
                events += [(r, self._finish(r, "error", exc)) for r in self._queue]
                self._queue.clear()
            self._call_id = None
        self._deliver(events)

    @staticmethod
    def _deliver(events: Sequence[tuple[_Running, Event]]) -> None:
        for r, ev in events:
            with contextlib.suppress(Exception):  # a broken callback must not stop the others
                r.req.on_event(ev)


def _top_logprobs(logits: Any, k: int) -> tuple[tuple[int, float], ...]:
    x = np.asarray(logits, dtype=np.float64)
    m = float(x.max())
    lse = m + float(np.log(np.exp(x - m).sum()))
    idx = np.argpartition(-x, k)[:k]
    idx = idx[np.argsort(-x[idx])]
    return tuple((int(i), float(x[i] - lse)) for i in idx)
