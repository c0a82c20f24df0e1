"""The OpenAI-compatible server, driven by the official ``openai`` client and
plain HTTP: replies equal what the library gives alone, per-request steering
in one batch, the vector registry, errors in OpenAI's shape, limits."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import llama_steer as ls
import openai
import pytest
from conftest import N_THREADS
from server_util import running_server, server_process

QUESTION = "Tell me about your weekend."
LAYERS = "8-21"


@pytest.fixture(scope="module")
def ref(f32_path: Path) -> Iterator[ls.Model]:
    """A model of the tests' own, for the replies expected (the server owns
    its model). Full precision, weights and KV: the server's replies equal
    the library's exactly there (see tests/test_batching.py)."""
    with ls.Model(f32_path, n_ctx=1024, n_threads=N_THREADS, kv_cache="f32") as m:
        yield m


@pytest.fixture(scope="module")
def happy(ref: ls.Model) -> ls.ControlVector:
    return ls.extract(ref, ls.persona_pairs(ref, "happy")[:80], progress=False)


@pytest.fixture(scope="module")
def calm(ref: ls.Model) -> ls.ControlVector:
    return ls.extract(ref, ls.persona_pairs(ref, "calm")[:80], progress=False)


@pytest.fixture(scope="module")
def server(
    f32_path: Path, happy: ls.ControlVector, calm: ls.ControlVector, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """``llama-steer serve`` as a real process on loopback, with happy.gguf
    and calm.gguf in its --vectors directory."""
    vectors = tmp_path_factory.mktemp("vectors")
    happy.save(vectors / "happy.gguf")
    calm.save(vectors / "calm.gguf")
    (vectors / "notes.gguf").write_bytes(b"not a vector")  # skipped with a warning, not fatal
    args = ["-m", str(f32_path), "--kv-cache", "f32", "--vectors", str(vectors), "--parallel", "8", "--slots", "8"]
    with server_process(*args, "-t", str(N_THREADS), "-c", "2048") as url:
        yield url


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server + "/v1", api_key="unused")


def expected(ref: ls.Model, happy: ls.ControlVector, strength: float | None, n: int) -> str:
    prompt = ref.apply_chat_template([{"role": "user", "content": QUESTION}])
    steer = None if strength is None else ls.Steer(happy, strength, layers=range(8, 22))
    return ref.complete(prompt, steer=steer, max_tokens=n, temperature=0)


def test_chat_matches_the_library(client: openai.OpenAI, ref: ls.Model, happy: ls.ControlVector) -> None:
    r = client.chat.completions.create(
        model="x", messages=[{"role": "user", "content": QUESTION}], max_tokens=20, temperature=0
    )
    assert r.object == "chat.completion"
    assert r.choices[0].message.content == expected(ref, happy, None, 20)
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None and r.usage.completion_tokens == 20
    assert r.usage.total_tokens == r.usage.prompt_tokens + 20


def test_streamed_steered_chat(client: openai.OpenAI, ref: ls.Model, happy: ls.ControlVector) -> None:
    stream = client.chat.completions.create(
        model="x",
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=20,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"steer": [{"vector": "happy", "strength": 6, "layers": LAYERS}]},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected(ref, happy, 6.0, 20) != expected(ref, happy, None, 20)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 20


def test_eight_concurrent_requests_equal_alone_and_offline(
    client: openai.OpenAI, ref: ls.Model, happy: ls.ControlVector, calm: ls.ControlVector
) -> None:
    """Different vectors, strengths and modes (some unsteered) in one batch:
    each reply is the text of the same request alone and of Model.complete."""
    band = range(8, 22)
    cases: list[tuple[list[dict[str, object]], list[ls.Steer]]] = [
        ([], []),
        ([{"vector": "happy", "strength": 6, "layers": LAYERS}], [ls.Steer(happy, 6.0, layers=band)]),
        ([{"vector": "happy", "strength": -6, "layers": LAYERS}], [ls.Steer(happy, -6.0, layers=band)]),
        ([{"vector": "calm", "strength": 6, "layers": LAYERS}], [ls.Steer(calm, 6.0, layers=band)]),
        ([{"vector": "calm", "strength": [0, 0, 8], "layers": LAYERS}], [ls.Steer(calm, [0.0, 0.0, 8.0], layers=band)]),
        (
            [{"vector": "happy", "strength": 3, "layers": LAYERS}, {"vector": "calm", "strength": 3, "layers": LAYERS}],
            [ls.Steer(happy, 3.0, layers=band), ls.Steer(calm, 3.0, layers=band)],
        ),
        ([{"vector": "happy", "mode": "ablate"}], [ls.Steer(happy, 1.0, mode="ablate")]),
        ([], []),
    ]
    questions = [
        QUESTION,
        QUESTION,
        QUESTION,
        "Describe your morning.",
        QUESTION,
        "What is the sea like?",
        QUESTION,
        "Hi!",
    ]

    def ask(i: int) -> str:
        r = client.chat.completions.create(
            model="x",
            messages=[{"role": "user", "content": questions[i]}],
            max_tokens=16,
            temperature=0,
            extra_body={"steer": cases[i][0]},
        )
        return r.choices[0].message.content or ""

    together: dict[int, str] = {}
    threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, ask(i))) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    alone = [ask(i) for i in range(8)]
    offline = [
        ref.complete(ref.apply_chat_template([{"role": "user", "content": q}]), steer=st, max_tokens=16, temperature=0)
        for q, (_, st) in zip(questions, cases)
    ]
    assert [together[i] for i in range(8)] == alone == offline
    assert len(set(offline)) >= 6  # the steerings really differ


def test_concurrent_requests_each_get_their_steering(
    client: openai.OpenAI, ref: ls.Model, happy: ls.ControlVector
) -> None:
    strengths = [None, 6.0, -6.0, 3.0]
    out: dict[int, str] = {}

    def one(i: int, s: float | None) -> None:
        steer = [] if s is None else [{"vector": "happy", "strength": s, "layers": LAYERS}]
        r = client.chat.completions.create(
            model="x",
            messages=[{"role": "user", "content": QUESTION}],
            max_tokens=16,
            temperature=0,
            extra_body={"steer": steer},
        )
        out[i] = r.choices[0].message.content or ""

    threads = [threading.Thread(target=one, args=(i, s)) for i, s in enumerate(strengths)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [out[i] for i in range(4)] == [expected(ref, happy, s, 16) for s in strengths]


def test_completions_with_logprobs(client: openai.OpenAI, ref: ls.Model) -> None:
    r = client.completions.create(model="x", prompt="The capital of France is", max_tokens=6, temperature=0, logprobs=2)
    assert r.choices[0].text == ref.complete("The capital of France is", max_tokens=6, temperature=0)
    lp = r.choices[0].logprobs
    assert lp is not None and lp.token_logprobs is not None and lp.top_logprobs is not None
    assert len(lp.token_logprobs) == 6 and all(len(t) == 2 for t in lp.top_logprobs)
    assert all(x <= 0 for x in lp.token_logprobs)
    streamed = client.completions.create(
        model="x", prompt="The capital of France is", max_tokens=6, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == r.choices[0].text


def test_chat_logprobs_and_stop(client: openai.OpenAI, ref: ls.Model, happy: ls.ControlVector) -> None:
    full = expected(ref, happy, None, 20)
    stop = full[8:12]
    r = client.chat.completions.create(
        model="x",
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=20,
        temperature=0,
        stop=stop,
        logprobs=True,
        top_logprobs=3,
    )
    assert r.choices[0].message.content == full[: full.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    content = r.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content and all(len(c.top_logprobs) == 3 for c in content)
    assert all(c.top_logprobs[0].token == c.token for c in content)  # greedy picks the top token


def test_models_health_metrics_playground(server: str) -> None:
    assert httpx.get(server + "/health").json() == {"status": "ok"}
    models = httpx.get(server + "/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["owned_by"] == "llama-steer"
    metrics = httpx.get(server + "/metrics").text
    for name in ("requests_total", "generated_tokens_total", "queue_depth", "active_sequences", "steer_slots_in_use"):
        assert f"llama_steer_{name}" in metrics
    page = httpx.get(server + "/")
    assert page.status_code == 200 and "llama-steer playground" in page.text


def test_vector_registry(server: str, happy: ls.ControlVector, tmp_path: Path) -> None:
    listed = httpx.get(server + "/v1/vectors").json()["data"]
    assert [v["name"] for v in listed] == ["calm", "happy"] and listed[1]["n_embd"] == happy.n_embd
    assert listed[1]["source"].endswith("happy.gguf")
    path = tmp_path / "sad.gguf"
    (-happy).save(path)
    r = httpx.post(server + "/v1/vectors?name=sad", content=path.read_bytes())
    assert r.status_code == 201 and r.json()["source"] == "upload"
    assert httpx.post(server + "/v1/vectors?name=sad", content=path.read_bytes()).status_code == 409
    for bad in ("../etc", ".hidden", "a/b", "x" * 65, ""):
        r = httpx.post(server + "/v1/vectors", params={"name": bad}, content=path.read_bytes())
        assert r.status_code == 400, bad
    r = httpx.post(server + "/v1/vectors?name=junk", content=b"GGUF not really")
    assert r.status_code == 400 and "control-vector" in r.json()["error"]["message"]
    assert httpx.delete(server + "/v1/vectors/sad").json()["deleted"] is True
    assert httpx.delete(server + "/v1/vectors/sad").status_code == 404


def test_extract_on_the_server_streams_progress(server: str, ref: ls.Model, client: openai.OpenAI) -> None:
    pairs = [[p.positive, p.negative] for p in ls.persona_pairs(ref, "calm")[:40]]
    events = []
    body = {"name": "calm-2", "pairs": pairs, "stream": True}
    with httpx.stream("POST", server + "/v1/vectors", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    assert events[0]["status"] == "queued" and events[-1]["status"] == "done"
    progress = [e for e in events if e["status"] == "extracting"]
    assert progress and progress[-1]["done"] == progress[-1]["total"]
    info = events[-1]["vector"]
    assert info["name"] == "calm-2" and info["source"] == "extracted"
    assert info["layers"] == list(range(1, ref.n_layer))
    assert all(n == pytest.approx(1.0, abs=1e-5) for n in info["norms"].values())  # pca_diff: unit directions
    r = client.chat.completions.create(
        model="x",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=4,
        extra_body={"steer": [{"vector": "calm-2"}]},
    )
    assert r.choices[0].message.content
    assert httpx.delete(server + "/v1/vectors/calm-2").status_code == 200


def test_errors_have_openai_shape(client: openai.OpenAI, server: str) -> None:
    msgs = [{"role": "user", "content": "Hi"}]
    with pytest.raises(openai.BadRequestError, match="no vector named 'nope'"):
        client.chat.completions.create(model="x", messages=msgs, extra_body={"steer": [{"vector": "nope"}]})  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError, match="strength"):
        client.chat.completions.create(
            model="x",
            messages=msgs,
            extra_body={"steer": [{"vector": "happy", "strength": "much"}]},  # type: ignore[arg-type]
        )
    with pytest.raises(openai.BadRequestError, match="layers"):
        client.chat.completions.create(
            model="x",
            messages=msgs,
            extra_body={"steer": [{"vector": "happy", "layers": "40-50"}]},  # type: ignore[arg-type]
        )
    with pytest.raises(openai.BadRequestError, match="n=1"):
        client.chat.completions.create(model="x", messages=msgs, n=2)  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(model="x", messages=msgs, max_tokens=100000)  # type: ignore[arg-type]
    r = httpx.post(server + "/v1/chat/completions", content=b"{" + b" " * (2 << 20) + b"}")
    assert r.status_code == 413 and "larger than" in r.json()["error"]["message"]
    r = httpx.post(server + "/v1/chat/completions", json={"messages": []})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def metric(text: str, name: str) -> float:
    return float(next(x for x in text.splitlines() if x.startswith(f"llama_steer_{name} ")).split()[1])


def wait_idle(url: str, headers: dict[str, str] | None = None) -> str:
    """The server's metrics once no sequence is active (a client that left
    is noticed within a poll, its sequence freed at the next step)."""
    deadline = time.monotonic() + 30
    while True:
        metrics = httpx.get(url + "/metrics", headers=headers).text
        if metric(metrics, "active_sequences") == 0:
            return metrics
        assert time.monotonic() < deadline, metrics
        time.sleep(0.05)


def test_a_client_that_leaves_frees_its_sequence(server: str) -> None:
    before = metric(httpx.get(server + "/metrics").text, "generated_tokens_total")
    body = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 400, "stream": True}
    with httpx.stream("POST", server + "/v1/chat/completions", json=body, timeout=60) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 6:
                break  # leave mid-stream
    metrics = wait_idle(server)
    assert metric(metrics, "kv_reserved_tokens") == 0
    assert metric(metrics, "generated_tokens_total") - before < 200  # cancelled, not run to its 400 tokens


def test_queue_full_is_429_and_api_key(model_path: Path) -> None:
    m = ls.Model(model_path, n_ctx=1024, n_threads=N_THREADS, n_seq_max=1)
    with m, running_server(m, {}, n_parallel=1, max_queue=0, api_key="s3cret") as url:
        auth = {"Authorization": "Bearer s3cret"}
        assert httpx.get(url + "/health").status_code == 200  # open without the key
        r = httpx.get(url + "/v1/models")
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        body = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 300, "stream": True}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=auth, timeout=60) as r:
            lines = r.iter_lines()
            next(lines)  # the first one is running
            busy = httpx.post(url + "/v1/chat/completions", json={**body, "stream": False}, headers=auth)
            assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
        wait_idle(url, auth)  # the stream's client has left: its slot comes back
        c = openai.OpenAI(base_url=url + "/v1", api_key="s3cret")
        assert c.chat.completions.create(model="x", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)


def test_condition_relative_and_actadd_forms(client: openai.OpenAI, ref: ls.Model, happy: ls.ControlVector) -> None:
    msgs = [{"role": "user", "content": QUESTION}]
    prompt = ref.apply_chat_template(msgs)
    for threshold, held in ((-1.0, True), (1.0, False)):
        cond = {"vector": "happy", "layer": 6, "threshold": threshold, "read": "mean"}
        r = client.chat.completions.create(
            model="x",
            messages=msgs,  # type: ignore[arg-type]
            max_tokens=12,
            temperature=0,
            extra_body={"steer": [{"vector": "happy", "strength": 6, "layers": LAYERS, "condition": cond}]},
        )
        steer = ls.Steer(happy, 6.0, layers=range(8, 22), condition=ls.Condition(happy[6], 6, threshold))
        assert r.choices[0].message.content == ref.complete(prompt, steer=steer, max_tokens=12, temperature=0)
        (outcome,) = r.model_extra["steer_conditions"]  # type: ignore[index]
        assert outcome["held"] is held and outcome["similarity"] == pytest.approx(
            ref.last_conditions[0].similarity, abs=1e-5
        )
    rel = {"vector": "happy", "strength": 0.1, "layers": LAYERS, "unit": "relative"}
    r = client.chat.completions.create(
        model="x",
        messages=msgs,
        max_tokens=12,
        temperature=0,
        extra_body={"steer": [rel]},  # type: ignore[arg-type]
    )
    steer = ls.Steer(happy, 0.1, layers=range(8, 22), unit="relative")
    assert r.choices[0].message.content == ref.complete(prompt, steer=steer, max_tokens=12, temperature=0)
    spec = {"actadd": {"positive": "Love", "negative": "Hate", "layer": 6}, "strength": 5}
    r = client.chat.completions.create(
        model="x",
        messages=msgs,
        max_tokens=12,
        temperature=0,
        extra_body={"steer": [spec]},  # type: ignore[arg-type]
    )
    act = ls.ActAdd(ref, "Love", "Hate", 6)
    alone = ref.complete(prompt, steer=ls.Steer(act, 5.0), max_tokens=12, temperature=0)
    assert r.choices[0].message.content == alone != expected(ref, happy, None, 12)
    with pytest.raises(openai.BadRequestError, match="exactly one of vector"):
        client.chat.completions.create(
            model="x",
            messages=msgs,
            extra_body={"steer": [{**spec, "vector": "happy"}]},  # type: ignore[arg-type]
        )
    with pytest.raises(openai.BadRequestError, match="layer"):
        client.chat.completions.create(
            model="x",
            messages=msgs,  # type: ignore[arg-type]
            extra_body={"steer": [{"actadd": {"positive": "a", "negative": "b", "layer": 99}}]},
        )


def test_faults_under_load(model_path: Path, happy: ls.ControlVector, tmp_path: Path) -> None:
    """64 clients at once against --parallel 8 (some leave mid-stream), and
    bad requests among them: each gets its reply or a clear error, the server
    keeps serving, and nothing leaks."""
    vectors = tmp_path / "vectors"
    vectors.mkdir()
    happy.save(vectors / "happy.gguf")
    other = ls.ControlVector({5: [0.5] * 64})  # made for a model with n_embd 64
    other.save(tmp_path / "other.gguf")
    args = ["-m", str(model_path), "--vectors", str(vectors), "--parallel", "8", "--max-queue", "16"]
    with server_process(*args, "-t", str(N_THREADS), "-c", "2048") as url:
        statuses: list[int] = []
        errors: list[str] = []
        lock = threading.Lock()

        def client_(i: int) -> None:
            steer = [] if i % 3 == 0 else [{"vector": "happy", "strength": (i % 7) - 3, "layers": LAYERS}]
            body = {"messages": [{"role": "user", "content": f"Say {i}."}], "max_tokens": 8, "steer": steer}
            if i % 8 == 1:  # a client that leaves after its first chunk
                with httpx.stream(
                    "POST", url + "/v1/chat/completions", json={**body, "stream": True}, timeout=120
                ) as r:
                    status = r.status_code
                    if status not in (200, 429):
                        errors.append(r.read().decode())
                    next(r.iter_lines(), None)
            else:
                r = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
                status = r.status_code
                assert r.json()["choices" if status == 200 else "error"]
                if status not in (200, 429):
                    errors.append(r.text)
            with lock:
                statuses.append(status)

        threads = [threading.Thread(target=client_, args=(i,)) for i in range(64)]
        for t in threads:
            t.start()
        http = httpx.Client(base_url=url, timeout=120)
        chat = "/v1/chat/completions"
        bad = [
            http.post(chat, content=b"{not json", headers={"content-type": "application/json"}),
            http.post(chat, json={"messages": [{"role": "user", "content": "x " * 3000}]}),
            http.post("/v1/vectors?name=other", content=(tmp_path / "other.gguf").read_bytes()),
            http.post(chat, json={"messages": [{"role": "user", "content": "Hi"}], "steer": [{"vector": "missing"}]}),
            http.delete("/v1/vectors/missing"),
        ]
        for t in threads:
            t.join(300)
        assert len(statuses) == 64 and set(statuses) <= {200, 429}, errors
        assert statuses.count(200) >= 8 and statuses.count(429) >= 1
        assert [r.status_code for r in bad] == [400, 400, 400, 400, 404]
        assert all(r.json()["error"]["message"] for r in bad)
        assert "n_embd 64" in bad[2].json()["error"]["message"]
        assert "context" in bad[1].json()["error"]["message"]
        deadline = time.monotonic() + 60
        while True:
            metrics = http.get("/metrics").text
            values = {
                name: float(next(x for x in metrics.splitlines() if x.startswith(f"llama_steer_{name} ")).split()[1])
                for name in ("active_sequences", "queue_depth", "steer_slots_in_use", "kv_reserved_tokens")
            }
            if not any(values.values()):
                break
            assert time.monotonic() < deadline, values
            time.sleep(0.1)
        r = httpx.post(
            url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
