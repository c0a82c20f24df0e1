"""An OpenAI-compatible server where every request carries its own steering.

``llama-steer serve`` (the optional extra ``llama-steer[server]``: FastAPI and
uvicorn). All requests share one continuously batched decode
(:class:`~llama_steer.batching.Batcher`); each binds its own vectors and
strengths through a ``steer`` field in the request body, which the official
``openai`` client sends with ``extra_body={"steer": [...]}``::

    {"vector": "happy", "strength": 4, "layers": "8-21",
     "positions": "all" | "prompt" | "generated", "mode": "add" | "ablate",
     "unit": "absolute" | "relative"}

``strength`` may be a list: a schedule over decode steps. Vectors live in a
registry: every control-vector ``*.gguf`` of ``--vectors DIR`` at startup,
plus those registered through ``POST /v1/vectors`` (an uploaded GGUF, or
pairs extracted on the server), kept in memory.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions`` (streaming
with ``stream: true``), ``GET /v1/models``, ``GET|POST /v1/vectors``,
``DELETE /v1/vectors/{name}``, ``GET /health``, ``GET /metrics``
(Prometheus text) and the playground page at ``/``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
import sys
import tempfile
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np

try:
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise ImportError("the server needs its extra: pip install 'llama-steer[server]'") from exc

from .actadd import ActAdd
from .batching import Batcher, DoneEvent, Event, TokenEvent
from .batching import Request as BatchRequest
from .conditions import Condition
from .errors import BusyError, LlamaSteerError, VectorFileError
from .extraction import check_pairs, extract
from .model import Model
from .sampling import SamplingParams
from .steer import Steer
from .vectors import ControlVector

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_NAME = re.compile(NAME_PATTERN)
MAX_BODY = 1 << 20  # JSON bodies
MAX_UPLOAD = 64 << 20  # an uploaded control vector (a 8k x 80-layer F32 vector is 2.6 MB)
_DISCONNECT_POLL = 0.25  # seconds between checks for a client that left


# -- the vector registry -----------------------------------------------------------
@dataclass(frozen=True)
class VectorEntry:
    name: str
    vector: ControlVector
    source: str  # a file path, "upload" or "extracted"

    def info(self) -> dict[str, Any]:
        v = self.vector
        return {
            "name": self.name,
            "object": "vector",
            "layers": v.layers,
            "n_embd": v.n_embd,
            "source": self.source,
            "norms": {str(k): round(float(np.linalg.norm(d)), 6) for k, d in v.items()},
        }


class VectorRegistry:
    """Named control vectors that fit one model (n_embd and layer range)."""

    def __init__(self, n_embd: int, n_layer: int) -> None:
        self._n_embd, self._n_layer = n_embd, n_layer
        self._entries: dict[str, VectorEntry] = {}

    @staticmethod
    def check_name(name: str) -> str:
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"vector names are 1-64 of [A-Za-z0-9_.-], not starting with '.', '_' or '-': {name!r}")
        return name

    def add(self, name: str, vector: ControlVector, source: str, *, replace: bool = False) -> VectorEntry:
        self.check_name(name)
        if vector.n_embd != self._n_embd:
            raise ValueError(f"vector {name!r} has n_embd {vector.n_embd}, the model {self._n_embd}")
        bad = [k for k in vector.layers if not 1 <= k < self._n_layer]
        if bad:
            raise ValueError(f"vector {name!r} has layers {bad} outside this model's 1..{self._n_layer - 1}")
        if name in self._entries and not replace:
            raise KeyError(f"a vector named {name!r} exists; DELETE it first")
        entry = VectorEntry(name, vector, source)
        self._entries[name] = entry
        return entry

    def load_dir(self, directory: Path) -> list[str]:
        """Register every control-vector ``*.gguf`` in ``directory`` under its
        file stem; returns warnings for the files skipped."""
        warnings = []
        for path in sorted(directory.glob("*.gguf")):
            try:
                self.add(path.stem, ControlVector.load(path), str(path))
            except (VectorFileError, ValueError, KeyError) as exc:
                warnings.append(f"skipped {path.name}: {exc}")
        return warnings

    def get(self, name: str) -> VectorEntry:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"no vector named {name!r} (GET /v1/vectors lists them)") from None

    def remove(self, name: str) -> None:
        self.get(name)
        del self._entries[name]

    def __iter__(self) -> Any:
        return iter(sorted(self._entries.values(), key=lambda e: e.name))

    def __len__(self) -> int:
        return len(self._entries)


# -- request bodies ------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use


class ConditionSpec(BaseModel):
    """CAST: steer a request's generated tokens only if its prompt's hidden
    state at ``layer`` is similar enough to registered vector ``vector``
    (its direction at that layer)."""

    model_config = ConfigDict(extra="forbid")
    vector: str
    layer: int
    threshold: float
    compare: Literal["above", "below"] = "above"
    read: Literal["mean", "last"] = "mean"


class ActAddSpec(BaseModel):
    """ActAdd: rows from a prompt pair, added at the steered prompt's positions."""

    model_config = ConfigDict(extra="forbid")
    positive: str = Field(max_length=2000)
    negative: str = Field(max_length=2000)
    layer: int
    location: Literal["front", "back"] | int = "front"
    pad_prompt: bool = False

    def key(self) -> tuple[Any, ...]:
        return (self.positive, self.negative, self.layer, self.location, self.pad_prompt)


class SteerSpec(BaseModel):
    """One entry of the ``steer`` list: a registered ``vector`` (optionally
    with a ``condition``), or an ``actadd`` prompt pair."""

    model_config = ConfigDict(extra="forbid")
    vector: str | None = None
    actadd: ActAddSpec | None = None
    condition: ConditionSpec | None = None
    strength: float | list[float] = 1.0
    layers: str | list[int] | None = None
    positions: Literal["all", "prompt", "generated"] = "all"
    mode: Literal["add", "ablate"] = "add"
    unit: Literal["absolute", "relative"] = "absolute"

    @field_validator("strength")
    @classmethod
    def _finite(cls, v: float | list[float]) -> float | list[float]:
        values = v if isinstance(v, list) else [v]
        if not values or any(x != x or abs(x) == float("inf") for x in values):
            raise ValueError("strength must be finite (a list: non-empty)")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> SteerSpec:
        if (self.vector is None) == (self.actadd is None):
            raise ValueError("give exactly one of vector (a registered name) or actadd")
        if self.actadd is not None and self.condition is not None:
            raise ValueError("an actadd acts on the prompt, before a condition can be decided")
        return self

    def layer_list(self) -> list[int] | None:
        if self.layers is None or isinstance(self.layers, list):
            return self.layers
        out: list[int] = []
        for part in self.layers.split(","):
            a, sep, b = part.strip().partition("-")
            try:
                lo, hi = int(a), int(b) if sep else int(a)
            except ValueError:
                raise ValueError(f"layers wants 'A-B', 'N' or a list, got {self.layers!r}") from None
            if hi < lo:
                raise ValueError(f"layers {part!r}: want A <= B")
            out.extend(range(lo, hi + 1))
        return out


class _SamplingBody(_Body):
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float = Field(default=1.0, ge=0.0, le=10.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    min_p: float = Field(default=0.0, ge=0.0, lt=1.0)
    repeat_penalty: float = Field(default=1.0, gt=0.0)
    seed: int | None = Field(default=None, ge=0, le=0xFFFFFFFE)
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    steer: list[SteerSpec] = Field(default_factory=list)
    model: str | None = None

    @field_validator("n")
    @classmethod
    def _one(cls, v: int) -> int:
        if v != 1:
            raise ValueError("only n=1 is supported")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop: at most 4 non-empty strings")
        return v

    def sampling(self, default_max: int) -> SamplingParams:
        stop = self.stop if isinstance(self.stop, list) else ([self.stop] if self.stop else [])
        return SamplingParams(
            max_tokens=self.max_tokens if self.max_tokens is not None else default_max,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            min_p=self.min_p,
            repeat_penalty=self.repeat_penalty,
            seed=self.seed,
            stop=tuple(stop),
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for p in self.content:
            if p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise ValueError("only text content parts are supported")
            parts.append(p["text"])
        return "".join(parts)


class ChatCompletionBody(_SamplingBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


class CompletionBody(_SamplingBody):
    prompt: str | list[str]
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and len(v) != 1:
            raise ValueError("one prompt per request")
        return v

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v: bool) -> bool:
        if v:
            raise ValueError("echo is not supported")
        return v


class ExtractBody(_Body):
    name: str = Field(pattern=NAME_PATTERN)
    pairs: list[list[str]] | list[dict[str, str]] = Field(min_length=2)
    method: Literal["pca_diff", "pca_center", "mean_diff", "probe"] = "pca_diff"
    layers: str | list[int] | None = None
    stream: bool = False


# -- errors in OpenAI's shape -----------------------------------------------------------
def _error(status: int, message: str, type_: str, param: str | None = None) -> JSONResponse:
    headers = {"Retry-After": "1"} if status == 429 else None
    body = {"error": {"message": message, "type": type_, "param": param, "code": None}}
    return JSONResponse(body, status_code=status, headers=headers)


_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error"}


# -- the app ---------------------------------------------------------------------------------
@dataclass
class ServerConfig:
    n_parallel: int = 4
    max_queue: int = 64
    api_key: str | None = None
    default_max_tokens: int = 512
    model_name: str | None = None
    prefill_chunk: int = 128


class _Metrics:
    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = {}

    def count(self, route: str, status: int) -> None:
        self.requests[(route, status)] = self.requests.get((route, status), 0) + 1


def create_app(model: Model, registry: VectorRegistry, config: ServerConfig | None = None) -> FastAPI:
    """The ASGI app over ``model`` (which it owns while running: its
    lifespan starts and closes a :class:`Batcher`)."""
    cfg = config or ServerConfig()
    batcher = Batcher(model, n_parallel=cfg.n_parallel, max_queue=cfg.max_queue, prefill_chunk=cfg.prefill_chunk)
    model_name = cfg.model_name or model.path.stem
    metrics = _Metrics()
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        try:
            yield
        finally:
            batcher.close()

    app = FastAPI(title="llama-steer", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.batcher = batcher
    app.state.registry = registry
    app.add_middleware(_BodyLimit, limit=MAX_BODY, upload_limit=MAX_UPLOAD)

    @app.middleware("http")
    async def guard(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        route = request.url.path
        if cfg.api_key is not None and route != "/health":
            got = request.headers.get("authorization", "")
            if not secrets.compare_digest(got.encode(), f"Bearer {cfg.api_key}".encode()):
                metrics.count(route, 401)
                return _error(401, "missing or wrong API key (Authorization: Bearer KEY)", "authentication_error")
        response = await call_next(request)
        metrics.count(route if route in _ROUTES else "other", response.status_code)
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return _error(400, f"{loc}: {first.get('msg', 'invalid request')}", "invalid_request_error", loc or None)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), _ERROR_TYPES.get(exc.status_code, "server_error"))

    # -- helpers ------------------------------------------------------------------------
    actadds: OrderedDict[tuple[Any, ...], ActAdd] = OrderedDict()  # built once per prompt pair (LRU)

    async def actadd_of(spec: ActAddSpec) -> ActAdd:
        key = spec.key()
        if key not in actadds:
            # two prompt decodes on the model: the batch drains for them
            fut = batcher.run_exclusive(
                lambda m: ActAdd(m, spec.positive, spec.negative, spec.layer, location=spec.location,
                                 pad_prompt=spec.pad_prompt)
            )  # fmt: skip
            actadds[key] = await asyncio.wrap_future(fut)
            while len(actadds) > 64:
                actadds.popitem(last=False)
        actadds.move_to_end(key)
        return actadds[key]

    async def steers_of(specs: list[SteerSpec]) -> list[Steer]:
        out = []
        for i, spec in enumerate(specs):
            try:
                if spec.actadd is not None:
                    out.append(Steer(await actadd_of(spec.actadd), spec.strength))
                    continue
                assert spec.vector is not None
                cond = None
                if spec.condition is not None:
                    c = spec.condition
                    cvec = registry.get(c.vector).vector
                    if c.layer not in cvec.layers:
                        raise ValueError(f"condition vector {c.vector!r} has no layer {c.layer}")
                    cond = Condition(cvec[c.layer], c.layer, c.threshold, compare=c.compare, read=c.read)
                out.append(
                    Steer(registry.get(spec.vector).vector, spec.strength, layers=spec.layer_list(),
                          positions=spec.positions,
                          mode=spec.mode, unit=spec.unit, condition=cond)
                )  # fmt: skip
            except KeyError as exc:
                raise HTTPException(400, f"steer[{i}]: {exc.args[0]}") from None
            except (ValueError, TypeError, LlamaSteerError) as exc:
                raise HTTPException(400, f"steer[{i}]: {exc}") from None
        return out

    async def run(
        request: Request, tokens: list[int], steers: list[Steer], params: SamplingParams, top: int
    ) -> AsyncGenerator[Event, None]:
        """Submit to the batcher and yield its events; a client that goes
        away cancels the request (its sequence is freed at the next step)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()

        def on_event(ev: Event) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, ev)

        try:
            ticket = batcher.submit(BatchRequest(tokens, on_event, steers, params, top))
        except BusyError as exc:
            raise HTTPException(429, str(exc)) from None
        except (ValueError, LlamaSteerError) as exc:
            raise HTTPException(400, str(exc)) from None
        # uvicorn drops writes to a closed connection silently, so a stream
        # does not fail when its client leaves: look for the disconnect
        # message a few times a second, tokens flowing or not
        checked = time.monotonic()
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(queue.get(), timeout=_DISCONNECT_POLL)
                except asyncio.TimeoutError:
                    ev = None
                if ev is None or time.monotonic() - checked > _DISCONNECT_POLL:
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        return
                if ev is None:
                    continue
                yield ev
                if isinstance(ev, DoneEvent):
                    return
        finally:
            ticket.cancel()  # a no-op once done

    def piece(token: int) -> str:
        return model.detokenize([token], special=True)

    def chat_logprob(ev: TokenEvent) -> dict[str, Any]:
        def one(tok: int, lp: float) -> dict[str, Any]:
            text = piece(tok)
            return {"token": text, "logprob": lp, "bytes": list(text.encode())}

        return {**one(ev.token, ev.logprob), "top_logprobs": [one(t, lp) for t, lp in ev.top]}

    def usage(done: DoneEvent) -> dict[str, int]:
        return {
            "prompt_tokens": done.n_prompt,
            "completion_tokens": done.n_generated,
            "total_tokens": done.n_prompt + done.n_generated,
        }

    def finish(done: DoneEvent) -> str:
        if done.finish_reason == "error":
            raise HTTPException(500, f"generation failed: {done.error}")
        return "length" if done.finish_reason == "length" else "stop"

    def conditions(done: DoneEvent) -> dict[str, Any]:
        """What each CAST condition decided (an extension field, only when there were any)."""
        if not done.conditions:
            return {}
        return {"steer_conditions": [{"steer": c.steer, "similarity": c.similarity, "held": c.held}
                                     for c in done.conditions]}  # fmt: skip

    def sse(obj: Any) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    # -- routes ------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionBody, request: Request) -> Response:
        try:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            text = model.apply_chat_template(messages)
        except (ValueError, LlamaSteerError) as exc:
            raise HTTPException(400, str(exc)) from None
        tokens = model.tokenize(text, add_special=True, parse_special=True)
        if body.max_completion_tokens is not None and body.max_tokens is None:
            body.max_tokens = body.max_completion_tokens
        params = _params(body, cfg.default_max_tokens, len(tokens), model.n_ctx)
        steers = await steers_of(body.steer)
        top = (body.top_logprobs or 0) if body.logprobs else 0
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        events = run(request, tokens, steers, params, top)
        first = await anext(events)  # errors before streaming are HTTP errors

        def chunk(
            delta: dict[str, Any],
            reason: str | None,
            lp: list[dict[str, Any]] | None = None,
            extra: dict[str, Any] | None = None,
        ) -> str:
            choice = {"index": 0, "delta": delta, "logprobs": None if lp is None else {"content": lp},
                      "finish_reason": reason}  # fmt: skip
            return sse({"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_name,
                        "choices": [choice], **(extra or {})})  # fmt: skip

        if body.stream:

            async def chat_stream() -> AsyncIterator[str]:
                yield chunk({"role": "assistant", "content": ""}, None)
                ev: Event | None = first
                while ev is not None:
                    if isinstance(ev, TokenEvent):
                        yield chunk({"content": ev.text}, None, [chat_logprob(ev)] if body.logprobs else None)
                    else:
                        if ev.finish_reason == "error":
                            yield sse({"error": {"message": f"generation failed: {ev.error}", "type": "server_error"}})
                            return
                        if ev.text:
                            yield chunk({"content": ev.text}, None)
                        yield chunk({}, finish(ev), None, conditions(ev))
                        if body.include_usage:
                            yield sse({"id": rid, "object": "chat.completion.chunk", "created": now,
                                       "model": model_name, "choices": [], "usage": usage(ev)})  # fmt: skip
                        break
                    ev = await anext(events, None)
                yield "data: [DONE]\n\n"

            return _event_stream(events, chat_stream())

        content, lps, done = await _collect(first, events)
        result = {
            "id": rid,
            "object": "chat.completion",
            "created": now,
            "model": model_name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "logprobs": {"content": [chat_logprob(e) for e in lps]} if body.logprobs else None,
                    "finish_reason": finish(done),
                }
            ],
            "usage": usage(done),
            **conditions(done),
        }
        return JSONResponse(result)

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request) -> Response:
        prompt = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
        tokens = model.tokenize(prompt, add_special=True, parse_special=False)
        params = _params(body, 16 if body.max_tokens is None else body.max_tokens, len(tokens), model.n_ctx)
        steers = await steers_of(body.steer)
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        events = run(request, tokens, steers, params, body.logprobs or 0)
        first = await anext(events)

        def legacy_logprobs(evs: list[TokenEvent], offset: int) -> dict[str, Any]:
            offsets, pos = [], offset
            for e in evs:
                offsets.append(pos)
                pos += len(e.text)
            return {
                "tokens": [piece(e.token) for e in evs],
                "token_logprobs": [e.logprob for e in evs],
                "top_logprobs": [{piece(t): lp for t, lp in e.top} for e in evs],
                "text_offset": offsets,
            }

        def choice(text: str, reason: str | None, lp: dict[str, Any] | None) -> dict[str, Any]:
            return {"text": text, "index": 0, "logprobs": lp, "finish_reason": reason}

        if body.stream:

            async def text_stream() -> AsyncIterator[str]:
                ev: Event | None = first
                offset = 0
                while ev is not None:
                    head = {"id": rid, "object": "text_completion", "created": now, "model": model_name}
                    if isinstance(ev, TokenEvent):
                        lp = legacy_logprobs([ev], offset) if body.logprobs is not None else None
                        offset += len(ev.text)
                        yield sse({**head, "choices": [choice(ev.text, None, lp)]})
                    else:
                        if ev.finish_reason == "error":
                            yield sse({"error": {"message": f"generation failed: {ev.error}", "type": "server_error"}})
                            return
                        yield sse({**head, "choices": [choice(ev.text, finish(ev), None)], **conditions(ev)})
                        if body.include_usage:
                            yield sse({**head, "choices": [], "usage": usage(ev)})
                        break
                    ev = await anext(events, None)
                yield "data: [DONE]\n\n"

            return _event_stream(events, text_stream())

        text, lps, done = await _collect(first, events)
        lp = legacy_logprobs(lps, 0) if body.logprobs is not None else None
        return JSONResponse(
            {
                "id": rid,
                "object": "text_completion",
                "created": now,
                "model": model_name,
                "choices": [choice(text, finish(done), lp)],
                "usage": usage(done),
                **conditions(done),
            }
        )

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "llama-steer"}]}  # fmt: skip

    @app.get("/v1/vectors")
    async def list_vectors() -> dict[str, Any]:
        return {"object": "list", "data": [e.info() for e in registry]}

    @app.post("/v1/vectors")
    async def add_vector(request: Request) -> Response:
        kind = request.headers.get("content-type", "").split(";")[0].strip()
        if kind == "application/json":
            try:
                body = ExtractBody.model_validate_json(await request.body())
            except ValueError as exc:
                raise HTTPException(400, _first_error(exc)) from None
            return await _extract(body)
        name = request.query_params.get("name", "")
        try:
            registry.check_name(name)
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None
        data = await request.body()
        with tempfile.TemporaryDirectory(prefix="llama-steer-upload-") as tmp:
            path = Path(tmp) / "vector.gguf"
            path.write_bytes(data)
            try:
                vec = ControlVector.load(path)
            except (VectorFileError, ValueError) as exc:
                raise HTTPException(400, f"not a control-vector GGUF: {exc}".replace(str(path), "upload")) from None
        entry = _register(name, vec, "upload")
        return JSONResponse(entry.info(), status_code=201)

    def _register(name: str, vec: ControlVector, source: str) -> VectorEntry:
        try:
            return registry.add(name, vec, source)
        except KeyError as exc:
            raise HTTPException(409, exc.args[0]) from None
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None

    async def _extract(body: ExtractBody) -> Response:
        try:
            pairs = check_pairs([tuple(p) if isinstance(p, list) else (p["positive"], p["negative"])
                                 for p in body.pairs])  # fmt: skip
            layers = SteerSpec(vector=body.name, layers=body.layers).layer_list()
        except (KeyError, ValueError, TypeError, LlamaSteerError) as exc:
            raise HTTPException(400, f"pairs: {exc}") from None
        if body.name in {e.name for e in registry}:
            raise HTTPException(409, f"a vector named {body.name!r} exists; DELETE it first")
        loop = asyncio.get_running_loop()
        progress: asyncio.Queue[tuple[int, int]] = asyncio.Queue()

        def report(done: int, total: int) -> None:
            loop.call_soon_threadsafe(progress.put_nowait, (done, total))

        fut = batcher.run_exclusive(lambda m: extract(m, pairs, method=body.method, layers=layers, progress=report))
        afut = asyncio.wrap_future(fut)

        async def finished() -> ControlVector:
            try:
                vec: ControlVector = await afut
                return vec
            except (ValueError, LlamaSteerError) as exc:
                raise HTTPException(400, f"extraction failed: {exc}") from None

        if not body.stream:
            entry = _register(body.name, await finished(), "extracted")
            return JSONResponse(entry.info(), status_code=201)

        async def stream() -> AsyncIterator[str]:
            yield sse({"status": "queued"})
            while not afut.done():
                getter = asyncio.ensure_future(progress.get())
                await asyncio.wait([getter, afut], return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    done, total = getter.result()
                    yield sse({"status": "extracting", "done": done, "total": total})
                else:
                    getter.cancel()
            try:
                entry = _register(body.name, await finished(), "extracted")
            except HTTPException as exc:
                yield sse({"status": "error", "error": {"message": exc.detail, "code": exc.status_code}})
            else:
                yield sse({"status": "done", "vector": entry.info()})
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.delete("/v1/vectors/{name}")
    async def delete_vector(name: str) -> dict[str, Any]:
        try:
            registry.remove(name)
        except KeyError as exc:
            raise HTTPException(404, exc.args[0]) from None
        return {"id": name, "object": "vector", "deleted": True}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(_metrics_text(batcher, metrics), media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def playground() -> HTMLResponse:
        page = resources.files("llama_steer").joinpath("data", "playground.html").read_text(encoding="utf-8")
        return HTMLResponse(page)

    return app


_ROUTES = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/vectors", "/health", "/metrics", "/"}


def _event_stream(events: AsyncGenerator[Event, None], body: AsyncIterator[str]) -> StreamingResponse:
    """An SSE response of ``body``; however it ends (done, an error, the
    client gone), ``events`` is closed, which cancels the request."""

    async def stream() -> AsyncIterator[str]:
        async with contextlib.aclosing(events):
            async for part in body:
                yield part

    return StreamingResponse(stream(), media_type="text/event-stream")


def _params(body: _SamplingBody, default_max: int, n_prompt: int, n_ctx: int) -> SamplingParams:
    """Sampling parameters; an unset max_tokens is capped to the room left
    after the prompt (a set one that does not fit is the client's error)."""
    if body.max_tokens is None:
        default_max = max(0, min(default_max, n_ctx - n_prompt))
    try:
        return body.sampling(default_max)
    except (ValueError, TypeError) as exc:
        raise HTTPException(400, str(exc)) from None


async def _collect(first: Event, events: AsyncIterator[Event]) -> tuple[str, list[TokenEvent], DoneEvent]:
    text: list[str] = []
    tokens: list[TokenEvent] = []
    ev: Event | None = first
    while ev is not None:
        text.append(ev.text)
        if isinstance(ev, DoneEvent):
            return "".join(text), tokens, ev
        tokens.append(ev)
        ev = await anext(events, None)
    raise HTTPException(499, "the client went away")


def _first_error(exc: ValueError) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        first = errors()[0]
        loc = ".".join(str(x) for x in first.get("loc", ()))
        return f"{loc}: {first.get('msg')}" if loc else str(first.get("msg"))
    return str(exc)


def _metrics_text(batcher: Batcher, metrics: _Metrics) -> str:
    s = batcher.stats()
    uptime = max(time.monotonic() - s.started, 1e-9)
    lines = [
        "# HELP llama_steer_requests_total HTTP requests by route and status.",
        "# TYPE llama_steer_requests_total counter",
    ]
    for (route, status), n in sorted(metrics.requests.items()):
        lines.append(f'llama_steer_requests_total{{route="{route}",status="{status}"}} {n}')
    for name, kind, help_, value in [
        ("prompt_tokens_total", "counter", "Prompt tokens admitted.", s.prompt_tokens),
        ("generated_tokens_total", "counter", "Tokens generated.", s.generated_tokens),
        ("decode_steps_total", "counter", "Scheduler steps that decoded.", s.steps),
        ("tokens_per_second", "gauge", "Generated tokens per second since start.", s.generated_tokens / uptime),
        ("queue_depth", "gauge", "Requests waiting for a sequence, slots or KV room.", s.queued),
        ("active_sequences", "gauge", "Requests being decoded.", s.active),
        ("steer_slots_in_use", "gauge", "Steering slots bound to a running request.", s.slots_in_use),
        ("steer_slots", "gauge", "Steering slots of the context.", s.n_slots),
        ("kv_reserved_tokens", "gauge", "KV cells reserved by running requests.", s.kv_reserved),
        ("kv_size_tokens", "gauge", "KV cells of the context.", s.n_ctx),
    ]:
        lines += [f"# HELP llama_steer_{name} {help_}", f"# TYPE llama_steer_{name} {kind}"]
        lines.append(f"llama_steer_{name} {value:.6g}" if isinstance(value, float) else f"llama_steer_{name} {value}")
    return "\n".join(lines) + "\n"


class _BodyLimit:
    """ASGI middleware: a request body beyond ``limit`` bytes gets 413 before
    the app reads it (uploads to /v1/vectors have their own, larger bound)."""

    def __init__(self, app: Any, limit: int, upload_limit: int) -> None:
        self.app, self.limit, self.upload_limit = app, limit, upload_limit

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.upload_limit if scope.get("path") == "/v1/vectors" else self.limit
        headers: Mapping[bytes, bytes] = dict(scope.get("headers", []))
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await _send_413(send, limit)
            return
        seen = 0

        async def limited() -> Any:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _TooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await _send_413(send, limit)


class _TooLarge(Exception):
    pass


async def _send_413(send: Any, limit: int) -> None:
    body = json.dumps(
        {
            "error": {
                "message": f"the body is larger than {limit} bytes",
                "type": "invalid_request_error",
                "param": None,
                "code": None,
            }
        }  # fmt: skip
    ).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def serve(
    model: Model,
    registry: VectorRegistry,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    config: ServerConfig | None = None,
    log_level: str = "info",
) -> None:
    """Run the server until interrupted (uvicorn)."""
    import uvicorn

    app = create_app(model, registry, config)
    if host not in ("127.0.0.1", "localhost", "::1") and (config is None or config.api_key is None):
        print(f"llama-steer serve: listening on {host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)  # fmt: skip
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)


__all__ = ["ServerConfig", "VectorEntry", "VectorRegistry", "create_app", "serve"]
