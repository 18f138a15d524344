"""OpenAI-compatible HTTP server over a Pipeline (FastAPI + uvicorn).

The app talks to a ChatBackend: in one process, one worker thread runs generation (a pipeline
is not re-entrant); on Ray Serve (ray_serve.py) replicas do. Requests wait in a bounded queue
and get 429 beyond it. Bad requests get a 4xx with an OpenAI-style error body. Images
come as data: URLs; local paths only with allow_local_files; nothing is ever fetched.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from collections.abc import AsyncIterator, Iterator
from typing import Any, Protocol

from ..errors import ConvLlavaError
from ..extras import require

require("fastapi", "fastapi", "the HTTP server")
from fastapi import FastAPI  # noqa: E402
from fastapi import Request as HttpRequest  # noqa: E402  (module level: FastAPI resolves annotations here)
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse  # noqa: E402

from ..prompt import SYSTEM_V1, Conversation
from .generation import Timings, TokenEvent
from .pipeline import Pipeline, Request
from .sampling import SamplingParams


@dataclass
class ServerLimits:
    max_body_bytes: int = 20 << 20
    max_image_pixels: int = 40_000_000
    max_images: int = 8
    max_tokens: int = 1024
    max_queue: int = 8  # waiting requests beyond the one running
    allow_local_files: bool = False


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class Metrics:
    """Prometheus text exposition, hand-written: five metrics do not need a client library."""

    BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[str, int] = {}
        self.errors = 0
        self.queue_depth = 0
        self.ttft_buckets = [0] * len(self.BUCKETS)
        self.ttft_sum = 0.0
        self.ttft_count = 0
        self.tokens_total = 0
        self.decode_seconds = 0.0

    def request(self, status: int) -> None:
        with self.lock:
            self.requests[str(status)] = self.requests.get(str(status), 0) + 1
            if status >= 400:
                self.errors += 1

    def generation(self, t: Timings, tokens: int) -> None:
        with self.lock:
            self.ttft_sum += t.ttft_s
            self.ttft_count += 1
            for i, b in enumerate(self.BUCKETS):
                if t.ttft_s <= b:
                    self.ttft_buckets[i] += 1
            self.tokens_total += tokens
            self.decode_seconds += t.decode_s

    def render(self) -> str:
        with self.lock:
            lines = ["# HELP convllava_requests_total HTTP requests to the API by status.", "# TYPE convllava_requests_total counter"]
            lines += [f'convllava_requests_total{{status="{s}"}} {n}' for s, n in sorted(self.requests.items())]
            lines += ["# HELP convllava_errors_total Requests answered with an error.", "# TYPE convllava_errors_total counter", f"convllava_errors_total {self.errors}"]
            lines += ["# HELP convllava_queue_depth Requests running or waiting.", "# TYPE convllava_queue_depth gauge", f"convllava_queue_depth {self.queue_depth}"]
            lines += ["# HELP convllava_ttft_seconds Time to first token.", "# TYPE convllava_ttft_seconds histogram"]
            for b, n in zip(self.BUCKETS, self.ttft_buckets):
                lines.append(f'convllava_ttft_seconds_bucket{{le="{b}"}} {n}')
            lines += [f'convllava_ttft_seconds_bucket{{le="+Inf"}} {self.ttft_count}', f"convllava_ttft_seconds_sum {self.ttft_sum}", f"convllava_ttft_seconds_count {self.ttft_count}"]
            tps = self.tokens_total / self.decode_seconds if self.decode_seconds > 0 else 0.0
            lines += ["# HELP convllava_generated_tokens_total Tokens generated.", "# TYPE convllava_generated_tokens_total counter", f"convllava_generated_tokens_total {self.tokens_total}"]
            lines += ["# HELP convllava_decode_tokens_per_second Mean decode speed since start.", "# TYPE convllava_decode_tokens_per_second gauge", f"convllava_decode_tokens_per_second {tps}"]
            return "\n".join(lines) + "\n"


def decode_image_url(url: str, limits: ServerLimits) -> bytes | str:
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if ";base64" not in header:
            raise ApiError(400, "image data URLs must be base64 encoded (data:image/png;base64,...)", "messages")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, "image data URL is not valid base64", "messages") from None
    if url.startswith(("http://", "https://")):
        raise ApiError(400, "this server never fetches images from the network: send them as data: URLs", "messages")
    path = url[len("file://"):] if url.startswith("file://") else url
    if not limits.allow_local_files:
        raise ApiError(400, "local image paths are disabled: send images as data: URLs, or start the server with --allow-local-files", "messages")
    if not Path(path).is_file():
        raise ApiError(400, f"image file not found: {path}", "messages")
    return path


def parse_chat(body: dict[str, Any], limits: ServerLimits) -> tuple[Conversation, list[bytes | str]]:
    """OpenAI messages → vicuna_v1 conversation + images in order."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", "messages")
    conv = Conversation()
    images: list[bytes | str] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or msg.get("role") not in ("system", "user", "assistant"):
            raise ApiError(400, f"messages[{i}] needs a role of system, user or assistant", "messages")
        content = msg.get("content")
        texts, msg_images = [], []
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    texts.append(str(part.get("text", "")))
                elif kind == "image_url":
                    url = part.get("image_url")
                    url = url.get("url") if isinstance(url, dict) else url
                    if not isinstance(url, str):
                        raise ApiError(400, f"messages[{i}]: image_url needs a url", "messages")
                    msg_images.append(decode_image_url(url, limits))
                else:
                    raise ApiError(400, f"messages[{i}]: unsupported content part type {kind!r}", "messages")
        elif content is not None:
            raise ApiError(400, f"messages[{i}].content must be a string or a list of parts", "messages")
        text = "\n".join(texts)
        if msg["role"] == "system":
            conv.system = text or SYSTEM_V1
        elif msg["role"] == "user":
            conv.add_user(text, num_images=len(msg_images))
            images += msg_images
        else:
            if msg_images:
                raise ApiError(400, "assistant messages cannot carry images", "messages")
            conv.add_assistant(text)
    if conv.messages and conv.messages[-1][0] != conv.roles[0]:
        raise ApiError(400, "the last message must be from the user", "messages")
    if len(images) > limits.max_images:
        raise ApiError(400, f"{len(images)} images in one request; the limit is {limits.max_images}", "messages")
    conv.add_assistant(None)
    return conv, images


def parse_sampling(body: dict[str, Any], limits: ServerLimits) -> SamplingParams:
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens", min(256, limits.max_tokens)))
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise ApiError(400, "max_tokens must be a positive integer", "max_tokens")
    if max_tokens > limits.max_tokens:
        raise ApiError(400, f"max_tokens {max_tokens} is above this server's limit of {limits.max_tokens}", "max_tokens")
    if body.get("n", 1) != 1:
        raise ApiError(400, "only n=1 is supported", "n")
    stop = body.get("stop") or ()
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    try:
        params = SamplingParams(
            max_new_tokens=max_tokens,
            temperature=float(body.get("temperature", 1.0) if body.get("temperature") is not None else 1.0),
            top_p=float(body.get("top_p", 1.0) if body.get("top_p") is not None else 1.0),
            seed=body.get("seed"),
            stop=stop,
            ignore_eos=bool(body.get("ignore_eos", False)),
        )
        params.validate()
    except (TypeError, ValueError) as exc:
        raise ApiError(400, str(exc)) from None
    return params


@dataclass
class Finished:
    """The last item of a backend's stream: what the usage block and metrics need."""

    timings: Timings
    completion_tokens: int
    prompt_tokens: int


def stream_one(
    pipeline: Pipeline, request: Request, params: SamplingParams, image_embeds: list | None = None, timings: list[Timings] | None = None
) -> Iterator[TokenEvent | Finished]:
    """One request's token events, then its Finished (usage and timings): what every backend streams."""
    tokens = 0
    for ev in pipeline.stream([request], params, image_embeds=image_embeds, timings=timings):
        tokens += 1
        yield ev
    t = pipeline.last_timings[0] if pipeline.last_timings else Timings()
    yield Finished(t, tokens, pipeline.last_prompt_tokens[0] if pipeline.last_prompt_tokens else 0)


class ChatBackend(Protocol):
    """What the HTTP app needs from whatever runs generation (one process, or Ray replicas)."""

    info: dict[str, Any]
    concurrency: int  # requests it runs at once; the app queues max_queue more before 429

    def prepare(self, conv: Conversation, images: list[bytes | str]) -> Any:
        """Decode/check inputs before queueing, so a bad image is a 400 (ApiError/ConvLlavaError)."""
        ...

    def stream(self, prepared: Any, params: SamplingParams) -> AsyncIterator[TokenEvent | Finished]:
        """Token events, then one Finished; failures raise ApiError."""
        ...


class LocalBackend:
    """Generation in this process: one worker thread, since a Pipeline is not re-entrant."""

    concurrency = 1

    def __init__(self, pipeline: Pipeline, limits: ServerLimits) -> None:
        self.pipeline = pipeline
        self.limits = limits
        self.info = pipeline.info
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="convllava-generate")

    def prepare(self, conv: Conversation, images: list[bytes | str]) -> Request:
        from ..preprocess import load_image

        return Request(conv, [load_image(im, max_pixels=self.limits.max_image_pixels) for im in images])

    async def stream(self, prepared: Request, params: SamplingParams) -> AsyncIterator[TokenEvent | Finished]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()
        pipeline = self.pipeline

        def run() -> None:
            try:
                for item in stream_one(pipeline, prepared, params):
                    if cancel.is_set():
                        break
                    loop.call_soon_threadsafe(events.put_nowait, item)
            except ConvLlavaError as exc:
                loop.call_soon_threadsafe(events.put_nowait, ApiError(400, str(exc), "messages"))
            except Exception as exc:  # noqa: BLE001
                loop.call_soon_threadsafe(events.put_nowait, ApiError(500, f"generation failed: {type(exc).__name__}: {exc}", kind="server_error"))

        self.worker.submit(run)
        try:
            while True:
                item = await events.get()
                if isinstance(item, ApiError):
                    raise item
                yield item
                if isinstance(item, Finished):
                    return
        finally:
            cancel.set()  # the client went away or the stream ended: stop generating


def create_app(backend: Pipeline | ChatBackend, model_name: str = "convllava", limits: ServerLimits | None = None):
    """The OpenAI-compatible FastAPI app over a Pipeline (this process) or any ChatBackend."""
    limits = limits or ServerLimits()
    if isinstance(backend, Pipeline):
        backend = LocalBackend(backend, limits)
    app = FastAPI(title="convllava-export", version="1")
    metrics = Metrics()
    state = {"active": 0}
    created = int(time.time())
    capacity = backend.concurrency + limits.max_queue

    def error_response(err: ApiError) -> JSONResponse:
        metrics.request(err.status)
        return JSONResponse(err.body(), status_code=err.status)

    @app.middleware("http")
    async def limit_body(request: HttpRequest, call_next):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limits.max_body_bytes:
            return error_response(ApiError(413, f"request body of {length} bytes is above the limit of {limits.max_body_bytes}", code="body_too_large"))
        return await call_next(request)

    @app.exception_handler(Exception)
    async def unexpected(request: HttpRequest, exc: Exception):  # never take the server down
        return error_response(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", kind="server_error"))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, **backend.info, "queue_depth": metrics.queue_depth}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "convllava-export"}]}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions")
    async def chat(request: HttpRequest):
        body_bytes = await request.body()
        if len(body_bytes) > limits.max_body_bytes:
            return error_response(ApiError(413, f"request body is above the limit of {limits.max_body_bytes} bytes", code="body_too_large"))
        try:
            body = json.loads(body_bytes)
            if not isinstance(body, dict):
                raise ValueError("not an object")
        except (ValueError, UnicodeDecodeError):
            return error_response(ApiError(400, "request body must be a JSON object"))
        try:
            if body.get("model") not in (None, model_name):
                raise ApiError(404, f"model {body.get('model')!r} does not exist; this server serves {model_name!r}", "model", code="model_not_found")
            conv, images = parse_chat(body, limits)
            params = parse_sampling(body, limits)
            prepared = backend.prepare(conv, images)
        except ApiError as err:
            return error_response(err)
        except ConvLlavaError as exc:
            return error_response(ApiError(400, str(exc), "messages"))
        if state["active"] >= capacity:
            return error_response(ApiError(429, f"server busy: {state['active']} requests running or queued (limit {capacity}); retry later", kind="rate_limit_error", code="queue_full"))
        state["active"] += 1
        metrics.queue_depth = state["active"]
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        events = backend.stream(prepared, params)

        async def finish() -> None:
            await events.aclose()
            state["active"] -= 1
            metrics.queue_depth = state["active"]

        if body.get("stream"):

            async def sse():
                try:
                    head = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model_name}
                    yield f"data: {json.dumps({**head, 'choices': [{'index': 0, 'delta': {'role': 'assistant', 'content': ''}, 'finish_reason': None}]})}\n\n"
                    try:
                        async for item in events:
                            if isinstance(item, Finished):
                                metrics.generation(item.timings, item.completion_tokens)
                                metrics.request(200)
                            elif item.text or item.finish_reason:
                                delta = {"content": item.text} if item.text else {}
                                yield f"data: {json.dumps({**head, 'choices': [{'index': 0, 'delta': delta, 'finish_reason': item.finish_reason}]})}\n\n"
                    except ApiError as err:
                        metrics.request(err.status)
                        yield f"data: {json.dumps(err.body())}\n\n"
                    yield "data: [DONE]\n\n"
                finally:
                    await finish()

            return StreamingResponse(sse(), media_type="text/event-stream")
        text, reason = "", "length"
        try:
            async for item in events:
                if isinstance(item, Finished):
                    done = item
                else:
                    text += item.text
                    reason = item.finish_reason or reason
        except ApiError as err:
            return error_response(err)
        finally:
            await finish()
        metrics.generation(done.timings, done.completion_tokens)
        metrics.request(200)
        return {
            "id": rid,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}],
            "usage": {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens, "total_tokens": done.prompt_tokens + done.completion_tokens},
            "timings": done.timings.to_dict(),
        }

    app.state.metrics = metrics
    app.state.limits = limits
    app.state.backend = backend
    return app


def serve(pipeline: Pipeline, host: str = "127.0.0.1", port: int = 8000, model_name: str = "convllava", limits: ServerLimits | None = None) -> None:
    import uvicorn

    uvicorn.run(create_app(pipeline, model_name, limits), host=host, port=port, log_level="warning")
