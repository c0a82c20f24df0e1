"""Directions from paired activations: the solvers behind ``extract``.

Pure numpy, no model. :func:`direction` fits one layer from all the rows at
once (the exact reference). :class:`PairStats` takes pairs one at a time and
keeps memory bounded whatever their number: it holds the rows exactly while
they take less room than second moments would (up to ``n_embd`` pairs, which
covers every bundled dataset, so those results are the exact ones), then
folds them into per-layer float64 moments (``n_embd x n_embd``), from which
the PCA methods are exact up to float rounding. ``probe`` (an iterative fit
that needs the rows) keeps a uniform random sample of ``n_embd`` pairs
instead, the one approximation. Held-out pairs (a fifth, at most
``MAX_HELD``) are kept as rows for the held-out diagnostics.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

from .errors import LlamaSteerError

METHODS: tuple[str, ...] = ("mean_diff", "pca_diff", "pca_center", "probe")
MAX_HELD = 256  # held-out pairs kept for the diagnostics (a fifth of the pairs, at most this)
_FOLD_BLOCK = 64  # rows folded into the moments at a time: a bounded float64 temporary

F64 = npt.NDArray[np.float64]
F32 = npt.NDArray[np.float32]


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def _unit(v: npt.NDArray[np.floating[Any]]) -> F32:
    n = float(np.linalg.norm(v))
    if not math.isfinite(n) or n == 0.0:
        raise LlamaSteerError("the extracted direction is zero or not finite")
    return (v / n).astype(np.float32)


def _first_pc(x: F64) -> tuple[F64, float]:
    """First principal component of the rows of x (centred) and its
    explained-variance ratio."""
    xc = x - x.mean(axis=0, keepdims=True)
    if xc.shape[0] < xc.shape[1]:
        # Fewer samples than dimensions: the top eigenvector of the small
        # Gram matrix X X^T maps to the top principal axis (X^T u), at a
        # fraction of a full SVD's cost.
        evals, evecs = np.linalg.eigh(xc @ xc.T)
        top = xc.T @ evecs[:, -1]
    else:
        evals, evecs = np.linalg.eigh(xc.T @ xc)
        top = evecs[:, -1]
    return top, _evr(evals)


def _evr(evals: F64) -> float:
    total = float(np.clip(evals, 0, None).sum())
    return float(evals[-1]) / total if total > 0 else 0.0


def _probe_direction(pos: F64, neg: F64) -> F64:
    """Logistic-regression weights (L2, plain gradient descent on
    standardised features), mapped back to the residual basis."""
    x = np.concatenate([pos, neg])
    y = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
    mu, sd = x.mean(axis=0), x.std(axis=0) + 1e-6
    z = (x - mu) / sd
    w = np.zeros(z.shape[1])
    b = 0.0
    lam, lr = 1e-2, 0.5
    for _ in range(300):
        p = 1.0 / (1.0 + np.exp(-(z @ w + b)))
        g = p - y
        w -= lr * (z.T @ g / len(y) + lam * w)
        b -= lr * float(g.mean())
    return np.asarray(w / sd, dtype=np.float64)


def _oriented(d: npt.NDArray[np.floating[Any]], mean_diff: F64) -> F32:
    """Deterministic sign: positive examples project higher than negatives."""
    return (-d if float(mean_diff @ d) < 0 else d).astype(np.float32)


def direction(method: str, pos: F64, neg: F64) -> tuple[F32, float]:
    """One layer's direction from positive/negative activations [n_pairs, n_embd];
    returns (direction, explained variance ratio or NaN)."""
    check_method(method)
    diff = pos - neg
    evr = math.nan
    if method == "mean_diff":
        d = diff.mean(axis=0)
    elif method == "pca_diff":
        d, evr = _first_pc(diff)
    elif method == "pca_center":
        center = (pos + neg) / 2.0
        d, evr = _first_pc(np.concatenate([pos - center, neg - center]))
    else:
        d = _probe_direction(pos, neg)
    if method != "mean_diff":
        d = _unit(d)
    return _oriented(d, np.mean(pos, axis=0) - np.mean(neg, axis=0)), evr


def direction_from_moments(method: str, n: int, s1: F64, s2: F64 | None) -> tuple[F32, float]:
    """:func:`direction` from the sums over n pairs of the differences (s1)
    and of their outer products (s2): the same result up to float rounding,
    for mean_diff, pca_diff and pca_center."""
    mean = s1 / n
    if method == "mean_diff":
        return _oriented(mean, mean), math.nan
    assert s2 is not None
    if method == "pca_diff":
        cov = s2 - np.outer(s1, mean)  # centred: sum (d - mean)(d - mean)^T
    elif method == "pca_center":
        # each pair's two rows centred on their midpoint are +-d/2: their
        # mean is 0, their scatter sum 2 (d/2)(d/2)^T = s2/2 (scale is moot)
        cov = s2
    else:
        raise ValueError(f"{method} cannot be solved from moments")
    evals, evecs = np.linalg.eigh(cov)
    return _oriented(_unit(evecs[:, -1]), mean), _evr(evals)


def auc(pos_scores: F64, neg_scores: F64) -> float:
    """P(score of a positive > score of a negative), ties count half."""
    diff = pos_scores[:, None] - neg_scores[None, :]
    return float((np.sum(diff > 0) + 0.5 * np.sum(diff == 0)) / diff.size)


def held_out_mask(n: int) -> npt.NDArray[np.bool_]:
    """A fixed pseudo-random fifth of n pairs (at most MAX_HELD): a stride
    would pick the same persona every time in persona x prefix datasets."""
    held = np.zeros(n, dtype=bool)
    if n >= 5:
        held[np.random.default_rng(0).permutation(n)[: min(n // 5, MAX_HELD)]] = True
    return held


class _Group:
    """The training pairs: exact rows until ``limit`` pairs, moments (or,
    for probe, a reservoir sample) after."""

    def __init__(self, method: str, n_layers: int, n_embd: int, limit: int, seed: int) -> None:
        self.method, self.limit = method, limit
        self.n = 0
        self.rows: list[tuple[int, F32, F32]] = []  # (pair index, pos, neg) [n_layers, n_embd]
        self.folded = False  # past the limit: moments (probe: a sample) instead of every row
        self.s1 = np.zeros((n_layers, n_embd))
        self.s2: F64 | None = None
        self.rng = np.random.default_rng(seed)
        self.n_embd = n_embd

    def add(self, index: int, pos: F32, neg: F32) -> None:
        self.n += 1
        self.s1 += pos.astype(np.float64) - neg
        if self.method == "probe" and self.folded:
            j = int(self.rng.integers(self.n))  # reservoir sampling (algorithm R)
            if j < self.limit:
                self.rows[j] = (index, pos, neg)
            return
        if self.folded and self.method == "mean_diff":
            return
        self.rows.append((index, pos, neg))
        if not self.folded and len(self.rows) > self.limit:
            self.folded = True
            if self.method == "probe":
                del self.rows[int(self.rng.integers(len(self.rows)))]
            elif self.method == "mean_diff":
                self.rows.clear()
            else:
                n_layers = self.s1.shape[0]
                self.s2 = np.zeros((n_layers, self.n_embd, self.n_embd))
                self._fold()
        elif self.s2 is not None and len(self.rows) >= _FOLD_BLOCK:
            self._fold()

    def _fold(self) -> None:
        """Rows into the second moments, a block at a time (one BLAS call per layer)."""
        if self.s2 is None:
            return
        for start in range(0, len(self.rows), _FOLD_BLOCK):
            d = np.stack([p.astype(np.float64) - q for _, p, q in self.rows[start : start + _FOLD_BLOCK]])
            for li in range(d.shape[1]):  # d: [k, n_layers, n_embd]
                self.s2[li] += d[:, li].T @ d[:, li]
        self.rows.clear()

    def sorted_rows(self, layer: int) -> tuple[F64, F64]:
        rows = sorted(self.rows, key=lambda r: r[0])
        pos = np.stack([r[1][layer] for r in rows]).astype(np.float64)
        neg = np.stack([r[2][layer] for r in rows]).astype(np.float64)
        return pos, neg

    def solve(self, layer: int, extra: tuple[F64, F64] | None = None) -> tuple[F32, float]:
        """This layer's direction, with ``extra`` (pos, neg) rows added."""
        if not self.folded or self.method == "probe":
            pos, neg = self.sorted_rows(layer)
            if extra is not None:
                pos, neg = np.concatenate([pos, extra[0]]), np.concatenate([neg, extra[1]])
            return direction(self.method, pos, neg)
        self._fold()
        n, s1 = self.n, self.s1[layer].copy()
        s2 = None if self.s2 is None else self.s2[layer].copy()
        if extra is not None:
            d = extra[0] - extra[1]
            n += len(d)
            s1 += d.sum(axis=0)
            if s2 is not None:
                s2 += d.T @ d
        return direction_from_moments(self.method, n, s1, s2)


class PairStats:
    """Streamed pairs -> per-layer directions and diagnostics, in memory
    that does not grow with the number of pairs (see the module docstring).

    ``add(i, pos, neg)`` takes pair i's activations, float32
    [n_layers, n_embd] each, in any order; :meth:`solve` returns the
    directions (one per layer) and the diagnostics ``extract`` records.
    """

    def __init__(self, method: str, n_pairs: int, n_layers: int, n_embd: int, *, limit: int | None = None) -> None:
        check_method(method)
        self.method, self.n_pairs = method, n_pairs
        self.held = held_out_mask(n_pairs)
        # exact rows up to n_embd pairs: 2 rows of n_embd float32 per pair and
        # layer take as much room as the float64 n_embd x n_embd moment
        limit = n_embd if limit is None else limit
        self.train = _Group(method, n_layers, n_embd, limit, seed=1)
        self.held_rows: dict[int, tuple[F32, F32]] = {}
        self.norm_sum = np.zeros(n_layers)
        self.n_added = 0

    def add(self, index: int, pos: F32, neg: F32) -> None:
        if not (np.all(np.isfinite(pos)) and np.all(np.isfinite(neg))):
            raise LlamaSteerError(f"pair {index}: the captured activations contain NaN or inf")
        self.n_added += 1
        self.norm_sum += np.linalg.norm(pos.astype(np.float64), axis=-1) + np.linalg.norm(
            neg.astype(np.float64), axis=-1
        )
        if self.held[index]:
            self.held_rows[index] = (pos, neg)
        else:
            self.train.add(index, pos, neg)

    def _held(self, layer: int) -> tuple[F64, F64] | None:
        if not self.held_rows:
            return None
        idx = sorted(self.held_rows)
        pos = np.stack([self.held_rows[i][0][layer] for i in idx]).astype(np.float64)
        neg = np.stack([self.held_rows[i][1][layer] for i in idx]).astype(np.float64)
        return pos, neg

    def solve(self, layers: list[int]) -> tuple[dict[int, F32], dict[str, dict[int, float]]]:
        if self.n_added != self.n_pairs:
            raise LlamaSteerError(f"{self.n_added} of {self.n_pairs} pairs were captured")
        dirs: dict[int, F32] = {}
        diag: dict[str, dict[int, float]] = {
            "explained_variance": {},
            "heldout_accuracy": {},
            "heldout_auc": {},
            "residual_norm": {},
        }
        for li, layer in enumerate(layers):
            held = self._held(li)
            if held is None:
                d, evr = self.train.solve(li)
            elif not self.train.folded:
                # all rows at hand: in pair order, exactly as a one-shot fit
                pos, neg = self.train.sorted_rows(li)
                order = np.argsort(np.concatenate([np.flatnonzero(~self.held), np.flatnonzero(self.held)]))
                d, evr = direction(
                    self.method, np.concatenate([pos, held[0]])[order], np.concatenate([neg, held[1]])[order]
                )
            else:
                d, evr = self.train.solve(li, extra=held)
            dirs[layer] = d
            diag["explained_variance"][layer] = evr
            diag["residual_norm"][layer] = float(self.norm_sum[li] / (2 * self.n_pairs))
            if held is not None:
                d_train, _ = self.train.solve(li)
                sp, sn = held[0] @ d_train, held[1] @ d_train
                diag["heldout_accuracy"][layer] = float(np.mean(sp > sn))
                diag["heldout_auc"][layer] = auc(sp, sn)
        return dirs, diag
