"""ActAdd: per-position rows in the steering buffer, on the bundled models."""

from __future__ import annotations

from pathlib import Path

import llama_steer as ls
import numpy as np
import pytest
from llama_steer.actadd import paper_to_layer
from llama_steer.extraction import capture_positions

POS = "I talk about weddings constantly"
NEG = "I do not talk about weddings constantly"


def _kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    p = np.exp(p_logits - p_logits.max(), dtype=np.float64)
    p /= p.sum()
    q = np.exp(q_logits - q_logits.max(), dtype=np.float64)
    q /= q.sum()
    return float(np.sum(p * (np.log(p) - np.log(q))))


def _padded(model: ls.Model, a: ls.ActAdd, text: str) -> list[int]:
    ids = model.tokenize(text)
    return ids + [a.pad_token] * (a.n_rows - len(ids))


@pytest.mark.parametrize("frac", [0.05, 0.3, 0.6, 0.99])
def test_swap_identity(any_model: ls.Model, frac: float) -> None:
    """ActAdd(p+, p-) at strength 1 on the front of p- turns its residual
    stream at layer L into that of p+, so its logits become those of p+."""
    m = any_model
    layer = max(1, int(frac * m.n_layer))
    a = ls.ActAdd(m, POS, NEG, layer)
    tp, tn = _padded(m, a, POS), _padded(m, a, NEG)
    assert len(tp) == len(tn) == a.n_rows
    steer = ls.Steer(a, 1.0)

    # The residual at layer L, every position: h(p-) + (h(p+) - h(p-)) == h(p+) to float rounding.
    (hp,) = capture_positions(m, [tp], [layer])
    (got,) = capture_positions(m, [tn], [layer], steer=steer)
    for i in range(a.n_rows):
        scale = float(np.abs(hp[i, 0]).max())
        np.testing.assert_allclose(got[i, 0], hp[i, 0], rtol=0, atol=4 * np.finfo(np.float32).eps * scale)

    # Logits: equal, or within 3x the noise floor of a rounding-size
    # perturbation of the residual at L, and far below the unsteered gap.
    want, got, unsteered = m.logits(tp), m.logits(tn, steer=steer), m.logits(tn)
    gap = _kl(unsteered, want)
    diff = float(np.abs(got - want).max())
    if not np.allclose(got, want, rtol=1e-4, atol=0):
        rng = np.random.default_rng(0)
        noise = 0.0
        for _ in range(3):
            # the same size as the residual's rounding error (~1e-7 relative)
            v = rng.standard_normal(m.n_embd).astype(np.float32) * 1e-7 * float(np.abs(hp).max())
            noisy = m.logits(tp, steer=ls.Steer({layer: v}, 1.0)) if layer >= 1 else want
            noise = max(noise, float(np.abs(noisy - want).max()))
        assert diff <= 3 * noise, f"layer {layer}: logits differ by {diff}, noise floor {noise}"
    assert _kl(got, want) < 0.01 * gap, f"KL to p+ {_kl(got, want)} vs unsteered {gap}"


def test_strength_zero_and_outside_the_window_are_bit_identical(model: ls.Model) -> None:
    a = ls.ActAdd(model, "Love", "Hate", 6)
    prompt = "I think that you are a very interesting person and"
    n = len(model.tokenize(prompt))
    base = model.logits(prompt)
    np.testing.assert_array_equal(model.logits(prompt, steer=ls.Steer(a, 0.0)), base)
    assert not np.array_equal(model.logits(prompt, steer=ls.Steer(a, 5.0)), base)
    # Rows at an offset: positions before the window are bit-identical (the
    # model is causal, and nothing is added there), those in it are not.
    at = a.at(4)
    assert 4 + at.n_rows < n
    (plain,) = capture_positions(model, [prompt], [6, 20])
    (steered,) = capture_positions(model, [prompt], [6, 20], steer=ls.Steer(at, 5.0))
    np.testing.assert_array_equal(steered[:4], plain[:4])
    for i in range(4, 4 + at.n_rows):
        if not np.array_equal(at.rows[i - 4], 0):  # a row of zeros (a shared token) adds nothing
            assert not np.array_equal(steered[i, 0], plain[i, 0]), i
    # "back": the rows end at the last prompt token
    back = a.at("back")
    (steered_b,) = capture_positions(model, [prompt], [6], steer=ls.Steer(back, 5.0))
    np.testing.assert_array_equal(steered_b[: n - back.n_rows], plain[: n - back.n_rows, :1])
    np.testing.assert_allclose(steered_b[n - 1, 0], plain[n - 1, 0] + 5.0 * back.rows[-1], rtol=1e-5, atol=1e-3)


def test_generated_tokens_feel_it_only_through_the_cache(model: ls.Model) -> None:
    """Rows cover prompt positions only: a generated token's own residual
    gets nothing. Decoding prompt + a generated token under the injection
    equals decoding it with the injection's window ending at the prompt."""
    a = ls.ActAdd(model, "Love", "Hate", 6)
    prompt = "I hate you because"
    n = len(model.tokenize(prompt))
    assert ls.Steer(a, 5.0).window(n) == (0, a.n_rows)
    text = model.complete(prompt, steer=ls.Steer(a, 5.0), max_tokens=16, temperature=0)
    assert text != model.complete(prompt, max_tokens=16, temperature=0)
    # a longer text: the generated-token positions (>= T) read the zero row
    longer = model.tokenize(prompt) + model.tokenize(text, add_special=False)[:3]
    (steered,) = capture_positions(model, [longer], [6, 20], steer=ls.Steer(a, 5.0))
    (plain,) = capture_positions(model, [longer], [6, 20])
    np.testing.assert_allclose(steered[: a.n_rows, 0], plain[: a.n_rows, 0] + 5.0 * a.rows, rtol=1e-5, atol=1e-3)
    # at the injection layer, positions past the window get nothing (bit-identical) ...
    np.testing.assert_array_equal(steered[a.n_rows :, 0], plain[a.n_rows :, 0])
    # ... and deeper down they change, through the cache only
    assert not np.array_equal(steered[n:, 1], plain[n:, 1])


def test_batch_mixes_actadd_vector_and_nothing(model: ls.Model) -> None:
    a = ls.ActAdd(model, "Love", "Hate", 6)
    rng = np.random.default_rng(3)
    v = ls.ControlVector({il: rng.standard_normal(model.n_embd).astype(np.float32) for il in (3, 4, 5)})
    prompts = ["I hate you because", "The weather today is", "Once upon a time"]
    steers = [ls.Steer(a, 5.0), ls.Steer(v, 2.0), None]
    batch = model.logits_batch(prompts, steers)
    np.testing.assert_array_equal(batch[2], model.logits_batch(prompts, None)[2])
    np.testing.assert_allclose(batch[0], model.logits(prompts[0], steer=steers[0]), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(batch[1], model.logits(prompts[1], steer=steers[1]), rtol=1e-4, atol=1e-3)
    outs: dict[int, str] = {0: "", 1: "", 2: ""}
    for i, tok in model.generate_batch(prompts, steers, max_tokens=8, temperature=0):
        outs[i] += tok.text
    assert outs[2] == model.complete(prompts[2], max_tokens=8, temperature=0)


def test_locations_and_paper_layer(model: ls.Model) -> None:
    a = ls.ActAdd(model, "Love", "Hate", paper_layer=6)
    assert a.layer == 5 == paper_to_layer(6) and a.paper_layer == 6
    T = a.n_rows
    assert a.start(10) == 0
    assert a.at("back").start(10) == 10 - T
    assert a.at(3).start(10) == 3
    with pytest.raises(ValueError, match="does not fit"):
        a.at(9).start(10)
    with pytest.raises(ValueError, match="does not fit"):
        model.logits(model.tokenize("Hi")[: T - 1], steer=ls.Steer(a, 1.0))
    # pad_prompt: T-1 pads after BOS, so the rows meet only BOS and pads
    padded = ls.ActAdd(model, "Love", "Hate", 5, pad_prompt=True)
    ids = model.tokenize("Hi")
    prepared = padded.prepare_prompt(ids)
    if padded.has_bos:
        assert prepared == ids[:1] + [padded.pad_token] * (T - 1) + ids[1:]
    else:  # SmolLM2 adds no BOS: T pads first
        assert prepared == [padded.pad_token] * T + ids
    plain = model.complete("Hi", max_tokens=6, temperature=0)
    assert model.complete("Hi", steer=ls.Steer(padded, 8.0), max_tokens=6, temperature=0) != plain
    with pytest.raises(ValueError, match="paper layer 0"):
        ls.ActAdd(model, "Love", "Hate", paper_layer=0)


def test_save_load_round_trip(model: ls.Model, tmp_path: Path) -> None:
    a = ls.ActAdd(model, POS, NEG, 12, location="back")
    path = tmp_path / "weddings.gguf"
    a.save(path)
    b = ls.ActAdd.load(path)
    np.testing.assert_array_equal(a.rows, b.rows)
    assert (b.layer, b.location, b.positive, b.negative, b.pad, b.pad_token, b.arch) == (
        a.layer,
        a.location,
        a.positive,
        a.negative,
        a.pad,
        a.pad_token,
        a.arch,
    )
    prompt = "I went up to my friend and said hello, and then"
    np.testing.assert_array_equal(
        model.logits(prompt, steer=ls.Steer(a, 4.0)), model.logits(prompt, steer=ls.Steer(b, 4.0))
    )
    # a control-vector file is not an ActAdd file, and the reverse
    ls.ControlVector({1: np.ones(model.n_embd, np.float32)}).save(tmp_path / "cv.gguf")
    with pytest.raises(ls.VectorFileError, match="not an ActAdd"):
        ls.ActAdd.load(tmp_path / "cv.gguf")
    with pytest.raises(ls.VectorFileError):
        ls.ControlVector.load(path)
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(path.read_bytes()[:-64])
    with pytest.raises(ls.VectorFileError):
        ls.ActAdd.load(corrupt)
    with pytest.raises(ls.VectorFileError, match="no such"):
        ls.ActAdd.load(tmp_path / "missing.gguf")


def test_same_vector_twice_on_one_sequence_composes(model: ls.Model) -> None:
    rng = np.random.default_rng(4)
    v = ls.ControlVector({il: rng.standard_normal(model.n_embd).astype(np.float32) for il in (4, 5, 6)})
    prompt = "The weather today is"
    both = model.logits(prompt, steer=[ls.Steer(v, 1.0), ls.Steer(v, 2.0)])
    np.testing.assert_allclose(both, model.logits(prompt, steer=ls.Steer(v, 3.0)), rtol=1e-4, atol=2e-3)
    a = ls.ActAdd(model, "Love", "Hate", 6)
    assert ls.Steer(a, [5.0, 0.0]).strength == (5.0, 0.0)  # schedules work for injections too


def test_bad_input_gives_clear_errors_and_the_model_stays_usable(model: ls.Model, gemma: ls.Model) -> None:
    before = model.logits("Hello")
    with pytest.raises(ValueError, match="tokenizes to nothing"):
        ls.ActAdd(model, "", "Hate", 6)
    with pytest.raises(ValueError, match="out of range"):
        ls.ActAdd(model, "Love", "Hate", model.n_layer)
    with pytest.raises(ValueError, match="exactly one of"):
        ls.ActAdd(model, "Love", "Hate")
    with pytest.raises(ValueError, match="one token"):
        ls.ActAdd(model, "Love", "Hate", 6, pad=" wedding cake")
    with pytest.raises(ValueError, match="location"):
        ls.ActAdd(model, "Love", "Hate", 6, location="middle")  # type: ignore[arg-type]
    a = ls.ActAdd(model, "Love", "Hate", 6)
    with pytest.raises(ValueError, match="another model|n_embd"):
        gemma.logits("Hello", steer=ls.Steer(a, 1.0))
    with pytest.raises(ValueError, match="does not fit"):
        model.generate("Hi", steer=ls.Steer(a.at(5), 1.0), max_tokens=2)  # at the call, not the first token
    with pytest.raises(ValueError, match="leave layers"):
        ls.Steer(a, 1.0, layers=[6])
    # two injections overlapping on one sequence: refused by the buffer
    b = ls.ActAdd(model, "Joy", "Grief", 7)
    with pytest.raises(ValueError, match="cover one position"):
        model.logits("I feel that you are", steer=[ls.Steer(a, 1.0), ls.Steer(b, 1.0)])
    # not overlapping: fine
    model.logits("I feel that you are very nice today", steer=[ls.Steer(a, 1.0), ls.Steer(b.at("back"), 1.0)])
    np.testing.assert_array_equal(model.logits("Hello"), before)
    assert model.engine.session is None
