"""Extraction: residual-stream capture and control vectors from contrastive pairs.

Everything runs on the GGUF model as shipped (quantized), inside llama.cpp:
the block outputs are captured in C++ at the point where the steering buffer
adds (see ``vectors.py`` for the layer convention), only for the rows read.

Prompts are decoded through a prefix tree: each distinct token prefix is
decoded once, as one token that belongs to every sequence sharing it (the KV
cache is unified), and a prompt that is a prefix of another is read off the
longer one's pass. With persona templates x progressively longer sentence
prefixes, that decodes a few hundred tokens for 10,000 prompt tokens.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

from .directions import PairStats, check_method
from .errors import DatasetError, LlamaSteerError
from .steer import Steer, as_steers
from .tokens import TokenBatch, common_prefix_len
from .vectors import ControlVector, check_layer

# True: a tqdm bar on a terminal; a callable: called with (tokens decoded, total)
Progress = bool | Callable[[int, int], None]

if TYPE_CHECKING:
    from .engine import Engine
    from .model import Model

Read = Literal["last", "mean"] | Callable[[Sequence[int]], Sequence[int]]
Method = Literal["mean_diff", "pca_diff", "pca_center", "probe"]


# -- pairs --------------------------------------------------------------------
@dataclass(frozen=True)
class Pair:
    """Two prompts that differ in the behaviour to extract."""

    positive: str
    negative: str


PairsLike = str | os.PathLike[str] | Sequence[Pair | tuple[str, str] | Sequence[str]]


def load_pairs(path: str | os.PathLike[str]) -> list[Pair]:
    """Read pairs from JSONL (``{"positive": ..., "negative": ...}`` per line)
    or CSV (a header with ``positive,negative`` columns)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"no such pairs file: {path}")
    try:
        return _load_pairs(path)
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text ({exc})") from exc
    except csv.Error as exc:
        raise DatasetError(f"{path}: malformed CSV ({exc})") from exc


def _load_pairs(path: Path) -> list[Pair]:
    pairs: list[Pair] = []
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"positive", "negative"} <= set(reader.fieldnames):
                raise DatasetError(f"{path}: the CSV header must name 'positive' and 'negative' columns")
            for lineno, row in enumerate(reader, start=2):
                pos, neg = row.get("positive"), row.get("negative")
                if not pos or not neg:
                    raise DatasetError(f"{path}:{lineno}: empty positive or negative")
                pairs.append(Pair(pos, neg))
    else:
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                    pairs.append(Pair(str(obj["positive"]), str(obj["negative"])))
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise DatasetError(
                        f"{path}:{lineno}: want a JSON object with 'positive' and 'negative' ({exc})"
                    ) from exc
    return check_pairs(pairs, source=str(path))


def check_pairs(pairs: PairsLike, *, source: str = "pairs") -> list[Pair]:
    """Normalise ``pairs`` (a path, Pairs or 2-tuples) and reject bad ones."""
    if isinstance(pairs, (str, os.PathLike)):
        return load_pairs(pairs)
    out: list[Pair] = []
    for i, p in enumerate(pairs):
        if isinstance(p, Pair):
            pair = p
        else:
            try:
                pos, neg = p
            except (TypeError, ValueError) as exc:
                raise DatasetError(f"{source}[{i}]: want (positive, negative), got {p!r}") from exc
            pair = Pair(pos, neg)
        if not isinstance(pair.positive, str) or not isinstance(pair.negative, str):
            raise DatasetError(f"{source}[{i}]: both sides must be str")
        if not pair.positive or not pair.negative:
            raise DatasetError(f"{source}[{i}]: empty prompt")
        if pair.positive == pair.negative:
            raise DatasetError(f"{source}[{i}]: both sides are identical ({pair.positive[:60]!r})")
        out.append(pair)
    if not out:
        raise DatasetError(f"{source}: no pairs")
    return out


def _personas() -> dict[str, Any]:
    text = resources.files("llama_steer").joinpath("data/personas.json").read_text(encoding="utf-8")
    data: dict[str, Any] = json.loads(text)
    return data


def behaviours() -> list[str]:
    """Names of the bundled persona datasets (e.g. ``"happy"``, ``"honest"``)."""
    return sorted(_personas()["behaviours"])


def persona_pairs(
    model: Model,
    behaviour: str = "happy",
    *,
    n_personas: int | None = None,
    suffixes: Sequence[str] | None = None,
    template: str | None = None,
    chat: bool = True,
    max_pairs: int | None = None,
) -> list[Pair]:
    """Contrastive pairs the way repeng and cvector-generator build them.

    Each pair is the same sentence prefix under a positive and a negative
    persona instruction (``template`` with ``{persona}``), wrapped in the
    model's chat template when ``chat``. Each suffix sentence contributes all
    its token prefixes (progressively longer), so the pairs share prefixes
    heavily, which extraction exploits.
    """
    data = _personas()
    if behaviour not in data["behaviours"]:
        raise ValueError(f"unknown behaviour {behaviour!r}; bundled: {', '.join(behaviours())}")
    b = data["behaviours"][behaviour]
    positives, negatives = b["positive"], b["negative"]
    if n_personas is not None:
        positives, negatives = positives[:n_personas], negatives[:n_personas]
    template = template or data["template"]
    if "{persona}" not in template:
        raise ValueError("template must contain '{persona}'")
    suffix_list = list(suffixes) if suffixes is not None else list(data["suffixes"])

    def wrap(persona: str, text: str) -> str:
        instruction = template.format(persona=persona)
        if not chat:
            return f"{instruction} {text}"
        head = model.apply_chat_template([{"role": "user", "content": instruction}], add_generation_prompt=True)
        return head + text

    pairs: list[Pair] = []
    for sentence in suffix_list:
        ids = model.tokenize(sentence, add_special=False)
        for i in range(1, len(ids) + 1):
            text = model.detokenize(ids[:i])
            for pos, neg in zip(positives, negatives):
                pairs.append(Pair(wrap(pos, text), wrap(neg, text)))
                if max_pairs is not None and len(pairs) >= max_pairs:
                    return pairs
    return pairs


# -- capture ------------------------------------------------------------------
class _Trie:
    """Token prefix tree; node 0 is the root (no token)."""

    def __init__(self) -> None:
        self.children: list[dict[int, int]] = [{}]
        self.token: list[int] = [-1]
        self.parent: list[int] = [-1]
        self.depth: list[int] = [-1]

    def add(self, parent: int, key: int, token: int) -> int:
        """A new child of ``parent`` under ``key`` (normally the token itself)."""
        node = len(self.token)
        self.children[parent][key] = node
        self.children.append({})
        self.token.append(token)
        self.parent.append(parent)
        self.depth.append(self.depth[parent] + 1)
        return node

    def insert(self, tokens: Sequence[int], private_key: int | None = None) -> list[int]:
        """Insert a path; return its node ids (one per token). With
        ``private_key`` the path shares no node with any other (its first
        node hangs under a negative key no token can collide with)."""
        node, path = 0, []
        for i, t in enumerate(tokens):
            key = -(private_key + 2) if private_key is not None and i == 0 else t
            nxt = self.children[node].get(key)
            node = self.add(node, key, t) if nxt is None else nxt
            path.append(node)
        return path

    def path(self, node: int) -> list[int]:
        out = []
        while node > 0:
            out.append(node)
            node = self.parent[node]
        return out[::-1]


def capture(
    model: Model,
    prompts: Sequence[str | Sequence[int]],
    layers: Iterable[int] | None = None,
    read: Read = "last",
    *,
    batch_size: int | None = None,
    share_prefixes: bool = True,
    progress: Progress = False,
    steer: Steer | Sequence[Steer] | None = None,
) -> npt.NDArray[np.float32]:
    """Residual stream (block outputs) of ``prompts``.

    Returns float32 [n_prompts, n_layers, n_embd]; ``layers`` default to all
    (0..n_layer-1, output of block N at index N). ``read`` is ``"last"`` (the
    last token), ``"mean"`` (mean over all tokens) or a callable mapping a
    prompt's token ids to the positions to average. ``steer`` applies to
    every prompt while capturing (positions "all" or an explicit window);
    the captured rows include its effect at their layer.
    """
    steers = as_steers(steer)
    for s in steers:
        if s.positions in ("prompt", "generated") or s.condition is not None:
            raise ValueError("capture takes steering on positions 'all' or an explicit (p0, p1) window")
        if s.actadd is not None and (s.actadd.location == "back" or s.actadd.pad_prompt):
            raise ValueError("capture takes ActAdd injections at 'front' or a fixed offset, without pad_prompt")
    eng = model.engine
    eng.check_steers(steers)
    token_lists = [eng.prompt_tokens(p) for p in prompts]
    if not token_lists:
        raise ValueError("no prompts to capture")
    positions = [_read_positions(read, t) for t in token_lists]
    layer_list = _capture_layers(model, range(model.n_layer) if layers is None else layers)
    n_shortest = min(len(t) for t in token_lists)
    rows = _capture_rows(
        eng, token_lists, positions, layer_list, batch_size, share_prefixes, progress, steers, n_shortest
    )
    return _average_reads(rows)


def capture_positions(
    model: Model,
    prompts: Sequence[str | Sequence[int]],
    layers: Iterable[int],
    *,
    steer: Steer | Sequence[Steer] | None = None,
) -> list[npt.NDArray[np.float32]]:
    """Residual stream at every position of each prompt: per prompt float32
    [n_tokens, n_layers, n_embd].

    Each prompt is decoded alone by :meth:`Engine.prefill`, as
    :meth:`Model.generate` decodes a prompt, so a row is exactly what
    generation computes there (prompts up to 65 tokens): an ActAdd built
    from these rows and applied to a prompt of the same length cancels to
    float rounding. ``steer`` applies as in generation.
    """
    eng = model.engine
    steers = as_steers(steer)
    eng.check_steers(steers)
    token_lists = [eng.prompt_tokens(p) for p in prompts]
    if not token_lists:
        raise ValueError("no prompts to capture")
    layer_list = _capture_layers(model, layers)
    if not layer_list:
        raise ValueError("no layers to capture")
    out: list[npt.NDArray[np.float32]] = []
    for t in token_lists:
        with eng.call({0: steers} if steers else {}, {0: len(t)}):
            cap = eng.prefill([t], layer_list, all_rows={0})
        assert cap is not None
        out.append(cap.rows(0))
    return out


def _capture_layers(model: Model, layers: Iterable[int]) -> list[int]:
    """``layers`` as ints, each a block output the model has (0..n_layer-1)."""
    out = [int(x) for x in layers]
    for il in out:
        if not 0 <= il < model.n_layer:
            raise ValueError(f"layer {il} is out of range [0, {model.n_layer})")
    return out


def _mean_read(rows: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """One prompt's read rows [n_positions, n_layers, n_embd] -> their mean [n_layers, n_embd]."""
    mean: npt.NDArray[np.float32] = rows[0] if rows.shape[0] == 1 else rows.mean(axis=0)
    return mean


def _average_reads(rows: Sequence[npt.NDArray[np.float32]]) -> npt.NDArray[np.float32]:
    """Per prompt, the mean of its read rows: float32 [n_prompts, n_layers, n_embd]."""
    return np.stack([_mean_read(r) for r in rows]).astype(np.float32, copy=False)


def _read_positions(read: Read, tokens: Sequence[int]) -> list[int]:
    n = len(tokens)
    if read == "last":
        return [n - 1]
    if read == "mean":
        return list(range(n))
    if callable(read):
        pos = sorted({int(p) for p in read(tokens)})
        if not pos or pos[0] < 0 or pos[-1] >= n:
            raise ValueError(f"read callable returned positions {pos[:5]}... outside [0, {n})")
        return pos
    raise ValueError(f"read must be 'last', 'mean' or a callable, got {read!r}")


def _capture_rows(
    eng: Engine,
    token_lists: Sequence[Sequence[int]],
    positions: Sequence[Sequence[int]],
    layers: list[int],
    batch_size: int | None,
    share_prefixes: bool,
    progress: Progress,
    steers: Sequence[Steer] = (),
    n_prompt: int = 0,
) -> list[npt.NDArray[np.float32]]:
    """Per prompt, the captured rows [n_positions, n_layers, n_embd]."""
    out: list[npt.NDArray[np.float32] | None] = [None] * len(token_lists)

    def keep(i: int, rows: npt.NDArray[np.float32]) -> None:
        out[i] = rows

    _stream_rows(eng, token_lists, positions, layers, keep, batch_size, share_prefixes, progress, steers, n_prompt)
    rows = [r for r in out if r is not None]
    assert len(rows) == len(out), "every prompt's rows are decoded"
    return rows


def _stream_rows(
    eng: Engine,
    token_lists: Sequence[Sequence[int]],
    positions: Sequence[Sequence[int]],
    layers: list[int],
    sink: Callable[[int, npt.NDArray[np.float32]], None],
    batch_size: int | None,
    share_prefixes: bool,
    progress: Progress,
    steers: Sequence[Steer] = (),
    n_prompt: int = 0,
) -> None:
    """Call ``sink(i, rows)`` with prompt i's captured rows [n_positions,
    n_layers, n_embd] as soon as they are all decoded, in about prompt order,
    each prompt once. A row is held only until the prompts reading it have
    had it, so memory stays bounded by one group of sequences whatever the
    number of prompts. ``n_prompt``: the prompt length steering windows are
    computed for (the shortest prompt: one binding serves every prompt).

    Decodes are capture-only: no LM head, and no blocks after the deepest
    captured layer (each group starts from a cleared cache).
    """
    ctx = eng.ctx
    n_seq = ctx.n_seq_max if batch_size is None else min(int(batch_size), ctx.n_seq_max)
    if n_seq < 1:
        raise ValueError("batch_size must be >= 1")
    trie = _Trie()
    # node ids to read, per prompt; without sharing every prompt gets its own branch
    reads: list[list[int]] = []
    for i, (toks, pos) in enumerate(zip(token_lists, positions)):
        path = trie.insert(toks, None if share_prefixes else i)
        reads.append([path[p] for p in pos])
    readers: dict[int, list[int]] = {}  # node -> prompts still waiting for its row
    for i, r in enumerate(reads):
        for n in dict.fromkeys(r):
            readers.setdefault(n, []).append(i)
    refs = {n: len(ps) for n, ps in readers.items()}  # node -> prompts that have not had its row
    missing = [len(set(r)) for r in reads]

    groups = _group_leaves(trie, _leaves_in_prompt_order(trie, reads), n_seq, eng.n_ctx, _first_reader(trie, reads))
    rows: dict[int, npt.NDArray[np.float32]] = {}
    # Every sequence gets the same steering (so a token shared by several
    # sequences is steered the same way), bound once for all groups.
    per_seq = {s: list(steers) for s in range(n_seq)} if steers else {}
    bar = _progress_bar(sum(len(g[1]) for g in groups), progress)
    n_batch = ctx.n_batch
    with eng.call(per_seq, dict.fromkeys(per_seq, n_prompt)):
        try:
            ctx.set_capture_layers(layers)
            for leaves, nodes in groups:
                seq_of_leaf = {leaf: s for s, leaf in enumerate(leaves)}
                # seq ids of every node: the leaves below it (within this group)
                seqs: dict[int, list[int]] = {n: [] for n in nodes}
                for leaf in leaves:
                    for n in trie.path(leaf):
                        seqs[n].append(seq_of_leaf[leaf])
                ctx.clear()
                # chunks of n_batch tokens in decode order (each sequence sees
                # consecutive positions; the cache keeps earlier chunks), rows
                # handed on after each chunk
                for start in range(0, len(nodes), n_batch):
                    batch = TokenBatch()
                    out_nodes = []
                    for n in nodes[start : start + n_batch]:
                        is_out = n in readers  # not read yet (a re-decoded prefix is read once)
                        batch.add(trie.token[n], trie.depth[n], seqs[n], is_out)
                        if is_out:
                            out_nodes.append(n)
                    captured = ctx.decode_capture(batch.build(), logits=False)
                    ready = []
                    for n, row in zip(out_nodes, captured):
                        rows[n] = row  # a view of the chunk, copied below if it outlives the chunk
                        for i in readers.pop(n):
                            missing[i] -= 1
                            if missing[i] == 0:
                                ready.append(i)
                    for i in sorted(ready):
                        sink(i, np.stack([rows[n] for n in reads[i]]))
                        for n in dict.fromkeys(reads[i]):
                            refs[n] -= 1
                            if refs[n] == 0:
                                del rows[n]
                    for n in out_nodes:  # rows whose readers wait for later chunks
                        if n in rows:
                            rows[n] = rows[n].copy()
                    del captured
                    bar.update(min(n_batch, len(nodes) - start))
        finally:
            bar.close()  # capture is turned off by the call's end


def _leaves_in_prompt_order(trie: _Trie, reads: Sequence[Sequence[int]]) -> list[int]:
    """The leaves to decode, in the order of the prompts whose rows they
    carry (both sides of a pair come out close together, so few rows wait
    for their partner): for each prompt, the first leaf below its deepest
    read node. Leaves below no read node are not decoded."""
    out: list[int] = []
    seen: set[int] = set()
    for r in reads:
        node = max(r, key=lambda n: trie.depth[n])
        while trie.children[node]:
            node = next(iter(trie.children[node].values()))
        if node not in seen:
            seen.add(node)
            out.append(node)
    return out


def _group_leaves(
    trie: _Trie, leaves: Sequence[int], n_seq: int, n_ctx: int, first_reader: dict[int, int]
) -> list[tuple[list[int], list[int]]]:
    """Split ``leaves`` (in order) into groups of at most n_seq sequences
    whose union of nodes fits the cache. Returns (leaves, nodes in decode
    order) per group."""
    groups: list[tuple[list[int], list[int]]] = []
    group: list[int] = []
    seen: set[int] = set()
    for leaf in leaves:
        path = trie.path(leaf)
        if len(path) > n_ctx:
            raise LlamaSteerError(f"a prompt of {len(path)} tokens does not fit the context of {n_ctx}")
        new = sum(1 for n in path if n not in seen)
        if group and (len(group) >= n_seq or len(seen) + new > n_ctx):
            groups.append((group, _decode_order(trie, seen, first_reader)))
            group, seen = [], set()
        group.append(leaf)
        seen.update(path)
    if group:
        groups.append((group, _decode_order(trie, seen, first_reader)))
    return groups


def _first_reader(trie: _Trie, reads: Sequence[Sequence[int]]) -> dict[int, int]:
    """Per node, the first prompt (in prompt order) that reads it or a node
    below it; nodes no prompt needs are absent."""
    first: dict[int, int] = {}
    for i, r in enumerate(reads):
        for n in r:
            while n > 0 and n not in first:  # a node already seen has an earlier reader, as do its parents
                first[n] = i
                n = trie.parent[n]
    return first


def _decode_order(trie: _Trie, members: set[int], first_reader: dict[int, int]) -> list[int]:
    """``members`` (closed under parents) in the order prompts need them: by
    first reader, then depth. A parent's first reader is never later than
    its child's, so parents come first and every sequence meets its positions
    in order. Both sides of a pair come out together: decoded subtree by
    subtree instead, a group's prompts of one persona would all wait for the
    other persona's, rows piling up with the size of the group."""
    return sorted(members, key=lambda n: (first_reader.get(n, sys.maxsize), trie.depth[n]))  # unread nodes last


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


class _CallbackBar:
    """Progress reported to a callable ``(done, total)`` (e.g. a server's
    progress stream), from the thread that decodes."""

    def __init__(self, total: int, fn: Callable[[int, int], None]) -> None:
        self._done, self._total, self._fn = 0, total, fn
        fn(0, total)

    def update(self, n: int) -> None:
        self._done += n
        self._fn(self._done, self._total)

    def close(self) -> None:
        pass


def _progress_bar(total: int, progress: Progress) -> Any:
    if callable(progress):
        return _CallbackBar(total, progress)
    # A bar on a terminal only: logs and CI stay clean.
    if not progress or not sys.stderr.isatty():
        return _NoBar()
    from tqdm.auto import tqdm  # type: ignore[import-untyped]

    return tqdm(total=total, unit="tok", desc="llama-steer: decoding", leave=False)


def extract(
    model: Model,
    pairs: PairsLike,
    *,
    method: str = "pca_diff",
    layers: Iterable[int] | None = None,
    read: Read = "last",
    batch_size: int | None = None,
    progress: Progress = True,
    share_prefixes: bool = True,
) -> ControlVector:
    """A control vector from contrastive ``pairs`` on the quantized model.

    ``pairs``: a list of (positive, negative) strings, :class:`Pair` objects
    or a JSONL/CSV path. ``method``: ``mean_diff`` (CAA: the mean of
    positive minus negative, unnormalised), ``pca_diff`` (first principal
    component of the differences), ``pca_center`` (first PC of each pair
    centred on its mean) or ``probe`` (logistic-regression weights); the last
    three are unit norm. ``read``: ``"last"`` token, ``"mean"`` over the
    tokens where the pair's two prompts differ, or a callable choosing
    positions from a prompt's token ids. ``layers`` default to 1..n_layer-1.

    The vector's ``diagnostics`` hold, per layer: ``explained_variance``
    (PCA methods), ``heldout_accuracy`` and ``heldout_auc`` (a direction fit
    without every 5th pair, scored on those pairs: does the positive side
    project higher), and ``residual_norm`` (mean norm of the captured stream).

    ``progress``: a bar on a terminal (True), none (False), or a callable
    ``(tokens_decoded, tokens_total)`` called as the decode advances.
    """
    check_method(method)
    plist = check_pairs(pairs)
    layer_list = sorted(
        {check_layer(x, model.n_layer) for x in (range(1, model.n_layer) if layers is None else layers)}
    )
    if not layer_list:
        raise ValueError("layers is empty")
    prompts: list[list[int]] = []
    reads: list[list[int]] = []
    for i, p in enumerate(plist):
        try:
            tp, tn = model.engine.prompt_tokens(p.positive), model.engine.prompt_tokens(p.negative)
        except (ValueError, LlamaSteerError) as exc:
            raise type(exc)(f"pair {i}: {exc}") from exc
        if tp == tn:
            raise DatasetError(f"pair {i}: both sides tokenize identically")
        if read == "mean":
            c = common_prefix_len(tp, tn)
            rp = list(range(min(c, len(tp) - 1), len(tp)))
            rn = list(range(min(c, len(tn) - 1), len(tn)))
        else:
            rp, rn = _read_positions(read, tp), _read_positions(read, tn)
        prompts += [tp, tn]
        reads += [rp, rn]
    # Pairs are fed to the solver as both sides arrive; a side waits for its
    # partner at most about one group of sequences.
    stats = PairStats(method, len(plist), len(layer_list), model.n_embd)
    waiting: dict[int, npt.NDArray[np.float32]] = {}

    def take(i: int, rows: npt.NDArray[np.float32]) -> None:
        act = _mean_read(rows)
        other = waiting.pop(i ^ 1, None)
        if other is None:
            waiting[i] = act
        else:
            pos, neg = (act, other) if i % 2 == 0 else (other, act)
            stats.add(i // 2, pos, neg)

    _stream_rows(model.engine, prompts, reads, layer_list, take, batch_size, share_prefixes, progress)
    dirs, diag = stats.solve(layer_list)
    diag_all: dict[str, Any] = dict(diag)
    diag_all.update(method=method, n_pairs=len(plist), read=read if isinstance(read, str) else "callable")
    # The model's scale, so that Steer(..., unit="relative") works wherever the vector goes.
    return ControlVector(dirs, model_hint=model.arch, diagnostics=diag_all, residual_norms=model.residual_norms())
