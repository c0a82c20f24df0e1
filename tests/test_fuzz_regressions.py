"""Inputs found by scripts/fuzz.py that once escaped as the wrong exception
(or exhausted memory): each must now raise the package's own error."""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path

import llama_steer as ls
import pytest

FOUND = Path(__file__).parent / "fuzz_regressions"  # GGUF inputs are kept as base64 text (*.gguf.b64)


@pytest.fixture(scope="module")
def found(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The found inputs as the files the fuzzer wrote, in a temporary folder."""
    out = tmp_path_factory.mktemp("fuzz_regressions")
    for src in FOUND.iterdir():
        if src.name.endswith(".b64"):
            (out / src.name[: -len(".b64")]).write_bytes(base64.b64decode(src.read_text()))
        else:
            (out / src.name).write_bytes(src.read_bytes())
    return out


Loader = Callable[[Path], object]
CASES: list[tuple[str, Loader, type[Exception], str]] = [
    ("actadd-bad-utf8-field.gguf", ls.ActAdd.load, ls.VectorFileError, "malformed ActAdd"),  # UnicodeDecodeError
    # counts that made gguf's reader grow past 2 GB: refused from the header, before it allocates
    ("controlvector-oom.gguf", ls.ControlVector.load, ls.VectorFileError, "corrupt GGUF header"),
    ("controlvector-oom-array.gguf", ls.ControlVector.load, ls.VectorFileError, "corrupt GGUF"),  # a metadata count
    ("pairs-not-utf8.jsonl", ls.load_pairs, ls.DatasetError, "not UTF-8"),  # UnicodeDecodeError
    ("pairs-not-utf8.csv", ls.load_pairs, ls.DatasetError, "not UTF-8"),
    ("ab-not-utf8.json", ls.load_ab_dataset, ls.DatasetError, "not UTF-8"),
]


@pytest.mark.parametrize(("name", "load", "error", "message"), CASES, ids=[c[0] for c in CASES])
def test_found_input_raises_the_package_error(
    found: Path, name: str, load: Loader, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        load(found / name)


def test_every_loader_refuses_every_found_input(found: Path) -> None:
    loaders: list[Loader] = [ls.ControlVector.load, ls.ActAdd.load, ls.load_pairs, ls.load_ab_dataset]
    for path in sorted(found.iterdir()):
        for load in loaders:
            with pytest.raises(ls.LlamaSteerError):  # never a bare UnicodeDecodeError, MemoryError, ...
                load(path)
