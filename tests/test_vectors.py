"""ControlVector arithmetic and llama.cpp's control-vector GGUF format."""

from __future__ import annotations

from pathlib import Path

import gguf
import llama_steer as ls
import numpy as np
import pytest


def vec(seed: int = 0, layers: range = range(1, 6), n: int = 16) -> ls.ControlVector:
    rng = np.random.default_rng(seed)
    return ls.ControlVector({k: rng.standard_normal(n).astype(np.float32) for k in layers}, model_hint="llama")


def test_arithmetic() -> None:
    a, b = vec(1), vec(2, range(3, 8))
    s = a + b
    assert s.layers == list(range(1, 8))
    np.testing.assert_array_equal(s[4], a[4] + b[4])
    np.testing.assert_array_equal(s[1], a[1])
    np.testing.assert_array_equal(s[7], b[7])
    np.testing.assert_array_equal((a - a)[2], np.zeros(16, dtype=np.float32))
    np.testing.assert_array_equal((-a)[2], -a[2])
    np.testing.assert_array_equal((2 * a)[2], a[2] * 2)
    np.testing.assert_array_equal((a * 2)[2], (a / 0.5)[2])
    n = a.normalized()
    assert all(abs(np.linalg.norm(n[k]) - 1) < 1e-6 for k in n.layers)
    assert a.select([2, 3]).layers == [2, 3]
    with pytest.raises(ValueError):
        a.select([9])
    with pytest.raises(ZeroDivisionError):
        a / 0
    with pytest.raises(ValueError):
        a + vec(3, n=8)


def test_directions_are_copies_and_read_only() -> None:
    raw = np.ones(4, dtype=np.float32)
    v = ls.ControlVector({1: raw})
    raw[0] = 5
    assert v[1][0] == 1
    with pytest.raises(ValueError):
        v[1][0] = 3


@pytest.mark.parametrize(
    "bad",
    [{}, {0: np.ones(4)}, {-2: np.ones(4)}, {1: np.ones((2, 2))}, {1: np.ones(4), 2: np.ones(5)}, {1: [np.nan] * 4}],
)
def test_bad_vectors(bad: dict[int, object]) -> None:
    with pytest.raises(ValueError):
        ls.ControlVector(bad)  # type: ignore[arg-type]


def test_save_load_roundtrip_is_exact(tmp_path: Path) -> None:
    v = vec(4, range(1, 30), n=576)
    p = tmp_path / "v.gguf"
    v.save(p)
    w = ls.ControlVector.load(p)
    assert w == v and w.model_hint == "llama"
    assert all(np.array_equal(v[k], w[k]) for k in v.layers)
    assert not list(tmp_path.glob("*.tmp"))  # no temporary left behind


def test_file_layout_is_llama_cpp_format(tmp_path: Path) -> None:
    v = vec(5, range(2, 5))
    p = tmp_path / "v.gguf"
    v.save(p)
    r = gguf.GGUFReader(p)
    arch = r.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "controlvector"
    count = r.fields["controlvector.layer_count"]
    assert int(count.parts[count.data[0]][0]) == 3
    assert sorted(t.name for t in r.tensors) == ["direction.2", "direction.3", "direction.4"]
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in r.tensors)


def _write_foreign(
    path: Path, tensors: dict[str, np.ndarray], arch: str = "controlvector", hint: str | None = "mistral"
) -> None:
    # As repeng's export_gguf and cvector-generator write them.
    w = gguf.GGUFWriter(str(path), arch)
    if hint is not None:
        w.add_string("controlvector.model_hint", hint)
        w.add_uint32("controlvector.layer_count", len(tensors))
    for name, t in tensors.items():
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_loads_a_repeng_style_file(tmp_path: Path) -> None:
    p = tmp_path / "repeng.gguf"
    t = {f"direction.{i}": np.full(8, i, dtype=np.float32) for i in range(1, 31)}
    _write_foreign(p, t)
    v = ls.ControlVector.load(p)
    assert v.layers == list(range(1, 31)) and v.model_hint == "mistral"
    assert v[7][0] == 7


def test_loads_a_file_without_hint(tmp_path: Path) -> None:
    p = tmp_path / "bare.gguf"
    _write_foreign(p, {"direction.3": np.ones(8, dtype=np.float32)}, hint=None)
    assert ls.ControlVector.load(p).layers == [3]


@pytest.mark.parametrize(
    "tensors,arch,match",
    [
        ({"direction.0": np.ones(8, dtype=np.float32)}, "controlvector", "start at 1"),
        ({"weights.1": np.ones(8, dtype=np.float32)}, "controlvector", "unexpected tensor"),
        ({"direction.1": np.ones(8, dtype=np.float16)}, "controlvector", "not F32"),
        ({"direction.1": np.ones(8, dtype=np.float32)}, "llama", "not 'controlvector'"),
        (
            {"direction.1": np.ones(8, dtype=np.float32), "direction.2": np.ones(4, dtype=np.float32)},
            "controlvector",
            "length",
        ),
    ],
)
def test_bad_vector_files(tmp_path: Path, tensors: dict[str, np.ndarray], arch: str, match: str) -> None:
    p = tmp_path / "bad.gguf"
    _write_foreign(p, tensors, arch=arch)
    with pytest.raises(ls.VectorFileError, match=match):
        ls.ControlVector.load(p)


def test_garbage_and_missing_files(tmp_path: Path) -> None:
    p = tmp_path / "junk.gguf"
    p.write_bytes(b"GGUF" + b"\x00" * 7)
    with pytest.raises(ls.VectorFileError):
        ls.ControlVector.load(p)
    with pytest.raises(ls.VectorFileError, match="no such"):
        ls.ControlVector.load(tmp_path / "missing.gguf")


def test_file_layers_mean_what_llama_cpp_means(model: ls.Model, tmp_path: Path) -> None:
    """direction.N read the way llama.cpp's loader does (data[(N-1)*n_embd])
    and applied through llama_set_adapter_cvec == Steer(loaded vector)."""
    rng = np.random.default_rng(9)
    layers = range(4, 20)
    v = ls.ControlVector({k: 3 * rng.standard_normal(model.n_embd).astype(np.float32) for k in layers})
    p = tmp_path / "v.gguf"
    v.save(p)
    data = np.zeros((model.n_layer - 1, model.n_embd), dtype=np.float32)
    for t in gguf.GGUFReader(p).tensors:
        n = int(t.name.split(".")[1])
        data[n - 1] += np.asarray(t.data, dtype=np.float32)
    model._c.set_upstream_cvec(data.reshape(-1).tolist(), 1, model.n_layer - 1)
    try:
        upstream = model.logits("Hello there")
    finally:
        model._c.set_upstream_cvec([], -1, -1)
    ours = model.logits("Hello there", steer=ls.Steer(ls.ControlVector.load(p)))
    np.testing.assert_allclose(ours, upstream, rtol=1e-5, atol=1e-5 * float(np.abs(upstream).max()))
