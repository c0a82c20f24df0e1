"""Capture and extraction on the quantized model itself."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import llama_steer as ls
import numpy as np
import pytest
from lexicon import mood
from llama_steer import _core
from llama_steer.directions import direction
from llama_steer.extraction import _stream_rows, capture_positions


def _final_norm(model: ls.Model, x: np.ndarray) -> np.ndarray:
    """output_norm (RMSNorm) of the model, read from the GGUF with the gguf package."""
    r = gguf.GGUFReader(model.path)
    w = next(np.asarray(t.data, dtype=np.float32) for t in r.tensors if t.name == "output_norm.weight")
    f = r.fields[f"{model.arch}.attention.layer_norm_rms_epsilon"]
    eps = float(f.parts[f.data[0]][0])
    return (x / np.sqrt(np.mean(x.astype(np.float64) ** 2) + eps) * w).astype(np.float32)


def test_last_block_capture_matches_llama_cpp_embeddings(model: ls.Model) -> None:
    prompt = "Steering vectors live in the residual stream."
    got = model.capture([prompt], layers=[model.n_layer - 1])[0, 0]
    # Independent path: llama.cpp's own embeddings output (pooling none) is
    # the last block's output after the final norm.
    params = _core.ContextParams()
    params.n_ctx = 256
    params.n_threads = 2
    params.embeddings = True
    ctx = _core.Context(model._m, params)
    ids = model.tokenize(prompt, parse_special=True)
    ctx.decode(_core.BatchTokens(ids, list(range(len(ids))), [0] * len(ids), [0] * (len(ids) - 1) + [1]))
    want = np.array(ctx.embeddings(-1))
    ctx.close()
    np.testing.assert_allclose(_final_norm(model, got), want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


def test_capture_shapes_and_reads(model: ls.Model) -> None:
    prompts = ["The cat sat on the mat", "The cat sat", "A dog"]
    acts = model.capture(prompts, layers=[3, 10, 20])
    assert acts.shape == (3, 3, model.n_embd) and acts.dtype == np.float32
    # "The cat sat" is a prefix of the first prompt: read off the same pass,
    # it equals capturing it alone.
    alone = model.capture(["The cat sat"], layers=[3, 10, 20])
    np.testing.assert_allclose(acts[1], alone[0], rtol=1e-4, atol=1e-3)
    mean = model.capture(prompts[:1], layers=[10], read="mean")
    ids = model.tokenize(prompts[0], parse_special=True)
    every = model.capture(prompts[:1], layers=[10], read=lambda toks: range(len(toks)))
    np.testing.assert_allclose(mean, every, rtol=1e-6)
    first = model.capture(prompts[:1], layers=[10], read=lambda toks: [0])
    assert not np.allclose(first, mean)
    assert len(ids) > 1


def test_capture_is_unsteered_and_leaves_model_clean(model: ls.Model) -> None:
    before = model.logits("Hello")
    model.capture(["Hello world"], layers=[5])
    assert np.array_equal(before, model.logits("Hello"))


def test_capture_bad_input(model: ls.Model) -> None:
    with pytest.raises(ValueError):
        model.capture([], layers=[3])
    with pytest.raises(ValueError):
        model.capture(["hi"], layers=[model.n_layer])
    with pytest.raises(ValueError):
        model.capture(["hi"], read="middle")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        model.capture(["hi"], read=lambda t: [len(t) + 3])


def test_mean_diff_equals_numpy_mean_of_captured_differences(model: ls.Model) -> None:
    pairs = ls.persona_pairs(model, "happy", max_pairs=24)
    layers = [6, 12, 18]
    v = ls.extract(model, pairs, method="mean_diff", layers=layers, progress=False)
    # One capture call over the same prompts decodes the same prefix tree, so
    # the numbers are the ones extract() saw: the method must agree to
    # float32 precision.
    acts = model.capture([s for p in pairs for s in (p.positive, p.negative)], layers=layers)
    want = (acts[0::2].astype(np.float64) - acts[1::2]).mean(axis=0)
    for i, layer in enumerate(layers):
        np.testing.assert_allclose(v[layer], want[i], rtol=1e-5, atol=1e-6 * float(np.abs(want[i]).max()))


def test_prefix_sharing_changes_nothing(model_path: Path) -> None:
    """With and without the prefix tree the vectors are the same.

    ggml's CPU backend picks its matmul kernel by ubatch size (the two paths
    differ by ~1.5% in the activations of this Q4_1 model), so the two runs
    are compared with ubatches small enough to stay on one path: then they
    agree bit for bit, which shows the sharing itself changes nothing."""
    with ls.Model(model_path, n_ctx=4096, n_threads=2, n_batch=16, n_seq_max=16) as m:
        pairs = ls.persona_pairs(m, "happy", max_pairs=30)
        layers = [5, 15, 25]
        for method in ("mean_diff", "pca_diff"):
            shared = ls.extract(m, pairs, method=method, layers=layers, progress=False)
            alone = ls.extract(m, pairs, method=method, layers=layers, progress=False, share_prefixes=False)
            for k in layers:
                np.testing.assert_allclose(shared[k], alone[k], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method", ["mean_diff", "pca_diff", "pca_center", "probe"])
def test_methods_separate_the_behaviour(model: ls.Model, method: str) -> None:
    pairs = ls.persona_pairs(model, "happy", max_pairs=60)
    v = ls.extract(model, pairs, method=method, layers=range(10, 24), progress=False)
    auc = v.diagnostics["heldout_auc"]
    assert max(auc.values()) > 0.9, auc
    if method != "mean_diff":
        assert all(abs(np.linalg.norm(v[k]) - 1) < 1e-4 for k in v.layers)


def test_sign_is_fixed_towards_positive() -> None:
    rng = np.random.default_rng(0)
    axis = rng.standard_normal(32)
    neg = rng.standard_normal((40, 32))
    pos = neg + 2.0 * axis + 0.1 * rng.standard_normal((40, 32))
    for method in ("mean_diff", "pca_diff", "pca_center", "probe"):
        d, _ = direction(method, pos, neg)
        assert np.mean(pos @ d) > np.mean(neg @ d), method
        d_swapped, _ = direction(method, neg, pos)
        assert np.mean(neg @ d_swapped) > np.mean(pos @ d_swapped), method


def test_pca_diff_matches_svd_reference() -> None:
    rng = np.random.default_rng(1)
    pos, neg = rng.standard_normal((30, 50)), rng.standard_normal((30, 50))
    d, evr = direction("pca_diff", pos, neg)
    diff = pos - neg
    _, s, vt = np.linalg.svd(diff - diff.mean(axis=0), full_matrices=False)
    assert abs(abs(float(d @ vt[0])) - 1) < 1e-5
    assert evr == pytest.approx(s[0] ** 2 / np.sum(s**2), rel=1e-6)


def test_happy_vector_steers_greedy_output(model: ls.Model, tmp_path: Path) -> None:
    """Extract happy/sad from the bundled dataset, steer a middle layer range.

    How it checks: over three neutral questions, the greedy answers at +s
    must use more words of a small happy lexicon (minus a sad lexicon) than
    the answers at -s, and +s must not score below the unsteered answers.
    """
    pairs = ls.persona_pairs(model, "happy", max_pairs=120)
    v = ls.extract(model, pairs, method="pca_diff", progress=False)
    steer_layers = range(8, 22)
    questions = ["How are you feeling today?", "Tell me about your weekend.", "What do you think of Mondays?"]
    score = {}
    for s in (-6.0, 0.0, 6.0):
        total = 0
        for q in questions:
            prompt = model.apply_chat_template([{"role": "user", "content": q}])
            out = model.complete(prompt, max_tokens=40, temperature=0, steer=ls.Steer(v, s, layers=steer_layers))
            total += mood(out)
        score[s] = total
    assert score[6.0] > score[-6.0], score
    assert score[6.0] >= score[0.0], score
    png = v.plot_layers(tmp_path / "layers.png")
    assert png.stat().st_size > 10_000


def test_pairs_files(tmp_path: Path, model: ls.Model) -> None:
    jl = tmp_path / "p.jsonl"
    jl.write_text("\n".join(json.dumps({"positive": f"good {i}", "negative": f"bad {i}"}) for i in range(6)) + "\n")
    cs = tmp_path / "p.csv"
    cs.write_text("positive,negative\n" + "".join(f"good {i},bad {i}\n" for i in range(6)))
    a = ls.load_pairs(jl)
    assert a == ls.load_pairs(cs) and len(a) == 6
    v = ls.extract(model, str(jl), method="mean_diff", layers=[5], progress=False)
    assert v.layers == [5]


@pytest.mark.parametrize(
    "content,suffix,match",
    [
        ('{"positive": "a", "negative": "b"}\nnot json\n', ".jsonl", r":2:"),
        ('{"positive": "a"}\n', ".jsonl", r":1:"),
        ("pos,neg\na,b\n", ".csv", "header"),
        ("positive,negative\na,\n", ".csv", r":2:"),
        ("", ".jsonl", "no pairs"),
    ],
)
def test_malformed_pairs_files(tmp_path: Path, content: str, suffix: str, match: str) -> None:
    p = tmp_path / f"bad{suffix}"
    p.write_text(content)
    with pytest.raises(ls.DatasetError, match=match):
        ls.load_pairs(p)


def test_bad_pairs(model: ls.Model, model_path: Path) -> None:
    with pytest.raises(ls.DatasetError, match="no pairs"):
        ls.extract(model, [], progress=False)
    with pytest.raises(ls.DatasetError, match=r"\[1\].*identical"):
        ls.extract(model, [("a", "b"), ("same", "same")], progress=False)
    with pytest.raises(ls.DatasetError):
        ls.extract(model, [("only one",)], progress=False)  # type: ignore[list-item]
    with pytest.raises(ValueError, match="method"):
        ls.extract(model, [("a", "b")], method="svd", progress=False)
    with ls.Model(model_path, n_ctx=64, n_threads=2) as small, pytest.raises(ls.ContextOverflowError, match="pair 1"):
        ls.extract(small, [("a", "b"), ("word " * 400, "b")], progress=False)


def _context(model: ls.Model, n_batch: int) -> _core.Context:
    params = _core.ContextParams()
    params.n_ctx = 256
    params.n_threads = 2
    params.n_batch = params.n_ubatch = n_batch
    params.n_seq_max = 4
    return _core.Context(model._m, params)


def _batch(ids: list[int], outputs: set[int]) -> _core.BatchTokens:
    return _core.BatchTokens(ids, list(range(len(ids))), [0] * len(ids), [int(i in outputs) for i in range(len(ids))])


@pytest.mark.parametrize("layers", [[1, 15, 29], [3, 9]], ids=["to-last-block", "pruned-after-9"])
def test_capture_only_decode_equals_full_decode(model: ls.Model, layers: list[int]) -> None:
    """A capture-only decode (no LM head, no blocks after the deepest captured
    layer, their cache stores dropped) gives the same rows bit for bit as a
    full decode with the same chunks, including chunks without any output
    (whose cache entries the later chunks' attention reads)."""
    ids = model.tokenize("Steering vectors live in the residual stream of a transformer, " * 4, parse_special=True)
    assert len(ids) > 40
    outputs = {5, len(ids) - 7, len(ids) - 1}  # the middle chunks have none
    ctx = _context(model, 16)
    try:
        ctx.set_capture_layers(layers)
        full = ctx.decode_capture(_batch(ids, outputs), 64)
        ctx.clear()
        only = ctx.decode_capture(_batch(ids, outputs), 64, logits=False)
        assert only.shape == (len(outputs), len(layers), model.n_embd)
        np.testing.assert_array_equal(only, full)
        # no logits were kept, and a later full decode (cache cleared) is untouched
        with pytest.raises(ValueError, match="no logits"):
            ctx.logits(-1)
        ctx.clear()
        ctx.set_capture_layers([])
        ctx.decode(_batch(ids[:16], {15}))
        after = np.array(ctx.logits(-1))
    finally:
        ctx.close()
    fresh = _context(model, 16)
    try:
        fresh.decode(_batch(ids[:16], {15}))
        np.testing.assert_array_equal(after, np.array(fresh.logits(-1)))
    finally:
        fresh.close()


def test_capture_only_needs_capture_layers(model: ls.Model) -> None:
    ctx = _context(model, 16)
    try:
        with pytest.raises(ValueError, match="no capture layers"):
            ctx.decode_capture(_batch([1, 2, 3], {2}), 64, logits=False)
    finally:
        ctx.close()


@pytest.mark.parametrize("method", ["mean_diff", "pca_diff", "pca_center", "probe"])
def test_streamed_solver_equals_exact(method: str) -> None:
    """PairStats past its exact-rows limit (moments, or for probe a sample)
    against the one-shot fit on every row: the same directions."""
    from llama_steer.directions import PairStats, held_out_mask

    rng = np.random.default_rng(3)
    n, n_layers, n_embd = 300, 3, 24
    true = rng.normal(size=(n_layers, n_embd))
    base = rng.normal(size=(n, n_layers, n_embd)) * 3
    pos = (base + true + 0.5 * rng.normal(size=base.shape)).astype(np.float32)
    neg = (base - true + 0.5 * rng.normal(size=base.shape)).astype(np.float32)
    limit = 200 if method == "probe" else 20  # probe keeps a sample of `limit` pairs
    streamed = PairStats(method, n, n_layers, n_embd, limit=limit)
    exact = PairStats(method, n, n_layers, n_embd, limit=n)
    for i in rng.permutation(n):  # any arrival order
        streamed.add(int(i), pos[i], neg[i])
        exact.add(int(i), pos[i], neg[i])
    assert streamed.train.folded and not exact.train.folded
    d_s, diag_s = streamed.solve([0, 1, 2])
    d_e, diag_e = exact.solve([0, 1, 2])
    held = held_out_mask(n)
    for li in range(n_layers):
        want, _ = direction(method, pos[:, li].astype(np.float64), neg[:, li].astype(np.float64))
        np.testing.assert_allclose(d_e[li], want, rtol=1e-5, atol=1e-6)  # exact path = one-shot fit
        a, b = d_s[li].astype(np.float64), d_e[li].astype(np.float64)
        cos = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
        # moments: float rounding only; probe: a 200-pair sample of 240 training pairs
        assert cos > (0.98 if method == "probe" else 1 - 1e-6), (li, cos)
        assert diag_s["residual_norm"][li] == pytest.approx(diag_e["residual_norm"][li], rel=1e-9)
        if method in ("pca_diff", "pca_center"):
            assert diag_s["explained_variance"][li] == pytest.approx(diag_e["explained_variance"][li], rel=1e-6)
    assert held.sum() == n // 5


def test_held_out_pairs_are_capped() -> None:
    from llama_steer.directions import MAX_HELD, held_out_mask

    assert held_out_mask(4).sum() == 0
    assert held_out_mask(100).sum() == 20
    assert held_out_mask(100_000).sum() == MAX_HELD


@pytest.mark.parametrize("method", ["mean_diff", "pca_diff", "pca_center", "probe"])
def test_extract_equals_prompt_by_prompt_reference_on_f32(f32_model: ls.Model, method: str) -> None:
    """On full-precision weights (where another op order moves numbers only
    at float rounding) the prefix-shared, capture-only, streamed extraction
    equals a reference built independently: every prompt decoded alone
    through generation's prefill, and the one-shot solver on all rows."""
    pairs = ls.persona_pairs(f32_model, "happy", n_personas=2, max_pairs=24)
    layers = [2, 12, 24]
    got = ls.extract(f32_model, pairs, method=method, layers=layers, progress=False)
    rows = capture_positions(f32_model, [s for p in pairs for s in (p.positive, p.negative)], layers)
    last = np.stack([r[-1] for r in rows]).astype(np.float64)  # [2n, layers, n_embd]
    for i, layer in enumerate(layers):
        want, _ = direction(method, last[0::2, i], last[1::2, i])
        cos = float(got[layer] @ want / np.linalg.norm(got[layer]) / np.linalg.norm(want))
        assert cos > 0.999, (layer, cos)


def test_pair_sides_arrive_together(model: ls.Model) -> None:
    """Rows reach the solver in the order prompts need them: a side waits for
    its partner only briefly, however many pairs there are (memory stays flat;
    decoded persona subtree by persona subtree, 50 sides waited here, a
    number that grew with the pairs)."""
    pairs = ls.persona_pairs(model, "happy", max_pairs=600)
    tokens = [model.engine.prompt_tokens(t) for p in pairs for t in (p.positive, p.negative)]
    waiting: set[int] = set()
    seen: list[int] = []
    most = 0

    def sink(i: int, rows: np.ndarray) -> None:
        nonlocal most
        seen.append(i)
        waiting.symmetric_difference_update({i} if i ^ 1 not in waiting else {i ^ 1})
        most = max(most, len(waiting))

    _stream_rows(model.engine, tokens, [[len(t) - 1] for t in tokens], [5], sink, None, True, False)
    assert sorted(seen) == list(range(len(tokens)))
    assert most <= 4
