"""OpenAI-compatible HTTP server over a Pipeline (FastAPI + uvicorn).

The app talks to a ChatBackend. In one process that is a ServingLoop (serving_loop.py): an
encoder thread decodes and encodes the images of admitted requests, and a scheduler thread
(scheduler.py) batches requests in flight: it admits a request when its KV cache (prompt +
max_tokens) fits the KV budget, prefills prompts in chunks, and runs one batched decode step for
every running sequence. On Ray Serve (ray_serve.py) each LLM replica runs such a loop. The app
takes at most the backend's concurrency plus `max_queue` requests at once and answers 429
beyond. Bad requests get a 4xx with an OpenAI-style error body. Images come as data: URLs;
local paths only with allow_local_files; nothing is ever fetched.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import math
import socket
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

import numpy as np

from ..errors import ConvLlavaError
from ..extras import require

require("fastapi", "fastapi", "the HTTP server")
from fastapi import FastAPI  # noqa: E402
from fastapi import Request as HttpRequest  # noqa: E402  (module level: FastAPI resolves annotations here)
from fastapi.exceptions import RequestValidationError  # noqa: E402
from fastapi.responses import JSONResponse, Response, StreamingResponse  # noqa: E402

from ..preprocess import PreprocessConfig, preprocess
from ..prompt import IMAGE_TOKEN, SYSTEM_V1, Conversation
from .serving_loop import Finished, LoopSettings, QueueFull, ServerFault, ServingLoop
from .generation import NO_TOKEN, TokenEvent
from .pipeline import Pipeline, Request
from .sampling import SamplingParams

log = logging.getLogger("convllava_export.server")


@dataclass
class ServerLimits:
    """What one request may cost. Each limit is checked before the step it protects."""

    max_body_bytes: int = 20 << 20  # counted while reading, chunked bodies too
    max_image_pixels: int = 40_000_000  # checked from the image header, before decoding
    max_images: int | None = None  # per request; None: the build's vision profile batch (8 without one)
    max_tokens: int = 1024
    max_queue: int = 8  # waiting requests beyond those running; 429 with Retry-After beyond
    max_stop: int = 16  # stop strings per request
    max_stop_chars: int = 256  # characters per stop string
    allow_local_files: bool = False


DEFAULT_MAX_IMAGES = 8
RETRY_AFTER_S = 1


DRAIN_MARGIN_S = 1.0  # streams still open this long before uvicorn's forced close get their error event and [DONE]


class Drain:
    """The shutdown drain as the streams see it: once SIGTERM arrives (`begin`, from the server's
    signal handling), a request still running at `deadline` ends with a 503 error event and
    [DONE] (its row freed) instead of a connection cut in the middle of a chunk."""

    def __init__(self) -> None:
        self.deadline: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._begun: asyncio.Future | None = None  # one future every stream waits on (no task per token)

    def begin(self, drain_s: float) -> None:
        if self.deadline is None:
            self.deadline = time.monotonic() + max(0.0, drain_s - DRAIN_MARGIN_S)
            if self._loop is not None:
                self._loop.call_soon_threadsafe(self._settle)

    def _settle(self) -> None:
        if self._begun is not None and not self._begun.done():
            self._begun.set_result(None)

    async def next(self, events: AsyncIterator[Any]) -> Any:
        """The next event of `events`, or ApiError(503) once the drain's deadline passes first.
        However this ends (the event, the deadline, or the caller cancelled when its client
        left), the pending read is settled before returning, so `events` can be closed and its
        request freed."""
        if self._begun is None:
            self._loop = asyncio.get_running_loop()
            self._begun = self._loop.create_future()
        task = asyncio.ensure_future(anext(events))
        try:
            if self.deadline is None:
                await asyncio.wait({task, self._begun}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done():
                await asyncio.wait({task}, timeout=max(0.0, (self.deadline or 0.0) - time.monotonic()))
            if task.done():
                return task.result()
            raise ApiError(503, "the server is shutting down; retry the request", kind="server_error", code="shutting_down")
        finally:
            if not task.done():
                task.cancel()  # the generator's own cleanup (its request's row freed) runs here
                await asyncio.wait({task})


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def internal_error(exc: BaseException, where: str, what: str = "internal error") -> ApiError:
    """A 500 whose body says nothing about the server's internals; the log gets the traceback
    (`what`: a message of our own, e.g. a ServerFault's, never a third party's)."""
    ref = uuid.uuid4().hex[:12]
    log.error("%s failed (ref %s)", where, ref, exc_info=exc)
    return ApiError(500, f"{what} (ref {ref}); the server log has the details", kind="server_error")


class Metrics:
    """/metrics through prometheus_client, one registry per app (several apps in one process)."""

    def __init__(self, backend: Any, state: dict[str, int]) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        latency = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.requests = Counter("convllava_requests", "HTTP requests to the API by status.", ["status"], registry=r)
        self.ttft = Histogram("convllava_time_to_first_token_seconds", "Time to first token, submit to first token.", buckets=latency, registry=r)
        self.tpot = Histogram("convllava_time_per_output_token_seconds", "Decode time per output token, per request.", buckets=latency, registry=r)
        self.itl = Histogram("convllava_inter_token_latency_seconds", "Time between two streamed tokens.", buckets=latency, registry=r)
        self.e2e = Histogram("convllava_request_latency_seconds", "Request latency, first byte in to last token out.", buckets=latency, registry=r)
        self.tokens = Counter("convllava_generated_tokens", "Tokens generated.", registry=r)
        self.queue_depth = Gauge("convllava_queue_depth", "Requests admitted by the API: running or waiting.", registry=r)
        self.queue_depth.set_function(lambda: state["active"])
        serving_loop = getattr(backend, "serving_loop", None)
        if serving_loop is not None:
            r.register(_LoopCollector(serving_loop))

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    def finished(self, done: Finished, latency_s: float) -> None:
        self.ttft.observe(done.timings.ttft_s)
        if done.timings.decode_tokens:
            self.tpot.observe(done.timings.decode_s / done.timings.decode_tokens)
        self.e2e.observe(latency_s)
        self.tokens.inc(done.completion_tokens)


class _LoopCollector:
    """The serving loop's counters (scheduler.SchedulerStats) as Prometheus metrics, read at scrape time."""

    def __init__(self, serving_loop: ServingLoop) -> None:
        self.serving_loop = serving_loop

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        st = self.serving_loop.stats
        yield GaugeMetricFamily("convllava_running_sequences", "Sequences in the running batch.", value=st.running)
        yield GaugeMetricFamily("convllava_waiting_requests", "Requests submitted to the serving loop, not yet running.", value=st.waiting)
        yield GaugeMetricFamily("convllava_kv_cache_bytes", "Bytes of the running rows' KV cache buffers.", value=st.kv_bytes)
        yield GaugeMetricFamily("convllava_kv_cache_budget_bytes", "The KV budget admission counts against.", value=st.kv_budget_bytes)
        steps = dict(st.batch_sizes)  # a copy: the scheduler thread keeps counting
        buckets = [(str(edge), sum(n for size, n in steps.items() if size <= edge)) for edge in BATCH_BUCKETS]
        buckets.append(("+Inf", sum(steps.values())))
        yield HistogramMetricFamily("convllava_batch_size", "Sequences per decode step.", buckets=buckets, sum_value=st.decoded_rows)
        yield CounterMetricFamily("convllava_encoder_cache_hits", "Images whose embeddings came from the encoder cache.", value=st.encoder_hits)
        yield CounterMetricFamily("convllava_encoder_cache_misses", "Images encoded by the vision engine.", value=st.encoder_misses)
        yield CounterMetricFamily("convllava_prompt_tokens", "Prompt positions admitted.", value=st.prompt_tokens)
        yield CounterMetricFamily("convllava_prefix_cache_hit_tokens", "Prompt positions whose KV cache was reused.", value=st.prefix_hit_tokens)
        yield CounterMetricFamily("convllava_prefill_passes", "Prefill passes (each runs the next chunk of the pending prompts).", value=st.prefill_passes)
        yield CounterMetricFamily("convllava_prefill_seconds", "Wall time inside prefill passes.", value=st.prefill_s)
        yield CounterMetricFamily("convllava_decode_seconds", "Wall time inside batched decode steps.", value=st.decode_s)
        total = st.encoder_hits + st.encoder_misses
        yield GaugeMetricFamily("convllava_encoder_cache_hit_ratio", "Encoder cache hits / lookups since start.", value=st.encoder_hits / total if total else 0.0)


BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


@dataclass(frozen=True)
class ImageSource:
    """An image as the client sent it; decoded only once the request is admitted, off the event loop."""

    data: str  # base64 payload of a data: URL, or a local path
    is_path: bool = False


def image_source(url: str, limits: ServerLimits) -> ImageSource:
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if ";base64" not in header:
            raise ApiError(400, "image data URLs must be base64 encoded (data:image/png;base64,...)", "messages")
        return ImageSource(payload)
    if url.startswith(("http://", "https://")):
        raise ApiError(400, "this server never fetches images from the network: send them as data: URLs", "messages")
    if not limits.allow_local_files:
        raise ApiError(400, "local image paths are disabled: send images as data: URLs, or start the server with --allow-local-files", "messages")
    return ImageSource(url[len("file://"):] if url.startswith("file://") else url, is_path=True)


def open_image(source: ImageSource, limits: ServerLimits):
    """Decode one image within the pixel limit (header checked before the pixels are decoded).

    Local paths get one wording for every failure, so a client cannot probe which files exist.
    """
    from ..preprocess import load_image

    if source.is_path:
        try:
            if not Path(source.data).is_file():  # also refuses FIFOs and devices, which could block
                raise FileNotFoundError
            return load_image(source.data, max_pixels=limits.max_image_pixels)
        except (OSError, ConvLlavaError):
            raise ApiError(400, f"cannot use image file {source.data!r}: it must be a readable image file within the limits", "messages") from None
    try:
        raw = base64.b64decode(source.data, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "image data URL is not valid base64", "messages") from None
    try:
        return load_image(raw, max_pixels=limits.max_image_pixels)
    except ConvLlavaError as exc:
        raise ApiError(400, str(exc), "messages") from None


def image_pixels(images: list[ImageSource], limits: ServerLimits, cfg: PreprocessConfig) -> list[np.ndarray]:
    """Decode and preprocess each image in turn: one decoded full-size image in memory at a time."""
    return [preprocess(open_image(im, limits), cfg) for im in images]


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ApiError(400, f"{where} must be a string", "messages")
    if IMAGE_TOKEN in value:
        raise ApiError(400, f"{where} contains '{IMAGE_TOKEN}': attach images as image_url content parts instead", "messages")
    return value


def parse_chat(body: dict[str, Any], limits: ServerLimits) -> tuple[Conversation, list[ImageSource]]:
    """OpenAI messages → vicuna_v1 conversation + images in order (not decoded yet)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", "messages")
    max_images = limits.max_images or DEFAULT_MAX_IMAGES
    conv = Conversation()
    images: list[ImageSource] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or msg.get("role") not in ("system", "user", "assistant"):
            raise ApiError(400, f"messages[{i}] needs a role of system, user or assistant", "messages")
        content = msg.get("content")
        texts, msg_images = [], []
        if isinstance(content, str):
            texts.append(_text(content, f"messages[{i}].content"))
        elif isinstance(content, list):
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    texts.append(_text(part.get("text"), f"messages[{i}].content[{j}].text"))
                elif kind == "image_url":
                    url = part.get("image_url")
                    url = url.get("url") if isinstance(url, dict) else url
                    if not isinstance(url, str):
                        raise ApiError(400, f"messages[{i}].content[{j}]: image_url needs a url string", "messages")
                    if len(images) + len(msg_images) >= max_images:
                        raise ApiError(400, f"more than {max_images} images in one request (this server's limit)", "messages")
                    msg_images.append(image_source(url, limits))
                else:
                    raise ApiError(400, f"messages[{i}].content[{j}]: unsupported content part type {str(kind)[:40]!r}", "messages")
        elif content is not None:
            raise ApiError(400, f"messages[{i}].content must be a string or a list of parts", "messages")
        text = "\n".join(texts)
        if msg["role"] == "user":
            conv.add_user(text, num_images=len(msg_images))
            images += msg_images
        elif msg_images:
            raise ApiError(400, f"messages[{i}]: only user messages can carry images", "messages")
        elif msg["role"] == "system":
            conv.system = text or SYSTEM_V1
        else:
            conv.add_assistant(text)
    if conv.messages and conv.messages[-1][0] != conv.roles[0]:
        raise ApiError(400, "the last message must be from the user", "messages")
    conv.add_assistant(None)
    return conv, images


def _field(body: dict[str, Any], names: tuple[str, ...], kinds: tuple[type, ...], what: str, default: Any) -> Any:
    """body[name] for the first name present, strictly typed: a bool is not a number, NaN/inf are not numbers."""
    name = next((n for n in names if body.get(n) is not None), names[0])
    value = body.get(name)
    if value is None:
        return default
    number = float in kinds or int in kinds
    if (bool not in kinds and isinstance(value, bool)) or not isinstance(value, kinds) or (number and isinstance(value, float) and not math.isfinite(value)):
        raise ApiError(400, f"'{name}' must be {what}", name)
    return value


def parse_sampling(body: dict[str, Any], limits: ServerLimits) -> SamplingParams:
    max_tokens = _field(body, ("max_completion_tokens", "max_tokens"), (int,), "a positive integer", min(256, limits.max_tokens))
    if max_tokens < 1:
        raise ApiError(400, "max_tokens must be a positive integer", "max_tokens")
    if max_tokens > limits.max_tokens:
        raise ApiError(400, f"max_tokens {max_tokens} is above this server's limit of {limits.max_tokens}", "max_tokens")
    if _field(body, ("n",), (int,), "the integer 1", 1) != 1:
        raise ApiError(400, "only n=1 is supported", "n")
    temperature = float(_field(body, ("temperature",), (int, float), "a finite number", 1.0))
    if not 0 <= temperature <= 2:
        raise ApiError(400, f"temperature must be between 0 and 2, got {temperature}", "temperature")
    top_p = float(_field(body, ("top_p",), (int, float), "a finite number", 1.0))
    if not 0 < top_p <= 1:
        raise ApiError(400, f"top_p must be in (0, 1], got {top_p}", "top_p")
    seed = _field(body, ("seed",), (int,), "an integer", None)
    if seed is not None and not 0 <= seed < 2**63:
        raise ApiError(400, "seed must be an integer in [0, 2^63)", "seed")
    stop = _field(body, ("stop",), (str, list), "a string or a list of strings", [])
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > limits.max_stop or not all(isinstance(s, str) and len(s) <= limits.max_stop_chars for s in stop):
        raise ApiError(400, f"'stop' must be at most {limits.max_stop} strings of at most {limits.max_stop_chars} characters", "stop")
    ignore_eos = _field(body, ("ignore_eos",), (bool,), "a boolean", False)
    return SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=tuple(stop), ignore_eos=ignore_eos)


class ChatBackend(Protocol):
    """What the HTTP app needs from whatever runs generation (one process, or Ray replicas)."""

    info: dict[str, Any]  # shown on /health: no paths or secrets
    concurrency: int  # requests it runs at once; the app queues max_queue more before 429

    def stream(self, conv: Conversation, images: list[ImageSource], params: SamplingParams) -> AsyncIterator[TokenEvent | Finished]:
        """Decode the images (off the event loop), then token events and one Finished.

        Failures raise ApiError: a client's mistake (bad image, prompt too long) as a 4xx.
        """
        ...

    def healthy(self) -> bool:
        """False once it cannot serve any more (a dead serving-loop thread): /health answers 503."""
        ...

    def close(self) -> None:
        """Stop, ending whatever still runs (called on shutdown, after the drain)."""
        ...


class LocalBackend:
    """Generation in this process through one ServingLoop: in-flight batching of up to
    `max_running` sequences, images decoded on the loop's encoder thread."""

    def __init__(self, pipeline: Pipeline, limits: ServerLimits, settings: LoopSettings | None = None) -> None:
        base = settings or LoopSettings()
        settings = replace(base, max_waiting=limits.max_queue)
        self.serving_loop = ServingLoop(pipeline, settings)
        self.limits = limits
        self.concurrency = settings.max_running
        self.info = {**pipeline.info, "max_running": settings.max_running}
        if self.serving_loop.scheduler is not None:
            self.info["kv_cache_mb"] = round(self.serving_loop.scheduler.settings.kv_budget_bytes / (1 << 20))

    def healthy(self) -> bool:
        return self.serving_loop.healthy

    def close(self) -> None:
        self.serving_loop.close()

    async def stream(self, conv: Conversation, images: list[ImageSource], params: SamplingParams) -> AsyncIterator[TokenEvent | Finished]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        limits, cfg = self.limits, self.serving_loop.pipeline.preprocess_cfg
        try:
            handle = self.serving_loop.submit(
                Request(conv), params, lambda item: loop.call_soon_threadsafe(events.put_nowait, item), pixels=lambda: image_pixels(images, limits, cfg)
            )
        except QueueFull as exc:
            raise ApiError(429, str(exc), kind="rate_limit_error", code="queue_full") from None
        except ServerFault as exc:
            raise ApiError(503, str(exc), kind="server_error", code="engine_stopped") from None
        try:
            while True:
                item = await events.get()
                if isinstance(item, BaseException):
                    raise as_api_error(item)
                yield item
                if isinstance(item, Finished):
                    return
        finally:
            handle.cancel()  # the client went away or the stream ended: the serving loop drops the sequence


def as_api_error(exc: BaseException) -> ApiError:
    """What a client sees of a failure: its own mistake as a 400, anything else as an opaque 500."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ServerFault):  # the server's own failure: our words, the cause in the log
        return internal_error(exc.__cause__ or exc, "generation", str(exc))
    if isinstance(exc, ConvLlavaError):
        return ApiError(400, str(exc), "messages")
    return internal_error(exc, "generation")


async def read_body(request: HttpRequest, limit: int) -> bytes:
    """The request body, refused as soon as it passes `limit` (Content-Length or not)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"request body of {length} bytes is above the limit of {limit}", code="body_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"request body is above the limit of {limit} bytes", code="body_too_large")
    return bytes(body)


def parse_json(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except RecursionError:
        raise ApiError(400, "request body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "request body must be a JSON object") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    return body


def usage(done: Finished) -> dict[str, Any]:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": done.cached_prompt_tokens},
    }


def create_app(backend: Pipeline | ChatBackend, model_name: str = "convllava", limits: ServerLimits | None = None, loop_settings: LoopSettings | None = None):
    """The OpenAI-compatible FastAPI app over a Pipeline (served by a ServingLoop in this process) or any ChatBackend."""
    backend, limits = _backend_and_limits(backend, limits, loop_settings)
    app = FastAPI(title="convllava-export", version="1", lifespan=_closing(backend))
    state = {"active": 0}
    ctx = _App(backend, model_name, limits, Metrics(backend, state), state, int(time.time()), backend.concurrency + limits.max_queue, Drain())
    _add_error_handlers(app, ctx)
    _add_info_routes(app, ctx)
    _add_chat_route(app, ctx)
    app.state.metrics = ctx.metrics
    app.state.limits = limits
    app.state.backend = backend
    app.state.drain = ctx.drain
    return app


def _backend_and_limits(backend: Pipeline | ChatBackend, limits: ServerLimits | None, loop_settings: LoopSettings | None) -> tuple[ChatBackend, ServerLimits]:
    """The limits with `max_images` resolved, and the backend (a Pipeline gets a LocalBackend: a ServingLoop starts)."""
    limits = limits or ServerLimits()
    if limits.max_images is None:  # as many as one vision-engine run takes
        limits = replace(limits, max_images=int(getattr(backend, "info", {}).get("max_images") or DEFAULT_MAX_IMAGES))
    if isinstance(backend, Pipeline):
        backend = LocalBackend(backend, limits, loop_settings)
    return backend, limits


def _closing(backend: ChatBackend):
    """The app's lifespan: on shutdown, after uvicorn's drain, the backend ends whatever still runs."""

    @asynccontextmanager
    async def lifespan(app):
        yield
        close = getattr(backend, "close", None)
        if close is not None:
            await asyncio.to_thread(close)

    return lifespan


@dataclass
class _App:
    """What the routes of one app share."""

    backend: ChatBackend
    model_name: str
    limits: ServerLimits
    metrics: Metrics
    state: dict[str, int]  # "active": requests admitted by the API, running or waiting
    created: int
    capacity: int  # the backend's concurrency + max_queue: 429 beyond
    drain: Drain

    def error_response(self, err: ApiError) -> JSONResponse:
        self.metrics.requests.labels(str(err.status)).inc()
        headers = {"Retry-After": str(RETRY_AFTER_S)} if err.status == 429 else None
        return JSONResponse(err.body(), status_code=err.status, headers=headers)


def _add_error_handlers(app: FastAPI, ctx: _App) -> None:
    @app.exception_handler(Exception)
    async def unexpected(request: HttpRequest, exc: Exception):  # never take the server down, never leak internals
        return ctx.error_response(internal_error(exc, f"{request.method} {request.url.path}"))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: HttpRequest, exc: RequestValidationError):
        return ctx.error_response(ApiError(400, "invalid request"))


def _add_info_routes(app: FastAPI, ctx: _App) -> None:
    """GET /health, /v1/models and /metrics."""
    model_name, backend, state = ctx.model_name, ctx.backend, ctx.state

    @app.get("/health")
    async def health():
        healthy = getattr(backend, "healthy", None)
        if healthy is not None and not healthy():
            return JSONResponse({"status": "error", "model": model_name, "error": "the engine has stopped; restart the server"}, status_code=503)
        return {"status": "ok", "model": model_name, **backend.info, "queue_depth": state["active"]}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": ctx.created, "owned_by": "convllava-export"}]}

    @app.get("/metrics")
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(ctx.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@dataclass(frozen=True)
class ChatCall:
    """A parsed POST /v1/chat/completions body."""

    conv: Conversation
    images: list[ImageSource]
    params: SamplingParams
    stream: bool
    include_usage: bool  # OpenAI's stream_options.include_usage: one last chunk with the usage
    per_chunk_usage: bool  # vLLM's stream_options.continuous_usage_stats: usage on every chunk


async def read_chat_call(request: HttpRequest, limits: ServerLimits, model_name: str) -> ChatCall:
    """Read and check a chat completion request (ApiError for a client's mistake)."""
    body = await asyncio.to_thread(parse_json, await read_body(request, limits.max_body_bytes))
    model = body.get("model")
    if model is not None and model != model_name:
        raise ApiError(404, f"model {str(model)[:100]!r} does not exist; this server serves {model_name!r}", "model", code="model_not_found")
    stream = _field(body, ("stream",), (bool,), "a boolean", False)
    stream_options = _field(body, ("stream_options",), (dict,), "an object", {})
    include_usage = _field(stream_options, ("include_usage",), (bool,), "a boolean", False)
    per_chunk_usage = _field(stream_options, ("continuous_usage_stats",), (bool,), "a boolean", False)  # vLLM's: usage on every chunk
    conv, images = parse_chat(body, limits)
    params = parse_sampling(body, limits)
    return ChatCall(conv, images, params, stream, include_usage, per_chunk_usage)


def _add_chat_route(app: FastAPI, ctx: _App) -> None:
    """POST /v1/chat/completions: parse, admit (429 beyond capacity), then stream or answer at once."""

    @app.post("/v1/chat/completions")
    async def chat(request: HttpRequest):
        try:
            call = await read_chat_call(request, ctx.limits, ctx.model_name)
        except ApiError as err:
            return ctx.error_response(err)
        state = ctx.state
        if state["active"] >= ctx.capacity:
            return ctx.error_response(ApiError(429, f"server busy: {state['active']} requests running or queued (limit {ctx.capacity}); retry later", kind="rate_limit_error", code="queue_full"))
        state["active"] += 1
        started = time.perf_counter()
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        events = ctx.backend.stream(call.conv, call.images, call.params)

        async def finish() -> None:
            await events.aclose()
            state["active"] -= 1

        # The first event decides the status: a bad image or an over-long prompt is a 4xx, not a 200 stream.
        try:
            first = await anext(events)
        except ApiError as err:
            await finish()
            return ctx.error_response(err)
        except BaseException:
            await finish()
            raise
        items = _timed_events(first, events, ctx.metrics, ctx.drain)
        if call.stream:
            return StreamingResponse(_sse(ctx, call, rid, started, items, finish), media_type="text/event-stream")
        return await _completion(ctx, rid, started, items, finish)


async def _timed_events(first: TokenEvent | Finished, events: AsyncIterator[TokenEvent | Finished], metrics: Metrics, drain: Drain) -> AsyncIterator[TokenEvent | Finished]:
    """The first event, then the rest (until the shutdown drain's deadline), observing the time between two tokens."""
    last = time.perf_counter()
    yield first
    while True:
        try:
            item = await drain.next(events)
        except StopAsyncIteration:
            return
        if isinstance(item, TokenEvent):
            now = time.perf_counter()
            metrics.itl.observe(now - last)
            last = now
        yield item


async def _sse(ctx: _App, call: ChatCall, rid: str, started: float, items: AsyncIterator[TokenEvent | Finished], finish: Callable[[], Awaitable[None]]) -> AsyncIterator[str]:
    """The streamed answer: server-sent chat.completion.chunk events, an error event, then [DONE]."""
    metrics = ctx.metrics
    try:
        head = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": ctx.model_name}
        yield f"data: {json.dumps({**head, 'choices': [{'index': 0, 'delta': {'role': 'assistant', 'content': ''}, 'finish_reason': None}]})}\n\n"
        prompt_tokens, completion = 0, 0
        try:
            async for item in items:
                if call.per_chunk_usage and isinstance(item, TokenEvent):  # one chunk per token, text or not (random weights)
                    completion += item.token_id != NO_TOKEN
                    prompt_tokens = item.prompt_tokens or prompt_tokens
                    running = {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}
                    delta = {"content": item.text} if item.text else {}
                    yield f"data: {json.dumps({**head, 'choices': [{'index': 0, 'delta': delta, 'finish_reason': item.finish_reason}], 'usage': running})}\n\n"
                    continue
                if isinstance(item, Finished):
                    metrics.finished(item, time.perf_counter() - started)
                    metrics.requests.labels("200").inc()
                    if call.include_usage:  # OpenAI's stream_options: one last chunk with the usage
                        yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage(item)})}\n\n"
                elif item.text or item.finish_reason:
                    delta = {"content": item.text} if item.text else {}
                    yield f"data: {json.dumps({**head, 'choices': [{'index': 0, 'delta': delta, 'finish_reason': item.finish_reason}]})}\n\n"
        except ApiError as err:
            metrics.requests.labels(str(err.status)).inc()
            yield f"data: {json.dumps(err.body())}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        await finish()


async def _completion(ctx: _App, rid: str, started: float, items: AsyncIterator[TokenEvent | Finished], finish: Callable[[], Awaitable[None]]):
    """The whole answer as one chat.completion object (or the error that ended it)."""
    text, reason = "", "length"
    try:
        async for item in items:
            if isinstance(item, Finished):
                done = item
            else:
                text += item.text
                reason = item.finish_reason or reason
    except ApiError as err:
        return ctx.error_response(err)
    finally:
        await finish()
    ctx.metrics.finished(done, time.perf_counter() - started)
    ctx.metrics.requests.labels("200").inc()
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": ctx.model_name,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}],
        "usage": usage(done),
        "timings": done.timings.to_dict(),
    }


def serve(
    pipeline: Pipeline,
    host: str = "127.0.0.1",
    port: int = 8000,
    model_name: str = "convllava",
    limits: ServerLimits | None = None,
    sock: socket.socket | None = None,
    loop_settings: LoopSettings | None = None,
    drain_s: float = 30.0,
) -> None:
    """Run the app with uvicorn; `sock` is a socket bound beforehand (bind errors before the model
    loads). On SIGTERM, running streams get `drain_s` seconds, then the serving loop ends what is left."""
    import uvicorn

    app = create_app(pipeline, model_name, limits, loop_settings)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=drain_s)

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            app.state.drain.begin(drain_s)  # streams end cleanly before uvicorn closes what is left
            super().handle_exit(sig, frame)

    server = DrainingServer(config)
    server.run(sockets=[sock] if sock is not None else None)
