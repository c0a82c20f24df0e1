"""A/B evaluation (CAA format) on the real model: loading, scoring, the curve."""

from __future__ import annotations

import json
import math
from pathlib import Path

import llama_steer as ls
import numpy as np
import pytest
from llama_steer.evaluation import (
    ABDataset,
    EvalResult,
    _chunks,
    bundled_ab_datasets,
    evaluate,
    load_ab_dataset,
    parse_ab_dataset,
    plot_curve,
)

STRENGTHS = (-1.0, 0.0, 1.0)
STEER_LAYERS = range(8, 22)
N_ITEMS = 16  # of the shipped 40: enough for the curve, and keeps the file under ~15 s


def _item(**over: object) -> dict[str, object]:
    item: dict[str, object] = {
        "question": "How are you?\n\nChoices:\n(A) Great!\n(B) Awful.",
        "answer_matching_behavior": "(A)",
        "answer_not_matching_behavior": "(B)",
    }
    item.update(over)
    return item


def _without(key: str) -> dict[str, object]:
    return {k: v for k, v in _item().items() if k != key}


@pytest.fixture(scope="module")
def happy() -> ABDataset:
    return load_ab_dataset("happy")


@pytest.fixture(scope="module")
def answer_a(model: ls.Model) -> ls.ControlVector:
    """A vector that makes the model answer "(A": residuals at the "(" that
    opens the answer, after "Reply with (A)." minus after "Reply with (B)."."""
    questions = [
        "What is the capital of France?",
        "Which season comes after spring?",
        "Is water wet?",
        "Pick a number.",
        "Which is larger, a cat or a mouse?",
        "What colour is the sky?",
        "Do fish swim?",
        "Which word rhymes with cat?",
    ]

    def prompt(q: str, letter: str) -> str:
        return model.apply_chat_template([{"role": "user", "content": f"{q}\n\nReply with ({letter})."}]) + "("

    pairs = [(prompt(q, "A"), prompt(q, "B")) for q in questions]
    return ls.extract(model, pairs, method="mean_diff", layers=STEER_LAYERS, progress=False)


@pytest.fixture(scope="module")
def sweep(model: ls.Model, happy: ABDataset, answer_a: ls.ControlVector) -> EvalResult:
    return evaluate(model, answer_a, ABDataset("happy", happy.items[:N_ITEMS]), STRENGTHS, progress=False)


# -- datasets -------------------------------------------------------------------
def test_bundled_dataset_is_balanced(happy: ABDataset) -> None:
    assert "happy" in bundled_ab_datasets()
    assert happy.name == "happy" and len(happy) == 40
    letters = [it.matching for it in happy]
    assert letters.count("A") == letters.count("B") == 20
    assert all({it.matching, it.not_matching} == {"A", "B"} for it in happy)
    assert len({it.question for it in happy}) == 40


def test_load_from_path_and_from_items(tmp_path: Path) -> None:
    items = [_item(), _item(answer_matching_behavior="(B)", answer_not_matching_behavior=" (A) ")]
    path = tmp_path / "mood_ab.json"
    path.write_text(json.dumps(items))
    ds = load_ab_dataset(path)
    assert ds.name == "mood" and [(it.matching, it.not_matching) for it in ds] == [("A", "B"), ("B", "A")]
    assert load_ab_dataset(str(path)) == ds
    assert parse_ab_dataset(items, name="mood") == ds


@pytest.mark.parametrize(
    "data,match",
    [
        ({"question": "x"}, "want a JSON list"),
        ([], "no items"),
        ([_item(), "text"], "item 1: want an object"),
        ([_item(), _item(), _without("question")], "item 2: missing key 'question'"),
        ([_without("answer_matching_behavior")], "item 0: missing key 'answer_matching_behavior'"),
        ([_without("answer_not_matching_behavior")], "item 0: missing key 'answer_not_matching_behavior'"),
        ([_item(question=3)], "item 0: 'question' must be a string"),
        ([_item(question="  ")], "item 0: the question is empty"),
        ([_item(), _item(answer_matching_behavior="A")], r"item 1: answer_matching_behavior must be .*'\(A\)'"),
        ([_item(answer_not_matching_behavior="(b)")], "item 0: answer_not_matching_behavior must be"),
        ([_item(answer_matching_behavior="(AB)")], "item 0: answer_matching_behavior must be"),
        ([_item(answer_not_matching_behavior="(A)")], r"item 0: both answers are \(A\)"),
        ([_item(answer_not_matching_behavior="(C)")], r"item 0: the question does not list the choice \(C\)"),
    ],
)
def test_malformed_datasets(tmp_path: Path, data: object, match: str) -> None:
    path = tmp_path / "bad_ab.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ls.DatasetError, match=match):
        load_ab_dataset(path)


def test_unreadable_sources(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('[{"question": ')
    with pytest.raises(ls.DatasetError, match="not valid JSON"):
        load_ab_dataset(bad)
    with pytest.raises(ls.DatasetError, match="no such A/B dataset file"):
        load_ab_dataset(tmp_path / "missing.json")
    with pytest.raises(ls.DatasetError, match="no bundled A/B dataset 'grumpy'.*happy"):
        load_ab_dataset("grumpy")
    assert issubclass(ls.DatasetError, ValueError)


# -- scoring ------------------------------------------------------------------
def test_p_matching_shape_and_range(sweep: EvalResult) -> None:
    assert sweep.strengths == list(STRENGTHS)
    assert sweep.p_matching.shape == (len(STRENGTHS), N_ITEMS) and sweep.p_matching.dtype == np.float64
    assert np.all((sweep.p_matching >= 0) & (sweep.p_matching <= 1))
    assert sweep.mean.shape == sweep.std.shape == (len(STRENGTHS),)
    np.testing.assert_allclose(sweep.mean, sweep.p_matching.mean(axis=1))
    assert sweep.layers == list(STEER_LAYERS) and sweep.behaviour == "happy"
    table = sweep.as_table()
    assert "steering layers 8-21" in table and len(table.splitlines()) == 2 + len(STRENGTHS)


def test_strength_zero_equals_unsteered(model: ls.Model, happy: ABDataset, sweep: EvalResult) -> None:
    """The strength-0 row equals p computed here from plain ``model.logits``
    (no Steer, one prompt at a time). Measured difference: exactly 0 (a
    strength-0 Steer adds exact zeros and the batched decode is designed to
    give each sequence the numbers it gets alone); 1e-5 leaves room for
    float summation order on another CPU, far below any steering effect."""
    a, b = (model.tokenize(x, add_special=False)[0] for x in ("A", "B"))
    want = []
    for item in happy.items[:N_ITEMS]:
        prompt = model.apply_chat_template([{"role": "user", "content": item.question}]) + "("
        logits = model.logits(prompt).astype(np.float64)
        match, other = (a, b) if item.matching == "A" else (b, a)
        want.append(1.0 / (1.0 + math.exp(logits[other] - logits[match])))
    np.testing.assert_allclose(sweep.p_matching[STRENGTHS.index(0.0)], want, rtol=0, atol=1e-5)


def test_steering_towards_a_moves_each_side_monotonically(happy: ABDataset, sweep: EvalResult) -> None:
    """The proof that the evaluation sees steering and keeps each item's
    matching letter straight: a vector that pushes the answer towards "(A"
    must raise p(matching) on items whose matching answer is (A) and lower
    it on the others, at each step -1 -> 0 -> +1 (layers 8-21).

    Measured on SmolLM2-135M Q4_1 (the first 16 items): A items 0.42 ->
    0.67 -> 0.99, B items 0.57 -> 0.37 -> 0.01. Logits are deterministic, so run-to-run noise is
    zero and cross-CPU differences are ~1e-4; the margin of 0.1 per step
    only guards against a flat or inverted curve.
    """
    is_a = np.array([it.matching == "A" for it in happy.items[:N_ITEMS]])
    a_side = sweep.p_matching[:, is_a].mean(axis=1)
    b_side = sweep.p_matching[:, ~is_a].mean(axis=1)
    assert np.all(np.diff(a_side) > 0.1), a_side
    assert np.all(np.diff(b_side) < -0.1), b_side


def test_many_strengths_share_one_steering_slot(model: ls.Model, happy: ABDataset, answer_a: ls.ControlVector) -> None:
    # More strengths than the context's 8 steering slots: one vector, one slot.
    strengths = np.linspace(-1, 1, 9)
    r = evaluate(model, answer_a, ABDataset("one", happy.items[:1]), strengths, layers=[10, 12], progress=False)
    assert r.p_matching.shape == (9, 1) and len(set(r.p_matching[:, 0].round(6))) > 1


def test_plain_prompt_without_chat_template(model: ls.Model, happy: ABDataset, answer_a: ls.ControlVector) -> None:
    item = happy.items[0]
    r = evaluate(model, answer_a, ABDataset("one", (item,)), [0.0], chat=False, progress=False)
    logits = model.logits(f"{item.question}\n\nAnswer: (").astype(np.float64)
    a, b = (model.tokenize(x, add_special=False)[0] for x in (item.matching, item.not_matching))
    assert r.p_matching[0, 0] == pytest.approx(1.0 / (1.0 + math.exp(logits[b] - logits[a])), abs=1e-5)


def test_bad_arguments(model: ls.Model, happy: ABDataset, answer_a: ls.ControlVector) -> None:
    one = ABDataset("one", happy.items[:1])
    for strengths in ([], [0.0, math.nan], [math.inf], ["1"], [True], "1"):
        with pytest.raises(ValueError, match="strength"):
            evaluate(model, answer_a, one, strengths, progress=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_embd"):
        evaluate(model, ls.ControlVector({5: np.ones(16, dtype=np.float32)}), one, progress=False)
    with pytest.raises(ValueError, match="not in this vector"):
        evaluate(model, answer_a, one, layers=[2], progress=False)
    with pytest.raises(ls.DatasetError):
        evaluate(model, answer_a, [_item(answer_matching_behavior="A")], progress=False)


def test_chunks_respect_both_limits() -> None:
    lengths = [40] * 10
    assert [list(c) for c in _chunks(lengths, 4, 10_000)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [len(c) for c in _chunks(lengths, 64, 121)] == [3, 3, 3, 1]  # 3 * 40 < 121 <= 4 * 40
    assert [len(c) for c in _chunks([500], 64, 100)] == [1]  # too long alone: the model reports it


# -- plot ---------------------------------------------------------------------
def test_plot_curve_writes_png(sweep: EvalResult, tmp_path: Path) -> None:
    out = plot_curve(sweep, tmp_path / "curve.png")
    assert out == tmp_path / "curve.png"
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_happy_vector_moves_next_word_mood_monotonically(model: ls.Model) -> None:
    """The happy persona vector, extracted from the bundled pairs, moves the
    mood of the very next word monotonically across five strengths.

    Threshold: every step of 3 in strength must raise the log-odds of a happy
    vs a sad next word by more than 0.5 nats. Logits are deterministic here,
    so this is not about noise: 0.5 nats (a 1.65x odds change) per step rules
    out a flat or merely wobbling curve (measured: about 1.5 to 2.5 a step)."""
    from llama_steer.evaluation import word_odds_curve

    vec = ls.extract(model, ls.persona_pairs(model, "happy", max_pairs=120), progress=False)
    curve = word_odds_curve(model, vec, [-6.0, -3.0, 0.0, 3.0, 6.0], layers=STEER_LAYERS)
    steps = np.diff(curve.log_odds)
    assert np.all(steps > 0.5), curve.log_odds
    plain = word_odds_curve(model, vec, [0.0], layers=STEER_LAYERS)
    assert plain.log_odds[0] == pytest.approx(curve.log_odds[2], abs=1e-6)


# -- the proof: a behaviour vector moves the shipped dataset ------------------
def test_happy_vector_moves_shipped_dataset_monotonically(model: ls.Model, happy: ABDataset) -> None:
    """The happy persona vector (extracted from the bundled pairs, all layers)
    moves p(matching) on all 40 shipped items upward at each step of
    strength -8 -> 0 -> +8, scored on the whole replies (``score="answer"``).

    Threshold: at each step the mean rise over items must exceed 0.1 and
    three standard errors of the paired per-item rise. Logits are exact, so
    the spread is between items, not runs: three standard errors say the
    rise holds across the dataset rather than on a few items (p < 0.002 for
    no effect); 0.1 says it is large enough to see on the curve. Measured on
    SmolLM2-135M Q4_1: 0.237 -> 0.528 -> 0.761, rises 0.29 (z 7.7) and
    0.23 (z 5.2); the share of items answered the happy way 22% -> 57% -> 75%.

    Letters are not the score here: this 135M model prefers "A" whatever
    the choices say (see the module docstring), so no behaviour vector moves
    its letters; `test_steering_towards_a_moves_each_side_monotonically`
    shows the letter score itself tracks steering."""
    vec = ls.extract(model, ls.persona_pairs(model, "happy", max_pairs=120), progress=False)
    r = evaluate(model, vec, happy, [-8.0, 0.0, 8.0], score="answer", progress=False)
    assert r.score == "answer" and r.p_matching.shape == (3, 40) and "answer score" in r.title()
    for lo, hi in ((0, 1), (1, 2)):
        rise = r.p_matching[hi] - r.p_matching[lo]
        se = rise.std(ddof=1) / math.sqrt(rise.size)
        assert rise.mean() > max(0.1, 3 * se), (r.as_table(), rise.mean(), se)


def test_answer_score_equals_model_score(model: ls.Model, happy: ABDataset, answer_a: ls.ControlVector) -> None:
    """Each answer-score p is sigmoid of the difference of the two replies'
    log-probabilities from :meth:`Model.score` with the same Steer.

    evaluate decodes the four (strength, item) jobs in one batch, ``score``
    one alone; scoring keeps every row on one attention kernel, so the
    numbers match (measured: exactly; 1e-4 allows for summation order)."""
    from llama_steer.evaluation import ab_prompt, answer_reply

    items = ABDataset("two", happy.items[:2])
    r = evaluate(model, answer_a, items, [-1.0, 1.0], score="answer", progress=False)
    for si, s in enumerate((-1.0, 1.0)):
        for j, item in enumerate(items):
            lp = model.score(
                ab_prompt(model, item.question),
                [answer_reply(item, item.matching), answer_reply(item, item.not_matching)],
                steer=ls.Steer(answer_a, s),
            )
            assert r.p_matching[si, j] == pytest.approx(1.0 / (1.0 + math.exp(lp[1] - lp[0])), abs=1e-4)


def test_choice_texts() -> None:
    from llama_steer.evaluation import answer_reply, choice_text

    ds = parse_ab_dataset(
        [
            _item(),
            _item(question="Pick (A) or (B)?\n\nChoices:\n(A)  Red.\n (B) Blue and\ngreen."),
            _item(question="Mood?\n(A) Unlike (B), I am happy.\n(B) Sad.\n\nAnswer with (A) or (B)."),
            _item(question="Mood? (A) Happy. (B) Sad."),
        ]
    )
    assert [choice_text(ds[0], x) for x in "AB"] == ["Great!", "Awful."]
    # labels at a line start are the choices; a choice is the rest of its line
    assert choice_text(ds[1], "A") == "Red." and choice_text(ds[1], "B") == "Blue and"
    assert [choice_text(ds[2], x) for x in "AB"] == ["Unlike (B), I am happy.", "Sad."]
    # no line-start labels: inline ones, each up to the next
    assert [choice_text(ds[3], x) for x in "AB"] == ["Happy.", "Sad."]
    assert answer_reply(ds[0], "B") == "B) Awful."
    empty = parse_ab_dataset([_item(question="How?\n(A)\n(B) No.")])
    with pytest.raises(ls.DatasetError, match=r"\(A\) has no text"):
        choice_text(empty[0], "A")


def test_unknown_score_is_refused(model: ls.Model, happy: ABDataset, answer_a: ls.ControlVector) -> None:
    with pytest.raises(ValueError, match="score must be one of letter, answer"):
        evaluate(model, answer_a, ABDataset("one", happy.items[:1]), score="logit", progress=False)
