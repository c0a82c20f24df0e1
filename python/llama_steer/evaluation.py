"""Evaluation: does a steering vector move a model's choices on A/B questions?

The datasets are in the format of Anthropic's model-written evals as used by
CAA (Rimsky et al., "Steering Llama 2 via Contrastive Activation Addition"):
a JSON list of ``{"question": ..., "answer_matching_behavior": "(A)",
"answer_not_matching_behavior": "(B)"}``, the question text listing the
choices ``(A) ...`` and ``(B) ...``. For each strength and question the model
reads the question, then an assistant turn opened with ``(``. Two scores:

- ``"letter"`` (CAA's): the probability of the matching letter against the
  other one alone, ``softmax(logit[match], logit[other])[0]``;
- ``"answer"``: the probability of the whole matching reply, its letter and
  its choice's text (``"A) Happy and cheerful."``), against the other reply,
  ``sigmoid(log p(matching reply) - log p(other reply))``.

Letters need a model that reads the choices and maps them to letters;
models under about 1B parameters mostly do not (the bundled 135M and 270M
models prefer "A" whatever the choices say), so a behaviour vector cannot
move their letters. The answer score asks the same question of the replies
themselves, so it needs no such reading. Two things enter it besides the
behaviour: the model's letter preference (the reply starts with its letter)
and the replies' lengths (a sum of log-probabilities). Both are fixed per
item, so they shift where an item's curve sits, not how steering moves it,
and a dataset balanced over letters (as the bundled one is) cancels the
first in the mean. A vector that steers the behaviour moves the mean
p(matching) with the strength.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

from .errors import DatasetError, LlamaSteerError
from .extraction import _progress_bar
from .steer import Steer
from .vectors import ControlVector

if TYPE_CHECKING:
    from .model import Model

KEYS = ("question", "answer_matching_behavior", "answer_not_matching_behavior")
_ANSWER = re.compile(r"\(([A-Z])\)")
_LABEL = re.compile(r"\(([A-Z])\)[ \t]*")  # a choice's label anywhere in the question
_LINE_LABEL = re.compile(r"^[ \t]*\(([A-Z])\)[ \t]*", re.MULTILINE)  # ... at the start of a line
SCORES = ("letter", "answer")
_SUFFIX = "_ab.json"  # bundled file of a dataset name: data/<name>_ab.json


# -- datasets -------------------------------------------------------------------
@dataclass(frozen=True)
class ABItem:
    """One question; ``matching`` / ``not_matching`` are the answer letters
    (``"A"``, ``"B"``, ...) without parentheses."""

    question: str
    matching: str
    not_matching: str


@dataclass(frozen=True)
class ABDataset:
    """A validated A/B dataset: its ``name`` (the bundled name or the file's
    stem) and its ``items``."""

    name: str
    items: tuple[ABItem, ...]

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[ABItem]:
        return iter(self.items)

    def __getitem__(self, i: int) -> ABItem:
        return self.items[i]


DatasetLike = ABDataset | str | os.PathLike[str] | Sequence[Mapping[str, Any]]


def bundled_ab_datasets() -> list[str]:
    """Names of the A/B datasets shipped in ``llama_steer/data`` (e.g. ``"happy"``)."""
    folder = resources.files("llama_steer").joinpath("data")
    return sorted(p.name[: -len(_SUFFIX)] for p in folder.iterdir() if p.name.endswith(_SUFFIX))


def load_ab_dataset(path_or_name: str | os.PathLike[str]) -> ABDataset:
    """Load and validate an A/B dataset: a JSON file path, or the name of a
    bundled one (``"happy"`` loads ``llama_steer/data/happy_ab.json``).

    Raises :class:`~llama_steer.errors.DatasetError` (a ``ValueError``) for a
    missing file, an unknown name, invalid JSON, or an item with a missing
    key, an answer that is not a letter in parentheses, two equal answers, or
    a letter the question does not list; the message names the item index.
    """
    text, source, name = _read_source(path_or_name)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{source}: not valid JSON ({exc})") from exc
    return parse_ab_dataset(data, name=name, source=source)


def parse_ab_dataset(data: Any, *, name: str = "dataset", source: str | None = None) -> ABDataset:
    """Validate already-parsed items (a list of CAA-format dicts); see :func:`load_ab_dataset`."""
    source = source or name
    if not isinstance(data, list):
        raise DatasetError(f"{source}: want a JSON list of items, got {type(data).__name__}")
    if not data:
        raise DatasetError(f"{source}: no items")
    items = []
    for i, obj in enumerate(data):
        where = f"{source}: item {i}"
        if not isinstance(obj, Mapping):
            raise DatasetError(f"{where}: want an object with keys {', '.join(KEYS)}, got {type(obj).__name__}")
        for key in KEYS:
            if key not in obj:
                raise DatasetError(f"{where}: missing key {key!r}")
            if not isinstance(obj[key], str):
                raise DatasetError(f"{where}: {key!r} must be a string, got {type(obj[key]).__name__}")
        question = obj["question"]
        if not question.strip():
            raise DatasetError(f"{where}: the question is empty")
        letters = []
        for key in KEYS[1:]:
            m = _ANSWER.fullmatch(obj[key].strip())
            if m is None:
                raise DatasetError(
                    f"{where}: {key} must be one capital letter in parentheses like '(A)', got {obj[key]!r}"
                )
            letters.append(m.group(1))
        match, other = letters
        if match == other:
            raise DatasetError(f"{where}: both answers are ({match})")
        for letter in letters:
            if f"({letter})" not in question:
                raise DatasetError(f"{where}: the question does not list the choice ({letter})")
        items.append(ABItem(question, match, other))
    return ABDataset(name, tuple(items))


def _read_source(path_or_name: str | os.PathLike[str]) -> tuple[str, str, str]:
    """(text, source for messages, dataset name) of a path or a bundled name."""
    if not isinstance(path_or_name, (str, os.PathLike)):
        raise TypeError(f"want a path or a dataset name, got {type(path_or_name).__name__}")
    is_name = isinstance(path_or_name, str) and re.fullmatch(r"[A-Za-z0-9_-]+", path_or_name) is not None
    if is_name and not Path(path_or_name).is_file():
        name = str(path_or_name)
        res = resources.files("llama_steer").joinpath("data", name + _SUFFIX)
        if not res.is_file():
            raise DatasetError(
                f"no bundled A/B dataset {name!r} (bundled: {', '.join(bundled_ab_datasets())}); "
                "or give the path of a JSON file"
            )
        return res.read_text(encoding="utf-8"), f"{name}{_SUFFIX}", name
    path = Path(path_or_name)
    if not path.is_file():
        raise DatasetError(f"no such A/B dataset file: {path}")
    name = path.stem[: -len("_ab")] if path.stem.endswith("_ab") else path.stem
    try:
        return path.read_text(encoding="utf-8"), str(path), name
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text ({exc})") from exc


def _as_dataset(dataset: DatasetLike) -> ABDataset:
    if isinstance(dataset, ABDataset):
        return dataset
    if isinstance(dataset, (str, os.PathLike)):
        return load_ab_dataset(dataset)
    return parse_ab_dataset(list(dataset))


# -- evaluation -------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class EvalResult:
    """Scores of one :func:`evaluate` run.

    ``p_matching``: float64 [n_strengths, n_items], row i for
    ``strengths[i]``, column j for item j of the dataset. ``layers``: the
    layers steered; ``behaviour``: the dataset's name; ``model``: the
    model's name; ``score``: ``"letter"`` or ``"answer"`` (see :func:`evaluate`).
    """

    strengths: list[float]
    p_matching: npt.NDArray[np.float64]
    behaviour: str = ""
    layers: list[int] = field(default_factory=list)
    model: str = ""
    score: str = "letter"

    @property
    def mean(self) -> npt.NDArray[np.float64]:
        """Mean p(matching) per strength: float64 [n_strengths]."""
        return np.asarray(self.p_matching.mean(axis=1), dtype=np.float64)

    @property
    def std(self) -> npt.NDArray[np.float64]:
        """Standard deviation of p(matching) over items per strength: float64 [n_strengths]."""
        return np.asarray(self.p_matching.std(axis=1), dtype=np.float64)

    @property
    def frac_matching(self) -> npt.NDArray[np.float64]:
        """Share of items where the matching answer wins (p > 0.5) per strength: float64 [n_strengths]."""
        return np.asarray((self.p_matching > 0.5).mean(axis=1), dtype=np.float64)

    def as_table(self) -> str:
        """A plain-text table: one row per strength."""
        lines = [
            f"{self.title()}",
            f"{'strength':>9}  {'mean p(matching)':>16}  {'std':>6}  {'p > 0.5':>7}",
        ]
        for s, m, sd, f in zip(self.strengths, self.mean, self.std, self.frac_matching):
            lines.append(f"{s:>9.3g}  {m:>16.3f}  {sd:>6.3f}  {f:>7.0%}")
        return "\n".join(lines)

    def title(self) -> str:
        """``<behaviour>, steering layers <ranges> (<model>)``, as the plot's title."""
        what = self.behaviour or "A/B evaluation"
        where = f", steering layers {_ranges(self.layers)}" if self.layers else ""
        who = f" ({self.model})" if self.model else ""
        return f"{what}{where}{who}, {self.p_matching.shape[1]} items, {self.score} score"


def _ranges(layers: Sequence[int]) -> str:
    """[8, 9, 10, 12] -> '8-10, 12'."""
    out: list[str] = []
    start = prev = None
    for x in sorted(layers):
        if start is None:
            start = prev = x
        elif x == prev + 1:  # type: ignore[operator]
            prev = x
        else:
            out.append(f"{start}-{prev}" if prev != start else f"{start}")
            start = prev = x
    if start is not None:
        out.append(f"{start}-{prev}" if prev != start else f"{start}")
    return ", ".join(out)


def ab_prompt(model: Model, question: str, *, chat: bool = True) -> str:
    """The prompt whose next token is the answer letter: the question as the
    user's message and an assistant turn opened with ``(`` (``chat``), or the
    question followed by ``Answer: (``."""
    if chat:
        return model.apply_chat_template([{"role": "user", "content": question}]) + "("
    return f"{question}\n\nAnswer: ("


def _letter_token(model: Model, letter: str, prompt: str) -> int:
    """The token the model reads for ``letter`` right after the prompt's
    ``(``: it must be one token that leaves the prompt's tokens alone
    (SmolLM2 and Gemma 3 both read "(A)" as "(", "A", ")"), or the letter's
    logit would not be what the model says next."""
    from .scoring import split_at_seam

    head, (tail,) = split_at_seam(model, prompt, [letter])
    if len(head) != len(model.engine.prompt_tokens(prompt)) or len(tail) != 1:
        raise LlamaSteerError(
            f"the model does not read {letter!r} after '(' as one token of its own; the letter score needs it to"
        )
    return tail[0]


def choice_text(item: ABItem, letter: str) -> str:
    """The text of choice ``letter`` in ``item``'s question: the rest of the
    line its label ``(X)`` starts. Labels at the start of a line are the
    choices (a ``(B)`` inside a sentence is a mention); only when the letter
    has none, its last inline label counts, up to the next label."""
    q = item.question
    at_line_start = [m for m in _LINE_LABEL.finditer(q) if m.group(1) == letter]
    if at_line_start:
        m = at_line_start[-1]
        text = q[m.end() :].split("\n", 1)[0].strip()
    else:
        labels = list(_LABEL.finditer(q))
        mine = [k for k, lab in enumerate(labels) if lab.group(1) == letter]
        if not mine:
            raise DatasetError(f"the question does not list the choice ({letter}): {q[:60]!r}")
        k = mine[-1]
        end = labels[k + 1].start() if k + 1 < len(labels) else len(q)
        text = q[labels[k].end() : end].split("\n", 1)[0].strip()
    if not text:
        raise DatasetError(f"the choice ({letter}) has no text: {q[:60]!r}")
    return text


def answer_reply(item: ABItem, letter: str) -> str:
    """The reply the answer score reads after ``(``: ``"A) <choice text>"``."""
    return f"{letter}) {choice_text(item, letter)}"


def _check_strengths(strengths: Sequence[float]) -> list[float]:
    if isinstance(strengths, (str, bytes)) or not hasattr(strengths, "__iter__"):
        raise ValueError(f"strengths must be a sequence of numbers, got {strengths!r}")
    out = []
    for s in strengths:
        if isinstance(s, bool) or not isinstance(s, (int, float, np.integer, np.floating)):
            raise ValueError(f"strengths must be numbers, got {s!r}")
        if not math.isfinite(float(s)):
            raise ValueError(f"strengths must be finite, got {s!r}")
        out.append(float(s))
    if not out:
        raise ValueError("strengths is empty")
    return out


def _chunks(lengths: Sequence[int], max_seqs: int, max_tokens: int) -> Iterator[range]:
    """Consecutive index ranges of at most ``max_seqs`` prompts whose tokens
    together stay below ``max_tokens`` (the sequences share the KV cache)."""
    from .scoring import pack

    return pack([(1, n) for n in lengths], (max_seqs, max_tokens - 1))


def evaluate(
    model: Model,
    vector: ControlVector | Mapping[int, npt.ArrayLike],
    dataset: DatasetLike,
    strengths: Sequence[float] = (-4, -2, 0, 2, 4),
    *,
    layers: Iterable[int] | None = None,
    score: str = "letter",
    progress: bool = True,
    chat: bool = True,
) -> EvalResult:
    """p(matching answer) of every item of ``dataset`` at every strength of ``vector``.

    ``dataset``: an :class:`ABDataset`, a bundled name (``"happy"``), a JSON
    path, or a list of CAA-format dicts. Each item is asked as in
    :func:`ab_prompt` with ``Steer(vector, strength, layers=layers)``
    (every position, prompt included). ``score="letter"`` (CAA's) is the
    softmax over the logits of the two answer letters only;
    ``score="answer"`` compares the probabilities of the two whole replies,
    letter and choice text (:func:`answer_reply`), for models too small to
    map choices to letters. Deterministic: nothing is sampled. Returns an
    :class:`EvalResult` whose ``p_matching`` is float64
    [len(strengths), len(dataset)].

    Bad arguments (no strengths, a non-finite one, an unknown score, a
    vector made for another model or with layers the model lacks) raise
    ``ValueError``.
    """
    strength_list = _check_strengths(strengths)
    if score not in SCORES:
        raise ValueError(f"score must be one of {', '.join(SCORES)}, got {score!r}")
    data = _as_dataset(dataset)
    vec = vector if isinstance(vector, ControlVector) else ControlVector(vector)
    if layers is not None:
        vec = vec.select(list(layers))
    # One resolved vector shared by every Steer: the sweep takes one slot of
    # the steering buffer however many strengths it has.
    steers = [Steer(vec, s) for s in strength_list]
    model.engine.check_steers(steers[:1])  # fail before decoding anything
    prompts = [ab_prompt(model, item.question, chat=chat) for item in data]
    score_items = _score_letters if score == "letter" else _score_answers
    diff = score_items(model, data, prompts, steers, progress)  # log-odds, [n_strengths, n_items]
    p = 0.5 * (1.0 + np.tanh(diff / 2.0))  # the logistic, without overflow at large |diff|
    return EvalResult(strength_list, p, behaviour=data.name, layers=vec.layers, model=model.name, score=score)


def _score_letters(
    model: Model,
    data: ABDataset,
    prompts: Sequence[str],
    steers: Sequence[Steer],
    progress: bool,
) -> npt.NDArray[np.float64]:
    """logit[match] - logit[other] per (strength, item)."""
    token_lists = [model.tokenize(p, add_special=True, parse_special=True) for p in prompts]
    letter_ids: dict[str, int] = {}
    for item in data:
        for letter in (item.matching, item.not_matching):
            if letter not in letter_ids:
                letter_ids[letter] = _letter_token(model, letter, prompts[0])
    match_ids = np.array([letter_ids[item.matching] for item in data])
    other_ids = np.array([letter_ids[item.not_matching] for item in data])

    # Every (strength, item) pair is one sequence of a batch, steered on its own.
    jobs = [(si, j) for si in range(len(steers)) for j in range(len(data))]
    lengths = [len(token_lists[j]) for _, j in jobs]
    diff = np.empty((len(steers), len(data)), dtype=np.float64)
    bar = _progress_bar(sum(lengths), progress)
    try:
        for chunk in _chunks(lengths, model.engine.ctx.n_seq_max, model.n_ctx):
            batch = [jobs[k] for k in chunk]
            logits = model.logits_batch([token_lists[j] for _, j in batch], [steers[si] for si, _ in batch])
            rows = np.arange(len(batch))
            items = np.array([j for _, j in batch])
            d = logits[rows, match_ids[items]].astype(np.float64) - logits[rows, other_ids[items]]
            diff[[si for si, _ in batch], items] = d
            bar.update(sum(lengths[k] for k in chunk))
    finally:
        bar.close()
    return diff


def _score_answers(
    model: Model,
    data: ABDataset,
    prompts: Sequence[str],
    steers: Sequence[Steer],
    progress: bool,
) -> npt.NDArray[np.float64]:
    """log p(matching reply) - log p(other reply) per (strength, item)."""
    from .scoring import ScoreJob, score_jobs, split_at_seam

    split = []
    for j, item in enumerate(data):
        try:
            texts = [answer_reply(item, item.matching), answer_reply(item, item.not_matching)]
        except DatasetError as exc:
            raise DatasetError(f"{data.name}: item {j}: {exc}") from None
        split.append(split_at_seam(model, prompts[j], texts))
    jobs = [ScoreJob(head, tails, [s]) for s in steers for head, tails in split]
    bar = _progress_bar(sum(job.n_cells for job in jobs), progress)
    try:
        scored = score_jobs(model, jobs, on_group=bar.update)
    finally:
        bar.close()
    diff = np.array([float(m.sum() - o.sum()) for m, o in scored], dtype=np.float64)
    return diff.reshape(len(steers), len(data))


# -- plot -------------------------------------------------------------------------
def plot_curve(result: EvalResult, path: str | os.PathLike[str]) -> Path:
    """Write a PNG of mean p(matching) against strength, with a +-1 std band
    over items and the 0.5 line (no preference); returns the path."""
    # Figure + the Agg canvas directly: no pyplot, so the caller's matplotlib
    # backend and global figure state are left alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    order = np.argsort(result.strengths)
    x = np.asarray(result.strengths, dtype=np.float64)[order]
    mean, std = result.mean[order], result.std[order]
    fig = Figure(figsize=(7, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.fill_between(x, np.clip(mean - std, 0, 1), np.clip(mean + std, 0, 1), alpha=0.2, label="±1 std over items")
    ax.plot(x, mean, "o-", label="mean p(matching)")
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1, label="no preference")
    ax.set_xlabel("steering strength")
    ax.set_ylabel("p(answer matching the behaviour)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    ax.set_title(result.title(), fontsize=10)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, format="png")
    return out


# -- next-word curve -------------------------------------------------------------
MOOD_PROMPT = "In one word, how do you feel right now?"
MOOD_POSITIVE = (" happy", " great", " wonderful", " excited", " good", " amazing", " fantastic", " grateful")
MOOD_NEGATIVE = (" sad", " terrible", " awful", " depressed", " bad", " miserable", " lonely", " down")


@dataclass
class WordOddsCurve:
    """Log-odds of the next word being one of ``positive`` rather than one of
    ``negative``, per strength: ``log_odds`` float64 [n_strengths]."""

    strengths: list[float]
    log_odds: npt.NDArray[np.float64]
    prompt: str
    layers: list[int] | None


def word_odds_curve(
    model: Model,
    vector: ControlVector,
    strengths: Sequence[float],
    *,
    layers: Iterable[int] | None = None,
    question: str = MOOD_PROMPT,
    answer_prefix: str = "I feel",
    positive: Sequence[str] = MOOD_POSITIVE,
    negative: Sequence[str] = MOOD_NEGATIVE,
    unit: Literal["absolute", "relative"] = "absolute",
) -> WordOddsCurve:
    """How steering moves the very next word: the chat-formatted ``question``
    followed by ``answer_prefix``, and log(sum p(positive words)) minus
    log(sum p(negative words)) over each word's first token, per strength
    (one batch, one sequence per strength; ``unit`` as in :class:`Steer`)."""
    values = _check_strengths(strengths)
    layer_list = None if layers is None else [int(k) for k in layers]
    vec = vector if layer_list is None else vector.select(layer_list)
    prompt = model.apply_chat_template([{"role": "user", "content": question}]) + answer_prefix
    pos_ids = sorted({model.tokenize(w, add_special=False)[0] for w in positive})
    neg_ids = sorted({model.tokenize(w, add_special=False)[0] for w in negative})
    if set(pos_ids) & set(neg_ids):
        raise ValueError("a positive and a negative word share their first token")
    logits = model.logits_batch([prompt] * len(values), [Steer(vec, s, unit=unit) for s in values]).astype(np.float64)

    # The softmax normaliser is the same for both word sets of a row, so the
    # log-odds need only the log-sum-exp of each set's logits.
    def lse(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        m = x.max(axis=1, keepdims=True)
        return np.asarray((m + np.log(np.exp(x - m).sum(axis=1, keepdims=True)))[:, 0], dtype=np.float64)

    return WordOddsCurve(values, lse(logits[:, pos_ids]) - lse(logits[:, neg_ids]), prompt, layer_list)


def plot_word_odds(curve: WordOddsCurve, path: str | os.PathLike[str], title: str = "") -> Path:
    """Write a PNG of the next-word log-odds against strength; returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    order = np.argsort(curve.strengths)
    x = np.asarray(curve.strengths, dtype=np.float64)[order]
    fig = Figure(figsize=(7, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(x, curve.log_odds[order], "o-", color="tab:orange")
    ax.axhline(0.0, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("steering strength")
    ax.set_ylabel("log p(happy words) - log p(sad words)")
    ax.grid(alpha=0.3)
    ax.set_title(title or "next word after 'I feel' as steering strength changes", fontsize=10)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, format="png")
    return out
