"""Relative strengths and the effect-based steering plan: invariants."""

from __future__ import annotations

from pathlib import Path

import llama_steer as ls
import numpy as np
import pytest
from llama_steer.plan import SEARCH_START, default_bands, measure, probe_damage, search_strengths

PROMPT = "How are you feeling today?"


@pytest.fixture(scope="module")
def happy(model: ls.Model) -> ls.ControlVector:
    return ls.extract(model, ls.persona_pairs(model, "happy", max_pairs=60), progress=False)


@pytest.fixture(scope="module")
def items() -> list:
    return list(ls.load_ab_dataset("happy").items[:4])


def test_residual_norms_measure_the_models_scale(any_model: ls.Model) -> None:
    norms = any_model.residual_norms()
    assert sorted(norms) == list(range(1, any_model.n_layer))
    assert all(v > 0 for v in norms.values())
    assert norms[any_model.n_layer - 1] > norms[1]  # the residual grows with depth
    assert any_model.residual_norms() == norms  # measured once, cached
    rows = any_model.capture([PROMPT], read="last")  # a prompt's own norms are the same order of size
    ratio = np.linalg.norm(rows[0, 1:], axis=-1) / np.array([norms[k] for k in sorted(norms)])
    assert np.all((ratio > 0.1) & (ratio < 10))


def test_residual_norms_after_a_suspended_call(model_path: Path) -> None:
    """The norms decode into a cleared cache, whatever the last call left
    there (a generator paused mid-reply holds its sequence's tokens), and
    equal a fresh model's."""
    with ls.Model(model_path, n_ctx=1024, n_threads=2) as fresh:
        expected = fresh.residual_norms()
    with ls.Model(model_path, n_ctx=1024, n_threads=2) as m:
        reply = m.generate("Hello there, how are", max_tokens=5, temperature=0)
        next(reply)
        assert m.residual_norms() == expected


def test_extract_records_norms_and_they_survive_save_and_arithmetic(
    model: ls.Model, happy: ls.ControlVector, tmp_path: Path
) -> None:
    assert happy.residual_norms == model.residual_norms()
    path = tmp_path / "happy.gguf"
    happy.save(path)
    loaded = ls.ControlVector.load(path)
    assert loaded == happy and loaded.residual_norms == happy.residual_norms
    assert (2 * happy).residual_norms == happy.residual_norms
    assert happy.select([10]).residual_norms == happy.residual_norms
    with pytest.raises(ValueError, match="positive"):
        ls.ControlVector({3: happy[3]}, residual_norms={3: -1.0})


def test_relative_equals_absolute_when_converted(model: ls.Model, happy: ls.ControlVector) -> None:
    norms = model.residual_norms()
    bare = ls.ControlVector(happy.directions)  # no recorded norms: the model's are measured
    for vec in (happy, bare):
        rel = ls.Steer(vec, 0.05, layers=range(8, 22), unit="relative")
        absolute = rel.absolute(norms)
        assert absolute.unit == "absolute"
        for k in range(8, 22):
            assert np.linalg.norm(absolute.control_vector[k]) == pytest.approx(norms[k], rel=1e-5)
        np.testing.assert_array_equal(model.logits(PROMPT, steer=rel), model.logits(PROMPT, steer=absolute))
    assert not np.allclose(model.logits(PROMPT, steer=rel), model.logits(PROMPT), atol=0.1)


def test_relative_strength_is_refused_where_it_means_nothing(model: ls.Model, happy: ls.ControlVector) -> None:
    with pytest.raises(ValueError, match="relative"):
        ls.Steer(happy, 0.5, mode="ablate", unit="relative")
    with pytest.raises(ValueError, match="unit"):
        ls.Steer(happy, 0.5, unit="percent")  # type: ignore[arg-type]
    with pytest.raises(ls.SteeringError, match="no residual norm"):
        ls.Steer(ls.ControlVector({5: happy[5]}), 0.1, unit="relative").absolute({6: 1.0})


def test_the_same_relative_strength_moves_both_models_the_same_way(gemma: ls.Model, model: ls.Model) -> None:
    """A happy vector extracted on each model, one relative strength for both."""
    for m in (model, gemma):
        vec = ls.extract(m, ls.persona_pairs(m, "happy", max_pairs=120), progress=False)
        mid = range(m.n_layer // 4, 3 * m.n_layer // 4)
        curve = ls.word_odds_curve(m, vec, [-0.05, 0.0, 0.05], layers=mid, unit="relative")
        print(m.name, curve.log_odds)
        assert curve.log_odds[0] < curve.log_odds[1] < curve.log_odds[2]


def test_measure_strength_zero_is_no_steering(model: ls.Model, happy: ls.ControlVector, items: list) -> None:
    (zero,) = measure(model, happy, items, [((8, 21), 0.0)])
    assert zero.effect == 0.0 and zero.damage == 0.0  # bit for bit, as the steering buffer guarantees
    assert zero.shift_plus == 0.0 and zero.shift_minus == 0.0


def test_measure_is_antisymmetric_and_damage_grows(f32_model: ls.Model, happy: ls.ControlVector, items: list) -> None:
    """On the full-precision copy: the quantized model's activation
    quantization makes tiny strengths act unevenly."""
    band = (8, 21)
    small, mid, big = measure(f32_model, happy, items[:3], [(band, 0.004), (band, 0.02), (band, 0.08)])
    print(small, mid, big, sep="\n")
    # antisymmetric in the sign to first order
    assert small.shift_plus > 0 > small.shift_minus
    assert abs(small.shift_plus + small.shift_minus) < 0.25 * (small.shift_plus - small.shift_minus)
    # damage and effect grow with |strength|
    assert 0 <= small.damage < mid.damage < big.damage
    assert small.effect < mid.effect < big.effect


def test_find_steering_picks_the_best_cell_within_the_bound(
    model: ls.Model, happy: ls.ControlVector, tmp_path: Path
) -> None:
    plan = ls.find_steering(model, happy, "happy", bands=[(1, 7), (8, 21)], strengths=[0.02, 0.08], max_items=4)
    assert len(plan.table) == 4
    allowed = [c for c in plan.table if c.damage <= plan.max_damage]
    best = max(allowed, key=lambda c: c.effect)
    assert plan.layers == tuple(range(best.layers[0], best.layers[1] + 1))
    assert plan.relative_strength == best.relative_strength
    steer = plan.steer()
    assert steer.unit == "relative" and steer.strength == plan.relative_strength
    assert plan.steer(-1).strength == -plan.relative_strength
    text = plan.as_table()
    assert "8-21" in text and "*" in text
    assert plan.plot(tmp_path / "plan.png").stat().st_size > 1000


def test_find_steering_searches_each_bands_strength(model: ls.Model, happy: ls.ControlVector) -> None:
    """Without a grid, each band is measured once, at the strength one damage
    probe puts under the bound; the pick is the best of those within it."""
    bands = [(8, 14), (22, 29)]
    assert probe_damage(model, happy, [(bands[0], 0.0), (bands[1], -0.0)]) == [0.0, 0.0]
    # the probe sees damage at its strength, and more of it at twice that
    d1, d2 = probe_damage(model, happy, [(bands[1], SEARCH_START), (bands[1], 2 * SEARCH_START)])
    assert 0 < d1 < d2
    found = search_strengths(model, happy, bands)
    assert all(0 < s < 4 * SEARCH_START + 1e-9 for s in found)
    # a looser bound lets every band go at least as hard
    assert all(a <= b for a, b in zip(found, search_strengths(model, happy, bands, max_damage=0.3)))
    plan = ls.find_steering(model, happy, "happy", bands=bands, max_items=2)
    assert [(c.layers, c.relative_strength) for c in plan.table] == list(zip(bands, found))
    allowed = [c for c in plan.table if c.damage <= plan.max_damage]
    if allowed:
        assert plan.effect == max(c.effect for c in allowed)
    assert "strength" in plan.as_table() and "*" in plan.as_table()


def test_find_steering_refuses_bad_input(model: ls.Model, happy: ls.ControlVector) -> None:
    with pytest.raises(ValueError, match="no items|no pairs"):
        ls.find_steering(model, happy, [], bands=[(8, 21)])
    with pytest.raises(ValueError, match="outside"):
        ls.find_steering(model, happy, "happy", bands=[(8, 40)])
    with pytest.raises(ValueError, match="outside"):
        ls.find_steering(model, happy, "happy", bands=[(0, 5)])
    with pytest.raises(ValueError, match="positive"):
        ls.find_steering(model, happy, "happy", bands=[(8, 21)], strengths=[0.0])
    with pytest.raises(ValueError, match="positive"):
        ls.find_steering(model, happy, "happy", bands=[(8, 21)], strengths=[-0.1])
    with pytest.raises(ValueError, match="max_damage"):
        ls.find_steering(model, happy, "happy", bands=[(8, 21)], max_damage=0)
    with pytest.raises(ValueError, match="no direction"):
        ls.find_steering(model, happy.select([10, 11]), "happy", bands=[(8, 21)])


def test_default_bands_cover_the_depth() -> None:
    assert default_bands(30) == [(1, 7), (8, 14), (15, 21), (22, 29), (1, 14), (8, 21), (15, 29)]
    for n in (4, 18, 26, 30, 48):
        bands = default_bands(n)
        assert min(a for a, _ in bands) == 1 and max(b for _, b in bands) == n - 1
        assert all(1 <= a <= b <= n - 1 for a, b in bands)


def test_cli_find(model_path: Path, happy: ls.ControlVector, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from llama_steer.cli import main

    vec = tmp_path / "happy.gguf"
    happy.save(vec)
    code = main(["find", "--vector", str(vec), "--strengths", "0.02,0.08", "--max-items", "3", "-m", str(model_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "chosen: --layers" in out and "--relative" in out
