"""The decode layer under :class:`~llama_steer.Model`.

An :class:`Engine` owns one llama.cpp model and its context, and the rules
every call on them follows:

- **One call at a time.** A per-model lock (re-entrant) is held for each
  call, and for each step of a generator (from a resume to its next yield),
  so two threads on one model are serialized instead of entering llama.cpp
  together. The GIL is released inside decode, so waiting threads and other
  Python work still run.
- **A call owns the context.** It begins by ending the previous call's
  steering and bumping the call id; a suspended generator of an earlier
  call then raises :class:`~llama_steer.errors.SupersededError` when
  resumed.
- **Steering is scoped.** The steering a call binds is undone when the
  call ends, whatever way it ends.

Modules that decode (``model``, ``extraction``, ``scoring``, ``actadd``,
``conditions``) stand on this layer; it imports none of them, so the arrows
point one way.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Collection, Iterator, Mapping, Sequence
from importlib import resources
from pathlib import Path

import numpy as np
import numpy.typing as npt

from . import _core
from .errors import ClosedError, ContextOverflowError, SteeringError, SupersededError
from .steer import Steer, SteeringSession, apply_steering, check_fits

Prompt = str | Sequence[int]


class Engine:
    """A llama.cpp model and context, with the per-model lock and the call
    protocol described in this module's docstring."""

    def __init__(
        self,
        path: Path,
        *,
        n_ctx: int,
        n_threads: int | None,
        n_gpu_layers: int,
        n_batch: int,
        n_seq_max: int,
        n_steer_slots: int,
        kv_cache: str = "f16",
        rpc: Sequence[str] = (),
    ) -> None:
        self.lock = threading.RLock()
        self._model: _core.Model | None = _core.Model(str(path), n_gpu_layers, rpc=list(rpc))
        params = _core.ContextParams()
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = n_batch
        params.n_seq_max = n_seq_max
        params.n_threads = n_threads or 0
        params.kv_f32 = kv_cache == "f32"
        self._ctx: _core.Context | None = _core.Context(self._model, params)
        # A graph without a steering hook still generates; any Steer is then
        # refused by check_steers with a clear error.
        with contextlib.suppress(SteeringError):
            self._ctx.steer_init(n_steer_slots, 1)
        self._call_id = 0  # bumped by every call that takes the context
        self._steering: SteeringSession | None = None
        self._norms: dict[int, float] | None = None

    # -- lifetime -------------------------------------------------------------
    def close(self) -> None:
        """Free the context and the weights (idempotent). Waits for a call
        running in another thread to finish its step."""
        with self.lock:
            self.end()
            if self._ctx is not None:
                self._ctx.close()
            self._ctx = None
            self._model = None
            self._call_id += 1  # a suspended generator raises ClosedError/Superseded, never touches freed memory

    @property
    def closed(self) -> bool:
        return self._ctx is None

    @property
    def model(self) -> _core.Model:
        """The core model; raises ClosedError after close."""
        if self._model is None:
            raise ClosedError("the model is closed")
        return self._model

    @property
    def ctx(self) -> _core.Context:
        """The core context; raises ClosedError after close."""
        if self._ctx is None:
            raise ClosedError("the model is closed")
        return self._ctx

    @property
    def n_layer(self) -> int:
        return int(self.model.n_layer)

    @property
    def n_embd(self) -> int:
        return int(self.model.n_embd)

    @property
    def n_vocab(self) -> int:
        return int(self.model.n_vocab)

    @property
    def n_ctx(self) -> int:
        return int(self.ctx.n_ctx)

    @property
    def arch(self) -> str:
        return str(self.model.meta("general.architecture"))

    # -- text -----------------------------------------------------------------
    def prompt_tokens(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt: a str (BOS added, chat markup parsed) or ids.
        Raises ValueError when empty, ContextOverflowError when it leaves no
        room to generate."""
        if isinstance(prompt, str):
            tokens = [int(t) for t in self.model.tokenize(prompt, True, True)]
        else:
            tokens = [int(t) for t in prompt]
        if not tokens or (isinstance(prompt, str) and not prompt):
            raise ValueError("the prompt is empty")
        if len(tokens) >= self.n_ctx:
            raise ContextOverflowError(
                f"the prompt has {len(tokens)} tokens; the context holds {self.n_ctx} (leave room to generate)"
            )
        return tokens

    def check_steers(self, steers: Sequence[Steer]) -> None:
        """Raise unless every steer fits this model (size, layers, hooks, the
        architecture an ActAdd was built on)."""
        with self.lock:  # reads the context's hook table
            check_fits(self.ctx, steers, self.n_layer, self.n_embd, self.arch)

    # -- the call protocol ----------------------------------------------------
    def begin(self, per_seq: Mapping[int, Sequence[Steer]], n_prompt: Mapping[int, int]) -> tuple[int, SteeringSession]:
        """Begin a call (the lock must be held): end the previous call's
        steering, take a new call id and bind sequence s to ``per_seq[s]``
        (windows computed from ``n_prompt[s]``). Returns the call id and its
        steering session, which is the engine's until :meth:`end` or the
        next begin."""
        self.end()
        norms: dict[int, float] | None = None
        if any(s.unit == "relative" and s.recorded_norms is None for steers in per_seq.values() for s in steers):
            norms = self.residual_norms()  # before anything is bound: it decodes
        self._call_id += 1
        self._steering = apply_steering(self.ctx, self.n_layer, self.n_embd, per_seq, n_prompt, norms)
        return self._call_id, self._steering

    def residual_norms(self) -> dict[int, float]:
        """Mean L2 norm of the residual stream at each layer (the output of
        block N, N >= 1), over the tokens of the bundled neutral reference
        text (the first token, an attention sink with an outsized norm,
        left out). Measured once per model (one prompt decode), then cached."""
        with self.lock:
            if self._norms is None:
                tokens = self.model.tokenize(reference_text(), True, False)[: min(_NORM_TOKENS, self.n_ctx - 1)]
                layers = list(range(1, self.n_layer))
                n = len(tokens)
                # call() ends by turning capture off and clearing the cache (capture-only leaves no logits)
                with self.call():
                    ctx = self.ctx
                    ctx.clear()  # the last call may have left sequences behind
                    ctx.set_capture_layers(layers)
                    # capture-only: every token's rows, no LM head (a fresh extract pays this)
                    batch = _core.BatchTokens(tokens, list(range(n)), [0] * n, [1] * n)
                    rows = np.asarray(ctx.decode_capture(batch, n, logits=False), dtype=np.float32)
                norms = np.linalg.norm(rows[1:].astype(np.float64), axis=-1).mean(axis=0)
                # float32, as a vector file stores them: recorded and measured norms agree exactly
                self._norms = {k: float(np.float32(v)) for k, v in zip(layers, norms)}
            return dict(self._norms)

    @property
    def session(self) -> SteeringSession | None:
        """The current call's steering, or None between calls."""
        return self._steering

    def end(self, session: SteeringSession | None = None) -> None:
        """End the current call's steering (idempotent); given a ``session``,
        close it, and end the call only if it is still that session's."""
        if session is not None and session is not self._steering:
            session.close()
            return
        if self._steering is not None:
            self._steering.close()
            self._steering = None
        if self._ctx is not None and self._ctx.capture_layers:
            self._ctx.set_capture_layers([])  # left on by an interrupted capture

    @contextlib.contextmanager
    def call(
        self, per_seq: Mapping[int, Sequence[Steer]] | None = None, n_prompt: Mapping[int, int] | None = None
    ) -> Iterator[SteeringSession]:
        """A whole call under the lock: :meth:`begin`, the body, :meth:`end`
        and a cleared KV cache, whatever way the body leaves."""
        with self.lock:
            _, session = self.begin(per_seq or {}, n_prompt or {})
            try:
                yield session
            finally:
                self.end()
                if not self.closed:
                    self.ctx.clear()

    def check_current(self, call_id: int) -> None:
        """Raise if another call took the context since call ``call_id``
        began (a suspended generator resumed after it), or it was closed."""
        if self._ctx is None:
            raise ClosedError("the model is closed")
        if call_id != self._call_id:
            raise SupersededError("this generation was ended by a newer call on the same model")

    def prefill(
        self,
        token_lists: Sequence[Sequence[int]],
        capture_layers: Sequence[int] = (),
        all_rows: Collection[int] = (),
    ) -> PrefillCapture | None:
        """Decode prompts (sequence i gets ``token_lists[i]``) into a cleared
        cache; afterwards batch row i holds the logits after prompt i.

        Each prompt but its last token is decoded on its own, then the last
        tokens of all prompts together: ggml's CPU attention switches kernels
        with the number of rows in a ubatch, so this keeps a sequence's
        numbers the same whether it runs alone or beside others (a sweep in
        one batch gives the texts of separate runs).

        With ``capture_layers``, the same decode also captures the residual
        stream there: each prompt's last token, and every token of the
        sequences in ``all_rows``. The KV cache is the same as without
        capture, so what is generated afterwards does not change; a prompt
        of up to 65 tokens is also split exactly as without capture (longer
        ones in ``all_rows`` are decoded 64 tokens at a time: each output
        row costs llama.cpp a logits row, and its buffer never shrinks).
        """
        ctx = self.ctx
        total = sum(len(t) for t in token_lists)
        if total >= ctx.n_ctx:
            raise ContextOverflowError(f"the prompts hold {total} tokens; the context holds {ctx.n_ctx}")
        ctx.clear()
        n = len(token_lists)
        heads: dict[int, npt.NDArray[np.float32]] = {}
        if capture_layers:
            ctx.set_capture_layers(list(capture_layers))
        try:
            for i, t in enumerate(token_lists):
                if len(t) > 1:
                    m = len(t) - 1
                    rows_wanted = bool(capture_layers) and i in all_rows
                    batch = _core.BatchTokens(list(t[:-1]), list(range(m)), [i] * m, [int(rows_wanted)] * m)
                    if rows_wanted:
                        heads[i] = np.asarray(ctx.decode_capture(batch, _MAX_CAPTURE_OUTPUTS), dtype=np.float32)
                    else:
                        ctx.decode(batch)
            pos = [len(t) - 1 for t in token_lists]
            if not capture_layers:
                ctx.decode_step([t[-1] for t in token_lists], pos, list(range(n)))
                return None
            last_batch = _core.BatchTokens([t[-1] for t in token_lists], pos, list(range(n)), [1] * n)
            last = np.asarray(ctx.decode_capture(last_batch, max(n, _MAX_CAPTURE_OUTPUTS)), dtype=np.float32)
        finally:
            if capture_layers and not self.closed:
                ctx.set_capture_layers([])
        return PrefillCapture(list(capture_layers), last, heads)


def reference_text() -> str:
    """The bundled neutral text: residual norms (relative strengths) and the
    damage of a steering plan are measured on it."""
    return resources.files("llama_steer").joinpath("data/reference.txt").read_text(encoding="utf-8")


# Tokens of the reference text residual norms are measured on: enough for a
# stable mean (two capture chunks), short enough to take well under a second.
_NORM_TOKENS = 128

# Output rows per decode chunk while capturing (see Engine.prefill).
_MAX_CAPTURE_OUTPUTS = 64


class PrefillCapture:
    """Residual streams captured while prompts were decoded (:meth:`Engine.prefill`)."""

    def __init__(
        self, layers: list[int], last: npt.NDArray[np.float32], heads: dict[int, npt.NDArray[np.float32]]
    ) -> None:
        self.layers = layers
        self._last = last  # [n_seq, n_layers, n_embd]
        self._heads = heads  # seq -> [n_tokens - 1, n_layers, n_embd]

    def rows(self, seq: int) -> npt.NDArray[np.float32]:
        """Every captured row of ``seq`` (it must have been in ``all_rows``): [n_tokens, n_layers, n_embd]."""
        last = self._last[seq : seq + 1]
        head = self._heads.get(seq)
        return last if head is None else np.concatenate([head, last])

    def read(self, seq: int, layer: int, how: str) -> npt.NDArray[np.float32]:
        """Sequence ``seq``'s hidden state [n_embd] at ``layer``: ``"last"``
        or ``"mean"`` (over its tokens; the sequence must be in ``all_rows``)."""
        j = self.layers.index(layer)
        if how == "last":
            row: npt.NDArray[np.float32] = self._last[seq, j]
            return row
        mean: npt.NDArray[np.float32] = self.rows(seq)[:, j].mean(axis=0, dtype=np.float64).astype(np.float32)
        return mean
