"""The steering buffer: invariants, agreement with upstream control vectors,
per-sequence isolation, windows, cheap strength changes and bad input."""

from __future__ import annotations

import math

import llama_steer as ls
import numpy as np
import pytest
from llama_steer import _core
from llama_steer.steer import apply_steering

PROMPT = "The weather today is"


def random_vector(model: ls.Model, layers: range, norm: float = 4.0, seed: int = 0) -> ls.ControlVector:
    rng = np.random.default_rng(seed)
    dirs = {}
    for layer in layers:
        v = rng.standard_normal(model.n_embd).astype(np.float32)
        dirs[layer] = v * np.float32(norm / np.linalg.norm(v))
    return ls.ControlVector(dirs, model_hint=model.arch)


def all_layers(model: ls.Model) -> range:
    return range(1, model.n_layer)


def test_strength_zero_is_bit_identical(any_model: ls.Model) -> None:
    v = random_vector(any_model, all_layers(any_model))
    base = any_model.logits(PROMPT)
    steered = any_model.logits(PROMPT, steer=ls.Steer(v, strength=0.0))
    assert np.array_equal(base, steered)


def test_v_minus_v_is_bit_identical(any_model: ls.Model) -> None:
    v = random_vector(any_model, all_layers(any_model))
    base = any_model.logits(PROMPT)
    assert np.array_equal(base, any_model.logits(PROMPT, steer=ls.Steer(v - v)))


def test_steering_changes_logits(any_model: ls.Model) -> None:
    v = random_vector(any_model, all_layers(any_model))
    base = any_model.logits(PROMPT)
    steered = any_model.logits(PROMPT, steer=ls.Steer(v, strength=2.0))
    assert not np.allclose(base, steered, atol=1e-2)
    # and it is undone when the call ends
    assert np.array_equal(base, any_model.logits(PROMPT))


LONG_PROMPT = "The weather today is " + "mild, with a light wind from the west and some clouds, " * 6


def _ops(model: ls.Model, tokens: list[int], steer: ls.Steer | None = None) -> int:
    """Computing nodes of the graph that decodes ``tokens`` in one ubatch."""
    ctx = model._c
    model.engine.end()
    ctx.clear()
    n = len(tokens)
    session = apply_steering(ctx, model.n_layer, model.n_embd, {0: [steer]} if steer else {}, {0: n})
    try:
        ctx.decode(_core.BatchTokens(tokens, list(range(n)), [0] * n, [0] * (n - 1) + [1]))
        return int(ctx.steer_stats().n_graph_ops)
    finally:
        session.close()


@pytest.mark.parametrize("prompt", [PROMPT, LONG_PROMPT], ids=["host-summed", "matmul"])
def test_matches_upstream_control_vector(any_model: ls.Model, prompt: str) -> None:
    """One slot on every token == llama_set_adapter_cvec with the same data, bit for bit.

    A short ubatch (a decode step, a short prompt) adds vectors summed on the
    host, one node a layer; a long one multiplies the slots by the tokens'
    strengths in the graph. With one slot both give round(strength * v), as
    upstream's precomputed vector does."""
    m = any_model
    layers = range(2, m.n_layer - 1)
    v = random_vector(m, layers, seed=3)
    steer = ls.Steer(v, strength=1.5)
    ids = m.tokenize(prompt)
    host_summed = len(ids) * m.n_embd <= 16384
    assert host_summed == (prompt == PROMPT)
    assert _ops(m, ids, steer) - _ops(m, ids) == len(layers) * (1 if host_summed else 2)

    base = m.logits(prompt)
    ours = m.logits(prompt, steer=steer)
    data = np.zeros((m.n_layer - 1, m.n_embd), dtype=np.float32)  # row il-1 = layer il, as upstream
    for layer, d in v.items():
        data[layer - 1] = 1.5 * d
    ctx = m._c
    ctx.set_upstream_cvec(data.reshape(-1).tolist(), layers.start, layers.stop - 1)
    try:
        upstream = m.logits(prompt)
    finally:
        ctx.set_upstream_cvec([], -1, -1)
    assert np.array_equal(ours, upstream)
    assert not np.allclose(base, upstream, atol=1e-2)
    assert np.array_equal(m.logits(prompt), base)  # both vectors are gone after their calls


def test_two_slots_host_summed_equal_matmul_sum(model: ls.Model) -> None:
    """Two vectors on one token: the host's sum and the graph's matmul both
    round each product and then their sum, so a decode step steered by two
    slots is bit-identical to one by their precomputed sum."""
    layers = range(1, model.n_layer)
    a, b = random_vector(model, layers, seed=5), random_vector(model, layers, seed=6)
    both = model.logits(PROMPT, steer=[ls.Steer(a, 0.75), ls.Steer(b, -1.25)])
    summed = ls.ControlVector({k: np.float32(0.75) * a[k] + np.float32(-1.25) * b[k] for k in layers})
    assert np.array_equal(both, model.logits(PROMPT, steer=ls.Steer(summed)))


def test_strength_scales_like_the_vector(any_model: ls.Model) -> None:
    v = random_vector(any_model, range(3, any_model.n_layer - 2), seed=5)
    a = any_model.logits(PROMPT, steer=ls.Steer(v, strength=2.0))
    b = any_model.logits(PROMPT, steer=ls.Steer(2 * v, strength=1.0))
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(a).max()))


def test_negative_strength_is_negated_vector(model: ls.Model) -> None:
    v = random_vector(model, range(5, 20), seed=6)
    a = model.logits(PROMPT, steer=ls.Steer(v, strength=-1.0))
    b = model.logits(PROMPT, steer=ls.Steer(-v))
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(a).max()))


def test_steers_compose(model: ls.Model) -> None:
    v = random_vector(model, range(5, 15), seed=7)
    w = random_vector(model, range(10, 20), seed=8)
    both = model.logits(PROMPT, steer=[ls.Steer(v), ls.Steer(w, strength=0.5)])
    summed = model.logits(PROMPT, steer=ls.Steer(v + 0.5 * w))
    np.testing.assert_allclose(both, summed, rtol=1e-4, atol=1e-4 * float(np.abs(both).max()))


def test_generated_window_leaves_prompt_untouched(any_model: ls.Model) -> None:
    v = random_vector(any_model, all_layers(any_model), norm=8.0)
    base = any_model.logits(PROMPT)
    assert np.array_equal(base, any_model.logits(PROMPT, steer=ls.Steer(v, positions="generated")))
    # ... but it does change what is generated after the first token.
    plain = [t.id for t in any_model.generate(PROMPT, max_tokens=12, temperature=0)]
    gen = [
        t.id
        for t in any_model.generate(PROMPT, max_tokens=12, temperature=0, steer=ls.Steer(v, 4.0, positions="generated"))
    ]
    assert gen[0] == plain[0] and gen != plain


def test_prompt_window_equals_all_for_prompt_logits(model: ls.Model) -> None:
    v = random_vector(model, all_layers(model))
    a = model.logits(PROMPT, steer=ls.Steer(v, positions="prompt"))
    b = model.logits(PROMPT, steer=ls.Steer(v, positions="all"))
    assert np.array_equal(a, b)


def test_explicit_window(model: ls.Model) -> None:
    v = random_vector(model, all_layers(model), norm=8.0)
    n = len(model.tokenize(PROMPT))
    # A window past the prompt changes nothing in the prompt's logits.
    assert np.array_equal(model.logits(PROMPT), model.logits(PROMPT, steer=ls.Steer(v, positions=(n, n + 5))))
    # The window covering only the last prompt token changes them.
    assert not np.array_equal(model.logits(PROMPT), model.logits(PROMPT, steer=ls.Steer(v, positions=(n - 1, n))))


def _batch_last_logits(model: ls.Model, prompts: list[str], steers: dict[int, list[ls.Steer]]) -> list[np.ndarray]:
    """Decode every prompt as its own sequence in ONE batch; last-token logits each."""
    ctx = model._c
    toks, pos, seq, out = [], [], [], []
    n_prompt = {}
    rows = []
    for s, p in enumerate(prompts):
        ids = model.tokenize(p)
        n_prompt[s] = len(ids)
        toks += ids
        pos += list(range(len(ids)))
        seq += [s] * len(ids)
        out += [0] * (len(ids) - 1) + [1]
        rows.append(len(toks) - 1)
    model.engine.end()
    ctx.clear()
    session = apply_steering(ctx, model.n_layer, model.n_embd, steers, {s: n_prompt.get(s, 0) for s in steers})
    try:
        ctx.decode(_core.BatchTokens(toks, pos, seq, out))
        return [np.array(ctx.logits(r)) for r in rows]
    finally:
        session.close()


def test_sequences_in_one_batch_are_isolated(any_model: ls.Model) -> None:
    m = any_model
    v = random_vector(m, all_layers(m), seed=11)
    w = random_vector(m, all_layers(m), seed=12)
    prompts = ["I think that cats are", "My favourite food is", "The capital of Spain is"]
    sv, sw = ls.Steer(v), ls.Steer(w, strength=-1.0)
    batch = _batch_last_logits(m, prompts, {0: [sv], 1: [sw]})
    # Each sequence's steering stays in its sequence: the same batch with only
    # one of them steered gives the same rows, and the unbound third sequence
    # is bit-identical to an unsteered batch of the same shape.
    only0 = _batch_last_logits(m, prompts, {0: [sv]})
    only1 = _batch_last_logits(m, prompts, {1: [sw]})
    plain = _batch_last_logits(m, prompts, {})
    assert np.array_equal(batch[0], only0[0])
    assert np.array_equal(batch[1], only1[1])
    assert np.array_equal(batch[2], plain[2])
    assert not np.allclose(batch[0], plain[0], atol=1e-2) and not np.allclose(batch[1], plain[1], atol=1e-2)


def test_batched_sequences_equal_each_run_alone(model: ls.Model) -> None:
    """On the llama architecture a batch row equals the sequence run alone.

    (Not asserted for Gemma 3: there llama.cpp's batched decode differs from
    single-sequence decode by up to ~1 logit even without any steering.)"""
    v = random_vector(model, all_layers(model), seed=11)
    w = random_vector(model, all_layers(model), seed=12)
    prompts = ["I think that cats are", "My favourite food is", "The capital of Spain is"]
    batch = _batch_last_logits(model, prompts, {0: [ls.Steer(v)], 1: [ls.Steer(w, strength=-1.0)]})
    alone = [
        model.logits(prompts[0], steer=ls.Steer(v)),
        model.logits(prompts[1], steer=ls.Steer(w, strength=-1.0)),
        model.logits(prompts[2]),
    ]
    for got, want in zip(batch, alone):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


def test_strength_changes_cause_no_reserve(model: ls.Model) -> None:
    """100 decode steps, a new strength each: no scheduler re-reserve, the graph is reused."""
    v = random_vector(model, all_layers(model))
    schedule = [math.sin(i / 5.0) for i in range(101)]
    ctx = model._c
    model.engine.end()
    ctx.clear()
    ids = model.tokenize(PROMPT)
    session = apply_steering(ctx, model.n_layer, model.n_embd, {0: [ls.Steer(v, strength=schedule)]}, {0: len(ids)})
    try:
        ctx.decode(_core.BatchTokens(ids, list(range(len(ids))), [0] * len(ids), [0] * (len(ids) - 1) + [1]))
        token = int(np.argmax(ctx.logits(-1)))
        ctx.decode_step([token], [len(ids)], [0])  # one step so the graph for 1 token exists
        before = ctx.steer_stats()
        for step in range(2, 102):
            session.update(step)
            token = int(np.argmax(ctx.logits(-1)))
            ctx.decode_step([token], [len(ids) + step - 1], [0])
        after = ctx.steer_stats()
    finally:
        session.close()
    assert after.n_reserve == before.n_reserve
    assert after.topology_version == before.topology_version
    assert after.n_graph_reuse - before.n_graph_reuse >= 99


def test_steering_on_and_off_cause_no_reserve(model: ls.Model) -> None:
    """Calls that start or end steering, or capture other layers, rebuild the
    graph and plan its memory afresh, but do not reserve the scheduler again
    (~3 ms a call): the steering node bound holds whether steering is in use
    or not. Logits and captured rows are a fresh model's, bit for bit (a graph
    placed by the previous graph's plan, same node count and sizes but other
    outputs, captured garbage)."""
    v = random_vector(model, all_layers(model))
    model.logits(PROMPT, steer=ls.Steer(v, 1.0))  # the first steered graph may raise the bound once
    before = model._c.steer_stats()
    outs = []
    for k in range(3):
        plain = model.logits(PROMPT)
        steered = model.logits(PROMPT, steer=ls.Steer(v, 1.0 + k))
        model.capture([PROMPT], [2, 12, 24])
        outs.append((plain, steered, model.capture([PROMPT], [3, 17])))
    after = model._c.steer_stats()
    assert after.n_reserve == before.n_reserve
    assert after.n_graph_build - before.n_graph_build >= 12
    with ls.Model(model.path, n_ctx=2048, n_threads=2) as fresh:
        rows = fresh.capture([PROMPT], [3, 17])
        base = fresh.logits(PROMPT)
        for k, (plain, steered, captured) in enumerate(outs):
            assert np.array_equal(plain, base)
            assert np.array_equal(steered, fresh.logits(PROMPT, steer=ls.Steer(v, 1.0 + k)))
            assert np.array_equal(captured, rows)


def test_schedule_is_evaluated_per_token(model: ls.Model) -> None:
    v = random_vector(model, all_layers(model), norm=8.0)
    plain = [t.id for t in model.generate(PROMPT, max_tokens=10, temperature=0)]
    zero_then_on = [0.0, 0.0, 0.0, 0.0] + [3.0] * 20
    sched = [t.id for t in model.generate(PROMPT, max_tokens=10, temperature=0, steer=ls.Steer(v, zero_then_on))]
    # steps 0..3 decode the prompt and tokens 1..3 unsteered: tokens 1..4 agree
    assert sched[:4] == plain[:4]
    assert sched != plain
    via_callable = [
        t.id
        for t in model.generate(
            PROMPT, max_tokens=10, temperature=0, steer=ls.Steer(v, lambda i: 0.0 if i < 4 else 3.0)
        )
    ]
    assert via_callable == sched


# -- bad input ---------------------------------------------------------------


def test_wrong_vector_length(model: ls.Model) -> None:
    v = ls.ControlVector({5: np.ones(model.n_embd + 1, dtype=np.float32)})
    with pytest.raises(ValueError, match="n_embd"):
        model.complete(PROMPT, steer=ls.Steer(v))
    with pytest.raises(ValueError, match="n_embd"):
        model.logits(PROMPT, steer=ls.Steer(v))


@pytest.mark.parametrize("layer", [0, -1, 30, 100])
def test_layer_out_of_range(model: ls.Model, layer: int) -> None:
    with pytest.raises(ValueError, match="layer"):
        model.logits(PROMPT, steer=ls.Steer({layer: np.ones(model.n_embd, dtype=np.float32)}))


def test_non_finite_values_rejected(model: ls.Model) -> None:
    bad = np.ones(model.n_embd, dtype=np.float32)
    bad[3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        ls.ControlVector({4: bad})
    with pytest.raises(ValueError):
        model.logits(PROMPT, steer=ls.Steer(random_vector(model, range(1, 3)), strength=math.inf))
    # the core refuses them too, whoever calls it
    with pytest.raises(ValueError):
        model._c.steer_set_add(0, 4, bad)
    with pytest.raises(ValueError):
        model._c.steer_bind(0, 0, math.nan, 0, -1)


def test_core_rejects_bad_slots_and_shapes(model: ls.Model) -> None:
    ctx = model._c
    base = model.logits(PROMPT)
    ok = np.ones(model.n_embd, dtype=np.float32)
    with pytest.raises(ValueError):
        ctx.steer_set_add(ctx.steer_n_slots, 4, ok)
    with pytest.raises(ValueError):
        ctx.steer_set_add(-1, 4, ok)
    with pytest.raises(ValueError):
        ctx.steer_set_add(0, model.n_layer, ok)
    with pytest.raises(ValueError):
        ctx.steer_set_add(0, 4, ok[:-1])
    with pytest.raises(ValueError):
        ctx.steer_bind(10_000, 0, 1.0, 0, -1)
    with pytest.raises(ValueError):
        ctx.steer_bind(0, 0, 1.0, 5, 3)
    with pytest.raises(ValueError):
        ctx.steer_set_ablate(0, 4, np.zeros((1, model.n_embd), dtype=np.float32), 1.0)
    # nothing was left bound or written: the model is unsteered
    assert np.array_equal(model.logits(PROMPT), base)


def test_too_many_vectors_for_the_slots(model: ls.Model) -> None:
    steers = [ls.Steer(random_vector(model, range(1, 3), seed=i)) for i in range(model._c.steer_n_slots + 1)]
    base = model.logits(PROMPT)
    with pytest.raises(ls.SteeringError, match="slots"):
        model.logits(PROMPT, steer=steers)
    assert np.array_equal(base, model.logits(PROMPT))  # the failed call left nothing behind


def test_bad_steer_arguments(model: ls.Model) -> None:
    v = random_vector(model, range(1, 3))
    with pytest.raises(ValueError):
        ls.Steer(v, positions="middle")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ls.Steer(v, positions=(5, 2))
    with pytest.raises(ValueError):
        ls.Steer(v, mode="multiply")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ls.Steer(v, layers=[7])  # not in the vector
    with pytest.raises(ValueError):
        ls.Steer(v, strength=[])
    with pytest.raises(TypeError):
        model.logits(PROMPT, steer="happy")  # type: ignore[arg-type]


def test_steering_a_closed_model(model_path) -> None:  # type: ignore[no-untyped-def]
    m = ls.Model(model_path, n_ctx=256, n_threads=2)
    v = random_vector(m, range(1, 3))
    m.close()
    with pytest.raises(ls.ClosedError):
        m.logits(PROMPT, steer=ls.Steer(v))


@pytest.mark.parametrize("layer", [4, 12])
def test_ablation_removes_the_component(any_model: ls.Model, layer: int) -> None:
    """After ablation the captured residual at that layer has no component
    along the direction (|cos| < 1e-3), on every token."""
    m = any_model
    ids = m.tokenize(PROMPT)
    prefixes = [ids[: i + 1] for i in range(len(ids))]  # read "last" of each = every position, one pass
    rng = np.random.default_rng(layer)
    r = rng.standard_normal(m.n_embd).astype(np.float32)
    plain = m.capture(prefixes, layers=[layer])[:, 0]
    mean_dir = plain.mean(axis=0)  # a direction the stream really uses
    for direction in (r / np.linalg.norm(r), mean_dir / np.linalg.norm(mean_dir)):
        direction = direction.astype(np.float32)
        before = np.abs(plain @ direction) / np.linalg.norm(plain, axis=1)
        assert before.max() > 1e-2  # there is something to remove
        steer = ls.Steer({layer: 3.0 * direction}, 1.0, mode="ablate")  # the vector's norm does not matter
        after = m.capture(prefixes, layers=[layer], steer=steer)[:, 0]
        cos = np.abs(after @ direction) / np.linalg.norm(after, axis=1)
        assert cos.max() < 1e-3, cos


def test_half_ablation_halves_the_component(model: ls.Model) -> None:
    layer = 8
    d = model.capture([PROMPT], layers=[layer])[0, 0]
    d = (d / np.linalg.norm(d)).astype(np.float32)
    before = float(model.capture([PROMPT], layers=[layer])[0, 0] @ d)
    after = float(model.capture([PROMPT], layers=[layer], steer=ls.Steer({layer: d}, 0.5, mode="ablate"))[0, 0] @ d)
    assert after == pytest.approx(0.5 * before, rel=1e-3)
