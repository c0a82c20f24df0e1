"""ActAdd: the prompt-pair steering of Turner et al., "Activation Addition"
(arXiv 2308.10248), token-aligned inside the steering buffer.

The injection is the residual stream of a prompt pair, position by
position: ``h_L(p+) - h_L(p-)``, a ``[T, n_embd]`` matrix at one layer. Both
prompts are tokenized with the model's BOS, the shorter is right-padded with
the token of ``pad`` (a space by default; the paper found spaces work and
end-of-text poorly), and row ``i`` is added at position ``p0 + i`` of the
steered prompt: ``p0 = 0`` ("front", the paper's default, BOS included:
both prompts share it, so its row is zero), the last T positions ("back"),
or an explicit offset. The rows cover prompt positions only, so generated
tokens feel the injection through the KV cache, as in the paper (its hooks
skip the one-token forward passes of sampling).

Layer convention. The paper's "layer L" is the *input* of block L
(TransformerLens ``blocks.L.hook_resid_pre``). Ours, as everywhere in this
package, is the *output* of block N (llama.cpp's ``direction.N``), so
paper layer L is our layer ``L - 1``: pass ``paper_layer=L`` to type the
paper's numbers. This module is the one place that maps them.
"""

from __future__ import annotations

import copy
import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

from .errors import SteeringError, VectorFileError
from .vectors import load_small_gguf

if TYPE_CHECKING:
    from .model import Model

Location = Literal["front", "back"] | int

_ARCH_KEY = "general.architecture"
_KEY = "llama_steer.actadd."
_TENSOR = "actadd.rows"


def paper_to_layer(paper_layer: int) -> int:
    """Our layer (output of block N) for the paper's layer L (input of block
    L): ``L - 1``. Paper layer 0 (the embeddings) has no steering hook."""
    if isinstance(paper_layer, bool) or not isinstance(paper_layer, (int, np.integer)):
        raise TypeError(f"paper_layer must be int, got {type(paper_layer).__name__}")
    if paper_layer < 1:
        raise ValueError("paper layer 0 is the embedding output, before any block: it has no steering hook here")
    return int(paper_layer) - 1


class ActAdd:
    """An ActAdd injection built on ``model`` from a prompt pair.

    ``layer`` is ours (the output of block N, ``0 <= N < n_layer``); or give
    ``paper_layer=L`` (the input of block L, as in the paper). ``pad`` is the
    text of the one token that right-pads the shorter prompt. ``location``
    says where row 0 lands in a steered prompt: ``"front"`` (position 0),
    ``"back"`` (the prompt's last T positions) or an int offset.
    ``pad_prompt=True`` inserts T-1 pad tokens after the steered prompt's BOS
    (T without a BOS), so a front injection does not overlap the prompt's
    own words (the paper's "pad" mode).

    Use it wherever a vector goes: ``Steer(actadd, strength)`` as ``steer=``
    of ``generate``, ``complete``, ``logits``, ``generate_batch``, ``chat``,
    ``score``. Construction is two prompt decodes. ``save``/``load`` keep it
    in a GGUF of its own.
    """

    __slots__ = (
        "rows",
        "layer",
        "location",
        "pad_prompt",
        "positive",
        "negative",
        "pad",
        "pad_token",
        "has_bos",
        "arch",
        "model_name",
    )

    def __init__(
        self,
        model: Model,
        positive: str,
        negative: str,
        layer: int | None = None,
        *,
        paper_layer: int | None = None,
        pad: str = " ",
        location: Location = "front",
        pad_prompt: bool = False,
    ) -> None:
        from .extraction import capture_positions  # here: extraction -> steer -> actadd at import time

        if (layer is None) == (paper_layer is None):
            raise ValueError("give exactly one of layer (ours: output of block N) or paper_layer (input of block L)")
        if layer is None:
            assert paper_layer is not None
            layer = paper_to_layer(paper_layer)
        layer = _check_layer(layer, model.n_layer)
        for name, text in (("positive", positive), ("negative", negative), ("pad", pad)):
            if not isinstance(text, str):
                raise TypeError(f"{name} must be str, got {type(text).__name__}")
        _check_location(location)
        pad_ids = model.tokenize(pad, add_special=False) if pad else []
        if len(pad_ids) != 1:
            raise ValueError(f"pad {pad!r} must be exactly one token for this model, it is {len(pad_ids)}")
        tp = model.tokenize(positive, add_special=True)
        tn = model.tokenize(negative, add_special=True)
        bos = model.tokenize("", add_special=True)  # [BOS] on models that add one, else []
        for name, text, toks in (("positive", positive, tp), ("negative", negative, tn)):
            if len(toks) <= len(bos):
                raise ValueError(f"the {name} prompt {text!r} tokenizes to nothing")
        n = max(len(tp), len(tn))
        tp = tp + pad_ids * (n - len(tp))
        tn = tn + pad_ids * (n - len(tn))
        hp, hn = capture_positions(model, [tp, tn], [layer])
        rows = (hp[:, 0, :].astype(np.float64) - hn[:, 0, :]).astype(np.float32)
        if not np.all(np.isfinite(rows)):
            raise SteeringError("the captured activations contain NaN or inf")
        self._set(
            rows, layer, location, pad_prompt, positive, negative, pad, pad_ids[0], bool(bos), model.arch, model.name
        )

    def _set(
        self,
        rows: npt.NDArray[np.float32],
        layer: int,
        location: Location,
        pad_prompt: bool,
        positive: str,
        negative: str,
        pad: str,
        pad_token: int,
        has_bos: bool,
        arch: str,
        model_name: str,
    ) -> None:
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        rows.setflags(write=False)
        self.rows: npt.NDArray[np.float32] = rows
        self.layer = int(layer)
        self.location: Location = location
        self.pad_prompt = bool(pad_prompt)
        self.positive = positive
        self.negative = negative
        self.pad = pad
        self.pad_token = int(pad_token)
        self.has_bos = bool(has_bos)
        self.arch = arch
        self.model_name = model_name

    # -- shape ----------------------------------------------------------------
    @property
    def n_rows(self) -> int:
        """T: the number of positions the injection covers."""
        return int(self.rows.shape[0])

    @property
    def n_embd(self) -> int:
        return int(self.rows.shape[1])

    @property
    def paper_layer(self) -> int:
        """The layer in the paper's convention (input of block L)."""
        return self.layer + 1

    def __repr__(self) -> str:
        return (
            f"ActAdd({self.positive!r} - {self.negative!r}, layer {self.layer} (paper {self.paper_layer}), "
            f"{self.n_rows} rows, location={self.location!r})"
        )

    def at(self, location: Location) -> ActAdd:
        """The same injection at another location (the rows are shared: read-only)."""
        _check_location(location)
        out = copy.copy(self)
        out.location = location
        return out

    # -- placing it ------------------------------------------------------------
    def start(self, n_prompt: int) -> int:
        """Position of row 0 in a prompt of ``n_prompt`` tokens (after
        :meth:`prepare_prompt`). Raises ValueError when the rows do not fit."""
        T = self.n_rows
        if self.location == "front":
            p0 = 0
        elif self.location == "back":
            p0 = n_prompt - T
        else:
            p0 = int(self.location)
        if p0 < 0 or p0 + T > n_prompt:
            raise ValueError(
                f"the prompt has {n_prompt} tokens; an ActAdd of {T} rows at {self.location!r} does not fit "
                "(use a longer prompt, another location, or pad_prompt=True)"
            )
        return p0

    def prepare_prompt(self, tokens: list[int]) -> list[int]:
        """The prompt as it is decoded: with ``pad_prompt``, T-1 pad tokens
        after its BOS (T without one), so a front injection meets only pads."""
        if not self.pad_prompt:
            return tokens
        if self.has_bos:
            return tokens[:1] + [self.pad_token] * (self.n_rows - 1) + tokens[1:]
        return [self.pad_token] * self.n_rows + tokens

    def check_fits(self, n_layer: int, n_embd: int, arch: str | None = None) -> None:
        """Raise ValueError unless this injection was built for a model like
        this one (width, depth, and ``arch`` when given)."""
        if self.n_embd != n_embd:
            raise ValueError(f"the ActAdd has n_embd {self.n_embd}, the model {n_embd}: it was built on another model")
        if arch is not None and self.arch != arch:
            raise ValueError(f"the ActAdd was built on a {self.arch!r} model, this one is {arch!r}")
        _check_layer(self.layer, n_layer)

    # -- files ----------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write a GGUF of its own (``actadd.rows`` [T, n_embd] float32 and
        ``llama_steer.actadd.*`` metadata), atomically."""
        import gguf

        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        w = gguf.GGUFWriter(str(tmp), arch="actadd")
        w.add_string(_KEY + "model_arch", self.arch)
        w.add_string(_KEY + "model_name", self.model_name)
        w.add_uint32(_KEY + "layer", self.layer)
        w.add_string(_KEY + "location", str(self.location))
        w.add_bool(_KEY + "pad_prompt", self.pad_prompt)
        w.add_string(_KEY + "positive", self.positive)
        w.add_string(_KEY + "negative", self.negative)
        w.add_string(_KEY + "pad", self.pad)
        w.add_uint32(_KEY + "pad_token", self.pad_token)
        w.add_bool(_KEY + "has_bos", self.has_bos)
        w.add_string(_KEY + "sha256", hashlib.sha256(self.rows.tobytes()).hexdigest())
        w.add_tensor(_TENSOR, np.array(self.rows))
        try:
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
        finally:
            w.close()
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ActAdd:
        """Read a file written by :meth:`save`; a malformed one raises
        :class:`~llama_steer.errors.VectorFileError`."""
        return load_small_gguf(path, "ActAdd", cls._from_reader)

    @classmethod
    def _from_reader(cls, r: Any, path: Path) -> ActAdd:
        import gguf

        def field(name: str) -> object:
            f = r.fields.get(_KEY + name)
            if f is None:
                raise VectorFileError(f"{path}: not an ActAdd file (no {_KEY + name})")
            return f.contents()

        arch_field = r.fields.get(_ARCH_KEY)
        if arch_field is None or arch_field.contents() != "actadd":
            raise VectorFileError(f"{path}: not an ActAdd file (general.architecture is not 'actadd')")
        tensors = [t for t in r.tensors if t.name == _TENSOR]
        if len(tensors) != 1:
            raise VectorFileError(f"{path}: no {_TENSOR} tensor")
        t = tensors[0]
        if t.tensor_type != gguf.GGMLQuantizationType.F32 or len(t.shape) != 2:
            raise VectorFileError(f"{path}: {_TENSOR} must be a 2-D float32 tensor")
        rows = np.array(t.data, dtype=np.float32).reshape(int(t.shape[1]), int(t.shape[0]))
        if rows.shape[0] < 1 or not np.all(np.isfinite(rows)):
            raise VectorFileError(f"{path}: {_TENSOR} is empty or has NaN/inf")
        if hashlib.sha256(rows.tobytes()).hexdigest() != field("sha256"):
            raise VectorFileError(f"{path}: the rows do not match their recorded hash (corrupt file)")
        # a bad value raises TypeError/ValueError: load_small_gguf reports the file as malformed
        loc = str(field("location"))
        location: Location = loc if loc in ("front", "back") else int(loc)  # type: ignore[assignment]
        _check_location(location)
        out = cls.__new__(cls)
        out._set(
            rows,
            int(field("layer")),  # type: ignore[call-overload]
            location,
            bool(field("pad_prompt")),
            str(field("positive")),
            str(field("negative")),
            str(field("pad")),
            int(field("pad_token")),  # type: ignore[call-overload]
            bool(field("has_bos")),
            str(field("model_arch")),
            str(field("model_name")),
        )
        return out


def _check_layer(layer: int, n_layer: int) -> int:
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
        raise TypeError(f"layer must be int, got {type(layer).__name__}")
    if not 0 <= int(layer) < n_layer:
        raise ValueError(f"layer {layer} is out of range for a model with {n_layer} layers (0..{n_layer - 1})")
    return int(layer)


def _check_location(location: object) -> None:
    if location in ("front", "back"):
        return
    if isinstance(location, bool) or not isinstance(location, (int, np.integer)) or int(location) < 0:
        raise ValueError(f"location must be 'front', 'back' or a position >= 0, got {location!r}")
