"""Model.score: log-probabilities of continuations, checked against logits."""

from __future__ import annotations

import llama_steer as ls
import numpy as np
import pytest
from llama_steer.scoring import ScoreJob, _groups, pack, score_jobs, split_at_seam

CONTINUATIONS = ["I feel great today!", "I feel awful.", "Blue"]


def _prompt(model: ls.Model) -> str:
    return model.apply_chat_template([{"role": "user", "content": "How do you feel?"}])


def _reference(model: ls.Model, prompt: str, cont: str, steer: ls.Steer | None = None) -> np.ndarray:
    """Token by token with plain ``logits``: log softmax at each next token."""
    head, (toks,) = split_at_seam(model, prompt, [cont])
    out = []
    for k, t in enumerate(toks):
        logits = model.logits(head + toks[:k], steer=steer).astype(np.float64)
        top = logits.max()
        out.append(logits[t] - top - np.log(np.exp(logits - top).sum()))
    return np.array(out)


def test_per_token_logprobs_equal_logits(model: ls.Model) -> None:
    """Each continuation's per-token log-probabilities equal log softmax of
    the logits of prefixes decoded one by one. Measured difference: ~1e-6
    (the batched decode reads the same weights in another order); 1e-3 nats
    is far below anything scoring is used to tell apart."""
    prompt = _prompt(model)
    got = model.score(prompt, CONTINUATIONS, per_token=True)
    assert len(got) == len(CONTINUATIONS)
    for g, cont in zip(got, CONTINUATIONS):
        want = _reference(model, prompt, cont)
        assert g.shape == want.shape and np.all(g <= 0)
        np.testing.assert_allclose(g, want, atol=1e-3)
    sums = model.score(prompt, CONTINUATIONS)
    assert sums.dtype == np.float64 and sums.shape == (3,)
    np.testing.assert_allclose(sums, [g.sum() for g in got])
    assert model.score(prompt, "Blue")[0] == pytest.approx(sums[2], abs=1e-3)


def test_steering_applies_to_the_continuation(model: ls.Model) -> None:
    """A steered score equals the steered logits, and differs from the plain one."""
    rng = np.random.default_rng(0)
    vec = ls.ControlVector({il: rng.standard_normal(model.n_embd).astype(np.float32) for il in range(8, 20)})
    steer = ls.Steer(vec, 0.5)
    prompt = _prompt(model)
    got = model.score(prompt, CONTINUATIONS[:2], steer=steer, per_token=True)
    plain = model.score(prompt, CONTINUATIONS[:2], per_token=True)
    for g, p, cont in zip(got, plain, CONTINUATIONS):
        np.testing.assert_allclose(g, _reference(model, prompt, cont, steer), atol=1e-3)
        assert np.abs(g - p).max() > 0.05
    # "generated": the prompt is left alone, so the first token (predicted
    # from the prompt's last row) scores exactly as unsteered.
    gen = model.score(prompt, CONTINUATIONS[:2], steer=ls.Steer(vec, 0.5, positions="generated"), per_token=True)
    for g, p in zip(gen, plain):
        assert g[0] == pytest.approx(p[0], abs=1e-4)
        assert np.abs(g[1:] - p[1:]).max() > 0.05


def test_branch_steering_equals_a_job_per_branch(model: ls.Model) -> None:
    """Continuations steered each their own way off one shared prompt score
    as if each had its own job with that steering on generated positions."""
    rng = np.random.default_rng(1)
    vec = ls.ControlVector({il: rng.standard_normal(model.n_embd).astype(np.float32) for il in range(8, 20)})
    head, tails = split_at_seam(model, _prompt(model), CONTINUATIONS[:2])
    steers = [[], [ls.Steer(vec, 0.5, positions="generated")], [ls.Steer(vec, -0.5, positions="generated")]]
    conts = [t for _ in steers for t in tails]
    branched = score_jobs(model, [ScoreJob(head, conts, (), [st for st in steers for _ in tails])])[0]
    alone = [x for st in steers for x in score_jobs(model, [ScoreJob(head, tails, st)])[0]]
    for b, a in zip(branched, alone):
        np.testing.assert_allclose(b, a, atol=1e-3)
    assert np.abs(branched[2] - branched[0]).max() > 0.05  # the steering did act
    with pytest.raises(ValueError, match="generated positions only"):
        score_jobs(model, [ScoreJob(head, tails, (), [[ls.Steer(vec, 0.5)], []])])
    with pytest.raises(ValueError, match="one list of steers per continuation"):
        score_jobs(model, [ScoreJob(head, tails, (), [[]])])


def test_many_jobs_in_batches_equal_one_by_one(model: ls.Model) -> None:
    """Jobs of different prompts and strengths split over several batches
    (n_seq_max 4 forces that) give the numbers of each job alone."""
    with ls.Model(model.path, n_threads=2, n_seq_max=4, n_ctx=512) as small:
        vec = ls.extract(small, ls.persona_pairs(small, "happy", max_pairs=8), progress=False)
        prompts = [
            small.apply_chat_template([{"role": "user", "content": q}])
            for q in ("How do you feel?", "Describe your day.", "What's new?")
        ]
        jobs, alone = [], []
        for i, p in enumerate(prompts):
            head, conts = split_at_seam(small, p, CONTINUATIONS[:2])
            steers = [ls.Steer(vec, float(i - 1))]
            jobs.append(ScoreJob(head, conts, steers))
            alone.append(small.score(p, CONTINUATIONS[:2], steer=steers, per_token=True))
        sizes: list[int] = []
        together = score_jobs(small, jobs, on_group=sizes.append)
        assert len(sizes) == 2  # two continuations a prompt, four sequences a batch: 2 + 1 prompts
        for got, want in zip(together, alone):
            for g, w in zip(got, want):
                np.testing.assert_allclose(g, w, atol=1e-3)


def test_groups_respect_every_limit() -> None:
    job = ScoreJob([1] * 10, [[1, 2, 3], [4, 5]])  # 2 sequences; 10 + 2 + 1 = 13 cells
    assert job.n_cells == 13
    assert [len(g) for g in _groups([job] * 5, 4, 1000)] == [2, 2, 1]
    assert [len(g) for g in _groups([job] * 5, 64, 39)] == [3, 2]
    with pytest.raises(ValueError, match="n_seq_max 1"):
        list(_groups([job], 1, 1000))
    with pytest.raises(ls.ContextOverflowError, match="context holds 12"):
        list(_groups([job], 64, 12))
    # pack: every dimension's sum stays within its limit; an oversized item stands alone
    assert list(pack([(1, 5), (1, 5), (1, 5)], (2, 100))) == [range(0, 2), range(2, 3)]
    assert list(pack([(1, 5), (1, 50), (1, 5)], (9, 10))) == [range(0, 1), range(1, 2), range(2, 3)]
    assert list(pack([], (1, 1))) == []


def test_long_prompts_span_several_decodes(model: ls.Model) -> None:
    """Prompts and continuations longer than one decode span (63 rows):
    outputs are read span by span. Scoring a continuation after a prompt,
    or its tail after the prompt plus its head, gives the same tail numbers
    although the two lay their rows out differently."""
    prompt = model.apply_chat_template([{"role": "user", "content": "Tell me about your week. " * 12}])
    head, (cont,) = split_at_seam(model, prompt, ["It was a long and happy week with many small joys, " * 6])
    assert len(head) > 63 and len(cont) > 63
    whole, split = score_jobs(model, [ScoreJob(head, [cont]), ScoreJob(head + cont[:50], [cont[50:]])])
    assert whole[0].shape == (len(cont),) and np.all(whole[0] <= 0)
    np.testing.assert_allclose(whole[0][50:], split[0], atol=1e-4)


def test_bad_arguments(model: ls.Model) -> None:
    prompt = _prompt(model)
    before = model.score(prompt, ["Blue", "Red"])
    with pytest.raises(ValueError, match="empty"):
        model.score(prompt, [""])
    with pytest.raises(ValueError, match="no continuations"):
        model.score(prompt, [])
    with pytest.raises(ValueError, match="empty"):
        model.score("", ["x"])
    with pytest.raises(TypeError, match="str"):
        model.score([1, 2, 3], ["x"])  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="str"):
        model.score(prompt, [b"x"])  # type: ignore[list-item]
    vec = ls.ControlVector({10: np.ones(model.n_embd, dtype=np.float32)})
    with pytest.raises(ValueError, match="constant strengths"):
        model.score(prompt, ["x"], steer=ls.Steer(vec, [0.0, 1.0]))
    with pytest.raises(ValueError, match="n_embd"):
        model.score(prompt, ["x"], steer=ls.Steer(ls.ControlVector({5: np.ones(16, dtype=np.float32)}), 1.0))
    with pytest.raises(ls.ContextOverflowError):
        model.score(prompt, ["word " * 5000])
    with pytest.raises(ValueError, match="n_seq_max"):
        model.score(prompt, [f"{i}" for i in range(65)])
    # A failure in the middle of a steered decode (a token id the model
    # lacks) leaves no steering and no cache behind.
    head, tails = split_at_seam(model, prompt, ["Blue"])
    with pytest.raises(ValueError, match="token"):
        score_jobs(model, [ScoreJob(head, [[*tails[0], model.n_vocab + 5, 1]], [ls.Steer(vec, 4.0)])])
    assert model.engine.session is None
    np.testing.assert_array_equal(model.score(prompt, ["Blue", "Red"]), before)
    # numpy scalars are constant strengths
    np.testing.assert_allclose(
        model.score(prompt, ["Blue"], steer=ls.Steer(vec, np.float32(0.0))), before[:1], atol=1e-6
    )


def test_small_n_batch_and_tokenizer_seams(model_path: object) -> None:
    """Decode spans shrink to n_batch (outputs must sit in one chunk), and a
    continuation that merges with the prompt's end scores the text as the
    model reads it whole."""
    with ls.Model(model_path, n_threads=2, n_batch=16, n_ctx=512) as m:  # type: ignore[arg-type]
        prompt = m.apply_chat_template([{"role": "user", "content": "How do you feel?"}])
        cont = "I feel great today! " * 4
        got = m.score(prompt, [cont], per_token=True)[0]
        assert got.shape[0] > 16
        np.testing.assert_allclose(got, _reference(m, prompt, cont), atol=1e-3)
        # "hel" + "lo": the whole text reads "hello" as one token, so the
        # prompt keeps its tokens before "hel" and the continuation is "hello".
        head, tails = split_at_seam(m, "Say hel", ["lo", "p"])
        whole = m.tokenize("Say hello")
        assert head == whole[:-1] and tails[0] == whole[-1:]
        assert m.detokenize(tails[1]) in ("help", " help")
        assert m.score("Say hel", ["lo", "p"]).shape == (2,)


def test_closed_model_raises(model_path: object) -> None:
    m = ls.Model(model_path, n_threads=1, n_ctx=256)  # type: ignore[arg-type]
    m.close()
    with pytest.raises(ls.ClosedError):
        m.score("Hello", ["x"])
