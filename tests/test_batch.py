"""generate_batch: per-sequence steering in one decode loop."""

from __future__ import annotations

import llama_steer as ls
import numpy as np
import pytest

PROMPT = "Tell me about your day."


def _vector(model: ls.Model) -> ls.ControlVector:
    pairs = ls.persona_pairs(model, "happy", max_pairs=60)
    return ls.extract(model, pairs, progress=False)


@pytest.fixture(scope="module")
def happy(model: ls.Model) -> ls.ControlVector:
    return _vector(model)


def _collect(stream, n):  # type: ignore[no-untyped-def]
    out = [[] for _ in range(n)]
    for i, tok in stream:
        out[i].append(tok)
    return out


def test_sweep_in_one_batch_equals_separate_runs(model: ls.Model, happy: ls.ControlVector) -> None:
    prompt = model.apply_chat_template([{"role": "user", "content": PROMPT}])
    strengths = [-6.0, -3.0, 0.0, 3.0, 6.0]
    steers = [ls.Steer(happy, s, layers=range(8, 22)) for s in strengths]
    batch = _collect(
        model.generate_batch([prompt] * len(strengths), steers, max_tokens=24, temperature=0), len(strengths)
    )
    texts = ["".join(t.text for t in toks) for toks in batch]
    for s, steer, got in zip(strengths, steers, texts):
        alone = model.complete(prompt, max_tokens=24, temperature=0, steer=steer)
        assert got == alone, f"strength {s}"
    assert len(set(texts)) >= 3  # the strengths really differ


def test_mixed_prompts_and_unsteered(model: ls.Model, happy: ls.ControlVector) -> None:
    prompts = ["The sky is", "My name is", "Water boils at"]
    batch = _collect(model.generate_batch(prompts, [None, ls.Steer(happy, 4.0), []], max_tokens=10, temperature=0), 3)
    assert "".join(t.text for t in batch[0]) == model.complete(prompts[0], max_tokens=10, temperature=0)
    assert "".join(t.text for t in batch[2]) == model.complete(prompts[2], max_tokens=10, temperature=0)


def test_each_sequence_stops_on_its_own(model: ls.Model) -> None:
    prompts = ["Count: 1, 2, 3,", "Count: 1, 2, 3,"]
    out = _collect(model.generate_batch(prompts, max_tokens=12, temperature=0, stop=[" 5"]), 2)
    want = model.complete(prompts[0], max_tokens=12, temperature=0, stop=[" 5"])
    assert " 5" not in want and want
    assert ["".join(t.text for t in x) for x in out] == [want, want]
    lengths = _collect(model.generate_batch(["Hello", "Hello there friend"], max_tokens=7, temperature=0), 2)
    assert all(len(x) <= 7 for x in lengths)


def test_seeded_batch_sampling(model: ls.Model) -> None:
    a = _collect(model.generate_batch(["Hi", "Hi"], max_tokens=12, temperature=1.0, seed=3), 2)
    b = _collect(model.generate_batch(["Hi", "Hi"], max_tokens=12, temperature=1.0, seed=3), 2)
    assert [[t.id for t in x] for x in a] == [[t.id for t in x] for x in b]
    # sequence i samples with seed + i: the two rows differ
    assert [t.id for t in a[0]] != [t.id for t in a[1]]


def test_batch_bad_input(model: ls.Model, happy: ls.ControlVector) -> None:
    with pytest.raises(ValueError):
        model.generate_batch([], max_tokens=2)
    with pytest.raises(TypeError):
        model.generate_batch("one prompt", max_tokens=2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="steers"):
        model.generate_batch(["a", "b"], [ls.Steer(happy)], max_tokens=2)
    with pytest.raises(ValueError, match="n_seq_max"):
        model.generate_batch(["a"] * (model._c.n_seq_max + 1), max_tokens=2)


def test_wide_batches_are_refused_cleanly(model_path) -> None:  # type: ignore[no-untyped-def]
    # n_batch 32 < n_seq_max 64: a batch of 40 sequences cannot be one decode
    with ls.Model(model_path, n_ctx=512, n_threads=2, n_batch=32) as m:
        with pytest.raises(ValueError, match="one batch"):
            m.logits_batch(["Hi"] * 40)
        assert m.logits_batch(["Hi"] * 32).shape == (32, m.n_vocab)
        # the core refuses outputs that would be lost across n_batch chunks
        from llama_steer import _core

        with pytest.raises(ValueError, match="would be lost"):
            m._c.decode(_core.BatchTokens([1] * 40, list(range(40)), [0] * 40, [1] * 40))


def test_logits_batch_matches_single(model: ls.Model, happy: ls.ControlVector) -> None:
    prompts = ["The sky is", "My name is", "Water boils at"]
    steers = [None, ls.Steer(happy, 4.0), None]
    batch = model.logits_batch(prompts, steers)
    assert batch.shape == (3, model.n_vocab) and batch.dtype == np.float32
    for p, s, row in zip(prompts, steers, batch):
        single = model.logits(p, steer=s)
        np.testing.assert_allclose(row, single, rtol=1e-5, atol=1e-5 * float(np.abs(single).max()))


def test_many_strengths_of_one_vector_share_one_slot(model: ls.Model, happy: ls.ControlVector) -> None:
    n = model._c.steer_n_slots + 4  # more strengths than slots
    steers = [ls.Steer(happy, s, layers=range(8, 22)) for s in np.linspace(-4, 4, n)]
    rows = model.logits_batch(["Today I feel"] * n, steers)
    assert rows.shape == (n, model.n_vocab)
    np.testing.assert_allclose(rows[n // 2], model.logits("Today I feel", steer=steers[n // 2]), rtol=1e-5, atol=1e-4)
