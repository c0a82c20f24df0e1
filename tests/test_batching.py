"""Continuous batching: requests that join and leave a running decode get
what they would get alone (on a full-precision copy, where that is exact),
and every resource they took comes back."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import closing

import llama_steer as ls
import pytest
from conftest import N_THREADS
from llama_steer.batching import Batcher, DoneEvent, Event, Request, TokenEvent
from llama_steer.sampling import SamplingParams

QUESTIONS = ["What is your favourite season?", "Describe your morning.", "Tell me about the sea."]
GREEDY = SamplingParams(max_tokens=16, temperature=0)


@pytest.fixture(scope="module")
def bmodel(f32_path) -> Iterator[ls.Model]:  # type: ignore[no-untyped-def]
    # Full precision (weights and KV): a request's cells land wherever the
    # shared cache has room, so attention sums run in another order than
    # alone; on a quantized model that last-bit noise can flip a greedy
    # token, here it cannot, and "as alone" is tested exactly.
    with ls.Model(f32_path, n_ctx=1024, n_threads=N_THREADS, n_seq_max=4, n_steer_slots=2, kv_cache="f32") as m:
        yield m


@pytest.fixture(scope="module")
def vec(bmodel: ls.Model) -> ls.ControlVector:
    return ls.extract(bmodel, ls.persona_pairs(bmodel, "happy")[:60], progress=False)


class Sink:
    """Collects one request's events."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, ev: Event) -> None:
        self.events.append(ev)

    @property
    def done(self) -> DoneEvent | None:
        last = self.events[-1] if self.events else None
        return last if isinstance(last, DoneEvent) else None

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events)

    @property
    def n_tokens(self) -> int:
        return sum(isinstance(e, TokenEvent) for e in self.events)


def prompt(m: ls.Model, q: str) -> list[int]:
    return m.tokenize(m.apply_chat_template([{"role": "user", "content": q}]), parse_special=True)


def run_until_done(b: Batcher, sinks: list[Sink], limit: int = 500) -> None:
    for _ in range(limit):
        if all(s.done for s in sinks):
            return
        b.step()
    raise AssertionError("requests did not finish")


def test_joining_requests_get_their_solo_text(bmodel: ls.Model, vec: ls.ControlVector) -> None:
    steers: list[list[ls.Steer]] = [
        [],
        [ls.Steer(vec, 4.0, layers=range(8, 22))],
        [ls.Steer(vec, -4.0, layers=range(8, 22))],
        [ls.Steer(vec, [0.0, 0.0, 6.0], layers=range(8, 22))],  # a schedule, per sequence
    ]
    prompts = [prompt(bmodel, q) for q in [*QUESTIONS, QUESTIONS[0]]]
    solo = [bmodel.complete(p, steer=s, max_tokens=16, temperature=0) for p, s in zip(prompts, steers)]
    assert len(set(solo)) == 4
    with closing(Batcher(bmodel, n_parallel=4)) as b:
        sinks = [Sink() for _ in prompts]
        for p, s, sink in zip(prompts, steers, sinks):
            b.submit(Request(p, sink, s, GREEDY))
            for _ in range(3):  # the next one joins a running batch
                b.step()
        run_until_done(b, sinks)
        assert [s.text for s in sinks] == solo
        assert all(s.done and s.done.finish_reason == "length" and s.done.n_generated == 16 for s in sinks)
        st = b.stats()
        assert (st.active, st.queued, st.kv_reserved, st.slots_in_use) == (0, 0, 0, 0)
        assert st.requests == 4 and st.generated_tokens == 64


def test_a_long_prompt_does_not_stall_running_streams(bmodel: ls.Model) -> None:
    with closing(Batcher(bmodel, n_parallel=2, prefill_chunk=8)) as b:
        a, long_ = Sink(), Sink()
        b.submit(Request(prompt(bmodel, QUESTIONS[0]), a, (), SamplingParams(max_tokens=40, temperature=0)))
        while a.n_tokens == 0:
            b.step()
        text = " ".join(["The quick brown fox jumps over the lazy dog."] * 8)
        b.submit(Request(bmodel.tokenize(text), long_, (), GREEDY))
        for _ in range(6):  # 100+ prompt tokens in chunks of 8: still prefilling
            before = a.n_tokens
            b.step()
            assert a.n_tokens == before + 1
        assert long_.n_tokens == 0
        run_until_done(b, [a, long_])


def test_cancel_and_cleanup(bmodel: ls.Model, vec: ls.ControlVector) -> None:
    with closing(Batcher(bmodel, n_parallel=2)) as b:
        sink = Sink()
        t = b.submit(Request(prompt(bmodel, QUESTIONS[1]), sink, [ls.Steer(vec, 2.0)], GREEDY))
        b.step()
        b.step()
        assert b.stats().active == 1 and b.stats().slots_in_use == 1
        t.cancel()
        b.step()
        assert sink.done is not None and sink.done.finish_reason == "cancelled"
        st = b.stats()
        assert (st.active, st.kv_reserved, st.slots_in_use) == (0, 0, 0)
        # the freed sequence serves the next request as if fresh
        again = Sink()
        b.submit(Request(prompt(bmodel, QUESTIONS[1]), again, [ls.Steer(vec, 2.0)], GREEDY))
        run_until_done(b, [again])
    alone = bmodel.complete(prompt(bmodel, QUESTIONS[1]), steer=ls.Steer(vec, 2.0), max_tokens=16, temperature=0)
    assert again.text == alone


def test_slots_and_sequences_queue_in_order(bmodel: ls.Model, vec: ls.ControlVector) -> None:
    other = vec * -1.0  # a distinct vector: its own slot
    third = vec * 0.5
    with closing(Batcher(bmodel, n_parallel=4)) as b:
        sinks = [Sink() for _ in range(3)]
        for sink, v in zip(sinks, [vec, other, third]):
            b.submit(Request(prompt(bmodel, QUESTIONS[2]), sink, [ls.Steer(v, 1.0)], GREEDY))
        b.step()
        st = b.stats()
        assert (st.active, st.queued, st.slots_in_use) == (2, 1, 2)  # two slots: the third waits
        run_until_done(b, sinks)
        assert all(s.done and s.done.finish_reason == "length" for s in sinks)


def test_stop_strings_and_logprobs(bmodel: ls.Model) -> None:
    p = prompt(bmodel, QUESTIONS[0])
    full = bmodel.complete(p, max_tokens=16, temperature=0)
    stop = full[5:9]
    with closing(Batcher(bmodel, n_parallel=2)) as b:
        sink = Sink()
        b.submit(Request(p, sink, (), SamplingParams(max_tokens=16, temperature=0, stop=(stop,)), top_logprobs=3))
        run_until_done(b, [sink])
    assert sink.done is not None and sink.done.finish_reason == "stop"
    assert sink.text == full[: full.index(stop)]
    for ev in sink.events:
        if isinstance(ev, TokenEvent):
            assert len(ev.top) == 3 and ev.top[0][0] == ev.token  # greedy: the top choice
            assert ev.logprob == pytest.approx(ev.top[0][1], abs=1e-4)
            assert ev.top[0][1] >= ev.top[1][1] >= ev.top[2][1]


def test_exclusive_jobs_wait_for_the_batch(bmodel: ls.Model) -> None:
    with closing(Batcher(bmodel, n_parallel=2)) as b:
        sink = Sink()
        b.submit(Request(prompt(bmodel, QUESTIONS[0]), sink, (), GREEDY))
        b.step()
        fut = b.run_exclusive(lambda m: m.complete("The sky is", max_tokens=4, temperature=0))
        late = Sink()
        b.submit(Request(prompt(bmodel, QUESTIONS[1]), late, (), GREEDY))
        while not fut.done():
            b.step()
        assert sink.done is not None  # the running request finished first
        assert late.n_tokens == 0  # the queued one waited for the job
        assert fut.result() == bmodel.complete("The sky is", max_tokens=4, temperature=0)
        run_until_done(b, [late])
    assert late.text == bmodel.complete(prompt(bmodel, QUESTIONS[1]), max_tokens=16, temperature=0)


def test_conditions_decide_per_request_as_alone(bmodel: ls.Model, vec: ls.ControlVector) -> None:
    """CAST in a running batch: each request's condition is decided on its own
    prompt (mean and last reads), and its text is the one Model.generate gives."""
    prompts = [prompt(bmodel, q) for q in QUESTIONS]
    steer_sets = []
    for read in ("mean", "last"):
        sims = []
        for p in prompts:  # thresholds between the prompts' similarities: some hold, some do not
            bmodel.complete(
                p, max_tokens=1, steer=ls.Steer(vec, 1.0, condition=ls.Condition(vec[6], 6, -1e9, read=read))
            )
            sims.append(bmodel.last_conditions[0].similarity)
        threshold = float(sorted(sims)[1]) - 1e-6  # the middle one and above hold
        cond = ls.Condition(vec[6], 6, threshold, read=read)
        steer_sets.append([ls.Steer(vec, 6.0, layers=range(8, 22), condition=cond)])
    cases = [(p, s) for s in steer_sets for p in prompts]
    solo, decided = [], []
    for p, s in cases:
        solo.append(bmodel.complete(p, steer=s, max_tokens=12, temperature=0))
        decided.append(bmodel.last_conditions[0].held)
    assert decided.count(True) == 4  # two of three per read
    with closing(Batcher(bmodel, n_parallel=3)) as b:
        sinks = [Sink() for _ in cases]
        for (p, s), sink in zip(cases, sinks):
            b.submit(Request(p, sink, s, SamplingParams(max_tokens=12, temperature=0)))
            b.step()
        run_until_done(b, sinks)
    assert [s.done.conditions[0].held for s in sinks if s.done] == decided
    assert [s.text for s in sinks] == solo


def test_bad_requests(bmodel: ls.Model, vec: ls.ControlVector) -> None:
    with closing(Batcher(bmodel, n_parallel=1, max_queue=1)) as b:
        p = prompt(bmodel, QUESTIONS[0])
        with pytest.raises(ValueError, match="exceed the context"):
            b.submit(Request(p, Sink(), (), SamplingParams(max_tokens=5000)))
        with pytest.raises(ValueError, match="empty"):
            b.submit(Request([], Sink()))
        with pytest.raises(ValueError, match="n_embd"):
            b.submit(Request(p, Sink(), [ls.Steer({5: [1.0, 2.0]}, 1.0)]))
        with pytest.raises(ValueError, match="steering slots"):
            b.submit(Request(p, Sink(), [ls.Steer(vec, 1.0), ls.Steer(vec, 2.0), ls.Steer(vec, 3.0)]))
        b.submit(Request(p, Sink()))
        b.submit(Request(p, Sink()))  # one running (after the next step), one queued
        with pytest.raises(ls.BusyError):
            b.submit(Request(p, Sink()))
    with pytest.raises(ValueError, match="n_parallel"):
        Batcher(bmodel, n_parallel=5)


def test_threaded_requests(bmodel: ls.Model) -> None:
    prompts = [prompt(bmodel, q) for q in QUESTIONS]
    solo = [bmodel.complete(p, max_tokens=16, temperature=0) for p in prompts]
    sinks = [Sink() for _ in prompts]
    finished = [threading.Event() for _ in prompts]
    with Batcher(bmodel, n_parallel=4) as b:  # starts the scheduler thread
        for p, sink, fin in zip(prompts, sinks, finished):

            def on(ev: Event, sink: Sink = sink, fin: threading.Event = fin) -> None:
                sink(ev)
                if isinstance(ev, DoneEvent):
                    fin.set()

            b.submit(Request(p, on, (), GREEDY))
        assert all(f.wait(120) for f in finished)
    assert [s.text for s in sinks] == solo
