"""Layers on ggml RPC workers (llama.cpp's distributed backend), on loopback.

Two `llama-steer rpc-worker` processes on 127.0.0.1 hold most of the bundled
model's layers; the rest stays on the local CPU. Everything the package does
must give what the local model gives: the worker runs the same ggml ops on
the same kind of CPU, so logits are compared at rtol 1e-4 (they come out
equal), greedy text exactly. A worker serves one client connection at a
time, so each test that needs a separate process starts its own worker.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import llama_steer as ls
import numpy as np
import pytest
from llama_steer import rpc

pytestmark = pytest.mark.skipif(not rpc.available(), reason="built without the RPC backend")

N_REMOTE = 20  # as llama.cpp counts them, the output layer is one: blocks 11-29 and the output go to the workers
PROMPT = "How are you feeling today?"


@pytest.fixture(scope="module")
def workers() -> Iterator[list[str]]:
    with rpc.local_workers(2, threads=1) as procs:
        yield [p.endpoint for p in procs]  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def pair(model_path: Path, workers: list[str]) -> Iterator[tuple[ls.Model, ls.Model]]:
    """(local model, the same model split across the CPU and two workers)."""
    with (
        ls.Model(model_path, n_ctx=1024, n_threads=1) as local,
        ls.Model(model_path, n_ctx=1024, n_threads=1, rpc=workers, n_gpu_layers=N_REMOTE) as split,
    ):
        yield local, split


@pytest.fixture(scope="module")
def happy(pair: tuple[ls.Model, ls.Model]) -> ls.ControlVector:
    local, _ = pair
    return ls.extract(local, ls.persona_pairs(local, "happy"), progress=False)


def _chat(m: ls.Model) -> str:
    return m.apply_chat_template([{"role": "user", "content": PROMPT}])


def test_layers_are_on_the_workers(pair: tuple[ls.Model, ls.Model], workers: list[str]) -> None:
    _, split = pair
    where = {il: split.engine.model.tensor_buffer(f"blk.{il}.attn_q.weight") for il in range(split.n_layer)}
    remote = {il for il, b in where.items() if b.startswith("RPC")}
    assert remote == set(range(split.n_layer + 1 - N_REMOTE, split.n_layer))
    assert {b.split("[")[1].rstrip("]") for b in where.values() if b.startswith("RPC")} == set(workers)


@pytest.mark.parametrize("how", ["unsteered", "add", "ablate", "actadd", "relative"])
def test_split_equals_local(pair: tuple[ls.Model, ls.Model], happy: ls.ControlVector, how: str) -> None:
    local, split = pair
    steer: ls.Steer | None
    if how == "unsteered":
        steer = None
    elif how == "add":
        steer = ls.Steer(happy, 4.0, layers=range(6, 24))  # across the CPU/worker boundary
    elif how == "ablate":
        steer = ls.Steer(happy, 1.0, layers=range(1, split.n_layer), mode="ablate")
    elif how == "actadd":
        steer = ls.Steer(ls.ActAdd(local, "Love", "Hate", 12), 4.0)
    else:
        steer = ls.Steer(happy, 0.08, layers=range(12, 20), unit="relative")
    prompt = _chat(local)
    want, got = local.logits(prompt, steer=steer), split.logits(prompt, steer=steer)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
    a = local.complete(prompt, max_tokens=24, temperature=0, steer=steer)
    b = split.complete(prompt, max_tokens=24, temperature=0, steer=steer)
    assert a == b and a


def test_steering_tensors_live_with_their_layer(pair: tuple[ls.Model, ls.Model], happy: ls.ControlVector) -> None:
    """A remote layer's steering tensors sit in that layer's buffer on its worker,
    never silently on the host (which would copy them every ubatch)."""
    _, split = pair
    ctx = split.engine.ctx
    ablate = ls.Steer(happy, 1.0, layers=range(1, split.n_layer), mode="ablate")
    split.logits("x", steer=[ls.Steer(happy, 1.0), ablate])  # allocates vectors and ablation directions
    with split.lock:
        for il in range(1, split.n_layer):
            weights = split.engine.model.tensor_buffer(f"blk.{il}.attn_q.weight")
            for kind in (0, 1):
                buf = ctx.steer_layer_buffer(il, kind)
                if weights.startswith("RPC"):
                    assert buf == weights, (il, kind, buf, weights)
                else:
                    assert buf == "CPU", (il, kind, buf)


def test_capture_and_extract_equal_local(pair: tuple[ls.Model, ls.Model]) -> None:
    local, split = pair
    prompts = [_chat(local), "The weather today is"]
    layers = [3, 12, 25, 29]
    for read in ("last", "mean"):
        a = local.capture(prompts, layers, read)
        b = split.capture(prompts, layers, read)
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * float(np.abs(a).max()))
    pairs = ls.persona_pairs(local, "happy")[:24]
    va = ls.extract(local, pairs, progress=False)
    vb = ls.extract(split, pairs, progress=False)
    for il in va.layers:
        cos = float(np.dot(va[il], vb[il]) / (np.linalg.norm(va[il]) * np.linalg.norm(vb[il])))
        assert cos > 0.9999, (il, cos)


def test_batched_sequences_stay_isolated(pair: tuple[ls.Model, ls.Model], happy: ls.ControlVector) -> None:
    """Different steering per sequence in one batch, on the split model, is
    what each sequence gets alone on the local one."""
    local, split = pair
    prompts = [_chat(local)] * 3
    steers = [ls.Steer(happy, 4.0, layers=range(8, 24)), None, ls.Steer(happy, -4.0, layers=range(8, 24))]
    outs = [""] * 3
    for i, tok in split.generate_batch(prompts, steers, max_tokens=16, temperature=0):
        outs[i] += tok.text
    alone = [local.complete(p, max_tokens=16, temperature=0, steer=s) for p, s in zip(prompts, steers)]
    assert outs == alone
    assert len(set(outs)) == 3


_LOST = textwrap.dedent(
    """
    import json, sys, time
    import llama_steer as ls
    from llama_steer import rpc
    out = {}
    path = sys.argv[1]
    with rpc.local_workers(1, threads=1) as (worker,):
        m = ls.Model(path, n_threads=1, rpc=[worker.endpoint])
        gen = m.generate("Once upon a time", max_tokens=200, temperature=0)
        out["before"] = [next(gen).text for _ in range(3)]
        worker.kill()
        worker.wait()
        t0 = time.monotonic()
        try:
            for _ in gen:
                pass
            out["error"] = None
        except ls.WorkerLostError as exc:
            out["error"] = type(exc).__name__ + ": " + str(exc)
            out["is_decode_error"] = isinstance(exc, ls.DecodeError)
        out["seconds"] = time.monotonic() - t0
        try:
            m.complete("Again", max_tokens=2)
            out["again"] = None
        except ls.WorkerLostError as exc:
            out["again"] = type(exc).__name__
        m.close()
    with ls.Model(path, n_threads=1) as local:
        out["local_after"] = local.complete("The capital of France is", max_tokens=4, temperature=0)
    print(json.dumps(out))
    """
)


def test_lost_worker_is_an_error_and_the_process_goes_on(model_path: Path, tmp_path: Path) -> None:
    """A worker killed mid-generation: WorkerLostError (a DecodeError), no
    hang, no abort; the model then refuses every call the same way and the
    process loads and runs a local model. Run in a child process so that a
    regression (an abort in ggml) fails this test instead of ending pytest."""
    script = tmp_path / "lost.py"
    script.write_text(_LOST)
    proc = subprocess.run([sys.executable, str(script), str(model_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(out["before"]) == 3
    assert out["error"] and out["error"].startswith("WorkerLostError") and "127.0.0.1" in out["error"], out
    assert out["is_decode_error"]
    assert out["seconds"] < 30
    assert out["again"] == "WorkerLostError"
    assert out["local_after"].strip().startswith("Paris")


def test_bad_worker_addresses(model_path: Path) -> None:
    with pytest.raises(ValueError, match="host:port"):
        ls.Model(model_path, rpc=["localhost"])
    with pytest.raises(ValueError, match="host:port"):
        ls.Model(model_path, rpc="127.0.0.1:99999")
    with pytest.raises(ValueError, match="twice"):
        ls.Model(model_path, rpc=["127.0.0.1:5", "127.0.0.1:5"])
    port = rpc.free_port()
    t0 = time.monotonic()
    with pytest.raises(ls.ModelLoadError, match=f"cannot reach the RPC worker at 127.0.0.1:{port}.*rpc-worker"):
        ls.Model(model_path, rpc=[f"127.0.0.1:{port}"])
    assert time.monotonic() - t0 < 30  # a refused connection is reported at once, not after a stall


def test_cli_generate_over_rpc(model_path: Path) -> None:
    """`--rpc` on the CLI, against a worker started by `llama-steer rpc-worker`."""
    args = ["generate", "-m", str(model_path), "-n", "12", "--temp", "0", "-t", "1", "The capital of France is"]
    local = subprocess.run([sys.executable, "-m", "llama_steer", *args], capture_output=True, text=True, timeout=120)
    assert local.returncode == 0, local.stderr
    with rpc.local_workers(1, threads=1) as (worker,):
        remote = subprocess.run(
            [sys.executable, "-m", "llama_steer", *args, "--rpc", worker.endpoint, "-ngl", "12"],  # type: ignore[attr-defined]
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert remote.returncode == 0, remote.stderr
    assert remote.stdout == local.stdout and "Paris" in local.stdout
