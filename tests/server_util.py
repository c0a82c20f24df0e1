"""A real uvicorn server in a thread, for the server and playground tests."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import llama_steer as ls


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running_server(model: ls.Model, vectors: dict[str, ls.ControlVector], **config: object) -> Iterator[str]:
    """Serve ``model`` with ``vectors`` registered; yields the base URL."""
    import uvicorn
    from llama_steer.serve import ServerConfig, VectorRegistry, create_app

    registry = VectorRegistry(model.n_embd, model.n_layer)
    for name, vec in vectors.items():
        registry.add(name, vec, "test")
    app = create_app(model, registry, ServerConfig(**config))  # type: ignore[arg-type]
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


@contextmanager
def server_process(*args: str, timeout: float = 120) -> Iterator[str]:
    """``llama-steer serve ARGS`` as a real process on loopback; yields the base URL."""
    import subprocess
    import sys

    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "llama_steer", "serve", "--port", str(port), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited: {proc.stdout.read() if proc.stdout else ''}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
