"""Representation tuning: train a direction into a GGUF's weights, no PyTorch.

Representation tuning (Ackerman, arXiv 2409.06927) fine-tunes a model so
that its own residual stream moves toward (``direction="in"``) or away from
(``"out"``) a steering vector, instead of adding the vector at run time. The
loss is the token cross-entropy on the data's completions plus a cosine term
on the block outputs of the chosen layers, averaged over completion tokens
and layers::

    loss = token_weight * CE + cos_weight * mean_layers(mean_tokens(term))
    term = (1 - cos(x, v)) / 2   (in)       |cos(x, v)|   (out)

:func:`tune` runs it on llama.cpp's own trainer (``llama_opt_epoch``,
AdamW), with the cosine term built into the training graph by our patches
0004/0005 (ggml ops with a backward pass, flagged as an extra loss term):

1. a working copy of the model is written beside the output: the trainable
   tensors (by default the chosen layers' attention output and FFN matrices)
   as F32 (ggml's own dequantizer), every other tensor in its own type;
2. the data: every pair gives two sequences (its positive and its negative
   prompt); the *completion* is the tokens the two share at the end (for the
   bundled persona pairs, the statement after the persona instruction). The
   token loss and the cosine term both act on the completion, so the model
   learns to put the direction into neutral text under either instruction.
   A sequence that is a token prefix of another is dropped (the longer one
   trains the same positions);
3. training, one sequence per ubatch (gradients reach K and V), ``batch_size``
   sequences per optimizer step, seeded shuffling;
4. the output: every untouched tensor byte for byte; every tuned tensor in
   the most compact of (its original type, Q8_0, F16, F32) that keeps the
   update (the stored change's relative error at most ``keep``): a
   fine-tune's update is far below a 4-bit quantization step.

Memory: the working copy's trainable tensors in F32, the AdamW moments and
the gradient accumulators (4 floats per trainable parameter), plus the
activations of one sequence and the rest of the model as stored.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .errors import TuneError
from .extraction import Pair, PairsLike, behaviours, check_pairs, persona_pairs
from .gguf_file import (
    GGML_F16,
    GGML_F32,
    GGML_Q8_0,
    Codec,
    Entry,
    Source,
    bytes_entry,
    check_target,
    copy_entry,
    write_gguf,
)
from .vectors import ControlVector, check_layer

# The matrices trained by default, per block (llama.cpp's tensor names): the
# paper trains the band's projections; these are the ones writing into, and
# computing, the block's contribution to the residual stream.
DEFAULT_TRAINABLE = ("attn_output", "ffn_gate", "ffn_up", "ffn_down")
DIRECTIONS = {"in": 0, "out": 1}
OUT_TYPES = ("auto", "same", "q8_0", "f16", "f32")
MAX_TOKENS = 512  # longest training sequence
_MAX_PROMPT = 256  # longest chat prompt with targets="steered"


@dataclass
class TensorChoice:
    """How one tuned tensor was stored: ``type`` and the relative error of
    the stored update against the trained one, for every type measured."""

    name: str
    type: str
    update_error: dict[str, float]


@dataclass
class TuneReport:
    """What :func:`tune` did. ``history`` holds one dict per optimizer step
    (``loss``, ``token_loss``, ``objective``, ``cos``: the mean over the
    objective's layers of the mean cos (in) or |cos| (out) on the step's
    sequences). ``cos_before`` / ``cos_after``: the same per layer on the
    held-out sequences before and after training; ``token_loss_before`` /
    ``_after`` their cross-entropy."""

    out_path: Path
    source: Path
    layers: list[int]
    train_layers: list[int]
    direction: str
    steps: int = 0
    sequences: int = 0
    heldout: int = 0
    seconds: float = 0.0
    trainable_params: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    cos_before: dict[int, float] = field(default_factory=dict)
    cos_after: dict[int, float] = field(default_factory=dict)
    token_loss_before: float = float("nan")
    token_loss_after: float = float("nan")
    tensors: list[TensorChoice] = field(default_factory=list)

    def __str__(self) -> str:
        types: dict[str, int] = {}
        for t in self.tensors:
            types[t.type] = types.get(t.type, 0) + 1
        before = np.nanmean(list(self.cos_before.values())) if self.cos_before else float("nan")
        after = np.nanmean(list(self.cos_after.values())) if self.cos_after else float("nan")
        what = "cos" if self.direction == "in" else "|cos|"
        return (
            f"tuned {self.source.name} -> {self.out_path} ({self.direction}, layers "
            f"{self.layers[0]}-{self.layers[-1]}): {self.steps} steps on {self.sequences} sequences in "
            f"{self.seconds:.1f} s; held-out {what} {before:.3f} -> {after:.3f}, token loss "
            f"{self.token_loss_before:.3f} -> {self.token_loss_after:.3f}; tuned tensors stored as "
            + ", ".join(f"{n} x {k}" for k, n in sorted(types.items()))
        )


@dataclass
class _Sequence:
    tokens: list[int]
    first: int  # index of the first completion token


def _common_suffix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _sequences(pairs: Sequence[Pair], tokenize: Callable[[str], list[int]]) -> list[_Sequence]:
    """Both sides of every pair with their completion (see the module doc),
    without sequences that are a token prefix of another."""
    out: dict[tuple[int, ...], int] = {}
    for i, p in enumerate(pairs):
        pos, neg = tokenize(p.positive), tokenize(p.negative)
        n = _common_suffix(pos, neg)
        # no shared ending (e.g. ("Love", "Hate")): the tokens after the shared beginning
        firsts = (len(pos) - n, len(neg) - n) if n > 0 else (_common_prefix(pos, neg),) * 2
        for toks, first in zip((pos, neg), firsts):
            if len(toks) > MAX_TOKENS:
                raise TuneError(f"pair {i}: {len(toks)} tokens, more than {MAX_TOKENS}")
            first = max(1, min(first, len(toks) - 1))  # a completion token has a token before it
            out[tuple(toks)] = min(first, out.get(tuple(toks), first))
    keys = sorted(out)
    seqs = []
    for k, key in enumerate(keys):
        # sorted order puts a sequence right before the ones it is a prefix of
        if k + 1 < len(keys) and keys[k + 1][: len(key)] == key:
            continue
        seqs.append(_Sequence(list(key), out[key]))
    return seqs


def _arrays(
    seq: _Sequence, n_ctx: int, pad: int
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int32], npt.NDArray[np.float32]]:
    n = len(seq.tokens)
    tokens = np.full(n_ctx, pad, dtype=np.int32)
    tokens[:n] = seq.tokens
    labels = np.full(n_ctx, -1, dtype=np.int32)
    # position i predicts token i+1: a loss where that token is a completion token
    labels[seq.first - 1 : n - 1] = seq.tokens[seq.first :]
    weight = np.zeros(n_ctx, dtype=np.float32)
    weight[seq.first : n] = 1.0  # the residual stream at the completion's tokens
    return tokens, labels, weight


def _resolve_pairs(data: PairsLike | str, source: Path) -> tuple[list[Pair], Callable[[str], list[int]], int]:
    """Pairs, their tokenizer, and a pad token from ``data`` (a bundled
    behaviour name, a file, or pairs), with the source model's vocabulary."""
    from .model import Model

    model = Model(source, n_ctx=512, n_threads=1)
    try:
        if isinstance(data, str) and data in behaviours() and not Path(data).exists():
            pairs = persona_pairs(model, data)
        else:
            pairs = check_pairs(data)
        texts = {t for p in pairs for t in (p.positive, p.negative)}
        tokens = {t: model.tokenize(t, add_special=True, parse_special=True) for t in texts}
    finally:
        model.close()
    # padding follows the sequence (causal attention: it changes nothing before it) and is masked
    return pairs, tokens.__getitem__, 0


def _steered_sequences(
    source: Path,
    vec: ControlVector,
    layers: Sequence[int],
    strength: float,
    prompts: Sequence[str] | None,
    max_completion: int,
    n_threads: int | None,
) -> tuple[list[_Sequence], int]:
    """Chat prompts followed by the source model's greedy replies under
    runtime steering (``vec`` at ``strength`` on ``layers``); the replies are
    the completions. Returns the sequences and a pad token."""
    from .conditions import topic_prompts
    from .model import Model
    from .steer import Steer

    if prompts is None:
        prompts = [p for topic in ("cooking", "health") for group in topic_prompts(topic) for p in group]
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise TuneError("targets='steered' needs non-empty prompts (user messages)")
    if not np.isfinite(strength) or max_completion < 1:
        raise ValueError("teacher_strength must be finite and max_completion >= 1")
    width = 16  # replies generated together
    seqs: list[_Sequence] = []
    with Model(source, n_ctx=width * (_MAX_PROMPT + max_completion), n_threads=n_threads, n_seq_max=width) as m:
        steer = Steer(vec, strength, layers=layers)
        chats = [m.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
        for p, chat in zip(prompts, chats):
            if len(m.tokenize(chat, add_special=True, parse_special=True)) > _MAX_PROMPT:
                raise TuneError(f"a prompt is longer than {_MAX_PROMPT} tokens: {p[:60]!r}...")
        for start in range(0, len(chats), width):
            batch = chats[start : start + width]
            replies: list[list[int]] = [[] for _ in batch]
            for i, tok in m.generate_batch(batch, [steer] * len(batch), max_tokens=max_completion, temperature=0):
                replies[i].append(tok.id)
            for chat, reply in zip(batch, replies):
                head = m.tokenize(chat, add_special=True, parse_special=True)
                if reply:
                    seqs.append(_Sequence(head + reply, len(head)))
    if not seqs:
        raise TuneError("the steered model replied to none of the prompts")
    return seqs, 0


def _encode(codec: Codec, type_: int, x: npt.NDArray[np.float32]) -> npt.NDArray[np.uint8]:
    """The bytes of ``x`` stored as ``type_``."""
    if type_ == GGML_F32:
        return np.ascontiguousarray(x, dtype=np.float32).view(np.uint8).reshape(-1)
    return codec.write(type_, x).reshape(-1)


def _update_error(
    codec: Codec, type_: int, data: npt.NDArray[np.uint8], new: npt.NDArray[np.float32], old: npt.NDArray[np.float32]
) -> float:
    """Relative error of the update ``new - old`` once ``new`` is stored as ``data`` of ``type_``."""
    nrows, n_per_row = new.shape
    if type_ == GGML_F32:
        return 0.0
    stored = codec.decode(type_, data, nrows, n_per_row)
    if type_ == GGML_F16:
        base = old.astype(np.float16).astype(np.float32)
    else:
        base = codec.decode(type_, codec.write(type_, old), nrows, n_per_row)
    delta = (new - old).astype(np.float64)
    kept = (stored - base).astype(np.float64)
    norm = float(np.linalg.norm(delta))
    return float(np.linalg.norm(kept - delta) / norm) if norm > 0 else 0.0


def _ne(t: Any) -> tuple[int, ...]:
    return tuple(int(n) for n in t.shape)


def _trainable_names(src: Source, train_layers: Sequence[int], trainable: Sequence[str]) -> list[str]:
    names = []
    for il in train_layers:
        for kind in trainable:
            name = f"blk.{il}.{kind}.weight"
            if name not in src.tensors:
                raise TuneError(f"the model has no tensor {name} (trainable kinds: {', '.join(trainable)})")
            names.append(name)
    return names


def tune(
    model_path: str | os.PathLike[str],
    vector: ControlVector | str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    layers: Sequence[int],
    data: PairsLike | str = "happy",
    targets: str = "pairs",
    teacher_strength: float = 4.0,
    prompts: Sequence[str] | None = None,
    max_completion: int = 48,
    direction: str = "in",
    cos_weight: float = 1.0,
    token_weight: float = 1.0,
    epochs: int = 1,
    lr: float = 1e-4,
    batch_size: int = 4,
    weight_decay: float = 0.0,
    trainable: Sequence[str] = DEFAULT_TRAINABLE,
    train_layers: Sequence[int] | None = None,
    out_type: str = "auto",
    keep: float = 0.25,
    heldout: float = 0.1,
    max_steps: int | None = None,
    seed: int = 0,
    n_threads: int | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
) -> TuneReport:
    """Train ``vector``'s direction into the model at ``model_path`` and write
    the result to ``out_path`` (a GGUF that stock llama.cpp runs).

    ``layers``: where the cosine term acts (and, unless ``train_layers`` says
    otherwise, whose ``trainable`` matrices are trained). ``data``: contrastive
    pairs (a bundled behaviour name such as ``"happy"``, a JSONL/CSV file, or
    pairs), used with ``targets="pairs"`` (the paper's: both sides of every
    pair, the token loss on their shared completion). ``targets="steered"``:
    the sequences are chat prompts (``prompts``, user messages; default the
    240 bundled topic prompts) each followed by the source model's own greedy
    reply, ``max_completion`` tokens long, under runtime steering with
    ``vector`` at ``teacher_strength`` on ``layers``: the token loss then
    distills that steering into the weights, and the cosine term acts on the
    replies. ``cos_weight`` / ``token_weight``: the two loss terms (0 switches
    one off). ``heldout``: the share of sequences kept out of training, on
    which the cosine and token loss are measured before and after.
    ``out_type``: ``"auto"`` (see the module doc, ``keep`` the bound),
    ``"same"``, ``"q8_0"``, ``"f16"`` or ``"f32"`` for the tuned tensors.
    Deterministic given ``seed`` and ``n_threads``. Raises :class:`TuneError`
    for input that cannot be tuned and when the loss stops being finite;
    nothing is written then, and the input file is never modified.
    """
    from tqdm.auto import tqdm  # type: ignore[import-untyped]

    from . import _core

    src_path, out = Path(model_path), Path(out_path)
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be 'in' or 'out', got {direction!r}")
    if out_type not in OUT_TYPES:
        raise ValueError(f"out_type must be one of {', '.join(OUT_TYPES)}, got {out_type!r}")
    for name, v in (("cos_weight", cos_weight), ("token_weight", token_weight), ("weight_decay", weight_decay)):
        if not np.isfinite(v) or v < 0:
            raise ValueError(f"{name} must be finite and >= 0, got {v}")
    if cos_weight == 0 and token_weight == 0:
        raise ValueError("cos_weight and token_weight are both 0: nothing to train")
    if not np.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be finite and > 0, got {lr}")
    if epochs < 1 or batch_size < 1 or (max_steps is not None and max_steps < 1):
        raise ValueError("epochs, batch_size and max_steps must be >= 1")
    if not 0 <= heldout < 1:
        raise ValueError(f"heldout must be in [0, 1), got {heldout}")
    if not trainable:
        raise ValueError("no trainable tensor kinds")
    check_target(src_path, out, overwrite, TuneError)

    src = Source(src_path)
    n_layer, n_embd = src.int("block_count"), src.int("embedding_length")
    vec = vector if isinstance(vector, ControlVector) else ControlVector.load(vector)
    if vec.n_embd != n_embd:
        raise TuneError(f"the vector has n_embd {vec.n_embd}, the model {n_embd}: it was made for another model")
    if vec.model_hint and vec.model_hint != src.arch:
        raise TuneError(f"the vector was made for a {vec.model_hint!r} model, this one is {src.arch!r}")
    layers = sorted({check_layer(int(il), n_layer) for il in layers})
    if not layers:
        raise ValueError("no layers")
    missing = [il for il in layers if il not in vec]
    if missing:
        raise TuneError(f"the vector has no direction at layer(s) {missing}; it covers {vec.layers}")
    train_layers = layers if train_layers is None else sorted({check_layer(int(il), n_layer) for il in train_layers})
    names = _trainable_names(src, train_layers, trainable)

    if targets == "pairs":
        pairs, tokenize, pad = _resolve_pairs(data, src_path)
        seqs = _sequences(pairs, tokenize)
    elif targets == "steered":
        seqs, pad = _steered_sequences(src_path, vec, layers, teacher_strength, prompts, max_completion, n_threads)
    else:
        raise ValueError(f"targets must be 'pairs' or 'steered', got {targets!r}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(seqs))
    n_held = int(round(heldout * len(seqs))) if len(seqs) > 1 else 0
    held = [seqs[i] for i in order[:n_held]]
    train = [seqs[i] for i in order[n_held:]]
    if not train:
        raise TuneError("no training sequences left after the held-out split")
    n_ctx = max(8, max(len(s.tokens) for s in seqs))

    report = TuneReport(out, src_path, layers, train_layers, direction, sequences=len(train), heldout=len(held))
    threads = n_threads or os.cpu_count() or 1
    codec = Codec(threads)
    work = out.parent / f".{out.name}.work.gguf"
    t0 = time.perf_counter()
    try:
        # 1. the working copy: trainable tensors F32, the rest as stored
        originals: dict[str, npt.NDArray[np.float32]] = {}
        entries: list[Entry] = []
        for t in src.reader.tensors:
            if t.name in names:
                x = np.ascontiguousarray(codec.read_all(t))
                originals[t.name] = x
                entries.append(bytes_entry(t.name, _ne(t), GGML_F32, x.view(np.uint8).reshape(-1)))
            else:
                entries.append(copy_entry(t))
        write_gguf(src, work, entries, {}, False, TuneError)
        report.trainable_params = int(sum(x.size for x in originals.values()))

        # 2. the trainer over the working copy (its weights in our memory, writable)
        model = _core.Model(str(work), 0, True)
        params = _core.TrainerParams()
        params.n_ctx, params.n_threads, params.batch_size = n_ctx, threads, batch_size
        params.lr, params.weight_decay, params.trainable = lr, weight_decay, names
        trainer = _core.Trainer(model, params)
        dirs = np.stack([np.asarray(vec[il], dtype=np.float32) for il in layers])
        trainer.set_objective(layers, dirs, DIRECTIONS[direction], cos_weight, token_weight)

        def split(loss: float, values: npt.NDArray[np.float32]) -> tuple[float, float, float]:
            """(token loss, objective, mean cos) from the trainer's total and per-layer values."""
            m = float(np.mean(values[layers]))
            graph_obj = cos_weight * (-0.5 * m if direction == "in" else m)
            objective = cos_weight * (0.5 - 0.5 * m) if direction == "in" else cos_weight * m
            tok = (loss - graph_obj) / token_weight if token_weight > 0 else float("nan")
            return tok, objective, m

        def evaluate() -> tuple[dict[int, float], float]:
            if not held:
                return {}, float("nan")
            per_layer, toks = [], []
            for s in held:
                loss, values = trainer.run(*_arrays(s, n_ctx, pad), False)
                per_layer.append(values[layers])
                toks.append(split(loss, values)[0])
            mean = np.mean(per_layer, axis=0)
            return {il: float(v) for il, v in zip(layers, mean)}, float(np.mean(toks))

        report.cos_before, report.token_loss_before = evaluate()

        # 3. training: batch_size sequences per optimizer step (the last batch of an epoch topped up)
        steps_per_epoch = -(-len(train) // batch_size)
        total = steps_per_epoch * epochs if max_steps is None else min(max_steps, steps_per_epoch * epochs)
        bar = tqdm(
            total=total, desc="llama-steer: tuning", unit="step", disable=None if progress is None else not progress
        )
        try:
            step = 0
            while step < total:
                perm = list(rng.permutation(len(train)))
                perm += list(rng.choice(len(train), steps_per_epoch * batch_size - len(perm)))
                for b in range(steps_per_epoch):
                    if step >= total:
                        break
                    sums = np.zeros(3)
                    losses = []
                    for i in perm[b * batch_size : (b + 1) * batch_size]:
                        loss, values = trainer.run(*_arrays(train[i], n_ctx, pad), True)
                        if not np.isfinite(loss) or not np.all(np.isfinite(values[layers])):
                            raise TuneError(
                                f"the loss is no longer finite at step {step + 1} (lr {lr:g} too large?); "
                                "nothing was written"
                            )
                        losses.append(loss)
                        sums += split(loss, values)
                    tok, obj, cos = sums / batch_size
                    report.history.append(
                        {"loss": float(np.mean(losses)), "token_loss": tok, "objective": obj, "cos": cos}
                    )
                    step += 1
                    bar.update(1)
                    bar.set_postfix(loss=f"{np.mean(losses):.3f}", tok=f"{tok:.3f}", cos=f"{cos:.3f}")
        finally:
            bar.close()
        report.steps = step
        report.cos_after, report.token_loss_after = evaluate()

        # 4. the output
        tuned: dict[str, tuple[int, npt.NDArray[np.uint8]]] = {}
        for name in names:
            new = np.ascontiguousarray(trainer.read_tensor(name), dtype=np.float32)
            t = src.tensors[name]
            type_, data_, choice = _store(codec, int(t.tensor_type), new, originals[name], out_type, keep, name)
            report.tensors.append(choice)
            tuned[name] = (type_, data_)
        entries = []
        for t in src.reader.tensors:
            if t.name in tuned:
                type_, data_ = tuned[t.name]
                entries.append(bytes_entry(t.name, _ne(t), type_, data_))
            else:
                entries.append(copy_entry(t))
        import gguf

        meta = {
            "vector": vec.fingerprint(),
            "layers": layers,
            "train_layers": train_layers,
            "direction": direction,
            "cos_weight": cos_weight,
            "token_weight": token_weight,
            "targets": targets,
            **({"teacher_strength": teacher_strength} if targets == "steered" else {}),
            "lr": lr,
            "epochs": epochs,
            "steps": report.steps,
            "batch_size": batch_size,
            "seed": seed,
        }
        span = f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0])
        kv = {
            "general.name": (
                src.edited_name(f"tuned by llama-steer: {direction} at {span}"),
                gguf.GGUFValueType.STRING,
                None,
            ),
            "llama_steer.tuned": (json.dumps(meta), gguf.GGUFValueType.STRING, None),
        }
        write_gguf(src, out, entries, kv, progress, TuneError)
    finally:
        work.unlink(missing_ok=True)
    report.seconds = time.perf_counter() - t0
    return report


def _store(
    codec: Codec,
    orig: int,
    new: npt.NDArray[np.float32],
    old: npt.NDArray[np.float32],
    out_type: str,
    keep: float,
    name: str,
) -> tuple[int, npt.NDArray[np.uint8], TensorChoice]:
    """The type a tuned tensor is stored in, its bytes, and the update errors measured."""
    fixed = {"q8_0": GGML_Q8_0, "f16": GGML_F16, "f32": GGML_F32, "same": orig}
    candidates = [fixed[out_type]] if out_type != "auto" else [orig, GGML_Q8_0, GGML_F16, GGML_F32]
    errors: dict[str, float] = {}
    chosen, data = candidates[-1], None
    for type_ in dict.fromkeys(candidates):  # unique, in order
        if type_ not in (GGML_F32, GGML_F16) and not codec.can_roundtrip(type_):
            continue
        encoded = _encode(codec, type_, new)  # measured and written: quantized once
        err = _update_error(codec, type_, encoded, new, old)
        errors[str(codec.core.quant_type_name(type_))] = err
        if out_type != "auto" or err <= keep:
            chosen, data = type_, encoded
            break
    if data is None:
        data = _encode(codec, chosen, new)
    return chosen, data, TensorChoice(name, str(codec.core.quant_type_name(chosen)), errors)


def tuned_metadata(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``llama_steer.tuned`` record of a tuned GGUF (None if absent)."""
    raw = Source(Path(path)).string("llama_steer.tuned")
    return json.loads(raw) if raw else None


__all__ = ["DEFAULT_TRAINABLE", "TensorChoice", "TuneReport", "tune", "tuned_metadata"]
