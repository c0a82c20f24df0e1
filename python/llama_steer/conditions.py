"""CAST, conditional activation steering (Lee et al., arXiv 2409.05907):
a behaviour is steered only when the prompt matches a condition.

A :class:`Condition` is a direction ``c`` at one layer, a threshold and a
comparison. After a prompt is decoded, its hidden state ``h`` at that layer
(the mean over the prompt's tokens, or the last token's) is compared with
the direction as CAST computes it::

    proj = tanh((h . c / c . c) c)          # the projection on c, squashed
    sim  = cos(h, proj) = h . proj / (|h| |proj|)

and the condition holds when ``sim > threshold`` (``compare="above"``) or
``sim < threshold`` (``"below"``). IBM's activation-steering names these
two the other way round ("smaller" means the threshold is smaller than the
similarity, i.e. our "above"). The hidden state is captured during the
prompt's own decode, not in a second pass; layer N is the output of block N
as everywhere in this package.

:func:`find_condition` picks the layer, threshold and comparison by F1 on
held-out prompts, as CAST's ``find_best_condition_point`` does.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from .model import Model

Compare = Literal["above", "below"]
ConditionRead = Literal["mean", "last"]


def similarity(h: npt.ArrayLike, direction: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """CAST's similarity of hidden states to a condition direction.

    ``h``: [..., n_embd] (any leading shape); ``direction``: [n_embd].
    Returns float64 of the leading shape: ``cos(h, tanh(P h))`` with ``P``
    the projection on ``direction``; 0 where ``h`` or the projection is zero.
    """
    hh = np.asarray(h, dtype=np.float64)
    c = np.asarray(direction, dtype=np.float64)
    cc = float(c @ c)
    if not cc > 0:
        raise ValueError("a condition direction must be non-zero")
    coef = (hh @ c) / cc  # [...]
    proj = np.tanh(coef[..., None] * c)  # [..., n_embd]
    num = np.sum(hh * proj, axis=-1)
    den = np.linalg.norm(hh, axis=-1) * np.linalg.norm(proj, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)
    return np.asarray(out, dtype=np.float64)


def meets(sim: npt.ArrayLike, threshold: float, compare: Compare) -> npt.NDArray[np.bool_]:
    """Where similarities ``sim`` meet a threshold: ``sim > threshold``
    (``"above"``) or ``sim < threshold`` (``"below"``)."""
    s = np.asarray(sim)
    return np.asarray(s > threshold if compare == "above" else s < threshold)


@dataclass(frozen=True, eq=False)  # holds an array: compared by identity
class Condition:
    """Steer only when the prompt matches: ``similarity(h, vector) > threshold``
    (``compare="above"``) or ``<`` (``"below"``), with ``h`` the prompt's hidden
    state at ``layer`` (``read="mean"`` over its tokens, or ``"last"``).

    ``vector`` is a float32 [n_embd] direction (a ``ControlVector``'s layer, a
    :func:`find_condition` result, or your own). ``f1`` is set by
    :func:`find_condition`: the F1 on the split it chose the threshold on,
    so optimistic; ``benchmarks/cast_topics.py`` measures prompts it never saw.

    The hidden state is read where steering has already acted: other
    (unconditional) Steers or an ActAdd on the same sequence change it, and
    thresholds found on unsteered prompts may then not carry over.
    """

    vector: npt.ArrayLike
    layer: int
    threshold: float
    compare: Compare = "above"
    read: ConditionRead = "mean"
    f1: float | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        vec = np.array(self.vector, dtype=np.float32)
        if vec.ndim != 1 or vec.size == 0:
            raise ValueError(f"a condition vector must be 1-D [n_embd], got shape {vec.shape}")
        if not np.all(np.isfinite(vec)) or not np.any(vec):
            raise ValueError("a condition vector must be finite and non-zero")
        vec.setflags(write=False)
        object.__setattr__(self, "vector", vec)
        if isinstance(self.layer, bool) or not isinstance(self.layer, (int, np.integer)) or self.layer < 0:
            raise ValueError(f"layer must be an int >= 0, got {self.layer!r}")
        object.__setattr__(self, "layer", int(self.layer))
        if not isinstance(self.threshold, (int, float, np.floating)) or not math.isfinite(self.threshold):
            raise ValueError(f"threshold must be a finite number, got {self.threshold!r}")
        object.__setattr__(self, "threshold", float(self.threshold))
        if self.compare not in ("above", "below"):
            raise ValueError(f"compare must be 'above' or 'below', got {self.compare!r}")
        if self.read not in ("mean", "last"):
            raise ValueError(f"read must be 'mean' or 'last', got {self.read!r}")

    @property
    def n_embd(self) -> int:
        return int(np.asarray(self.vector).shape[0])

    def similarity(self, h: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """CAST's similarity of hidden states ``h`` [..., n_embd] to this direction."""
        return similarity(h, self.vector)

    def holds(self, h: npt.ArrayLike) -> bool:
        """Whether the condition holds for one hidden state ``h`` [n_embd]."""
        return self.meets(float(self.similarity(h)))

    def meets(self, sim: float) -> bool:
        """Whether a similarity (from :meth:`similarity`) meets the threshold."""
        return bool(meets(sim, self.threshold, self.compare))

    def check_fits(self, n_layer: int, n_embd: int) -> None:
        """Raise ValueError unless the condition fits a model of this shape."""
        if self.n_embd != n_embd:
            raise ValueError(f"the condition vector has n_embd {self.n_embd}, the model {n_embd}")
        if not 0 <= self.layer < n_layer:
            raise ValueError(f"the condition's layer {self.layer} is out of range (0..{n_layer - 1})")


@dataclass(frozen=True)
class ConditionSearch:
    """What :func:`find_condition` measured: the best condition, and the
    held-out F1 of every (layer, compare) at its best threshold."""

    condition: Condition
    f1_by_layer: dict[tuple[int, str], float]
    n_train: int
    n_heldout: int


def f1_score(pred: npt.NDArray[np.bool_], truth: npt.NDArray[np.bool_]) -> float:
    """F1 of boolean predictions against boolean truth (0 when undefined)."""
    tp = float(np.sum(pred & truth))
    fp = float(np.sum(pred & ~truth))
    fn = float(np.sum(~pred & truth))
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def find_condition(
    model: Model,
    matching: Sequence[str],
    other: Sequence[str],
    *,
    layers: Iterable[int] | None = None,
    read: ConditionRead = "mean",
    heldout: float = 0.5,
    chat: bool = True,
    seed: int = 0,
) -> ConditionSearch:
    """Grid-search a :class:`Condition` that tells ``matching`` prompts from ``other`` ones.

    The prompts (user messages, wrapped in the chat template when ``chat``)
    are split at random (``seed``) into a training part and a held-out part
    (``heldout`` of each class). On the training part, the condition
    direction at each layer is the difference of the two classes' mean
    hidden states (unit norm). On the held-out part, every layer x compare x
    threshold (midpoints between sorted similarities) is scored by F1 with
    ``matching`` as the positive class; the best is returned with its F1
    (ties: the earlier layer). That F1 is measured on the split the
    threshold was chosen on, so it is optimistic: test the condition on
    prompts the search never saw. One capture pass over all prompts.
    """
    match_list, other_list = [str(p) for p in matching], [str(p) for p in other]
    if len(match_list) < 2 or len(other_list) < 2:
        raise ValueError("find_condition needs at least 2 matching and 2 other prompts")
    if not 0 < heldout < 1:
        raise ValueError(f"heldout must be in (0, 1), got {heldout}")
    layer_list = list(range(1, model.n_layer)) if layers is None else [int(x) for x in layers]
    if not layer_list:
        raise ValueError("no layers to search")  # out-of-range ones: model.capture says which
    texts = match_list + other_list
    if chat:
        texts = [model.apply_chat_template([{"role": "user", "content": t}]) for t in texts]
    truth = np.array([True] * len(match_list) + [False] * len(other_list))
    rng = np.random.default_rng(seed)
    test = np.zeros(len(texts), dtype=bool)
    for cls in (truth, ~truth):
        idx = np.flatnonzero(cls)
        n_test = min(max(1, round(heldout * len(idx))), len(idx) - 1)
        test[rng.choice(idx, size=n_test, replace=False)] = True
    acts = model.capture(texts, layer_list, read=read).astype(np.float64)  # [n, n_layers, n_embd]

    best: tuple[float, int, str, float] | None = None  # (f1, layer, compare, threshold)
    f1_by_layer: dict[tuple[int, str], float] = {}
    train = ~test
    for j, il in enumerate(layer_list):
        direction = acts[train & truth, j].mean(axis=0) - acts[train & ~truth, j].mean(axis=0)
        norm = float(np.linalg.norm(direction))
        if not norm > 0:
            continue
        direction /= norm
        sims = similarity(acts[test, j], direction)
        cuts = np.unique(sims)
        thresholds = np.concatenate([[cuts[0] - 1e-6], (cuts[:-1] + cuts[1:]) / 2, [cuts[-1] + 1e-6]])
        for compare in ("above", "below"):
            scores = [f1_score(meets(sims, t, compare), truth[test]) for t in thresholds]
            k = int(np.argmax(scores))
            f1_by_layer[(il, compare)] = scores[k]
            if best is None or scores[k] > best[0]:
                best = (scores[k], il, compare, float(thresholds[k]))
                best_dir = direction.astype(np.float32)
    if best is None:
        raise ValueError("the two sets of prompts have the same mean hidden state at every layer searched")
    f1, il, compare, threshold = best
    cond = Condition(best_dir, il, threshold, compare, read, f1=f1)  # type: ignore[arg-type]
    return ConditionSearch(cond, f1_by_layer, int(np.sum(~test)), int(np.sum(test)))


def topic_prompts(topic: str = "cooking") -> tuple[list[str], list[str]]:
    """The bundled prompts (user messages) that do and do not ask about a
    ``topic`` (``"cooking"``, ``"health"``): ``(matching, other)``."""
    import json
    from importlib import resources

    data = json.loads(resources.files("llama_steer").joinpath("data/topics.json").read_text(encoding="utf-8"))
    if topic not in data["topics"]:
        raise ValueError(f"unknown topic {topic!r}; bundled: {', '.join(sorted(data['topics']))}")
    t = data["topics"][topic]
    return list(t["matching"]), list(t["other"])
