"""Bake steering into a GGUF's weights, for runtimes that cannot steer.

:func:`bake` writes a new GGUF that stock llama.cpp (llama-cli, llama-server,
ollama, LM Studio) runs with the steering built in, no flag and no patch:

- **add** steers become a per-layer bias in the one place the graph adds it
  right before the block's residual add (``blk.N.ffn_down.bias`` on llama:
  block N's output becomes ``x + ffn(x) + b``, exactly the runtime's
  ``x + ffn(x)`` then ``+ b``). Every other tensor is copied byte for byte.
- **ablate** steers orthogonalize every matrix that writes into the residual
  stream (``W <- W - r r^T W``, the embedding's rows ``e <- e - r r^T e``), so
  no block can write the direction ("abliteration"). Quantized tensors are
  dequantized, edited in float32 and requantized to their own type with
  ggml's own quantizer; the report gives the requantization error.

:func:`dequantize_model` writes a full-precision (F32/F16) copy with the same
machinery, for exactness tests and as a starting point for other tools.

Files are written one tensor at a time to a temporary file beside the target
and renamed at the end: memory stays at about one tensor, and an interrupted
bake leaves no file under the target name.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .errors import BakeError
from .gguf_file import (
    GGML_F16,
    GGML_F32,
    Codec,
    Entry,
    FloatArray,
    Source,
    check_target,
    converted_entry,
    copy_entry,
    f32_entry,
    row_chunks,
    tensor_rows,
    write_gguf,
)
from .steer import Steer
from .vectors import FIRST_LAYER, ControlVector

# Architectures whose graph adds an optional per-layer bias right before the
# block's residual add, with no norm or scale in between, so that a bias
# there is exactly a control vector on that block's output. Read the graph
# (third_party/llama.cpp/src/models/<arch>.cpp) before adding one: Gemma's
# post-FFN norm, Granite's residual scale, MoE blocks (no down bias) do not
# qualify.
BIAS_SLOTS: dict[str, str] = {
    "llama": "blk.{}.ffn_down.bias",
}

# The tensors that write into the residual stream, by architecture: the
# token embedding (rows are residual vectors) and, per block, matrices whose
# output dimension is the residual's (their biases too, when present). On a
# graph that normalizes a block's output before the residual add (Gemma),
# orthogonal weights would not keep the direction out, so it is not listed.
RESIDUAL_WRITERS: dict[str, tuple[str, ...]] = {
    "llama": ("blk.{}.attn_output", "blk.{}.ffn_down"),
}
EMBEDDING = "token_embd.weight"
OUTPUT = "output.weight"  # absent when the head is tied to the embedding

ALTERNATIVES = (
    "steer at runtime instead (ls.Model(...).generate(..., steer=...), or the llama-steer CLI), "
    "or train the direction into the weights with representation tuning"
)

# Rounds of feeding the quantization error along an ablated direction back
# into the input: on SmolLM2's Q4_1 down projections the part of the
# direction a matrix can still write fell from 0.45 to 0.06 in 3 rounds and
# 0.04 in 4, for 4.3% -> 5.0% requantization error.
_FEEDBACK_ROUNDS = 4


@dataclass(frozen=True)
class TensorEdit:
    """What baking did to one tensor."""

    name: str
    type: str  # ggml type name, kept from the original
    action: str  # "bias" (add steering), "ablate", "copy-untied-head", "dequantize"
    # ||deq(Q(W')) - W'|| / ||W'|| for a requantized W' (0.0 when stored exactly)
    requant_error: float = 0.0
    # after ablation: ||r^T W_baked|| / ||r^T W_original||, the part of the
    # direction the tensor can still write (quantization noise)
    leak: float = float("nan")


@dataclass
class BakeReport:
    """The result of :func:`bake` or :func:`dequantize_model`."""

    path: Path
    source: Path
    arch: str
    edits: list[TensorEdit] = field(default_factory=list)
    bytes_in: int = 0
    bytes_out: int = 0

    def __str__(self) -> str:
        lines = [
            f"{self.path}: {len(self.edits)} tensor(s) edited, {self.bytes_out / 1e6:.1f} MB "
            f"({100 * (self.bytes_out / max(self.bytes_in, 1) - 1):+.2f}% vs {self.source.name})"
        ]
        for e in self.edits:
            extra = f"  requant err {e.requant_error:.2e}" if e.requant_error else ""
            if not np.isnan(e.leak):
                extra += f"  leak {e.leak:.3f}"
            lines.append(f"  {e.name:<28} {e.type:<6} {e.action}{extra}")
        return "\n".join(lines)


# --------------------------------------------------------------------- plan


@dataclass(frozen=True)
class _Recipe:
    """What a bake writes, checked against the model before any byte is."""

    bias: dict[int, FloatArray]  # layer -> summed strength * direction
    ablate: FloatArray | None  # unit direction, or None
    steers: list[dict[str, Any]]  # metadata, one per Steer


def _recipe(steers: Sequence[Steer], arch: str, n_layer: int, n_embd: int) -> _Recipe:
    bias: dict[int, FloatArray] = {}
    ablate: FloatArray | None = None
    meta: list[dict[str, Any]] = []
    for i, st in enumerate(steers):
        what = f"steer {i}"
        if not isinstance(st, Steer):
            raise TypeError(f"bake takes Steer objects, {what} is a {type(st).__name__}")
        if st.actadd is not None:
            raise BakeError(f"{what} is an ActAdd: it adds rows at prompt positions, which a file cannot carry")
        if st.condition is not None:
            raise BakeError(f"{what} is conditional (CAST): a baked model cannot decide per prompt")
        if st.positions != "all":
            raise BakeError(f"{what} steers positions {st.positions!r}: a baked model steers every position")
        if st.scheduled:
            raise BakeError(f"{what} has a strength schedule: a baked model steers at one strength")
        if st.unit == "relative":
            norms = st.recorded_norms
            if norms is None:
                raise BakeError(
                    f"{what} has a relative strength but its vector records no residual norms: "
                    f"use st.absolute(model.residual_norms()) with the model loaded"
                )
            st = st.absolute(norms)
        vec = st.control_vector
        if vec.n_embd != n_embd:
            raise BakeError(
                f"{what}'s vector has n_embd {vec.n_embd}, the model {n_embd}: it was made for another model"
            )
        if vec.model_hint and vec.model_hint != arch:
            raise BakeError(f"{what}'s vector was made for a {vec.model_hint!r} model, this one is {arch!r}")
        bad = [layer for layer in vec.layers if not FIRST_LAYER <= layer < n_layer]
        if bad:
            raise BakeError(f"{what} has layers {bad} outside this model's {FIRST_LAYER}..{n_layer - 1}")
        strength = st.strength_at(0)
        meta.append(
            {
                "mode": st.mode,
                "strength": strength,
                "layers": vec.layers,
                "vector_sha256": vec.fingerprint(),
                "model_hint": vec.model_hint,
            }
        )
        if st.mode == "add":
            if arch not in BIAS_SLOTS:
                raise BakeError(
                    f"architecture {arch!r} has no bias slot before its residual add, so additive steering "
                    f"cannot be baked exactly (architectures with one: {', '.join(sorted(BIAS_SLOTS))}). "
                    f"Alternatives: {ALTERNATIVES}"
                )
            for layer, d in vec.items():
                acc = bias.setdefault(layer, np.zeros(n_embd, dtype=np.float32))
                acc += np.float32(strength) * d
            continue
        if arch not in RESIDUAL_WRITERS:
            raise BakeError(
                f"architecture {arch!r} is not one where orthogonal weights keep a direction out of the "
                f"residual stream (supported: {', '.join(sorted(RESIDUAL_WRITERS))}). Alternatives: {ALTERNATIVES}"
            )
        if strength != 1.0:
            raise BakeError(f"{what}: a baked ablation removes the direction entirely (strength 1), got {strength}")
        r = _single_direction(vec, what)
        if ablate is not None and abs(float(ablate @ r)) < 1 - 1e-5:
            raise BakeError("bake ablates one direction; combine the ablation steers into one vector first")
        ablate = r
    return _Recipe(bias, ablate, meta)


def _single_direction(vec: ControlVector, what: str) -> FloatArray:
    """The one unit direction an ablation bake removes from every writer.

    Orthogonal weights keep a direction out of the whole residual stream, so
    the same direction holds at every layer: a vector with one layer gives
    it, several layers must agree."""
    units = []
    for layer, d in vec.items():
        n = float(np.linalg.norm(d))
        if n == 0.0:
            raise BakeError(f"{what}: the direction at layer {layer} is zero")
        units.append(d / np.float32(n))
    r = units[0]
    if any(abs(float(u @ r)) < 0.9999 for u in units[1:]):
        raise BakeError(
            f"{what}: a baked ablation removes one direction from every layer, but this vector's layers point "
            f"different ways; pick one with vector.select([layer])"
        )
    return r.astype(np.float32)


# ------------------------------------------------------------------ reading


# ------------------------------------------------------------------ editing


class _Editor(Codec):
    """A codec that also edits: ablation with requantization feedback."""

    def check_roundtrip(self, t: Any) -> None:
        if not self.can_roundtrip(int(t.tensor_type)):
            raise BakeError(
                f"{t.name} is stored as {self.type_name(t)}, which ggml cannot requantize without an "
                f"importance matrix; ablation cannot be baked into this file"
            )

    def requantize_orthogonal(
        self,
        type_: int,
        x: FloatArray,
        leak: Callable[[FloatArray], FloatArray],
        undo: Callable[[FloatArray], FloatArray],
    ) -> tuple[npt.NDArray[np.uint8], FloatArray]:
        """Quantize ``x`` (already orthogonal to the direction) so that the
        stored values stay orthogonal: quantization error along the direction
        (``leak`` of the dequantized values) is fed back into the input
        (``x - undo(leak)``) and quantized again, keeping the best round.
        Returns the bytes and their dequantized values."""
        best: tuple[float, npt.NDArray[np.uint8], FloatArray] | None = None
        target = x
        for _ in range(_FEEDBACK_ROUNDS + 1):
            q = self.write(type_, target)
            back = self.decode(type_, q, x.shape[0], x.shape[1])
            d = leak(back)
            size = float(np.linalg.norm(d))
            if best is None or size < best[0]:
                best = (size, q, back)
            if size == 0.0:
                break
            target = target - undo(d)
        assert best is not None
        return best[1], best[2]

    def ablate_rows(self, t: Any, r: FloatArray) -> tuple[npt.NDArray[np.uint8], TensorEdit]:
        """Rows are residual vectors (the embedding): e <- e - r (r . e)."""
        self.check_roundtrip(t)
        nrows, n_per_row = tensor_rows(t)
        type_ = int(t.tensor_type)
        out = np.empty(int(t.n_bytes), dtype=np.uint8)
        stats = _Stats()
        pos = 0
        for rows in row_chunks(nrows, n_per_row):
            x = self.read(t, rows)
            before = x @ r
            x -= np.outer(before, r)
            q, back = self.requantize_orthogonal(type_, x, lambda b: b @ r, lambda d: np.outer(d, r))
            stats.add(x, back, before, back @ r)
            out[pos : pos + q.nbytes] = q.reshape(-1)
            pos += q.nbytes
        return out, stats.edit(t.name, self.type_name(t))

    def ablate_columns(self, t: Any, r: FloatArray) -> tuple[npt.NDArray[np.uint8], TensorEdit]:
        """Rows index the residual's dimensions (a writer W [n_embd, k]): W <- W - r (r^T W)."""
        self.check_roundtrip(t)
        nrows, n_per_row = tensor_rows(t)
        if nrows != r.shape[0]:
            raise BakeError(f"{t.name} has {nrows} output rows, the residual stream {r.shape[0]}")
        type_ = int(t.tensor_type)
        chunks = list(row_chunks(nrows, n_per_row))
        rw = np.zeros(n_per_row, dtype=np.float64)  # r^T W, summed over row chunks
        for rows in chunks:
            rw += r[rows].astype(np.float64) @ self.read(t, rows)
        rw32 = rw.astype(np.float32)
        out = np.empty(int(t.n_bytes), dtype=np.uint8)
        stats = _Stats()
        left = np.zeros(n_per_row, dtype=np.float64)
        pos = 0
        for rows in chunks:
            x = self.read(t, rows)
            rc = r[rows]
            x -= np.outer(rc, rw32)
            # each chunk keeps its own share of r^T W' (they sum to zero)
            share = rc @ x
            norm2 = float(rc @ rc)

            def leak(b: FloatArray, rc: FloatArray = rc, share: FloatArray = share) -> FloatArray:
                out: FloatArray = rc @ b - share
                return out

            def undo(d: FloatArray, rc: FloatArray = rc, norm2: float = norm2) -> FloatArray:
                out: FloatArray = np.outer(rc, d / norm2 if norm2 > 1e-12 else 0.0 * d)
                return out

            q, back = self.requantize_orthogonal(type_, x, leak, undo)
            stats.add(x, back)
            left += rc.astype(np.float64) @ back
            out[pos : pos + q.nbytes] = q.reshape(-1)
            pos += q.nbytes
        stats.before, stats.after = float(rw @ rw), float(left @ left)
        return out, stats.edit(t.name, self.type_name(t))


class _Stats:
    """Requantization error and leak of one tensor, summed over chunks."""

    def __init__(self) -> None:
        self.err = self.norm = self.before = self.after = 0.0

    def add(
        self, x: FloatArray, back: FloatArray, before: FloatArray | None = None, after: FloatArray | None = None
    ) -> None:
        self.err += float(np.sum((back - x).astype(np.float64) ** 2))
        self.norm += float(np.sum(x.astype(np.float64) ** 2))
        if before is not None and after is not None:
            self.before += float(np.sum(before.astype(np.float64) ** 2))
            self.after += float(np.sum(after.astype(np.float64) ** 2))

    def edit(self, name: str, type_name: str) -> TensorEdit:
        return TensorEdit(name, type_name, "ablate", _ratio(self.err, self.norm), _ratio(self.after, self.before))


def _ratio(a: float, b: float) -> float:
    return float(np.sqrt(a / b)) if b > 0 else 0.0


# ------------------------------------------------------------------ writing


def _describe(recipe: _Recipe) -> str:
    parts = []
    for s in recipe.steers:
        layers = s["layers"]
        span = f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0])
        parts.append(f"ablate {span}" if s["mode"] == "ablate" else f"{s['strength']:+g} at {span}")
    return "steered by llama-steer: " + ", ".join(parts)


def bake(
    model_path: str | os.PathLike[str],
    steers: Steer | Sequence[Steer],
    out_path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    n_threads: int | None = None,
    progress: bool | None = None,
) -> BakeReport:
    """Write ``model_path`` with ``steers`` built into its weights to ``out_path``.

    Each steer must steer every position at one strength (no ActAdd, no
    condition, no window, no schedule): that is what a file can carry.
    ``mode="add"`` steers are summed per layer into the architecture's bias
    slot (see :data:`BIAS_SLOTS`); ``mode="ablate"`` steers (strength 1, one
    direction) orthogonalize every residual writer (see
    :data:`RESIDUAL_WRITERS`), requantizing to each tensor's own type. Every
    other tensor is copied byte for byte. The original is only read; the
    output appears under ``out_path`` only once complete.

    Raises :class:`BakeError` for steering a file cannot carry or an
    architecture without the slot, :class:`FileExistsError` when
    ``out_path`` exists (unless ``overwrite``), :class:`OSError` when writing
    fails (nothing is left under ``out_path``).
    """
    src_path, out = Path(model_path), Path(out_path)
    steer_list = [steers] if isinstance(steers, Steer) else list(steers)
    if not steer_list:
        raise ValueError("bake needs at least one Steer")
    check_target(src_path, out, overwrite, BakeError)
    src = Source(src_path)
    n_layer, n_embd = src.int("block_count"), src.int("embedding_length")
    if (src.field(f"{src.arch}.expert_count") or 0) > 0:
        raise BakeError(
            f"{src_path} is a mixture-of-experts {src.arch!r} model: its blocks have no bias slot. "
            f"Alternatives: {ALTERNATIVES}"
        )
    recipe = _recipe(steer_list, src.arch, n_layer, n_embd)
    editor = _Editor(n_threads or os.cpu_count() or 1)
    report = BakeReport(out, src_path, src.arch, bytes_in=src_path.stat().st_size)
    entries: list[Entry] = []
    r = recipe.ablate
    writers = {w.format(i) + ".weight" for w in RESIDUAL_WRITERS.get(src.arch, ()) for i in range(n_layer)}
    writer_biases = {name[: -len(".weight")] + ".bias" for name in writers}
    bias_names = {BIAS_SLOTS[src.arch].format(layer): layer for layer in recipe.bias} if recipe.bias else {}
    placed: set[str] = set()

    def bias_entry(name: str, t: Any | None) -> Entry:
        b = np.zeros(n_embd, dtype=np.float32) if t is None else editor.read(t, slice(0, 1)).reshape(-1)
        if r is not None:
            b = b - r * np.float32(r @ b)
        if name in bias_names:
            b = b + recipe.bias[bias_names[name]]
        report.edits.append(TensorEdit(name, "f32", "bias" if name in bias_names else "ablate"))
        return f32_entry(name, b)

    def edit_entry(t: Any, fn: Callable[[Any, FloatArray], tuple[npt.NDArray[np.uint8], TensorEdit]]) -> Entry:
        assert r is not None
        direction = r

        def produce() -> npt.NDArray[np.uint8]:
            data, edit = fn(t, direction)
            report.edits.append(edit)
            return data

        return Entry(t.name, tuple(int(n) for n in t.shape), int(t.tensor_type), int(t.n_bytes), produce)

    for t in src.reader.tensors:
        name = t.name
        if name in bias_names or (r is not None and name in writer_biases):
            entries.append(bias_entry(name, t))
            placed.add(name)
        elif r is not None and name == EMBEDDING:
            if OUTPUT not in src.tensors:
                # The head reads the embedding: keep the original as an untied
                # output.weight, so only the residual stream loses the direction.
                entries.append(copy_entry(t, OUTPUT))
                report.edits.append(TensorEdit(OUTPUT, editor.type_name(t), "copy-untied-head"))
            entries.append(edit_entry(t, editor.ablate_rows))
        elif r is not None and name in writers:
            entries.append(edit_entry(t, editor.ablate_columns))
        else:
            entries.append(copy_entry(t))
        # a new bias goes right after its block's down projection
        slot = name[: -len(".weight")] + ".bias" if name.endswith(".weight") else ""
        if slot in bias_names and slot not in src.tensors:
            entries.append(bias_entry(slot, None))
            placed.add(slot)
    missing = set(bias_names) - placed
    if missing:
        raise BakeError(f"{src_path}: no tensor to place {sorted(missing)} after (not a {src.arch} model?)")

    import gguf

    from . import __version__

    kv = {
        "general.name": (src.edited_name(_describe(recipe)), gguf.GGUFValueType.STRING, None),
        "llama_steer.version": (__version__, gguf.GGUFValueType.STRING, None),
        "llama_steer.source": (src_path.name, gguf.GGUFValueType.STRING, None),
        "llama_steer.steers": (
            [json.dumps(s, sort_keys=True) for s in recipe.steers],
            gguf.GGUFValueType.ARRAY,
            gguf.GGUFValueType.STRING,
        ),
    }
    report.bytes_out = write_gguf(src, out, entries, kv, progress, BakeError)
    return report


def dequantize_model(
    model_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    dtype: str = "f32",
    overwrite: bool = False,
    n_threads: int | None = None,
    progress: bool | None = None,
) -> BakeReport:
    """Write a full-precision copy of a GGUF model: every quantized matrix
    stored as ``dtype`` (``"f32"`` or ``"f16"``), the rest copied. The values
    are the quantized model's own (ggml's dequantizer), so the copy is the
    same model without quantized matmuls: the place to test exactness."""
    types = {"f32": (GGML_F32, 0), "f16": (GGML_F16, 1)}  # ggml type, llama_ftype
    if dtype not in types:
        raise ValueError(f"dtype must be 'f32' or 'f16', got {dtype!r}")
    ggml_type, ftype = types[dtype]
    src_path, out = Path(model_path), Path(out_path)
    check_target(src_path, out, overwrite, BakeError)
    src = Source(src_path)
    editor = _Editor(n_threads or os.cpu_count() or 1)
    report = BakeReport(out, src_path, src.arch, bytes_in=src_path.stat().st_size)
    entries: list[Entry] = []
    for t in src.reader.tensors:
        if int(t.tensor_type) in (GGML_F32, ggml_type) or len(t.shape) < 2:
            entries.append(copy_entry(t))
            continue
        entries.append(converted_entry(editor, t, ggml_type))
        report.edits.append(TensorEdit(t.name, dtype, "dequantize"))
    import gguf

    kv = {
        "general.file_type": (ftype, gguf.GGUFValueType.UINT32, None),
        "general.name": (src.edited_name(dtype), gguf.GGUFValueType.STRING, None),
    }
    report.bytes_out = write_gguf(src, out, entries, kv, progress, BakeError)
    return report
