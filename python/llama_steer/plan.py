"""Where and how hard to steer: an effect-based search over layer bands and
strengths (:func:`find_steering`).

Separation (how well a layer's activations tell the two behaviours apart,
what ``ControlVector.plot_layers`` shows) is not steerability. The search
measures what steering does instead, for every (band, strength) cell:

- **effect**: how much more the steered model prefers the matching answer of
  held-out A/B items over the other: the log-odds of the two whole replies
  at ``+s`` minus those at ``-s``, halved, averaged over items;
- **damage**: how much the steering raises the model's negative
  log-likelihood of a neutral reference text (relative to unsteered; the
  worse of the two signs).

Strengths are relative (``Steer(..., unit="relative")``: a fraction of the
model's residual norm at each layer), so a plan carries across models. Every
cell is scored in the same batched passes (:func:`~llama_steer.scoring.score_jobs`):
each question is decoded once, unsteered, and every cell's two replies branch
off it, steered on the reply's tokens (and the question's last token).

Damage grows with strength and effect with it, so the best cell of a band is
the strongest one within the damage bound: by default each band gets one
cell, at the strength one damage probe (both signs, the reference text
only) and a power law put just under the bound, instead of a grid of
strengths most of whose cells are either weak or over the bound. On the
bundled SmolLM2: 7 bands,
~2k scored tokens, ~10 s on 2 cores, where a 7 x 4 grid on 12 items
scored ~15k tokens in ~60 s.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .engine import reference_text
from .evaluation import ABItem, DatasetLike, _as_dataset, ab_prompt, answer_reply
from .scoring import ScoreJob, score_jobs, split_at_seam
from .steer import Steer
from .vectors import FIRST_LAYER, ControlVector

if TYPE_CHECKING:
    from .model import Model

GRID_STRENGTHS = (0.02, 0.04, 0.08, 0.16)  # relative: a geometric grid (find_steering(strengths=...))
DEFAULT_MAX_DAMAGE = 0.10  # NLL of the reference text up by at most 10%
DEFAULT_ITEMS = 6  # held-out A/B items scored per cell
REFERENCE_TOKENS = 48  # tokens of the reference text whose NLL is the damage
PROBE_TOKENS = 24  # ... of which a search's probes read the first (they only aim)
# The search for each band's strength (find_steering without a grid): probe
# the damage at SEARCH_START, and measure the cell at the strength a power
# law puts at SEARCH_TARGET of the bound (the measurement decides whether it
# is within).
SEARCH_START = 0.08
SEARCH_TARGET = 0.75
_SEARCHED = "at its strength"  # the one column of a table whose bands were searched
# Questions with no mood of their own, for looking at steered answers
# (benchmarks/find_steering.py, tests/test_bake.py).
NEUTRAL_QUESTIONS = (
    "How are you feeling today?",
    "Tell me about your weekend.",
    "What do you think about rainy days?",
    "Describe your morning.",
    "How was work this week?",
    "What is your favourite season and why?",
)


@dataclass(frozen=True)
class PlanCell:
    """One measured (layer band, relative strength) cell."""

    layers: tuple[int, int]  # first and last layer of the band
    relative_strength: float
    effect: float  # (shift_plus - shift_minus) / 2
    damage: float  # relative NLL increase of the reference text (worse sign)
    shift_plus: float = 0.0  # mean log-odds change toward the matching answer at +strength
    shift_minus: float = 0.0  # ... at -strength


@dataclass
class SteeringPlan:
    """The search's answer (:func:`find_steering`) and everything it measured."""

    vector: ControlVector
    layers: tuple[int, ...]
    relative_strength: float
    strength: float  # absolute, at the band's middle layer (for the CLI's --strength)
    effect: float
    damage: float
    max_damage: float
    table: list[PlanCell] = field(default_factory=list)
    seconds: float = 0.0
    model: str = ""

    def steer(self, sign: float = 1.0) -> Steer:
        """The chosen steering (``sign=-1`` steers the other way)."""
        return Steer(self.vector, sign * self.relative_strength, layers=self.layers, unit="relative")

    def _layout(self) -> tuple[list[tuple[int, int]], list[str], list[list[PlanCell]]]:
        """The table as rows of bands and columns: the strengths of a grid, or
        one column when each band was measured at its own strength."""
        bands = sorted({c.layers for c in self.table})
        strengths = sorted({c.relative_strength for c in self.table})
        by_cell = {(c.layers, c.relative_strength): c for c in self.table}
        if len(by_cell) == len(bands) * len(strengths):
            return bands, [f"{x:g}" for x in strengths], [[by_cell[(b, x)] for x in strengths] for b in bands]
        per_band = {c.layers: c for c in self.table}
        return bands, [_SEARCHED], [[per_band[b]] for b in bands]

    def _is_chosen(self, c: PlanCell) -> bool:
        return c.layers == (self.layers[0], self.layers[-1]) and c.relative_strength == self.relative_strength

    def as_table(self) -> str:
        """Every cell, effect and damage, the chosen one marked."""
        bands, columns, rows = self._layout()
        bound = f"bound {100 * self.max_damage:.0f}%"
        lines = [f"effect (log-odds) / damage (NLL +%), relative strengths; {bound}"]
        searched = columns == [_SEARCHED]
        lines.append("layers   " + (f"{'strength':>10}{'':>16}" if searched else "".join(f"{x:>16}" for x in columns)))
        for b, cells in zip(bands, rows):
            row = f"{b[0]:>2}-{b[1]:<5}"
            for c in cells:
                mark = "*" if self._is_chosen(c) else ("!" if c.damage > self.max_damage else " ")
                row += f"{c.relative_strength:>10.3g}" if searched else ""
                row += f"{c.effect:>8.2f} /{100 * c.damage:>5.1f}%{mark}"
            lines.append(row)
        lines.append("* chosen   ! over the damage bound")
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike[str]) -> Path:
        """A heat map of effect over (band, strength) with the cells over the
        damage bound hatched (one column, each cell labelled with its
        strength, when each band was searched); returns the path."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Rectangle

        bands, columns, rows = self._layout()
        eff = np.array([[c.effect for c in cells] for cells in rows])
        fig, ax = plt.subplots(figsize=(1.4 * len(columns) + 2.5, 0.45 * len(bands) + 1.8))
        im = ax.imshow(eff, cmap="viridis", aspect="auto")
        for i, cells in enumerate(rows):
            for j, c in enumerate(cells):
                over = c.damage > self.max_damage
                if over:
                    ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="xx", edgecolor="red", lw=0))
                label = f"{c.effect:.2f}" + (f" @{c.relative_strength:.3g}" if columns == [_SEARCHED] else "")
                ax.text(
                    j,
                    i,
                    label + (" *" if self._is_chosen(c) else ""),
                    ha="center",
                    va="center",
                    color="white" if not over else "red",
                    fontsize=8,
                )
        ax.set_xticks(range(len(columns)), columns)
        ax.set_yticks(range(len(bands)), [f"{b[0]}-{b[1]}" for b in bands])
        ax.set_xlabel("relative strength (fraction of the residual norm)")
        ax.set_ylabel("layers")
        ax.set_title(f"{self.model}: effect (log-odds); hatched: NLL up > {100 * self.max_damage:.0f}%", fontsize=9)
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def default_bands(n_layer: int) -> list[tuple[int, int]]:
    """Contiguous bands across the depth: the four quarters, and three halves
    starting at each of the first three quarters (the last band of each kind
    runs to the last layer). 29 layers: 1-7, 8-14, 15-21, 22-29, 1-14, 8-21, 15-29."""
    last = n_layer - 1
    q = max(1, (last - FIRST_LAYER + 1) // 4)
    starts = [FIRST_LAYER + i * q for i in range(4) if FIRST_LAYER + i * q <= last]
    quarters = [(a, starts[i + 1] - 1 if i + 1 < len(starts) else last) for i, a in enumerate(starts)]
    halves = [(a, starts[i + 2] - 1 if i + 2 < len(starts) else last) for i, a in enumerate(starts[:-1])]
    return list(dict.fromkeys(quarters + halves))


def measure(
    model: Model,
    vector: ControlVector,
    items: Sequence[ABItem],
    cells: Sequence[tuple[tuple[int, int], float]],
    *,
    reference: str | None = None,
) -> list[PlanCell]:
    """Effect and damage of each ``(band, relative strength)`` cell (a
    strength may be 0) on A/B ``items`` (e.g. ``load_ab_dataset("happy").items``),
    all scored in one batched pass with the unsteered baseline: the engine of
    :func:`find_steering`."""
    if not items:
        raise ValueError("no pairs to measure the effect on")
    model.engine.check_steers([Steer(vector, 1.0)])
    # Each item's question is decoded once, unsteered, and every cell's two
    # replies branch off it, steered on their own tokens (and the question's
    # last token, whose row predicts the reply's first): the cost of a cell
    # is its replies, not the question again.
    steers: list[list[Steer]] = [[]]  # the unsteered baseline first
    for (a, b), s in cells:
        for sign in (1.0, -1.0):
            span = range(a, b + 1)
            steers.append([Steer(vector, sign * s, layers=span, unit="relative", positions="generated")])
    per_job = max(1, model.engine.ctx.n_seq_max // 2)  # steers per job: two replies each
    jobs: list[ScoreJob] = []
    for item in items:
        replies = [answer_reply(item, item.matching), answer_reply(item, item.not_matching)]
        head, tails = split_at_seam(model, ab_prompt(model, item.question), replies)
        if len(head) < 2:
            raise ValueError(f"item {item.question[:40]!r}: its prompt is too short to branch from")
        branches = [[head[-1], *t] for t in tails]
        for k in range(0, len(steers), per_job):
            chunk = steers[k : k + per_job]
            conts = [c for _ in chunk for c in branches]
            jobs.append(ScoreJob(head[:-1], conts, (), [st for st in chunk for _ in branches]))
    ref_tokens = _reference_tokens(model, reference)
    n_item_jobs = len(jobs)
    for st in steers:
        everywhere = [Steer(x.vector, x.strength, layers=x.layers, unit=x.unit) for x in st]
        jobs.append(_reference_job(ref_tokens, everywhere))
    scored = score_jobs(model, jobs)
    # log-odds per (steer, item): the jobs of an item hold its steers in order
    log_odds = np.empty((len(steers), len(items)))
    jobs_per_item = n_item_jobs // len(items)
    for j, item_jobs in enumerate(range(0, n_item_jobs, jobs_per_item)):
        flat = [x for job in scored[item_jobs : item_jobs + jobs_per_item] for x in job]
        log_odds[:, j] = [float(flat[2 * i].sum() - flat[2 * i + 1].sum()) for i in range(len(steers))]
    nll = np.array([-float(scored[n_item_jobs + i][0].mean()) for i in range(len(steers))])
    table = []
    for c, (band, s) in enumerate(cells):
        plus, minus = 1 + 2 * c, 2 + 2 * c
        up, down = float(np.mean(log_odds[plus] - log_odds[0])), float(np.mean(log_odds[minus] - log_odds[0]))
        damage = float(max(nll[plus], nll[minus]) / nll[0] - 1)
        table.append(PlanCell(band, s, (up - down) / 2, damage, up, down))
    return table


def _reference_tokens(model: Model, reference: str | None, n: int = REFERENCE_TOKENS) -> list[int]:
    tokens = model.tokenize(reference or reference_text(), add_special=True)[:n]
    if len(tokens) < 8:
        raise ValueError("the reference text is too short (fewer than 8 tokens)")
    return tokens


def _reference_job(tokens: Sequence[int], steers: list[Steer]) -> ScoreJob:
    """A short head as the prompt, the rest scored token by token, steered
    everywhere, as in generation."""
    return ScoreJob(tokens[:4], [tokens[4:]], steers)


def probe_damage(
    model: Model,
    vector: ControlVector,
    cells: Sequence[tuple[tuple[int, int], float]],
    reference: str | None = None,
    n_tokens: int = PROBE_TOKENS,
) -> list[float]:
    """Damage of each ``(band, signed relative strength)`` cell alone (the
    relative NLL increase of the reference text's first ``n_tokens``), in
    one batched pass: the cheap half of :func:`measure`, for searching
    strengths (:func:`measure` reads :data:`REFERENCE_TOKENS`)."""
    tokens = _reference_tokens(model, reference, n_tokens)
    jobs = [_reference_job(tokens, [])]
    for (a, b), st in cells:
        jobs.append(_reference_job(tokens, [Steer(vector, st, layers=range(a, b + 1), unit="relative")]))
    nll = [-float(job[0].mean()) for job in score_jobs(model, jobs)]
    return [x / nll[0] - 1 for x in nll[1:]]


def search_strengths(
    model: Model,
    vector: ControlVector,
    bands: Sequence[tuple[int, int]],
    *,
    max_damage: float = DEFAULT_MAX_DAMAGE,
    reference: str | None = None,
) -> list[float]:
    """Per band, the relative strength where damage reaches
    :data:`SEARCH_TARGET` of ``max_damage`` by a power law through one probe
    at :data:`SEARCH_START` (the worse sign). The probe sits where every
    band's damage is well above float noise (small strengths move a
    quantized model's NLL either way); the exponents, measured on the
    bundled models near the bound (1.1 to 2.5), are taken at their
    cautious ends: 1.5 going down, 2.5 going up."""
    target = SEARCH_TARGET * max_damage
    s0 = SEARCH_START
    both = probe_damage(model, vector, [(band, sign * s0) for band in bands for sign in (1.0, -1.0)], reference)
    out = []
    for k in range(len(bands)):
        d = max(both[2 * k], both[2 * k + 1])
        if d <= 0:
            out.append(s0 * 4)
            continue
        power = 1.5 if d > target else 2.5
        out.append(float(f"{np.clip(s0 * (target / d) ** (1 / power), s0 / 16, s0 * 4):.3g}"))
    return out


def find_steering(
    model: Model,
    vector: ControlVector,
    pairs: DatasetLike = "happy",
    *,
    bands: Sequence[tuple[int, int]] | None = None,
    strengths: Sequence[float] | None = None,
    reference: str | None = None,
    max_damage: float = DEFAULT_MAX_DAMAGE,
    max_items: int | None = DEFAULT_ITEMS,
) -> SteeringPlan:
    """Measure effect and damage over layer bands x relative strengths and
    pick the cell with the largest effect whose damage stays within
    ``max_damage`` (a relative NLL increase; default 10%).

    ``pairs``: held-out A/B items (an :class:`ABDataset`, a bundled name such
    as ``"happy"``, a path; not what the vector was extracted from), the first
    ``max_items`` used. ``bands``: ``(first, last)`` layer ranges (default:
    :func:`default_bands`). ``strengths``: positive relative strengths, a
    grid measured in every band (e.g. :data:`GRID_STRENGTHS`), each at +
    and -; by default each band is measured once, at the strength
    :func:`search_strengths` finds just under the damage bound.
    ``reference``: the neutral text for damage (default: the bundled one).
    Raises ``ValueError`` for empty pairs, bands outside the model or the
    vector, or a non-positive strength.
    """
    t0 = time.perf_counter()
    if not isinstance(vector, ControlVector):
        raise TypeError(f"vector must be a ControlVector, got {type(vector).__name__}")
    items = list(_as_dataset(pairs))[: max_items if max_items is not None else None]
    if not items:
        raise ValueError("no pairs to measure the effect on")
    grid = None if strengths is None else [float(s) for s in strengths]
    if grid is not None and (not grid or any(not np.isfinite(s) or s <= 0 for s in grid)):
        raise ValueError(f"strengths must be positive and finite (each is tried at + and -), got {grid}")
    if not np.isfinite(max_damage) or max_damage <= 0:
        raise ValueError(f"max_damage must be a positive fraction, got {max_damage}")
    band_list = [(int(a), int(b)) for a, b in (bands if bands is not None else default_bands(model.n_layer))]
    if not band_list:
        raise ValueError("no layer bands to try")
    for a, b in band_list:
        if not FIRST_LAYER <= a <= b < model.n_layer:
            raise ValueError(f"band {a}-{b} is outside the model's layers {FIRST_LAYER}..{model.n_layer - 1}")
        missing = [k for k in range(a, b + 1) if k not in vector]
        if missing:
            raise ValueError(f"band {a}-{b}: the vector has no direction at layers {missing}")
    norms = model.residual_norms()
    if grid is None:
        found = search_strengths(model, vector, band_list, max_damage=max_damage, reference=reference)
        cells = list(zip(band_list, found))
    else:
        cells = [(band, s) for band in band_list for s in grid]
    table = measure(model, vector, items, cells, reference=reference)
    ok = [c for c in table if c.damage <= max_damage] or [min(table, key=lambda c: c.damage)]
    best = max(ok, key=lambda c: c.effect)
    layers = tuple(range(best.layers[0], best.layers[1] + 1))
    mid = layers[len(layers) // 2]
    return SteeringPlan(
        vector=vector,
        layers=layers,
        relative_strength=best.relative_strength,
        strength=best.relative_strength * norms[mid],
        effect=best.effect,
        damage=best.damage,
        max_damage=max_damage,
        table=table,
        seconds=time.perf_counter() - t0,
        model=model.name,
    )
