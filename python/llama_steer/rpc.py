"""Layers on other machines: ggml's RPC backend.

A machine with spare memory or a GPU runs a worker::

    llama-steer rpc-worker --host 0.0.0.0 --port 50052

and a model loads with some or all of its layers there::

    Model(path, rpc=["192.168.1.7:50052"], n_gpu_layers=-1)

The worker is ggml's own RPC server (``ggml_backend_rpc_start_server``) from
the same pinned llama.cpp as the package, so the protocol always matches.
Steering, ablation, ActAdd rows and capture work unchanged: a remote layer's
steering tensors live in that layer's buffer on the worker (llama.cpp sends
the graph, ggml runs the same ops there). The protocol has no
authentication or encryption: bind workers to a trusted network only.
A worker serves one client connection at a time (one process; that
process's models share it).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence

from . import _core
from .errors import LlamaSteerError

DEFAULT_PORT = 50052  # llama.cpp's rpc-server default
_ENDPOINT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")


def available() -> bool:
    """Whether this build has ggml's RPC backend (CMake option ``LLAMA_STEER_RPC``, on by default)."""
    return bool(_core.rpc_available())


def rpc_endpoints(rpc: Sequence[str] | str | None) -> list[str]:
    """``"host:port"`` workers from a list or a comma-separated string,
    checked for form (not reachability); ``None`` or empty: no workers."""
    if rpc is None:
        return []
    items = rpc.split(",") if isinstance(rpc, str) else list(rpc)
    out: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"rpc workers must be 'host:port' strings, got {type(item).__name__}")
        ep = item.strip()
        m = _ENDPOINT.match(ep)
        if not m or not 1 <= int(m.group(2)) <= 65535:
            raise ValueError(f"rpc worker must be host:port (port 1-65535), got {item!r}")
        if ep in out:
            raise ValueError(f"rpc worker {ep} is listed twice")
        out.append(ep)
    if out and not available():
        raise LlamaSteerError("this build of llama-steer has no RPC backend (build with -DLLAMA_STEER_RPC=ON)")
    return out


def serve(host: str = "127.0.0.1", port: int = DEFAULT_PORT, threads: int | None = None) -> None:
    """Serve this machine's devices (its GPUs, else its CPU with ``threads``)
    to RPC clients until the process is ended (Ctrl-C works). Does not return."""
    endpoint = rpc_endpoints(f"{host}:{port}")[0]
    # The server loop is C++ and never returns: let SIGINT/SIGTERM end the
    # process directly instead of waiting for Python's handler.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _core.rpc_serve(endpoint, threads or os.cpu_count() or 1)


def wait_reachable(endpoint: str, timeout: float = 30.0) -> None:
    """Block until a TCP connect to ``endpoint`` succeeds (the worker
    listens), or raise ``TimeoutError``. Connects and closes; the worker
    takes the next client."""
    host, _, port = endpoint.rpartition(":")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no RPC worker answered at {endpoint} within {timeout:g} s") from None
            time.sleep(0.05)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def local_workers(n: int = 1, *, threads: int = 1, host: str = "127.0.0.1") -> Iterator[list[subprocess.Popen[bytes]]]:
    """Start ``n`` workers on this machine (each a ``llama-steer rpc-worker``
    process on a free port), wait until they listen, and stop them on exit.
    Yields the processes; each has ``.endpoint``. For trying a split on one
    machine, tests and benchmarks."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(n):
            port = free_port(host)
            cmd = [sys.executable, "-m", "llama_steer", "rpc-worker", "--host", host, "--port", str(port)]
            cmd += ["--threads", str(threads)]
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            proc.endpoint = f"{host}:{port}"  # type: ignore[attr-defined]
            procs.append(proc)
        for proc in procs:
            wait_reachable(proc.endpoint)  # type: ignore[attr-defined]
        yield procs
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait(timeout=30)
