"""bake: steering written into a GGUF, checked against the runtime path.

Exactness is tested where it can hold: on a full-precision copy (F32
weights, F32 cache, no flash attention). On the quantized model a bias and a
runtime add part at the last bit and quantized matmuls amplify that, so the
baked model is held to the noise floor measured in the same test (the same
steering with its strength moved by 1e-6). Upstream llama-completion, built
from the unpatched pin, runs the baked file with no flags.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import llama_steer as ls
import numpy as np
import pytest
from lexicon import mood
from llama_steer import _core
from llama_steer.plan import NEUTRAL_QUESTIONS as CHATS

ROOT = Path(__file__).resolve().parents[1]
HELD_OUT = [
    "What is the capital of Spain?",
    "Write a short poem about the sea.",
    "I lost my keys again today.",
    "Explain photosynthesis simply.",
]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """KL(p || q) of two next-token distributions given as logits."""

    def logsoftmax(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64)
        return x - (x.max() + np.log(np.exp(x - x.max()).sum()))

    lp, lq = logsoftmax(p_logits), logsoftmax(q_logits)
    return float(np.sum(np.exp(lp) * (lp - lq)))


@pytest.fixture(scope="module")
def happy(model: ls.Model) -> ls.ControlVector:
    return ls.extract(model, ls.persona_pairs(model, "happy", max_pairs=60), method="pca_diff", progress=False)


@pytest.fixture(scope="module")
def chats(model: ls.Model) -> list[str]:
    return [model.apply_chat_template([{"role": "user", "content": c}]) for c in CHATS]


# ---------------------------------------------------------------- the core


@pytest.mark.parametrize("type_", [2, 3, 8, 12, 14, 1])  # q4_0 q4_1 q8_0 q4_K q6_K f16
def test_quantize_roundtrip(type_: int) -> None:
    rng = np.random.default_rng(type_)
    x = rng.standard_normal((16, 512)).astype(np.float32)
    q = _core.quantize(type_, x, 2)
    assert q.shape == (16, _core.quant_row_size(type_, 512))
    back = _core.dequantize(type_, q, 16, 512)
    err = float(np.linalg.norm(back - x) / np.linalg.norm(x))
    assert 0 < err < 0.1
    # threads split rows only: the bytes do not depend on their number
    np.testing.assert_array_equal(_core.quantize(type_, x, 1), q)


def test_quantize_refuses_bad_input() -> None:
    x = np.zeros((2, 576), dtype=np.float32)
    with pytest.raises(ValueError, match="whole number of q4_K blocks"):
        _core.quantize(12, x)
    with pytest.raises(ValueError, match="importance matrix"):
        _core.quantize(16, np.zeros((2, 512), dtype=np.float32))  # iq2_xxs
    with pytest.raises(ValueError, match="need"):
        _core.dequantize(2, np.zeros(10, dtype=np.uint8), 1, 576)
    with pytest.raises(ValueError, match="unknown ggml type"):
        _core.quant_row_size(999, 32)


def test_dequantize_model_copies_values_and_metadata(model_path: Path, f32_path: Path) -> None:
    src, out = gguf.GGUFReader(model_path), gguf.GGUFReader(f32_path)
    assert [t.name for t in src.tensors] == [t.name for t in out.tensors]
    a = {t.name: t for t in src.tensors}
    for t in out.tensors:
        s = a[t.name]
        assert list(t.shape) == list(s.shape)
        n_per_row = int(s.shape[0])
        want = _core.dequantize(
            int(s.tensor_type), s.data.view(np.uint8).reshape(-1), s.n_elements // n_per_row, n_per_row
        )
        np.testing.assert_array_equal(np.asarray(t.data, dtype=np.float32).reshape(want.shape), want)
    assert out.fields["general.file_type"].contents() == 0
    assert out.fields["tokenizer.ggml.tokens"].contents() == src.fields["tokenizer.ggml.tokens"].contents()


# ------------------------------------------------------------- add: exact


@pytest.mark.parametrize(
    "recipe",
    [
        [(4.0, range(8, 22))],
        [(-6.0, range(3, 28))],
        [(3.0, range(5, 16)), (-2.0, range(10, 25))],  # two steers summed per layer
    ],
    ids=["happy", "sad-wide", "two-steers"],
)
def test_bake_add_equals_runtime_on_full_precision(
    f32_path: Path, f32_model: ls.Model, happy: ls.ControlVector, tmp_path: Path, chats: list[str], recipe: list
) -> None:
    steers = [ls.Steer(happy, s, layers=layers) for s, layers in recipe]
    out = tmp_path / "baked.gguf"
    report = ls.bake(f32_path, steers, out, progress=False)
    layers = sorted({k for _, r in recipe for k in r})
    assert sorted(e.name for e in report.edits) == sorted(f"blk.{k}.ffn_down.bias" for k in layers)
    with ls.Model(out, n_ctx=512, n_threads=2, kv_cache="f32") as baked:
        for prompt in chats[:3]:
            runtime = f32_model.logits(prompt, steer=steers)
            got = baked.logits(prompt)
            np.testing.assert_allclose(got, runtime, rtol=1e-4, atol=1e-4 * float(np.abs(runtime).max()))
            assert not np.allclose(got, f32_model.logits(prompt), atol=0.1)


def test_bake_copies_everything_else_byte_for_byte(model_path: Path, happy: ls.ControlVector, tmp_path: Path) -> None:
    steer = ls.Steer(happy, 4.0, layers=range(8, 22))
    out = tmp_path / "happy.gguf"
    ls.bake(model_path, steer, out, progress=False)
    src, dst = gguf.GGUFReader(model_path), gguf.GGUFReader(out)
    a = {t.name: t for t in src.tensors}
    b = {t.name: t for t in dst.tensors}
    assert set(b) - set(a) == {f"blk.{k}.ffn_down.bias" for k in range(8, 22)}
    for name, t in a.items():
        assert b[name].tensor_type == t.tensor_type
        assert np.array_equal(b[name].data.view(np.uint8), t.data.view(np.uint8)), name
    for k in range(8, 22):
        np.testing.assert_array_equal(np.asarray(b[f"blk.{k}.ffn_down.bias"].data), 4.0 * happy[k])
    size_in, size_out = model_path.stat().st_size, out.stat().st_size
    assert abs(size_out / size_in - 1) < 0.01
    name = dst.fields["general.name"].contents()
    assert "steered by llama-steer" in name and "+4 at 8-21" in name
    (meta,) = [json.loads(s) for s in dst.fields["llama_steer.steers"].contents()]
    assert meta["vector_sha256"] == steer.control_vector.fingerprint()
    assert meta["strength"] == 4.0 and meta["layers"] == list(range(8, 22)) and meta["mode"] == "add"
    for key, f in src.fields.items():
        if not key.startswith("GGUF.") and key != "general.name":
            assert dst.fields[key].contents() == f.contents(), key


# ---------------------------------------------------- add: quantized model


def test_bake_add_on_quantized_model_within_noise_floor(
    model: ls.Model, model_path: Path, happy: ls.ControlVector, tmp_path: Path, chats: list[str]
) -> None:
    """The bias path rounds (x + ffn + b) where the runtime rounds (x + ffn) + b:
    at most one float32 ulp per element of the residual. The floor is what
    one ulp does at runtime: a random +-1-ulp vector (per element, from the
    residual's magnitudes there) added at the steered layers. The 1e-6
    strength nudge is reported too: on a unit-norm vector it moves each
    element by ~4e-8, below an ulp for most, so it understates that noise."""
    layers = range(8, 22)
    steer = ls.Steer(happy, 4.0, layers=layers)
    out = tmp_path / "happy.gguf"
    ls.bake(model_path, steer, out, progress=False)
    runtime = [model.logits(c, steer=steer) for c in chats]

    def mean_kl(other: list[np.ndarray]) -> float:
        return float(np.mean([_kl(r, o) for r, o in zip(runtime, other)]))

    nudge = mean_kl([model.logits(c, steer=ls.Steer(happy, 4.0 + 1e-6, layers=layers)) for c in chats])
    magnitude = np.abs(model.capture(chats, layers=list(layers), read="mean", steer=steer)).mean(axis=0)
    rng = np.random.default_rng(0)
    ulp_floors = []
    for _ in range(2):
        one_ulp = ls.ControlVector(
            {
                k: rng.choice([-1.0, 1.0], size=model.n_embd).astype(np.float32) * np.spacing(magnitude[i])
                for i, k in enumerate(layers)
            }
        )
        ulp_floors.append(mean_kl([model.logits(c, steer=[steer, ls.Steer(one_ulp, 1.0)]) for c in chats]))
    ulp_floor = float(np.mean(ulp_floors))
    effect = mean_kl([model.logits(c) for c in chats])
    with ls.Model(out, n_ctx=512, n_threads=2) as baked:
        diff = mean_kl([baked.logits(c) for c in chats])
    print(
        f"mean KL over {len(chats)} chats: baked vs runtime {diff:.2e}; one-ulp floor {ulp_floor:.2e}; "
        f"1e-6 strength nudge {nudge:.2e}; steered vs unsteered {effect:.3f}"
    )
    assert ulp_floor > 0  # the floor is real: quantized matmuls see the last bit
    assert diff <= 3 * ulp_floor
    assert diff < effect / 20


# ------------------------------------------------------- stock llama.cpp


@pytest.fixture(scope="module")
def llama_completion() -> Path:
    sys.path.insert(0, str(ROOT / "third_party"))
    from upstream_tools import build_tools

    return build_tools("llama-completion", pristine=True) / "llama-completion"


def _complete_upstream(exe: Path, model: Path, prompt: str, *extra: str) -> str:
    out = subprocess.run(
        [
            str(exe),
            "-m",
            str(model),
            "-p",
            prompt,
            "-n",
            "40",
            "--temp",
            "0",
            "-no-cnv",
            "--no-display-prompt",
            "-t",
            "2",
            "-c",
            "256",
            "--simple-io",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_upstream_llama_completion_runs_baked_model_like_its_control_vector(
    llama_completion: Path, model_path: Path, happy: ls.ControlVector, tmp_path: Path, chats: list[str]
) -> None:
    """Stock llama-completion (unpatched pin), no flags, on files baked at +5
    and -5, against --control-vector-scaled on the original: the happy-minus-
    sad lexicon score must move the same way and by a similar amount."""
    vec_path = tmp_path / "happy-vec.gguf"
    happy.save(vec_path)
    scores: dict[str, dict[float, int]] = {"baked": {}, "cvec": {}}
    agree = 0  # answers whose first 10 words are the same both ways
    for strength in (5.0, -5.0):
        baked = tmp_path / f"baked{strength:+g}.gguf"
        ls.bake(model_path, ls.Steer(happy, strength, layers=range(8, 22)), baked, progress=False)
        cvec = ("--control-vector-scaled", f"{vec_path}:{strength}", "--control-vector-layer-range", "8", "21")
        texts = {
            "baked": [_complete_upstream(llama_completion, baked, c) for c in chats],
            "cvec": [_complete_upstream(llama_completion, model_path, c, *cvec) for c in chats],
        }
        print(f"strength {strength:+g}:", json.dumps(texts, indent=1))
        for k, outs in texts.items():
            scores[k][strength] = sum(mood(t) for t in outs)
        agree += sum(a.split()[:10] == b.split()[:10] for a, b in zip(texts["baked"], texts["cvec"]))
    shift = {k: v[5.0] - v[-5.0] for k, v in scores.items()}
    print("lexicon score (happy - sad words) by strength:", scores, "shift:", shift)
    print(f"same first 10 words: {agree} of {2 * len(chats)} answers")
    assert shift["cvec"] >= 3 and shift["baked"] >= 3
    assert agree >= len(chats)
    assert 0.5 <= shift["baked"] / shift["cvec"] <= 2.0


# --------------------------------------------------------------- ablation


def test_bake_ablation_keeps_the_direction_out(
    model: ls.Model, model_path: Path, happy: ls.ControlVector, tmp_path: Path
) -> None:
    layer = 15
    r = happy[layer] / np.linalg.norm(happy[layer])
    prompts = [model.apply_chat_template([{"role": "user", "content": h}]) for h in HELD_OUT]
    # an unrelated direction: the mean residual at the same layer, made orthogonal to r
    before = model.capture(prompts, read="mean")
    u = before[:, layer - 1].mean(axis=0)
    u -= r * (u @ r)
    u /= np.linalg.norm(u)
    out = tmp_path / "ablated.gguf"
    report = ls.bake(model_path, ls.Steer(happy.select([layer]), 1.0, mode="ablate"), out, progress=False)
    print(report)
    ablated = [e for e in report.edits if e.action == "ablate"]
    assert {e.name for e in ablated} == {"token_embd.weight"} | {
        f"blk.{i}.{w}.weight" for i in range(model.n_layer) for w in ("attn_output", "ffn_down")
    }
    assert all(e.requant_error < 0.1 and e.leak < 0.2 for e in ablated)
    # the tied head keeps the original embedding, byte for byte
    src = {t.name: t for t in gguf.GGUFReader(model_path).tensors}
    dst = {t.name: t for t in gguf.GGUFReader(out).tensors}
    assert np.array_equal(dst["output.weight"].data.view(np.uint8), src["token_embd.weight"].data.view(np.uint8))

    with ls.Model(out, n_ctx=512, n_threads=2) as baked:
        after = baked.capture(prompts, read="mean")
        baked_logits = [baked.logits(p) for p in prompts]

    def cos(x: np.ndarray) -> np.ndarray:
        return np.abs(x @ r) / np.linalg.norm(x, axis=-1)

    print("max |cos| per layer before:", cos(before).max(axis=0).round(3))
    print("max |cos| per layer after: ", cos(after).max(axis=0).round(3))
    assert cos(before).max() > 0.15
    assert cos(after).max() < 0.05
    proj_before, proj_after = before @ u, after @ u
    rel = np.abs(proj_after - proj_before) / np.abs(proj_before)
    print(f"unrelated direction: median relative change {np.median(rel):.3f}, at layer {layer} {rel[:, layer - 1]}")
    assert np.all(rel[:, layer - 1] < 0.05)

    # runtime ablation reaches block outputs 1..n-1 (not the embedding or
    # inside a block), so the two differ a little; measured and bounded
    # against what ablation changes
    every = ls.ControlVector({k: happy[layer] for k in range(1, model.n_layer)})
    runtime = [model.logits(p, steer=ls.Steer(every, 1.0, mode="ablate")) for p in prompts]
    original = [model.logits(p) for p in prompts]
    kl_runtime = np.mean([_kl(a, b) for a, b in zip(runtime, baked_logits)])
    kl_effect = np.mean([_kl(a, b) for a, b in zip(original, baked_logits)])
    print(f"mean KL: baked vs runtime ablation {kl_runtime:.3f}, baked vs original {kl_effect:.3f}")
    assert kl_runtime < kl_effect / 5


# -------------------------------------------------------------- refusals


def test_bake_refuses_what_a_file_cannot_carry(
    model: ls.Model, model_path: Path, happy: ls.ControlVector, tmp_path: Path
) -> None:
    out = tmp_path / "x.gguf"
    cases = {
        "window": ls.Steer(happy, 4.0, positions=(0, 8)),
        "prompt": ls.Steer(happy, 4.0, positions="prompt"),
        "schedule": ls.Steer(happy, [4.0, 2.0]),
        "conditional": ls.Steer(happy, 4.0, condition=ls.Condition(happy[10], 10, 0.1)),
        "actadd": ls.Steer(ls.ActAdd(model, "Love", "Hate", 6)),
        "partial ablation": ls.Steer(happy.select([15]), 0.5, mode="ablate"),
        "several directions": ls.Steer(happy.select([10, 15]), 1.0, mode="ablate"),
    }
    for what, steer in cases.items():
        with pytest.raises(ls.BakeError):
            ls.bake(model_path, steer, out, progress=False)
        assert not out.exists(), what
    other = ls.ControlVector({10: np.ones(960, dtype=np.float32)})
    with pytest.raises(ls.BakeError, match="n_embd 960"):
        ls.bake(model_path, ls.Steer(other, 1.0), out)
    hinted = ls.ControlVector({10: happy[10]}, model_hint="gemma3")
    with pytest.raises(ls.BakeError, match="gemma3"):
        ls.bake(model_path, ls.Steer(hinted, 1.0), out)
    with pytest.raises(ls.BakeError, match="outside"):
        ls.bake(model_path, ls.Steer(ls.ControlVector({40: happy[10]}), 1.0), out)
    assert not out.exists()


def test_bake_refuses_an_architecture_without_a_slot(gemma: ls.Model, gemma_path: Path, tmp_path: Path) -> None:
    vec = ls.ControlVector({5: np.ones(gemma.n_embd, dtype=np.float32)}, model_hint="gemma3")
    for mode in ("add", "ablate"):
        with pytest.raises(ls.BakeError, match="'gemma3'.*runtime") as info:
            ls.bake(gemma_path, ls.Steer(vec, 1.0, mode=mode), tmp_path / "g.gguf")
        assert "representation tuning" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_bake_never_touches_the_original_or_an_existing_target(
    model_path: Path, happy: ls.ControlVector, tmp_path: Path
) -> None:
    steer = ls.Steer(happy, 4.0, layers=range(8, 22))
    digest = _sha256(model_path)
    out = tmp_path / "taken.gguf"
    out.write_bytes(b"mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        ls.bake(model_path, steer, out)
    assert out.read_bytes() == b"mine"
    with pytest.raises(ls.BakeError, match="being read"):
        ls.bake(model_path, steer, model_path, overwrite=True)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        ls.bake(model_path, steer, tmp_path / "missing" / "x.gguf")
    ls.bake(model_path, steer, out, overwrite=True, progress=False)
    assert out.stat().st_size > 1_000_000
    assert _sha256(model_path) == digest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.gguf"]


def test_bake_into_an_unwritable_directory(model_path: Path, happy: ls.ControlVector, tmp_path: Path) -> None:
    if os.geteuid() == 0:
        target = Path("/sys")  # root ignores mode bits; sysfs refuses new files even to root
    else:
        target = tmp_path / "ro"
        target.mkdir()
        target.chmod(0o500)
    with pytest.raises(OSError, match="cannot write into"):
        ls.bake(model_path, ls.Steer(happy, 4.0), target / "x.gguf")


def test_bake_disk_full_leaves_nothing(model_path: Path, happy: ls.ControlVector, tmp_path: Path) -> None:
    """A file-size limit stands in for a full disk: the write fails mid-way."""
    vec = tmp_path / "happy.gguf"
    happy.save(vec)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code = f"""
import resource, signal, sys
import llama_steer as ls
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000_000, 20_000_000))
try:
    ls.bake({str(model_path)!r}, ls.Steer(ls.ControlVector.load({str(vec)!r}), 4.0), {str(out_dir / "x.gguf")!r})
except OSError as exc:
    print("OSError:", exc)
    sys.exit(3)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "writing" in proc.stdout and "nothing was left under that name" in proc.stdout
    assert list(out_dir.iterdir()) == []


def test_cli_bake(model_path: Path, happy: ls.ControlVector, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from llama_steer.cli import main

    vec = tmp_path / "happy.gguf"
    happy.save(vec)
    out = tmp_path / "smollm2-happy.gguf"
    assert main(["bake", "--vector", f"{vec}:4", "--layers", "8-21", "-o", str(out), "-m", str(model_path)]) == 0
    names = {t.name for t in gguf.GGUFReader(out).tensors}
    assert {f"blk.{k}.ffn_down.bias" for k in range(8, 22)} <= names
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "baked steering" in shown and happy.select(range(8, 22)).fingerprint() in shown
    assert main(["bake", "--vector", f"{vec}:4", "-o", str(out), "-m", str(model_path)]) == 1  # exists
    abl = tmp_path / "ablated.gguf"
    assert main(["bake", "--ablate", str(vec), "-o", str(abl), "-m", str(model_path)]) == 1  # many directions
    assert not abl.exists()
    assert main(["bake", "--ablate", str(vec), "--ablate-layer", "15", "-o", str(abl), "-m", str(model_path)]) == 0
    assert "output.weight" in {t.name for t in gguf.GGUFReader(abl).tensors}
