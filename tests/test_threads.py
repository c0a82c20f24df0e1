"""Concurrent use of one Model: calls from several threads are serialized by
the model's lock, so each gives what it gives alone; nothing crashes."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import llama_steer as ls
import numpy as np
import pytest
from llama_steer import _core


def _happy_vector(model: ls.Model) -> ls.ControlVector:
    rng = np.random.default_rng(7)
    return ls.ControlVector({il: rng.standard_normal(model.n_embd).astype(np.float32) for il in range(2, 10)})


def _run_threads(jobs: list[Callable[[], Any]], n_threads: int, rounds: int) -> list[list[Any]]:
    """Run every job ``rounds`` times in each of ``n_threads`` threads, all
    released at once; returns each thread's results (or exceptions)."""
    barrier = threading.Barrier(n_threads)
    results: list[list[Any]] = [[] for _ in range(n_threads)]

    def work(t: int) -> None:
        barrier.wait()
        for r in range(rounds):
            job = jobs[(t + r) % len(jobs)]
            try:
                results[t].append(((t + r) % len(jobs), job()))
            except BaseException as exc:  # recorded, asserted on below
                results[t].append(((t + r) % len(jobs), exc))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
        assert not th.is_alive(), "a thread hung"
    return results


def _streamed_batch(model: ls.Model, vec: ls.ControlVector) -> list[str]:
    with model.lock:  # a streamed generation made atomic
        gen = model.generate_batch(["One", "Two"], [ls.Steer(vec, 2.0), None], max_tokens=6, temperature=0)
        return [t.text for _, t in gen]


def test_four_threads_hammering_one_model_get_the_results_of_calls_alone(model: ls.Model) -> None:
    vec = _happy_vector(model)
    prompt = model.apply_chat_template([{"role": "user", "content": "Tell me about your day."}])
    jobs: list[Callable[[], Any]] = [
        lambda: model.complete(prompt, max_tokens=12, temperature=0),
        lambda: model.complete(prompt, max_tokens=12, temperature=0, steer=ls.Steer(vec, 4.0)),
        lambda: model.logits("The weather today is", steer=ls.Steer(vec, -3.0)),
        lambda: model.score("The capital of France is", [" Paris", " Rome"]),
        lambda: model.capture(["Hello there", "A second prompt"], layers=[3, 7]),
        lambda: _streamed_batch(model, vec),
    ]
    alone = [job() for job in jobs]
    results = _run_threads(jobs, n_threads=4, rounds=6)
    n = 0
    for per_thread in results:
        for k, got in per_thread:
            assert not isinstance(got, BaseException), f"job {k} raised {got!r}"
            want = alone[k]
            if isinstance(want, np.ndarray):
                np.testing.assert_array_equal(got, want)
            else:
                assert got == want, f"job {k}"
            n += 1
    assert n == 24


def test_a_generator_superseded_by_another_thread_raises_the_documented_error(model: ls.Model) -> None:
    gen = model.generate("Once upon a time", max_tokens=40, temperature=0)
    next(gen)
    other = threading.Thread(target=lambda: model.complete("Hi", max_tokens=3, temperature=0))
    other.start()
    other.join()
    with pytest.raises(ls.SupersededError, match="newer call"):
        list(gen)
    # The model is fine afterwards.
    assert model.complete("Hi", max_tokens=3, temperature=0)


def test_generators_in_two_threads_interleave_without_crashing(model: ls.Model) -> None:
    """Two threads stream from one model: each step is serialized; the one
    whose generation another call took over gets SupersededError, the other
    completes (or is itself superseded). Never a crash or a mixed-up token."""

    def stream() -> str:
        return "".join(t.text for t in model.generate("Count to ten:", max_tokens=30, temperature=0))

    results = _run_threads([stream], n_threads=2, rounds=5)
    want = stream()
    for per_thread in results:
        for _, got in per_thread:
            if isinstance(got, BaseException):
                assert isinstance(got, ls.SupersededError), repr(got)
            else:
                assert got == want


def test_close_from_another_thread_waits_for_the_running_call(model_path: Any) -> None:
    m = ls.Model(model_path, n_ctx=512, n_threads=2)
    gen = m.generate("Once upon a time", max_tokens=200, temperature=0)
    next(gen)
    held, release = threading.Event(), threading.Event()

    def busy() -> None:  # a call in progress: holds the model's lock
        with m.lock:
            held.set()
            release.wait(30)

    worker = threading.Thread(target=busy)
    worker.start()
    held.wait(30)
    closer = threading.Thread(target=m.close)
    closer.start()
    closer.join(timeout=0.5)
    assert closer.is_alive() and not m.closed, "close() did not wait for the call holding the model"
    release.set()
    closer.join(30)
    worker.join(30)
    assert m.closed
    with pytest.raises(ls.ClosedError):
        next(gen)
    with pytest.raises(ls.ClosedError):
        m.complete("Hi", max_tokens=2)


def test_the_core_refuses_two_threads_in_one_context(model: ls.Model) -> None:
    """Code that bypasses Model's lock and enters one core context from two
    threads at once gets ConcurrentUseError, not a crash."""
    ctx = model.engine.ctx
    ids = model.tokenize("A fairly long prompt to keep llama.cpp busy for a little while " * 4)
    batch = _core.BatchTokens(ids, list(range(len(ids))), [0] * len(ids), [0] * (len(ids) - 1) + [1])
    errors: list[BaseException] = []
    with model.engine.lock:  # keep Model's own calls out of the way
        barrier = threading.Barrier(2)

        def work() -> None:
            barrier.wait()
            for _ in range(20):
                try:
                    ctx.clear()
                    ctx.decode(batch)
                except ls.ConcurrentUseError as exc:
                    errors.append(exc)

        threads = [threading.Thread(target=work) for _ in range(2)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        ctx.clear()
    assert errors, "two threads decoding at once never collided"
    assert all("another thread" in str(e) for e in errors)
    assert model.complete("Hi", max_tokens=3, temperature=0)


def test_ctrl_c_inside_generate_leaves_the_model_usable(model: ls.Model) -> None:
    """SIGINT while the native decode runs: KeyboardInterrupt reaches Python,
    the call's steering is undone, and the next call answers as before."""
    import os
    import signal

    rng = np.random.default_rng(5)
    vec = ls.ControlVector({il: rng.standard_normal(model.n_embd).astype(np.float32) for il in (4, 5, 6)})
    before = model.complete("Once upon a time", max_tokens=10, temperature=0)
    interrupted = 0
    for delay in (0.01, 0.05, 0.1):
        timer = threading.Timer(delay, lambda: os.kill(os.getpid(), signal.SIGINT))
        timer.start()
        try:
            model.complete("Tell me a long story.", max_tokens=400, temperature=0, steer=ls.Steer(vec, 3.0))
        except KeyboardInterrupt:
            interrupted += 1
        timer.join()
        assert model.engine.session is None
        assert model.complete("Once upon a time", max_tokens=10, temperature=0) == before
    assert interrupted == 3
