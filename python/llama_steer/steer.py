"""``Steer``: what to add to (or project out of) the residual stream, and how
it is put into the steering buffer's slots for one call.

A ``Steer`` is an argument of a call (``generate``, ``complete``, ``logits``,
...): it is applied for that call only and undone when the call ends, so a
model never carries hidden steering state.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np
import numpy.typing as npt

from .actadd import ActAdd
from .conditions import Condition
from .errors import SteeringError
from .vectors import ControlVector, check_layer

if TYPE_CHECKING:
    from . import _core

Positions = Literal["all", "prompt", "generated"] | tuple[int, int]
Strength = float | Sequence[float] | Callable[[int], float]
UNBOUNDED = -1  # the steering buffer's "no end" for a position window


@dataclass(frozen=True)
class Steer:
    """Steer with ``vector`` at ``strength``.

    - ``vector``: a :class:`ControlVector`, or a mapping layer -> float32
      array of length n_embd (layer N is the output of block N, N >= 1), or
      an :class:`~llama_steer.ActAdd` injection (rows added at prompt
      positions its ``location`` picks; then ``layers``, ``positions`` and
      ``mode`` keep their defaults).
    - ``strength``: a number, or a schedule evaluated per decode step ``i``
      (0 for the prompt, i for the i-th generated token's decode): a sequence
      (its last value holds after its end) or a callable ``i -> float``.
    - ``layers``: restrict to these layers (default: every layer of the vector).
    - ``positions``: ``"all"``, ``"prompt"`` (prompt tokens only),
      ``"generated"`` (generated tokens only) or ``(p0, p1)``: positions
      ``p0 <= pos < p1`` (``p1 = -1``: no end).
    - ``mode``: ``"add"`` adds ``strength * v``; ``"ablate"`` projects the
      direction of ``v`` out: ``x <- x - strength * r r^T x`` with ``r = v/|v|``
      (strength 1 removes the component entirely).
    - ``unit``: ``"absolute"`` (the default): the added vector is ``strength
      * v``; ``"relative"``: at each layer N the added vector has norm
      ``strength`` times the model's mean residual norm there (see
      :meth:`Model.residual_norms`), so one strength means the same push on
      models of any scale. Add mode only.
    - ``condition``: a :class:`~llama_steer.Condition` (CAST): the steering
      applies to a sequence's generated tokens only, and only if the
      condition holds on its prompt (decided once, after the prompt is
      decoded). ``positions`` must then be ``"all"`` or ``"generated"``.
    """

    vector: ControlVector | Mapping[int, npt.ArrayLike] | ActAdd
    strength: Strength = 1.0
    layers: Iterable[int] | None = None
    positions: Positions = "all"
    mode: Literal["add", "ablate"] = "add"
    condition: Condition | None = None
    unit: Literal["absolute", "relative"] = "absolute"
    _resolved: ControlVector | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.strength, (list, tuple, np.ndarray)):
            if len(self.strength) == 0:
                raise ValueError("a strength schedule needs at least one value")
            object.__setattr__(self, "strength", tuple(float(s) for s in self.strength))
        if self.condition is not None and not isinstance(self.condition, Condition):
            raise TypeError(f"condition must be a Condition, got {type(self.condition).__name__}")
        if self.condition is not None and self.positions not in ("all", "generated"):
            raise ValueError("a conditional Steer acts on generated tokens: positions must be 'all' or 'generated'")
        if self.unit not in ("absolute", "relative"):
            raise ValueError(f"unit must be 'absolute' or 'relative', got {self.unit!r}")
        if self.unit == "relative" and (self.mode != "add" or isinstance(self.vector, ActAdd)):
            raise ValueError("unit='relative' scales an added vector: it needs mode='add' and a vector (not an ActAdd)")
        if isinstance(self.vector, ActAdd):
            if self.layers is not None or self.positions != "all" or self.mode != "add":
                raise ValueError(
                    "an ActAdd sets its own layer and positions (its location) and only adds: "
                    "leave layers, positions and mode at their defaults"
                )
            if self.condition is not None:
                raise ValueError("an ActAdd acts on the prompt, before a condition can be decided")
            object.__setattr__(self, "_resolved", None)
            self.strength_at(0)
            return
        vec = self.vector if isinstance(self.vector, ControlVector) else ControlVector(self.vector)
        if self.layers is not None:
            layers = list(self.layers)
            object.__setattr__(self, "layers", tuple(layers))
            vec = vec.select(layers)
        object.__setattr__(self, "_resolved", vec)
        if self.mode not in ("add", "ablate"):
            raise ValueError(f"mode must be 'add' or 'ablate', got {self.mode!r}")
        if isinstance(self.positions, str):
            if self.positions not in ("all", "prompt", "generated"):
                raise ValueError(f"positions must be 'all', 'prompt', 'generated' or (p0, p1), got {self.positions!r}")
        else:
            try:
                p0, p1 = (int(p) for p in self.positions)
            except (TypeError, ValueError) as exc:
                raise ValueError(
                    f"positions must be 'all', 'prompt', 'generated' or (p0, p1), got {self.positions!r}"
                ) from exc
            if p0 < 0 or (p1 != UNBOUNDED and p1 <= p0):
                raise ValueError(f"position window ({p0}, {p1}) is empty or negative")
            object.__setattr__(self, "positions", (p0, p1))
        self.strength_at(0)  # validates numbers and callables early

    @property
    def control_vector(self) -> ControlVector:
        """The vector after ``layers`` selection (TypeError for an ActAdd)."""
        if self._resolved is None:
            raise TypeError("an ActAdd Steer has rows, not a control vector")
        return self._resolved

    @property
    def recorded_norms(self) -> dict[int, float] | None:
        """The residual norms the vector recorded, if they cover its layers
        (what a relative strength converts with, before measuring the model's)."""
        norms = self.control_vector.residual_norms
        if norms and all(k in norms for k in self.control_vector.layers):
            return norms
        return None

    def absolute(self, norms: Mapping[int, float]) -> Steer:
        """This Steer in absolute units, given the model's mean residual norm
        per layer (``norms``): each layer's direction rescaled to norm
        ``norms[N]``, so the same ``strength`` applies. An absolute Steer is
        returned as is. Raises :class:`SteeringError` for a layer without a norm."""
        if self.unit == "absolute":
            return self
        vec = self.control_vector
        missing = [k for k in vec.layers if k not in norms]
        if missing:
            raise SteeringError(f"no residual norm for layers {missing}: cannot convert a relative strength")
        out = {}
        for k, d in vec.items():
            n = float(np.linalg.norm(d))
            out[k] = d * np.float32(float(norms[k]) / n) if n > 0 else d
        scaled = ControlVector(out, vec.model_hint, vec.diagnostics, vec.residual_norms)
        return Steer(scaled, self.strength, positions=self.positions, condition=self.condition)

    @property
    def actadd(self) -> ActAdd | None:
        """The ActAdd injection, or None for a vector."""
        return self.vector if isinstance(self.vector, ActAdd) else None

    def strength_at(self, step: int) -> float:
        """The strength for decode step ``step`` (0 = the prompt)."""
        s = self.strength
        if callable(s):
            value = float(s(step))
        elif isinstance(s, tuple):
            value = s[min(step, len(s) - 1)]
        elif isinstance(s, (int, float, np.floating, np.integer)) and not isinstance(s, bool):
            value = float(s)
        else:
            raise TypeError(f"strength must be a number, a sequence or a callable, got {type(s).__name__}")
        if not math.isfinite(value):
            raise ValueError(f"strength at step {step} is not finite: {value}")
        return value

    @property
    def scheduled(self) -> bool:
        """Whether the strength is a list or a callable (changes per decode step)."""
        return callable(self.strength) or isinstance(self.strength, tuple)

    def window(self, n_prompt: int) -> tuple[int, int]:
        """Positions [p0, p1) steered for a prompt of ``n_prompt`` tokens."""
        if isinstance(self.vector, ActAdd):
            p0 = self.vector.start(n_prompt)
            return p0, p0 + self.vector.n_rows
        if self.condition is not None:
            return n_prompt, UNBOUNDED
        if self.positions == "all":
            return 0, UNBOUNDED
        if self.positions == "prompt":
            return 0, n_prompt
        if self.positions == "generated":
            return n_prompt, UNBOUNDED
        return self.positions


def prepare_prompt(tokens: list[int], steers: Sequence[Steer]) -> list[int]:
    """The prompt a sequence decodes under ``steers``: padded for an ActAdd
    with ``pad_prompt`` (see :meth:`ActAdd.prepare_prompt`). Every steer's
    window is computed here, so an injection that does not fit the prompt
    raises when the call is made, not at the first token."""
    injections = [s.actadd for s in steers if s.actadd is not None and s.actadd.pad_prompt]
    if len(injections) > 1:
        raise ValueError("at most one ActAdd with pad_prompt=True per sequence")
    out = injections[0].prepare_prompt(tokens) if injections else tokens
    for s in steers:
        s.window(len(out))
    return out


def as_steers(steer: Steer | Sequence[Steer] | None) -> list[Steer]:
    """One Steer, a sequence of them or None, as a list (type-checked)."""
    if steer is None:
        return []
    if isinstance(steer, Steer):
        return [steer]
    out = list(steer)
    for s in out:
        if not isinstance(s, Steer):
            raise TypeError(f"steer must be a Steer or a list of Steer, got {type(s).__name__}")
    return out


@dataclass
class _Binding:
    seq: int
    slot: int
    steer: Steer
    window: tuple[int, int]


class SteeringSession:
    """The slots and bindings of one call.

    Made by :func:`apply_steering`; :meth:`close` unbinds and clears
    everything it wrote (idempotent), so a model never keeps steering state
    beyond the call that asked for it.
    """

    def __init__(self, ctx: _core.Context) -> None:
        self._ctx = ctx
        self._bindings: list[_Binding] = []
        self._slots: list[int] = []
        self._open = True

    def update(self, step: int, seqs: Iterable[int] | None = None) -> None:
        """Re-bind scheduled strengths for decode step ``step`` (cheap: no rebuild)."""
        wanted = None if seqs is None else set(seqs)
        for b in self._bindings:
            if b.steer.scheduled and (wanted is None or b.seq in wanted):
                self._ctx.steer_bind(b.seq, b.slot, b.steer.strength_at(step), *b.window)

    def drop(self, seq: int, steer: Steer) -> None:
        """Unbind ``steer`` from sequence ``seq`` (a condition that did not hold)."""
        for b in list(self._bindings):
            if b.seq == seq and b.steer is steer:
                self._ctx.steer_unbind(b.seq, b.slot)
                self._bindings.remove(b)

    def close(self) -> None:
        """Unbind and clear everything this session wrote (idempotent)."""
        if not self._open:
            return
        if not self._ctx.closed and (self._slots or self._bindings):
            self._ctx.steer_unbind(-1, -1)
            for slot in self._slots:
                self._ctx.steer_clear(slot)
        self._open = False  # only now: an interrupt above leaves close() to be retried


def apply_steering(
    ctx: _core.Context,
    n_layer: int,
    n_embd: int,
    per_seq: Mapping[int, Sequence[Steer]],
    n_prompt: Mapping[int, int],
    norms: Mapping[int, float] | None = None,
) -> SteeringSession:
    """Write each distinct vector into a slot and bind it to its sequences.

    Steers sharing one vector (and mode and unit) share one slot: a sweep
    over strengths costs one slot. A relative Steer is written in absolute
    units: its vector's recorded residual norms, else ``norms`` (the
    model's). On any error everything written is undone.
    """
    session = SteeringSession(ctx)
    slots: dict[tuple[int, tuple[int, ...] | None, str, int], int] = {}
    try:
        for seq, steers in per_seq.items():
            seen: dict[tuple[int, tuple[int, ...] | None, str], int] = {}
            for s in steers:
                # The vector the user passed (not the per-Steer layer
                # selection) names the slot, so Steer(v, s, layers=L) for
                # many s across sequences is one slot. A second Steer of the
                # same vector on one sequence takes another slot: a
                # (sequence, slot) pair has one binding, and both must apply.
                base = (id(s.vector), None if s.layers is None else tuple(s.layers), s.mode + s.unit)
                seen[base] = seen.get(base, -1) + 1
                key = (*base, seen[base])
                if key not in slots:
                    slots[key] = len(slots)
                    if slots[key] < ctx.steer_n_slots:
                        session._slots.append(slots[key])  # before writing: close() clears a half-written slot
                    _write_slot(ctx, slots[key], _absolute(s, norms), n_layer, n_embd)
                b = _Binding(seq, slots[key], s, s.window(n_prompt[seq]))
                ctx.steer_bind(b.seq, b.slot, s.strength_at(0), *b.window)
                session._bindings.append(b)
    except BaseException:
        session.close()
        raise
    return session


def _absolute(s: Steer, norms: Mapping[int, float] | None) -> Steer:
    if s.unit == "absolute":
        return s
    recorded = s.recorded_norms
    if recorded is not None:
        return s.absolute(recorded)
    if norms is None:
        raise SteeringError("a relative strength needs the model's residual norms")
    return s.absolute(norms)


def check_fits(
    ctx: _core.Context | None,
    steers: Sequence[Steer],
    n_layer: int,
    n_embd: int,
    arch: str | None = None,
    hooked: Collection[int] | None = None,
) -> None:
    """Raise unless every steer fits the model: n_embd, layer range, hooks,
    and (given ``arch``) the architecture an ActAdd was built on. The hooks
    are asked of ``ctx``, or looked up in ``hooked`` (the layers with a hook,
    read once: a thread that must not touch a busy context)."""
    for s in steers:
        if s.actadd is not None:
            s.actadd.check_fits(n_layer, n_embd, arch)
            layers = [s.actadd.layer]
        else:
            vec = s.control_vector
            if vec.n_embd != n_embd:
                raise ValueError(
                    f"the vector has n_embd {vec.n_embd}, the model {n_embd}: it was made for another model"
                )
            layers = [check_layer(layer, n_layer) for layer in vec.layers]
        if s.condition is not None:
            s.condition.check_fits(n_layer, n_embd)
            layers.append(s.condition.layer)
        for layer in layers:
            if not (layer in hooked if hooked is not None else ctx is not None and ctx.steer_layer_hooked(layer)):
                raise SteeringError(
                    f"this model's graph has no steering hook after block {layer}: steering it would do nothing"
                )


def _write_slot(ctx: _core.Context, slot: int, s: Steer, n_layer: int, n_embd: int) -> int:
    if slot >= ctx.steer_n_slots:
        raise SteeringError(
            f"this call needs more than the {ctx.steer_n_slots} steering slots of the model's context "
            "(distinct vectors per call); load the Model with more n_steer_slots"
        )
    check_fits(ctx, [s], n_layer, n_embd)
    ctx.steer_clear(slot)  # whatever an interrupted call may have left in it
    if s.actadd is not None:
        ctx.steer_set_rows(slot, s.actadd.layer, s.actadd.rows)
        return slot
    for layer, direction in s.control_vector.items():
        if s.mode == "add":
            ctx.steer_set_add(slot, layer, direction)
        else:
            if not np.any(direction):
                continue  # a zero direction removes nothing
            ctx.steer_set_ablate(slot, layer, direction.reshape(1, -1), 1.0)
    return slot


_SlotKey = tuple[int, tuple[int, ...] | None, str]


class SlotPool:
    """The steering slots of a context shared by sequences that come and go
    (continuous batching), where :func:`apply_steering` serves one call.

    A slot holds one vector (written once, keyed as in
    :func:`apply_steering`); each sequence binds to it with its own strength
    and window. A slot no sequence uses keeps its vector until another needs
    the room, so a vector used request after request is written once.
    """

    def __init__(self, ctx: _core.Context, n_layer: int, n_embd: int, norms: Mapping[int, float] | None = None) -> None:
        self._ctx = ctx
        self._n_layer, self._n_embd = n_layer, n_embd
        self._norms = norms
        n = ctx.steer_n_slots
        self._keys: list[_SlotKey | None] = [None] * n
        self._vectors: list[object] = [None] * n  # holds the keyed object, so its id() stays unique
        self._users: list[set[int]] = [set() for _ in range(n)]
        self._last_use = [0] * n
        self._clock = 0

    @property
    def n_slots(self) -> int:
        return len(self._keys)

    @property
    def in_use(self) -> int:
        """Slots bound to at least one sequence."""
        return sum(1 for u in self._users if u)

    @staticmethod
    def _key(s: Steer) -> _SlotKey:
        return (id(s.vector), None if s.layers is None else tuple(s.layers), s.mode + s.unit)

    def _plan(self, seq: int, steers: Sequence[Steer]) -> list[tuple[Steer, int, bool]] | None:
        """(steer, slot, needs writing) for each steer, or None when the free
        slots do not suffice. Changes nothing."""
        taken: set[int] = set()
        plan = []
        for s in steers:
            key = self._key(s)
            slot = next(
                (i for i, k in enumerate(self._keys) if k == key and i not in taken and seq not in self._users[i]),
                None,
            )
            write = slot is None
            if slot is None:
                idle = [i for i in range(self.n_slots) if not self._users[i] and i not in taken]
                if not idle:
                    return None
                # an empty slot first, else the one unused the longest
                slot = min(idle, key=lambda i: (self._keys[i] is not None, self._last_use[i]))
            taken.add(slot)
            plan.append((s, slot, write))
        return plan

    def fits(self, steers: Sequence[Steer]) -> bool:
        """Whether a new sequence with ``steers`` can be bound now."""
        return self._plan(-1, steers) is not None

    def bind(self, seq: int, steers: Sequence[Steer], n_prompt: int) -> list[_Binding]:
        """Bind ``steers`` to ``seq`` (a prompt of ``n_prompt`` tokens),
        writing vectors into slots as needed. Raises :class:`SteeringError`
        when the slots do not suffice (check :meth:`fits` first); on any error
        nothing stays bound."""
        plan = self._plan(seq, steers)
        if plan is None:
            raise SteeringError(f"not enough free steering slots ({self.n_slots} in all) for {len(steers)} steers")
        bindings: list[_Binding] = []
        try:
            for s, slot, write in plan:
                if write:
                    self._keys[slot] = None  # until written: a failed write leaves no stale key
                    _write_slot(self._ctx, slot, _absolute(s, self._norms), self._n_layer, self._n_embd)
                    self._keys[slot], self._vectors[slot] = self._key(s), s.vector
                b = _Binding(seq, slot, s, s.window(n_prompt))
                self._ctx.steer_bind(b.seq, b.slot, s.strength_at(0), *b.window)
                self._users[slot].add(seq)
                bindings.append(b)
        except BaseException:
            self.unbind(bindings)
            raise
        return bindings

    def update(self, bindings: Iterable[_Binding], step: int) -> None:
        """Re-bind scheduled strengths for decode step ``step`` of their sequence."""
        for b in bindings:
            if b.steer.scheduled:
                self._ctx.steer_bind(b.seq, b.slot, b.steer.strength_at(step), *b.window)

    def unbind(self, bindings: Iterable[_Binding]) -> None:
        """Undo :meth:`bind`; the slots keep their vectors for later sequences."""
        self._clock += 1
        for b in bindings:
            if not self._ctx.closed:
                self._ctx.steer_unbind(b.seq, b.slot)
            self._users[b.slot].discard(b.seq)
            self._last_use[b.slot] = self._clock

    def close(self) -> None:
        """Unbind everything and clear every slot this pool wrote."""
        if self._ctx.closed:
            return
        self._ctx.steer_unbind(-1, -1)
        for slot, key in enumerate(self._keys):
            if key is not None:
                self._ctx.steer_clear(slot)
        self._keys = [None] * self.n_slots
        self._vectors = [None] * self.n_slots
        self._users = [set() for _ in range(self.n_slots)]
