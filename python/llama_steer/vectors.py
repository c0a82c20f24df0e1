"""``ControlVector``: one direction per layer, and llama.cpp's GGUF file format.

Layer convention (the same as llama.cpp control vectors, written once here):
the direction of layer ``N`` is added to the *output of block N*, for
``1 <= N < n_layer``. A file ``direction.N`` tensor means exactly that, so a
file made here works with ``llama-cli --control-vector`` and files from
repeng and ``cvector-generator`` load here.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from .errors import VectorFileError

FloatArray = npt.NDArray[np.float32]
T = TypeVar("T")

FIRST_LAYER = 1  # llama.cpp never steers the output of block 0 (direction.0 is invalid)
NORM_LAYERS_KEY = "llama_steer.residual_norm.layers"
NORM_VALUES_KEY = "llama_steer.residual_norm.values"


def check_layer(layer: int, n_layer: int | None = None) -> int:
    """Validate a layer index against the convention (and a model's depth)."""
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
        raise TypeError(f"layer indices must be int, got {type(layer).__name__}")
    layer = int(layer)
    if layer < FIRST_LAYER:
        raise ValueError(f"layer {layer} is out of range: directions start at layer {FIRST_LAYER}")
    if n_layer is not None and layer >= n_layer:
        raise ValueError(f"layer {layer} is out of range for a model with {n_layer} layers (1..{n_layer - 1})")
    return layer


class ControlVector:
    """Per-layer float32 directions, plus the model they were made for.

    ``directions`` maps a layer (>= 1) to a 1-D float32 array of length
    ``n_embd``. Vectors support ``+``, ``-``, unary ``-``, and ``*`` / ``/``
    by a scalar; layers missing on one side count as zero.

    ``residual_norms`` (layer -> the model's mean residual norm there, as
    :meth:`Model.residual_norms` measures it) is recorded by
    :func:`~llama_steer.extract` and saved with the vector; a relative
    strength (``Steer(..., unit="relative")``) uses it.
    """

    __slots__ = ("_directions", "model_hint", "diagnostics", "residual_norms")

    def __init__(
        self,
        directions: Mapping[int, npt.ArrayLike],
        model_hint: str = "",
        diagnostics: Mapping[str, Any] | None = None,
        residual_norms: Mapping[int, float] | None = None,
    ) -> None:
        dirs: dict[int, FloatArray] = {}
        n_embd = None
        for layer, vec in directions.items():
            layer = check_layer(layer)
            if np.ndim(vec) != 1:
                raise ValueError(f"direction for layer {layer} must be 1-D, got shape {np.shape(vec)}")
            arr = np.array(vec, dtype=np.float32)  # a copy: the caller's array stays theirs
            if n_embd is None:
                n_embd = arr.shape[0]
            elif arr.shape[0] != n_embd:
                raise ValueError(f"direction for layer {layer} has length {arr.shape[0]}, others {n_embd}")
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"direction for layer {layer} has NaN or infinite values")
            arr.setflags(write=False)
            dirs[layer] = arr
        if not dirs:
            raise ValueError("a control vector needs at least one layer")
        self._directions = dict(sorted(dirs.items()))
        self.model_hint = str(model_hint)
        self.diagnostics: dict[str, Any] = dict(diagnostics or {})
        self.residual_norms: dict[int, float] | None = None
        if residual_norms is not None:
            norms = {check_layer(k): float(np.float32(v)) for k, v in residual_norms.items()}  # as saved
            if not all(math.isfinite(v) and v > 0 for v in norms.values()):
                raise ValueError("residual norms must be positive and finite")
            self.residual_norms = dict(sorted(norms.items()))

    # -- mapping-like access ------------------------------------------------
    @property
    def directions(self) -> dict[int, FloatArray]:
        """A copy of the layer -> direction mapping (arrays are read-only)."""
        return dict(self._directions)

    @property
    def layers(self) -> list[int]:
        """The layers that have a direction, ascending (each ≥ 1)."""
        return list(self._directions)

    @property
    def n_embd(self) -> int:
        """Width of each direction: the model's embedding size."""
        return int(next(iter(self._directions.values())).shape[0])

    def __getitem__(self, layer: int) -> FloatArray:
        return self._directions[layer]

    def __contains__(self, layer: object) -> bool:
        return layer in self._directions

    def __iter__(self) -> Iterator[int]:
        return iter(self._directions)

    def __len__(self) -> int:
        return len(self._directions)

    def items(self) -> Iterable[tuple[int, FloatArray]]:
        """``(layer, direction)`` pairs, ascending by layer."""
        return self._directions.items()

    def __repr__(self) -> str:
        lo, hi = self.layers[0], self.layers[-1]
        hint = f", model_hint={self.model_hint!r}" if self.model_hint else ""
        return f"ControlVector(layers {lo}..{hi} ({len(self)}), n_embd {self.n_embd}{hint})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ControlVector):
            return NotImplemented
        return self.layers == other.layers and all(np.array_equal(self[k], other[k]) for k in self.layers)

    __hash__ = None  # type: ignore[assignment]

    def fingerprint(self) -> str:
        """sha256 of the layers and float32 values: names exactly this vector
        (recorded in baked models' metadata)."""
        h = hashlib.sha256()
        for layer, vec in self.items():
            h.update(int(layer).to_bytes(4, "little"))
            h.update(np.ascontiguousarray(vec, dtype="<f4").tobytes())
        return h.hexdigest()

    # -- arithmetic ---------------------------------------------------------
    def _combine(self, other: ControlVector, sign: float) -> ControlVector:
        if not isinstance(other, ControlVector):
            return NotImplemented
        if other.n_embd != self.n_embd:
            raise ValueError(f"cannot combine vectors of n_embd {self.n_embd} and {other.n_embd}")
        out: dict[int, FloatArray] = {}
        for layer in sorted(set(self._directions) | set(other._directions)):
            a = self._directions.get(layer)
            b = other._directions.get(layer)
            if a is None:
                assert b is not None
                out[layer] = b * np.float32(sign)
            elif b is None:
                out[layer] = a.copy()
            else:
                out[layer] = a + sign * b
        norms = self.residual_norms or other.residual_norms
        return ControlVector(out, self.model_hint or other.model_hint, None, norms)

    def __add__(self, other: ControlVector) -> ControlVector:
        return self._combine(other, 1.0)

    def __sub__(self, other: ControlVector) -> ControlVector:
        return self._combine(other, -1.0)

    def __neg__(self) -> ControlVector:
        return self * -1.0

    def __mul__(self, scalar: float) -> ControlVector:
        if isinstance(scalar, bool) or not isinstance(scalar, (int, float, np.floating, np.integer)):
            return NotImplemented
        if not math.isfinite(float(scalar)):
            raise ValueError("cannot scale a control vector by a non-finite number")
        scaled = {k: v * np.float32(scalar) for k, v in self.items()}
        return ControlVector(scaled, self.model_hint, None, self.residual_norms)

    __rmul__ = __mul__

    def __truediv__(self, scalar: float) -> ControlVector:
        if isinstance(scalar, bool) or not isinstance(scalar, (int, float, np.floating, np.integer)):
            return NotImplemented
        if float(scalar) == 0.0:
            raise ZeroDivisionError("control vector divided by zero")
        return self * (1.0 / float(scalar))

    def normalized(self) -> ControlVector:
        """Each layer's direction scaled to unit L2 norm (zero layers are kept)."""
        out = {}
        for k, v in self.items():
            n = float(np.linalg.norm(v))
            out[k] = v / n if n > 0 else v.copy()
        return ControlVector(out, self.model_hint, self.diagnostics, self.residual_norms)

    def select(self, layers: Iterable[int]) -> ControlVector:
        """Only the given layers (each must be present)."""
        wanted = [check_layer(k) for k in layers]
        missing = [k for k in wanted if k not in self._directions]
        if missing:
            raise ValueError(f"layers {missing} are not in this vector (it has {self.layers[0]}..{self.layers[-1]})")
        picked = {k: self._directions[k] for k in wanted}
        return ControlVector(picked, self.model_hint, self.diagnostics, self.residual_norms)

    def plot_layers(self, path: str | os.PathLike[str]) -> Path:
        """Write a PNG of the extraction diagnostics by layer (held-out
        separation, explained variance, residual norm). Separation says where
        the behaviours differ, not where steering works: for that, measure
        with :func:`llama_steer.find_steering`. Needs a vector made by
        :func:`llama_steer.extract`."""
        diag = self.diagnostics
        if "heldout_auc" not in diag:
            raise ValueError("this vector has no extraction diagnostics to plot")
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        layers = self.layers
        fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
        for key, label, style in (
            ("heldout_auc", "held-out AUC", "o-"),
            ("heldout_accuracy", "held-out pair accuracy", "s--"),
            ("explained_variance", "explained variance (PC1)", "^:"),
        ):
            values = [diag.get(key, {}).get(k, math.nan) for k in layers]
            if not all(math.isnan(v) for v in values):
                ax.plot(layers, values, style, label=label, markersize=4)
        ax.set_xlabel("layer (output of block N)")
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("separation / variance")
        ax.grid(alpha=0.3)
        norms = [diag.get("residual_norm", {}).get(k, math.nan) for k in layers]
        ax2 = ax.twinx()
        ax2.plot(layers, norms, color="grey", alpha=0.5, label="residual norm")
        ax2.set_ylabel("mean residual norm")
        lines, labels = ax.get_legend_handles_labels()
        l2, lb2 = ax2.get_legend_handles_labels()
        ax.legend(lines + l2, labels + lb2, loc="lower right", fontsize=8)
        title = f"{diag.get('method', '')} on {diag.get('n_pairs', '?')} pairs"
        ax.set_title(f"Separation by layer: {title} ({self.model_hint or 'model'})")
        fig.tight_layout()
        out = Path(path)
        fig.savefig(out)
        plt.close(fig)
        return out

    # -- files --------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write llama.cpp's control-vector GGUF (atomically: temp file + rename)."""
        import gguf

        path = Path(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or Path("."))
        os.close(fd)
        try:
            writer = gguf.GGUFWriter(tmp, "controlvector")
            writer.add_string("controlvector.model_hint", self.model_hint)
            writer.add_uint32("controlvector.layer_count", len(self))
            if self.residual_norms:  # ours; llama.cpp ignores keys it does not know
                writer.add_array(NORM_LAYERS_KEY, list(self.residual_norms))
                writer.add_array(NORM_VALUES_KEY, list(self.residual_norms.values()))
            for layer, vec in self.items():
                writer.add_tensor(f"direction.{layer}", np.ascontiguousarray(vec, dtype=np.float32))
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ControlVector:
        """Read a control-vector GGUF (ours, llama.cpp's cvector-generator's or repeng's)."""
        return load_small_gguf(path, "control-vector", cls._from_reader)

    @classmethod
    def _from_reader(cls, reader: Any, path: Path) -> ControlVector:
        import gguf

        arch_field = reader.fields.get("general.architecture")
        arch = _field_str(arch_field) if arch_field is not None else ""
        if arch != "controlvector":
            raise VectorFileError(f"{path}: general.architecture is {arch!r}, not 'controlvector'")
        hint_field = reader.fields.get("controlvector.model_hint")
        hint = _field_str(hint_field) if hint_field is not None else ""
        dirs: dict[int, FloatArray] = {}
        for tensor in reader.tensors:
            name = tensor.name
            prefix, _, idx = name.partition(".")
            if prefix != "direction" or not idx.isdigit():
                raise VectorFileError(f"{path}: unexpected tensor {name!r} (want direction.N)")
            layer = int(idx)
            if layer < FIRST_LAYER:
                raise VectorFileError(f"{path}: tensor {name!r}: layer indices start at {FIRST_LAYER}")
            if tensor.tensor_type != gguf.GGMLQuantizationType.F32:
                raise VectorFileError(f"{path}: tensor {name!r} is {tensor.tensor_type.name}, not F32")
            data = np.array(tensor.data, dtype=np.float32).reshape(-1)
            # Several tensors for one layer add up, as llama.cpp does.
            dirs[layer] = dirs[layer] + data if layer in dirs else data
        if not dirs:
            raise VectorFileError(f"{path}: no direction tensors")
        norms = None
        if NORM_LAYERS_KEY in reader.fields or NORM_VALUES_KEY in reader.fields:
            layers = reader.fields[NORM_LAYERS_KEY].contents() if NORM_LAYERS_KEY in reader.fields else []
            values = reader.fields[NORM_VALUES_KEY].contents() if NORM_VALUES_KEY in reader.fields else []
            if not isinstance(layers, list) or not isinstance(values, list) or len(layers) != len(values):
                raise VectorFileError(f"{path}: {NORM_LAYERS_KEY} and {NORM_VALUES_KEY} do not match")
            norms = dict(zip(layers, values))
        try:
            return cls(dirs, hint, None, norms)
        except (ValueError, TypeError) as exc:
            raise VectorFileError(f"{path}: {exc}") from exc


# GGUF header: magic, u32 version, u64 tensor count, u64 metadata count.
_GGUF_HEADER = struct.Struct("<4sIQQ")


def load_small_gguf(path: str | os.PathLike[str], what: str, parse: Callable[[Any, Path], T]) -> T:
    """Read a small GGUF of ours (a control vector, an ActAdd): ``parse(reader,
    path)`` on a ``gguf.GGUFReader``. Anything wrong with the file is a
    :class:`VectorFileError` naming ``what``: a missing file, a corrupt
    header or metadata (checked first, see :func:`_open_gguf`), or a field
    the reader accepted but ``parse`` cannot read (bad UTF-8, wrong type)."""
    path = Path(path)
    if not path.is_file():
        raise VectorFileError(f"no such {what} file: {path}")
    reader = _open_gguf(path)
    try:
        return parse(reader, path)
    except VectorFileError:
        raise
    except Exception as exc:  # a malformed field or tensor the reader accepted lazily
        raise VectorFileError(f"{path}: malformed {what} file ({type(exc).__name__}: {exc})") from exc


def _open_gguf(path: Path) -> Any:
    """A ``gguf.GGUFReader`` of ``path``, after checking the header's counts
    against the file size (each metadata pair takes at least 12 bytes, each
    tensor entry 24) and walking the metadata with bounded counts, so a
    corrupt file cannot make the reader loop or allocate without bound."""
    import gguf

    data = path.read_bytes()
    size = len(data)
    if size < _GGUF_HEADER.size:
        raise VectorFileError(f"{path}: not a GGUF file (too short)")
    magic, version, n_tensors, n_kv = _GGUF_HEADER.unpack_from(data)
    if magic != b"GGUF" or version not in (2, 3):
        raise VectorFileError(f"{path}: not a GGUF file (magic {magic!r}, version {version})")
    if n_kv * 12 + n_tensors * 24 > size:
        raise VectorFileError(
            f"{path}: corrupt GGUF header ({n_kv} metadata pairs, {n_tensors} tensors in {size} bytes)"
        )
    problem = _gguf_bounds_problem(data, n_kv, n_tensors)
    if problem:
        raise VectorFileError(f"{path}: corrupt GGUF ({problem})")
    try:
        return gguf.GGUFReader(path)
    except Exception as exc:  # ValueError, struct.error, MemoryError, ... on bad files
        raise VectorFileError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc})") from exc


# GGUF value types -> fixed sizes in bytes (8: string, 9: array)
_GGUF_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def _gguf_bounds_problem(data: bytes, n_kv: int, n_tensors: int) -> str | None:
    """Walk a GGUF's metadata and tensor entries, checking every length and
    count against the bytes left (gguf's reader trusts them and can loop or
    allocate without bound on a corrupt file). Returns what is wrong, or None.
    Arrays of arrays are refused (no small GGUF of ours has them)."""
    pos, size = _GGUF_HEADER.size, len(data)

    def take(n: int) -> int:
        nonlocal pos
        if n < 0 or pos + n > size:
            raise IndexError
        start, pos = pos, pos + n
        return start

    def u32() -> int:
        return int.from_bytes(data[take(4) : pos], "little")

    def u64() -> int:
        return int.from_bytes(data[take(8) : pos], "little")

    def string() -> None:
        take(u64())

    try:
        for _ in range(n_kv):
            string()
            vtype = u32()
            if vtype == 8:
                string()
            elif vtype == 9:
                itype, count = u32(), u64()
                if itype == 8:
                    if count * 8 > size - pos:
                        return f"an array of {count} strings"
                    for _ in range(count):
                        string()
                elif itype in _GGUF_SCALAR:
                    take(count * _GGUF_SCALAR[itype])
                else:
                    return f"an array of value type {itype}"
            elif vtype in _GGUF_SCALAR:
                take(_GGUF_SCALAR[vtype])
            else:
                return f"value type {vtype}"
        for _ in range(n_tensors):
            string()
            n_dims = u32()
            if not 1 <= n_dims <= 4:
                return f"a tensor with {n_dims} dimensions"
            n_elem = 1
            for _ in range(n_dims):
                n_elem *= u64()
            if n_elem > 8 * size:
                return f"a tensor of {n_elem} elements in {size} bytes"
            take(12)  # type, offset
    except IndexError:
        return "a length or count past the end of the file"
    return None


def _field_str(field: Any) -> str:
    return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
