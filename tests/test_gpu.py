"""The steering buffer on a GPU backend (every layer offloaded).

Skipped unless the package was built with -DGGML_CUDA=ON (or Metal) and a
device is present; the same invariants as on the CPU must hold there.
"""

from __future__ import annotations

import llama_steer as ls
import numpy as np
import pytest
from test_steering import PROMPT, _batch_last_logits, all_layers, random_vector

pytestmark = pytest.mark.gpu


def test_gpu_strength_zero_and_v_minus_v(gpu_model: ls.Model) -> None:
    v = random_vector(gpu_model, all_layers(gpu_model))
    base = gpu_model.logits(PROMPT)
    assert np.array_equal(base, gpu_model.logits(PROMPT, steer=ls.Steer(v, 0.0)))
    assert np.array_equal(base, gpu_model.logits(PROMPT, steer=ls.Steer(v - v)))


def test_gpu_matches_cpu(gpu_model: ls.Model, model: ls.Model) -> None:
    v = random_vector(gpu_model, range(3, 20))
    gpu = gpu_model.logits(PROMPT, steer=ls.Steer(v, 1.5))
    cpu = model.logits(PROMPT, steer=ls.Steer(v, 1.5))
    np.testing.assert_allclose(gpu, cpu, rtol=2e-2, atol=2e-2 * float(np.abs(cpu).max()))


def test_gpu_matches_upstream_cvec(gpu_model: ls.Model) -> None:
    m = gpu_model
    v = random_vector(m, range(2, m.n_layer - 1), seed=3)
    ours = m.logits(PROMPT, steer=ls.Steer(v))
    data = np.zeros((m.n_layer - 1, m.n_embd), dtype=np.float32)
    for k, d in v.items():
        data[k - 1] = d
    m._c.set_upstream_cvec(data.reshape(-1).tolist(), 2, m.n_layer - 2)
    try:
        upstream = m.logits(PROMPT)
    finally:
        m._c.set_upstream_cvec([], -1, -1)
    np.testing.assert_allclose(ours, upstream, rtol=1e-4, atol=1e-4 * float(np.abs(upstream).max()))


def test_gpu_sequences_isolated(gpu_model: ls.Model) -> None:
    v = random_vector(gpu_model, all_layers(gpu_model), seed=11)
    prompts = ["I think that cats are", "My favourite food is", "The capital of Spain is"]
    steered = _batch_last_logits(gpu_model, prompts, {0: [ls.Steer(v)]})
    plain = _batch_last_logits(gpu_model, prompts, {})
    assert np.array_equal(steered[2], plain[2]) and not np.allclose(steered[0], plain[0], atol=1e-2)


def test_gpu_ablation_removes_component(gpu_model: ls.Model) -> None:
    r = random_vector(gpu_model, range(10, 11), seed=5, norm=1.0)[10]
    acts = gpu_model.capture([PROMPT], layers=[10], read="mean", steer=ls.Steer({10: r}, 1.0, mode="ablate"))[0, 0]
    assert abs(float(acts @ r) / float(np.linalg.norm(acts))) < 1e-3
