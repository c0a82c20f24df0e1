"""CAST conditional steering: the condition is decided on the prompt's own
decode, and the behaviour reaches exactly the matching sequences."""

from __future__ import annotations

import llama_steer as ls
import numpy as np
import pytest
from llama_steer.conditions import f1_score, similarity


@pytest.fixture(scope="module")
def cooking(model: ls.Model) -> tuple[ls.ConditionSearch, list[str], list[str]]:
    """A condition found on two thirds of the bundled cooking set; the last
    third (never seen by the search) is returned for testing."""
    match, other = ls.topic_prompts("cooking")
    search = ls.find_condition(model, match[:40], other[:40], read="last")
    return search, match[40:], other[40:]


def _behaviour(model: ls.Model) -> ls.ControlVector:
    rng = np.random.default_rng(11)
    return ls.ControlVector({il: 4.0 * rng.standard_normal(model.n_embd).astype(np.float32) for il in range(3, 12)})


def test_similarity_is_cast_formula() -> None:
    rng = np.random.default_rng(0)
    h = rng.standard_normal((5, 16))
    c = rng.standard_normal(16)
    for i in range(5):
        proj = np.tanh((h[i] @ c) / (c @ c) * c)
        want = h[i] @ proj / (np.linalg.norm(h[i]) * np.linalg.norm(proj))
        assert similarity(h[i], c) == pytest.approx(want, rel=1e-12)
    np.testing.assert_allclose(similarity(h, c), [similarity(x, c) for x in h])
    cond = ls.Condition(c, 3, 0.1, "above")
    assert cond.holds(h[0]) == (similarity(h[0], c) > 0.1)
    assert ls.Condition(c, 3, 0.1, "below").holds(h[0]) == (similarity(h[0], c) < 0.1)


def test_find_condition_separates_held_out_prompts(
    model: ls.Model, cooking: tuple[ls.ConditionSearch, list[str], list[str]]
) -> None:
    search, test_match, test_other = cooking
    cond = search.condition
    assert cond.f1 is not None and cond.f1 >= 0.8, search.f1_by_layer
    assert search.n_train + search.n_heldout == 80
    # On prompts the search never saw, decided during generation.
    prompts = [model.apply_chat_template([{"role": "user", "content": p}]) for p in test_match + test_other]
    truth = np.array([True] * len(test_match) + [False] * len(test_other))
    v = _behaviour(model)
    pred: list[bool] = []
    for i in range(0, len(prompts), 20):
        chunk = prompts[i : i + 20]
        list(model.generate_batch(chunk, [ls.Steer(v, 1.0, condition=cond)] * len(chunk), max_tokens=1))
        pred += [r.held for r in sorted(model.last_conditions, key=lambda r: r.seq)]
    f1 = f1_score(np.array(pred), truth)
    assert f1 >= 0.75, f"test F1 {f1}"


@pytest.mark.parametrize("read", ["last", "mean"])
def test_a_mixed_batch_steers_exactly_the_matching_sequences(
    model: ls.Model, cooking: tuple[ls.ConditionSearch, list[str], list[str]], read: str
) -> None:
    search, test_match, test_other = cooking
    base = search.condition
    # the found direction, read as asked; the threshold at the midpoint of this batch's similarities
    users = [test_match[0], test_other[0], test_match[1], test_other[1]]
    prompts = [model.apply_chat_template([{"role": "user", "content": u}]) for u in users]
    probe = ls.Condition(base.vector, base.layer, 0.0, "above", read)  # type: ignore[arg-type]
    list(model.generate_batch(prompts, [ls.Steer(_behaviour(model), 1.0, condition=probe)] * 4, max_tokens=1))
    sims = {r.seq: r.similarity for r in model.last_conditions}
    order = sorted(sims, key=lambda s: sims[s])
    # the two highest-similarity sequences match (whichever they are)
    threshold = (sims[order[1]] + sims[order[2]]) / 2
    cond = ls.Condition(base.vector, base.layer, threshold, "above", read)  # type: ignore[arg-type]
    matching = set(order[2:])

    v = _behaviour(model)
    steers = [ls.Steer(v, 1.0, condition=cond)] * 4
    out = {i: "" for i in range(4)}
    for i, tok in model.generate_batch(prompts, steers, max_tokens=12, temperature=0):
        out[i] += tok.text
    held = {r.seq: r.held for r in model.last_conditions}
    assert {s for s, h in held.items() if h} == matching

    unconditioned = {i: "" for i in range(4)}
    for i, tok in model.generate_batch(
        prompts, [ls.Steer(v, 1.0, positions="generated")] * 4, max_tokens=12, temperature=0
    ):
        unconditioned[i] += tok.text
    unsteered = {i: "" for i in range(4)}
    for i, tok in model.generate_batch(prompts, None, max_tokens=12, temperature=0):
        unsteered[i] += tok.text
    for i in range(4):
        want = unconditioned[i] if i in matching else unsteered[i]
        assert out[i] == want, (i, i in matching, out[i], want)
    # the behaviour visibly does something to the matching ones
    assert any(unconditioned[i] != unsteered[i] for i in matching)


def test_prompt_logits_are_untouched_by_a_conditional_steer(model: ls.Model) -> None:
    """The behaviour of a conditional Steer acts on generated tokens only."""
    rng = np.random.default_rng(1)
    cond = ls.Condition(rng.standard_normal(model.n_embd), 10, -2.0, "above")  # always holds
    prompt = "How do I bake bread?"
    steered = model.logits(prompt, steer=ls.Steer(_behaviour(model), 1.0, condition=cond))
    assert [r.held for r in model.last_conditions] == [True]
    np.testing.assert_array_equal(steered, model.logits(prompt))


def test_bad_conditions_are_clear_errors(model: ls.Model, gemma: ls.Model) -> None:
    v = _behaviour(model)
    with pytest.raises(ValueError, match="1-D"):
        ls.Condition(np.ones((2, 3)), 3, 0.1)
    with pytest.raises(ValueError, match="non-zero"):
        ls.Condition(np.zeros(model.n_embd), 3, 0.1)
    with pytest.raises(ValueError, match="compare"):
        ls.Condition(np.ones(model.n_embd), 3, 0.1, "larger")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="threshold"):
        ls.Condition(np.ones(model.n_embd), 3, float("nan"))
    with pytest.raises(ValueError, match="positions"):
        ls.Steer(v, 1.0, positions="prompt", condition=ls.Condition(np.ones(model.n_embd), 3, 0.1))
    wrong_size = ls.Condition(np.ones(gemma.n_embd), 3, 0.1)
    with pytest.raises(ValueError, match="n_embd"):
        model.complete("Hi", steer=ls.Steer(v, 1.0, condition=wrong_size), max_tokens=2)
    deep = ls.Condition(np.ones(model.n_embd), model.n_layer, 0.1)
    with pytest.raises(ValueError, match="out of range"):
        model.complete("Hi", steer=ls.Steer(v, 1.0, condition=deep), max_tokens=2)
    ok = ls.Condition(np.ones(model.n_embd), 3, 0.1)
    with pytest.raises(ValueError, match="conditional"):
        model.score("Hi", [" there"], steer=ls.Steer(v, 1.0, condition=ok))
    with pytest.raises(ValueError, match="at least 2"):
        ls.find_condition(model, ["a"], ["b", "c"])
    with pytest.raises(ValueError, match="unknown topic"):
        ls.topic_prompts("astrology")
    assert model.complete("Hi", max_tokens=2, temperature=0)
    assert model.engine.session is None
