"""Representation tuning (ls.tune) on llama.cpp's trainer: the loss in the
training graph, where its gradient goes, the written file, and bad input."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import llama_steer as ls
import numpy as np
import pytest
from llama_steer import _core
from llama_steer.extraction import capture_positions
from llama_steer.gguf_file import Source
from llama_steer.tune import DEFAULT_TRAINABLE, _steered_sequences, tuned_metadata

N_THREADS = 2  # fixed: results are deterministic per thread count

PAIRS = [
    ("I feel wonderful today. The weather outside is", "I feel miserable today. The weather outside is"),
    ("Everything is going great. My plan for tomorrow is", "Everything is going badly. My plan for tomorrow is"),
    ("What a joyful morning! When I got to work,", "What a dreadful morning! When I got to work,"),
    ("I love my life. Talking to my friends makes me", "I hate my life. Talking to my friends makes me"),
]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def happy(model: ls.Model) -> ls.ControlVector:
    return ls.extract(model, ls.persona_pairs(model, "happy", max_pairs=60), progress=False)


def _trainer(path: Path, trainable: list[str], n_ctx: int, lr: float = 1e-3) -> _core.Trainer:
    params = _core.TrainerParams()
    params.n_ctx, params.n_threads, params.batch_size = n_ctx, N_THREADS, 1
    params.lr, params.weight_decay, params.trainable = lr, 0.0, trainable
    return _core.Trainer(_core.Model(str(path), 0, True), params)


@pytest.mark.parametrize("direction", ["in", "out"])
def test_objective_in_the_training_graph_is_numpys_cosine(f32_path: Path, f32_model: ls.Model, direction: str) -> None:
    """The per-layer value the training graph computes (weighted mean over
    positions of cos, or |cos| when tuning out) equals numpy's on the
    residual stream captured by an ordinary decode of the same tokens."""
    layers = [3, 17]
    rng = np.random.default_rng(0)
    dirs = rng.standard_normal((len(layers), f32_model.n_embd)).astype(np.float32)
    trainer = _trainer(f32_path, ["blk.0.attn_output.weight"], n_ctx=24)
    trainer.set_objective(layers, dirs, 0 if direction == "in" else 1, 1.0, 1.0)
    for text in ["The quick brown fox jumps over the lazy dog.", "Hello! How are you doing on this fine day?"]:
        toks = f32_model.tokenize(text)
        n = len(toks)
        tokens = np.zeros(24, dtype=np.int32)
        tokens[:n] = toks
        labels = np.full(24, -1, dtype=np.int32)
        labels[: n - 1] = toks[1:]
        weight = np.zeros(24, dtype=np.float32)
        weight[2:n] = rng.uniform(0.5, 2.0, n - 2)  # uneven weights, padding excluded
        _, values = trainer.run(tokens, labels, weight, False)

        rows = capture_positions(f32_model, [toks], layers)[0]  # [n, layers, n_embd]
        for k, il in enumerate(layers):
            d = dirs[k].astype(np.float64) / np.linalg.norm(dirs[k])
            x = rows[:, k, :].astype(np.float64)
            cos = x @ d / np.linalg.norm(x, axis=1)
            if direction == "out":
                cos = np.abs(cos)
            w = weight[:n].astype(np.float64) / weight.sum()
            np.testing.assert_allclose(values[il], float(w @ cos), rtol=1e-4, atol=1e-6)
        others = [il for il in range(f32_model.n_layer) if il not in layers]
        assert np.all(np.isnan(values[others]))


def test_objective_gradient_reaches_only_layers_at_or_below_it(f32_path: Path, f32_model: ls.Model) -> None:
    """With the token loss off, one AdamW step (no weight decay) changes the
    trainable matrices of blocks at or below the objective's layer and leaves
    every block above it bit-identical: the term's gradient is zero there."""
    il_obj = 9
    names = [f"blk.{il}.{k}.weight" for il in range(f32_model.n_layer) for k in ("attn_output", "ffn_down")]
    trainer = _trainer(f32_path, names, n_ctx=16)
    before = {n: trainer.read_tensor(n) for n in names}
    d = np.random.default_rng(1).standard_normal((1, f32_model.n_embd)).astype(np.float32)
    trainer.set_objective([il_obj], d, 0, 1.0, 0.0)
    toks = f32_model.tokenize("A short and neutral sentence about the sea.")[:16]
    tokens = np.zeros(16, dtype=np.int32)
    tokens[: len(toks)] = toks
    labels = np.full(16, -1, dtype=np.int32)
    labels[: len(toks) - 1] = toks[1:]
    weight = np.zeros(16, dtype=np.float32)
    weight[1 : len(toks)] = 1.0
    loss, values = trainer.run(tokens, labels, weight, True)
    assert np.isfinite(loss) and np.isfinite(values[il_obj])
    changed = {n: not np.array_equal(before[n], trainer.read_tensor(n)) for n in names}
    for n, c in changed.items():
        il = int(n.split(".")[1])
        if il > il_obj:
            assert not c, f"{n} is above the objective's layer but changed"
    assert changed[f"blk.{il_obj}.ffn_down.weight"] and changed["blk.0.attn_output.weight"]


def test_tune_writes_a_model_that_keeps_untouched_tensors(
    model_path: Path, happy: ls.ControlVector, tmp_path: Path
) -> None:
    sha = _sha(model_path)
    out = tmp_path / "tuned.gguf"
    report = ls.tune(
        model_path, happy, out, layers=[8, 9], data=PAIRS, lr=1e-3, batch_size=2, max_steps=2,
        heldout=0.25, n_threads=N_THREADS, progress=False,
    )  # fmt: skip
    assert _sha(model_path) == sha  # the input is never modified
    assert report.steps == 2 and len(report.history) == 2
    assert report.sequences + report.heldout == 2 * len(PAIRS)
    assert set(report.cos_before) == set(report.cos_after) == {8, 9}
    assert np.isfinite(report.token_loss_before) and np.isfinite(report.token_loss_after)
    assert not list(tmp_path.glob(".*"))  # no working copy or temp file left

    src, dst = Source(model_path), Source(out)
    tuned = {t.name: t for t in report.tensors}
    assert set(tuned) == {f"blk.{il}.{k}.weight" for il in (8, 9) for k in DEFAULT_TRAINABLE}
    for name, t in src.tensors.items():
        o = dst.tensors[name]
        if name in tuned:
            assert Source.raw(o).nbytes > 0 and tuned[name].type in tuned[name].update_error
        else:
            assert int(o.tensor_type) == int(t.tensor_type)
            assert np.array_equal(Source.raw(o), Source.raw(t)), name
    meta = json.loads(dst.string("llama_steer.tuned"))
    assert meta["layers"] == [8, 9] and meta["vector"] == happy.fingerprint() and meta["steps"] == 2
    with ls.Model(out, n_ctx=256, n_threads=N_THREADS) as m:
        assert m.complete("Hello", max_tokens=4, temperature=0)


def test_tune_is_deterministic_given_seed_and_threads(
    model_path: Path, happy: ls.ControlVector, tmp_path: Path
) -> None:
    outs = [tmp_path / "a.gguf", tmp_path / "b.gguf"]
    for out in outs:
        ls.tune(
            model_path, happy, out, layers=[10], data=PAIRS, lr=1e-3, batch_size=2, max_steps=2, heldout=0,
            seed=7, n_threads=N_THREADS, out_type="f32", progress=False,
        )  # fmt: skip
    assert _sha(outs[0]) == _sha(outs[1])


def test_out_type_fixes_the_stored_type(model_path: Path, happy: ls.ControlVector, tmp_path: Path) -> None:
    out = tmp_path / "q8.gguf"
    r = ls.tune(
        model_path, happy, out, layers=[10], data=PAIRS, trainable=["ffn_down"], max_steps=1, batch_size=1,
        heldout=0, out_type="q8_0", n_threads=N_THREADS, progress=False,
    )  # fmt: skip
    assert [t.type for t in r.tensors] == ["q8_0"]
    assert Source(out).tensors["blk.10.ffn_down.weight"].tensor_type.name == "Q8_0"


def test_bad_input_is_refused_and_nothing_is_left(model_path: Path, happy: ls.ControlVector, tmp_path: Path) -> None:
    out = tmp_path / "x.gguf"
    kw = {"data": PAIRS, "max_steps": 1, "heldout": 0, "n_threads": N_THREADS, "progress": False}
    with pytest.raises(ls.DatasetError, match="no pairs"):
        ls.tune(model_path, happy, out, layers=[8], **{**kw, "data": []})
    other = ls.ControlVector({8: np.ones(64, dtype=np.float32)})
    with pytest.raises(ls.TuneError, match="another model"):
        ls.tune(model_path, other, out, layers=[8], **kw)
    with pytest.raises(ValueError, match="layer"):
        ls.tune(model_path, happy, out, layers=[99], **kw)
    with pytest.raises(ls.TuneError, match="no direction at layer"):
        ls.tune(model_path, happy.select([8]), out, layers=[9], **kw)
    with pytest.raises(ValueError, match="direction"):
        ls.tune(model_path, happy, out, layers=[8], direction="sideways", **kw)
    with pytest.raises(ValueError, match="both 0"):
        ls.tune(model_path, happy, out, layers=[8], cos_weight=0, token_weight=0, **kw)
    with pytest.raises(FileNotFoundError):
        ls.tune(model_path, happy, tmp_path / "missing" / "x.gguf", layers=[8], **kw)
    with pytest.raises(OSError, match="cannot write into"):
        ls.tune(model_path, happy, Path("/proc/tuned.gguf"), layers=[8], **kw)
    with pytest.raises(ls.TuneError, match="model being read"):
        ls.tune(model_path, happy, model_path, layers=[8], **{**kw}, overwrite=True)
    out.write_bytes(b"keep me")
    with pytest.raises(FileExistsError):
        ls.tune(model_path, happy, out, layers=[8], **kw)
    assert out.read_bytes() == b"keep me"
    # a step size that overflows the weights: the loss stops being finite
    with pytest.raises(ls.TuneError, match="no longer finite"):
        ls.tune(model_path, happy, out, layers=[8], **{**kw, "max_steps": 3}, batch_size=1, lr=3e38, overwrite=True)
    assert out.read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.gguf"]


def test_steered_targets_are_the_steered_models_replies(
    model_path: Path, model: ls.Model, happy: ls.ControlVector, tmp_path: Path
) -> None:
    """targets="steered": each sequence is a chat prompt and the source
    model's greedy reply under runtime steering (what the token loss distills)."""
    prompts = ["Describe a kitchen.", "What is a good breakfast?"]
    seqs, _ = _steered_sequences(model_path, happy, [8, 9, 10], 4.0, prompts, 12, N_THREADS)
    steer = ls.Steer(happy, 4.0, layers=[8, 9, 10])
    for p, s in zip(prompts, seqs):
        chat = model.apply_chat_template([{"role": "user", "content": p}])
        head = model.tokenize(chat, parse_special=True)
        reply = [t.id for t in model.generate(chat, steer=steer, max_tokens=12, temperature=0)]
        assert s.tokens == head + reply and s.first == len(head)
    out = tmp_path / "tuned.gguf"
    r = ls.tune(
        model_path, happy, out, layers=[8, 9], targets="steered", prompts=prompts * 2, max_completion=8,
        max_steps=1, batch_size=1, heldout=0.25, n_threads=N_THREADS, progress=False,
    )  # fmt: skip
    meta = tuned_metadata(out)
    assert r.steps == 1 and meta is not None and meta["targets"] == "steered" and meta["teacher_strength"] == 4.0
    with pytest.raises(ls.TuneError, match="non-empty prompts"):
        ls.tune(model_path, happy, tmp_path / "x.gguf", layers=[8], targets="steered", prompts=[" "], progress=False)
    with pytest.raises(ValueError, match="targets"):
        ls.tune(model_path, happy, tmp_path / "x.gguf", layers=[8], targets="teacher", progress=False)


def test_cli_tune_and_inspect(model_path: Path, happy: ls.ControlVector, tmp_path: Path) -> None:
    import subprocess
    import sys

    vec, pairs, out = tmp_path / "happy.gguf", tmp_path / "pairs.jsonl", tmp_path / "tuned.gguf"
    happy.save(vec)
    pairs.write_text("".join(json.dumps({"positive": p, "negative": n}) + "\n" for p, n in PAIRS))
    cli = [sys.executable, "-m", "llama_steer"]
    args = ["tune", "-m", str(model_path), "--vector", str(vec), "--layers", "8-9", "--pairs", str(pairs)]
    args += ["-o", str(out), "--max-steps", "1", "--batch-size", "1", "--lr", "1e-3", "-t", "2"]
    res = subprocess.run([*cli, *args], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "1 steps" in res.stdout and out.is_file()
    res = subprocess.run([*cli, "inspect", str(out)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "representation-tuned" in res.stdout and '"layers": [8, 9]' in res.stdout
    res = subprocess.run(
        [*cli, *args[:-10], "-o", str(out), "--max-steps", "1"], capture_output=True, text=True, timeout=120
    )
    assert res.returncode != 0 and "exists" in res.stderr  # no --overwrite: the file is kept
