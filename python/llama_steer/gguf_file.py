"""Reading a GGUF model and writing an edited copy of it, one tensor at a time.

The machinery :mod:`~llama_steer.bake` and :mod:`~llama_steer.tune` share:
a memory-mapped :class:`Source`, a :class:`Codec` that reads any ggml type as
float32 and writes float32 back in any type (ggml's own dequantizer and
quantizer), and :func:`write_gguf`, which writes the source's metadata and a
list of :class:`Entry` (header + a function producing the bytes) to a
temporary file beside the target and renames it at the end: memory stays at
about one tensor, and an interrupted write leaves no file under the target
name.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .errors import LlamaSteerError, ModelLoadError

FloatArray = npt.NDArray[np.float32]

GGML_F32 = 0
GGML_F16 = 1
GGML_Q8_0 = 8

# Rows dequantized at a time when converting a tensor: bounds the float32 copy.
CHUNK_VALUES = 1 << 22


class Source:
    """A GGUF opened read-only (memory-mapped; nothing is loaded up front)."""

    def __init__(self, path: Path) -> None:
        import gguf

        if not path.is_file():
            raise ModelLoadError(f"no such model file: {path}")
        try:
            self.reader = gguf.GGUFReader(path, "r")
        except Exception as exc:  # ValueError, struct.error, ... on a corrupt file
            raise ModelLoadError(f"{path}: not a readable GGUF model ({type(exc).__name__}: {exc})") from exc
        self.path = path
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.arch = self.string("general.architecture")
        if not self.arch:
            raise ModelLoadError(f"{path}: no general.architecture")

    def field(self, key: str) -> Any:
        f = self.reader.fields.get(key)
        return None if f is None else f.contents()

    def string(self, key: str) -> str:
        v = self.field(key)
        return v if isinstance(v, str) else ""

    def int(self, key: str) -> int:
        v = self.field(f"{self.arch}.{key}")
        if not isinstance(v, int):
            raise ModelLoadError(f"{self.path}: no {self.arch}.{key}")
        return v

    def edited_name(self, what: str) -> str:
        """``general.name`` of a copy: the source's name with ``what`` added."""
        base = self.string("general.name") or self.path.stem
        return f"{base} ({what})"

    @staticmethod
    def raw(t: Any) -> npt.NDArray[np.uint8]:
        """A tensor's bytes (a view of the map, read lazily)."""
        data: npt.NDArray[np.uint8] = t.data.view(np.uint8).reshape(-1)
        return data


def tensor_rows(t: Any) -> tuple[int, int]:
    """(rows, values per row) of a tensor in ggml's layout."""
    n_per_row = int(t.shape[0])
    return int(t.n_elements) // n_per_row, n_per_row


def row_chunks(nrows: int, n_per_row: int) -> Iterator[slice]:
    step = max(1, CHUNK_VALUES // n_per_row)
    for r0 in range(0, nrows, step):
        yield slice(r0, min(nrows, r0 + step))


class Codec:
    """Tensors through float32, one chunk of rows at a time (ggml's kernels)."""

    def __init__(self, n_threads: int) -> None:
        from . import _core

        self.core = _core
        self.n_threads = n_threads

    def type_name(self, t: Any) -> str:
        return str(self.core.quant_type_name(int(t.tensor_type)))

    def can_roundtrip(self, type_: int) -> bool:
        return bool(self.core.quant_can_roundtrip(type_))

    def row_size(self, type_: int, n_per_row: int) -> int:
        return int(self.core.quant_row_size(type_, n_per_row))

    def read(self, t: Any, rows: slice) -> FloatArray:
        """Rows ``rows`` of a tensor as float32 [n, n_per_row]."""
        _, n_per_row = tensor_rows(t)
        row_bytes = self.row_size(int(t.tensor_type), n_per_row)
        raw = Source.raw(t)[rows.start * row_bytes : rows.stop * row_bytes]
        out: FloatArray = self.core.dequantize(int(t.tensor_type), raw, rows.stop - rows.start, n_per_row)
        return out

    def read_all(self, t: Any) -> FloatArray:
        nrows, n_per_row = tensor_rows(t)
        return np.concatenate([self.read(t, rows) for rows in row_chunks(nrows, n_per_row)])

    def write(self, type_: int, x: FloatArray) -> npt.NDArray[np.uint8]:
        out: npt.NDArray[np.uint8] = self.core.quantize(
            type_, np.ascontiguousarray(x, dtype=np.float32), self.n_threads
        )
        return out

    def decode(self, type_: int, data: npt.NDArray[np.uint8], nrows: int, n_per_row: int) -> FloatArray:
        out: FloatArray = self.core.dequantize(type_, data, nrows, n_per_row)
        return out


@dataclass
class Entry:
    """One tensor of the output: its header, and how to produce its bytes."""

    name: str
    ne: tuple[int, ...]  # ggml order
    type: int
    nbytes: int
    produce: Callable[[], npt.NDArray[np.uint8]]


def copy_entry(t: Any, name: str | None = None) -> Entry:
    """``t``'s bytes unchanged (under ``name``, default its own)."""
    ne = tuple(int(n) for n in t.shape)
    return Entry(name or t.name, ne, int(t.tensor_type), int(t.n_bytes), lambda: Source.raw(t))


def bytes_entry(name: str, ne: tuple[int, ...], type_: int, data: npt.NDArray[np.uint8]) -> Entry:
    """A tensor whose bytes are already in memory."""
    return Entry(name, ne, type_, data.nbytes, lambda: data)


def f32_entry(name: str, values: FloatArray) -> Entry:
    data = np.ascontiguousarray(values, dtype=np.float32)
    return bytes_entry(name, (data.shape[0],), GGML_F32, data.view(np.uint8))


def converted_entry(codec: Codec, t: Any, type_: int) -> Entry:
    """``t`` stored as ``type_`` (dequantized and requantized chunk by chunk)."""
    nrows, n_per_row = tensor_rows(t)

    def produce() -> npt.NDArray[np.uint8]:
        parts = [codec.write(type_, codec.read(t, rows)).reshape(-1) for rows in row_chunks(nrows, n_per_row)]
        return np.concatenate(parts)

    ne = tuple(int(n) for n in t.shape)
    return Entry(t.name, ne, type_, codec.row_size(type_, n_per_row) * nrows, produce)


def check_target(src: Path, out: Path, overwrite: bool, error: type[LlamaSteerError]) -> None:
    """Refuse an existing target (unless ``overwrite``), the source itself,
    and a missing directory, before any work is done."""
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    if out.exists() and out.resolve() == src.resolve():
        raise error(f"{out} is the model being read; write the new model to another path")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"no such directory: {out.parent}")
    if not os.access(out.parent, os.W_OK):
        raise PermissionError(f"cannot write into {out.parent}")


def write_gguf(
    src: Source,
    out: Path,
    entries: list[Entry],
    set_kv: dict[str, tuple[Any, Any, Any]],
    progress: bool | None,
    error: type[LlamaSteerError],
) -> int:
    """Write ``src``'s metadata (with ``set_kv`` replacing or adding keys:
    key -> (value, GGUFValueType, array subtype)) and ``entries`` to ``out``,
    through a temporary file renamed at the end. Returns the bytes written."""
    import gguf
    from tqdm.auto import tqdm  # type: ignore[import-untyped]

    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot write into {out.parent}: {exc.strerror}") from exc
    os.close(fd)
    tmp = Path(tmp_name)
    writer = gguf.GGUFWriter(None, src.arch)
    try:
        for key, f in src.reader.fields.items():
            if key.startswith("GGUF.") or key == "general.architecture" or key in set_kv:
                continue
            vtype = f.types[0]
            sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, f.contents(), vtype, sub)
            if key == "general.alignment":
                writer.data_alignment = int(f.contents())
        for key, (value, vtype, sub) in set_kv.items():
            writer.add_key_value(key, value, vtype, sub)
        for e in entries:
            # gguf wants numpy order; a non-uint8 dtype means "shape in elements"
            writer.add_tensor_info(
                e.name,
                tuple(reversed(e.ne)),
                np.dtype(np.float32),
                e.nbytes,
                raw_dtype=gguf.GGMLQuantizationType(e.type),
            )
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        total = sum(e.nbytes for e in entries)
        with tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            desc=f"llama-steer: writing {out.name}",
            disable=None if progress is None else not progress,
            leave=False,
        ) as bar:
            for e in entries:
                data = e.produce()
                if data.nbytes != e.nbytes:
                    raise error(f"{e.name}: produced {data.nbytes} bytes, expected {e.nbytes}")
                writer.write_tensor_data(data)
                bar.update(e.nbytes)
        writer.close()
        os.chmod(tmp, src.path.stat().st_mode & 0o777)  # mkstemp made it 0600
        os.replace(tmp, out)  # atomic: the target is complete or absent
    except BaseException as exc:
        writer.close()
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, (FileExistsError, ModelLoadError)):
            if exc.errno is None:  # numpy's short write: no errno, only the byte counts
                raise OSError(
                    f"writing {out} failed ({exc}: is the disk full?); nothing was left under that name"
                ) from exc
            raise OSError(
                exc.errno, f"writing {out} failed ({exc.strerror}); nothing was left under that name"
            ) from exc
        raise
    return out.stat().st_size
