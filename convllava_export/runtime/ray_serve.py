"""The pipeline as a Ray Serve application: ingress → vision replicas → LLM replicas.

    HTTP ─► Ingress (FastAPI: the single-process server's app, same API and limits)
              │ decode + preprocess images, then per image
              ├─► VisionEncoder  (@serve.batch: concurrent images of equal shape share a run)
              └─► LLMWorker × N  (a ServingLoop each: requests batched in flight, admitted by KV bytes)

The same application is built from Python (`convllava-export serve --engine ray`) and from a
Serve config (`serve deploy`, KubeRay's RayService) through `app_builder`, with the
deployment options of `deployment_options`, so both paths deploy exactly the same thing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConvLlavaError
from ..extras import require
from ..manifest import Manifest

require("ray.serve", "ray", "serving on Ray (--engine ray)")
from ray import serve  # noqa: E402
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError  # noqa: E402

from ..prompt import Conversation  # noqa: E402
from .generation import Timings, TokenEvent  # noqa: E402
from .sampling import SamplingParams  # noqa: E402
from .serving_loop import Finished, LoopSettings, QueueFull, ServerFault  # noqa: E402
from .server import ApiError, ImageSource, ServerLimits, create_app, image_pixels  # noqa: E402
from ..targets import GPU_TARGETS  # noqa: E402

APP_NAME = "convllava"
REPLICA_LOST = (ActorDiedError, ActorUnavailableError, RayActorError)


@dataclass
class RayServeOptions:
    """Everything that shapes the application; the `args` of a Serve config are this, as a dict."""

    build_dir: str
    model_name: str = "convllava"
    replicas: int = 1  # LLM replicas when not autoscaling
    min_replicas: int | None = None  # set both min and max to autoscale the LLM replicas
    max_replicas: int | None = None
    target_ongoing_requests: float = 1.0  # per LLM replica (each batches up to max_running of them in flight)
    vision_replicas: int = 1
    gpus_per_replica: float | None = None  # LLM replica; None: 1 for GPU builds, 0 for CPU builds
    vision_gpus: float | None = None  # vision replica; None: 0.5 for GPU builds, 0 for CPU builds
    cpus_per_replica: float = 1.0
    threads: int | None = None  # intra-op threads per replica (default: the build's setting)
    max_batch_size: int = 4  # vision images per engine run
    batch_wait_timeout_s: float = 0.01
    retries: int = 2  # re-route a request whose LLM replica died before it produced a token
    stream_interval_s: float = 0.02  # LLM replicas send tokens in lists at most this often
    limits: dict[str, Any] = field(default_factory=dict)  # ServerLimits fields
    engine: dict[str, Any] = field(default_factory=dict)  # LoopSettings fields (a Serve-config key): each LLM replica runs one ServingLoop

    def loop_settings(self) -> LoopSettings:
        return LoopSettings(**self.engine)

    @classmethod
    def from_dict(cls, args: dict[str, Any]) -> RayServeOptions:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(args) - known)
        if unknown:
            raise ConvLlavaError(f"unknown Ray Serve application args {unknown}; known: {sorted(known)}")
        if "build_dir" not in args:
            raise ConvLlavaError("the Ray Serve application needs args.build_dir (the build folder, readable on every node)")
        return cls(**args)

    def validate(self) -> None:
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ConvLlavaError("autoscaling needs both --min-replicas and --max-replicas")
        if self.min_replicas is not None and not 0 <= self.min_replicas <= self.max_replicas:
            raise ConvLlavaError(f"--min-replicas {self.min_replicas} must be between 0 and --max-replicas {self.max_replicas}")
        if self.replicas < 1 or self.vision_replicas < 1:
            raise ConvLlavaError("replica counts must be at least 1")
        if self.max_batch_size < 1 or self.batch_wait_timeout_s < 0:
            raise ConvLlavaError("--max-batch-size must be >= 1 and --batch-wait-ms >= 0")
        ServerLimits(**self.limits)  # unknown limit names fail here, before anything starts
        self.loop_settings().validate()


def deployment_options(opts: RayServeOptions, target: str) -> dict[str, dict[str, Any]]:
    """Per-deployment Serve options (replicas, resources, health checks, shutdown), by deployment name."""
    gpu = target in GPU_TARGETS
    llm_gpus = opts.gpus_per_replica if opts.gpus_per_replica is not None else (1.0 if gpu else 0.0)
    vision_gpus = opts.vision_gpus if opts.vision_gpus is not None else (0.5 if gpu else 0.0)
    common = {"health_check_period_s": 10.0, "health_check_timeout_s": 60.0, "graceful_shutdown_wait_loop_s": 2.0, "graceful_shutdown_timeout_s": 30.0}
    llm: dict[str, Any] = {
        **common,
        "max_ongoing_requests": opts.loop_settings().max_running,  # one ServingLoop batches them
        "ray_actor_options": {"num_cpus": opts.cpus_per_replica, "num_gpus": llm_gpus},
    }
    if opts.min_replicas is not None:
        llm["autoscaling_config"] = {
            "min_replicas": opts.min_replicas,
            "initial_replicas": max(opts.min_replicas, 1),
            "max_replicas": opts.max_replicas,
            "target_ongoing_requests": opts.target_ongoing_requests,
        }
    else:
        llm["num_replicas"] = opts.replicas
    limits = ServerLimits(**opts.limits)
    llm_capacity = (opts.max_replicas if opts.max_replicas is not None else opts.replicas) * opts.loop_settings().max_running
    return {
        "Ingress": {**common, "num_replicas": 1, "max_ongoing_requests": max(64, 4 * (llm_capacity + limits.max_queue)), "ray_actor_options": {"num_cpus": 0}},
        "VisionEncoder": {
            **common,
            "num_replicas": opts.vision_replicas,
            "max_ongoing_requests": 4 * opts.max_batch_size,
            "ray_actor_options": {"num_cpus": opts.cpus_per_replica, "num_gpus": vision_gpus},
        },
        "LLMWorker": llm,
    }


def worker_error(exc: BaseException) -> WorkerError:
    """A client's mistake is a 400; the server's own failure (a ServerFault or anything else) a 500."""
    if isinstance(exc, ConvLlavaError):
        return WorkerError(400, str(exc))
    return WorkerError(500, str(exc) if isinstance(exc, ServerFault) else "generation failed on an LLM replica")


@dataclass
class WorkerError:
    """An error a replica reports as a value (exceptions with extra fields do not pickle back)."""

    status: int
    message: str


@serve.deployment(name="VisionEncoder")
class VisionEncoder:
    """The build's vision engine; concurrent single-image calls are batched when shapes match."""

    def __init__(self, build_dir: str, threads: int | None, max_batch_size: int, batch_wait_timeout_s: float) -> None:
        from .build_loader import load_pipeline

        self.vision = load_pipeline(build_dir, threads=threads, parts=("vision",)).vision
        self.encode_batch.set_max_batch_size(max_batch_size)
        self.encode_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.batch_sizes: dict[int, int] = {}  # engine runs by images per run (bounded: one key per size)

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.01)
    async def encode_batch(self, pixels: list[np.ndarray]) -> list[np.ndarray]:
        """[3,H,W] per request → [tokens, hidden] per request; one engine run per distinct shape."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, p in enumerate(pixels):
            groups.setdefault(p.shape, []).append(i)
        out: list[np.ndarray] = [np.empty(0)] * len(pixels)
        for idx in groups.values():
            self.batch_sizes[len(idx)] = self.batch_sizes.get(len(idx), 0) + 1
            embeds = await asyncio.to_thread(self.vision.encode, np.stack([pixels[i] for i in idx]))
            for j, i in enumerate(idx):
                out[i] = embeds[j] if len(idx) == 1 else embeds[j].copy()
        return out

    async def encode(self, pixels: np.ndarray) -> np.ndarray:
        return await self.encode_batch(pixels)

    def stats(self) -> dict[str, Any]:
        return {"engine_runs": sum(self.batch_sizes.values()), "batch_sizes": dict(self.batch_sizes)}

    def check_health(self) -> None:
        if self.vision is None:
            raise RuntimeError("vision engine not loaded")


@serve.deployment(name="LLMWorker")
class LLMWorker:
    """The build's decoder and tokenizer under one ServingLoop: the requests routed here are batched
    in flight, with prefix reuse across them.

    Tokens travel in small lists, at most one list per `stream_interval_s` (the first token
    goes at once): each item of a Ray stream costs milliseconds, more than a small model's
    decode step, while 20 ms of grouping is invisible to a reader.
    """

    def __init__(self, build_dir: str, threads: int | None, stream_interval_s: float = 0.02, loop_settings: dict[str, Any] | None = None) -> None:
        from .build_loader import load_pipeline
        from .serving_loop import ServingLoop

        self.pipeline = load_pipeline(build_dir, threads=threads, parts=("llm",))
        self.serving_loop = ServingLoop(self.pipeline, LoopSettings(**(loop_settings or {})))
        self.interval = stream_interval_s

    async def stream(self, conv: Conversation, image_embeds: list[np.ndarray], params: SamplingParams, timings: Timings) -> AsyncIterator[list[TokenEvent | Finished | WorkerError]]:
        """An async generator, so that Serve's cancellation (the client went away, the ingress
        cancelled the call) reaches it at its next await and frees its slot in the serving loop at once."""
        from .pipeline import Request

        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        try:
            handle = self.serving_loop.submit(Request(conv), params, lambda item: loop.call_soon_threadsafe(events.put_nowait, item), image_embeds=image_embeds, timings=timings)
        except ConvLlavaError as exc:
            yield [WorkerError(429 if isinstance(exc, QueueFull) else 400, str(exc))]
            return
        except ServerFault as exc:
            yield [WorkerError(503, str(exc))]
            return
        last = 0.0  # the first token is sent at once
        try:
            done = False
            while not done:
                pending = [await events.get()]
                wait = self.interval - (time.perf_counter() - last)
                while not done:
                    item = pending[-1]
                    if isinstance(item, BaseException):
                        pending[-1] = worker_error(item)
                        done = True
                    elif isinstance(item, Finished):
                        done = True
                    elif wait > 0:  # group what comes within the interval
                        try:
                            pending.append(await asyncio.wait_for(events.get(), wait))
                        except asyncio.TimeoutError:
                            break
                        wait = self.interval - (time.perf_counter() - last)
                    else:
                        break
                yield pending
                last = time.perf_counter()
        finally:
            handle.cancel()

    def stats(self) -> dict[str, int]:
        st = self.serving_loop.stats
        return {"replica": id(self), "running": st.running, "waiting": st.waiting, "decoded_rows": st.decoded_rows, "kv_bytes": st.kv_bytes}

    def __del__(self) -> None:
        """Serve calls this when it shuts the replica down: end what still runs, stop the threads."""
        serving_loop = getattr(self, "serving_loop", None)
        if serving_loop is not None:
            serving_loop.close(timeout=2.0)

    def check_health(self) -> None:
        if self.pipeline.decoder is None or not self.serving_loop.healthy:
            raise RuntimeError("decoder not loaded or serving loop stopped")


class RayBackend:
    """The server app's ChatBackend over deployment handles, with re-routing on replica loss."""

    def __init__(self, vision: Any, llm: Any, opts: RayServeOptions, manifest: Manifest) -> None:
        from .build_loader import preprocess_config

        self.vision, self.llm, self.opts = vision, llm, opts
        self.limits = ServerLimits(**opts.limits)
        self.preprocess_cfg = preprocess_config(manifest)
        self.concurrency = (opts.max_replicas if opts.max_replicas is not None else opts.replicas) * opts.loop_settings().max_running
        self.info = {
            "build": Path(opts.build_dir).name,
            "target": manifest.target,
            "engine": "ray",
            "vision": f"{manifest.vision.backend} {manifest.vision.precision}",
            "llm": f"{manifest.llm.backend} {manifest.llm.precision}",
            "llm_replicas": opts.max_replicas if opts.max_replicas is not None else opts.replicas,
            "max_running": opts.loop_settings().max_running,  # per LLM replica
            "max_images": int(manifest.vision.profile.get("max_batch", 4)),
        }

    async def _with_retries(self, call, what: str):
        for attempt in range(self.opts.retries + 1):
            try:
                return await call()
            except REPLICA_LOST as exc:
                if attempt == self.opts.retries:
                    raise ApiError(503, f"{what} failed: its replica died ({type(exc).__name__}); retry the request", kind="server_error", code="replica_unavailable") from None
                await asyncio.sleep(0.25 * (attempt + 1))

    async def stream(self, conv: Conversation, images: list[ImageSource], params: SamplingParams) -> AsyncIterator[TokenEvent | Finished]:
        t0 = time.perf_counter()
        pixels = await asyncio.to_thread(image_pixels, images, self.limits, self.preprocess_cfg)  # admitted already; off the event loop
        timings = Timings(preprocess_s=time.perf_counter() - t0)
        t0 = time.perf_counter()

        async def encode_all() -> list[np.ndarray]:
            return list(await asyncio.gather(*[self.vision.encode.remote(p) for p in pixels]))

        embeds = await self._with_retries(encode_all, "image encoding") if pixels else []
        timings.vision_s = time.perf_counter() - t0
        for attempt in range(self.opts.retries + 1):
            sent = 0
            gen = self.llm.options(stream=True).stream.remote(conv, embeds, params, timings)
            finished = False
            try:
                async for items in gen:
                    for item in items:
                        if isinstance(item, WorkerError):
                            finished = True
                            raise ApiError(item.status, item.message, "messages" if item.status == 400 else None, kind="invalid_request_error" if item.status < 500 else "server_error")
                        sent += 1
                        finished = isinstance(item, Finished)
                        yield item
                return
            except REPLICA_LOST as exc:
                # Before the first token nothing reached the client: run it again on another
                # replica (same answer when greedy or seeded). After it, stop cleanly.
                if sent or attempt == self.opts.retries:
                    raise ApiError(
                        503,
                        f"the LLM replica serving this request died after {sent} tokens ({type(exc).__name__}); retry the request",
                        kind="server_error",
                        code="replica_unavailable",
                    ) from None
                await asyncio.sleep(0.25 * (attempt + 1))
            finally:
                if not finished:  # the client went away (or this failed): the replica's serving loop drops the sequence
                    gen.cancel()


@serve.deployment(name="Ingress")
@serve.ingress()
class Ingress:
    """HTTP entry: the same FastAPI app as the single-process server, over RayBackend."""

    def __init__(self, vision: Any, llm: Any, args: dict[str, Any]) -> None:
        from ..manifest import read_manifest

        self.opts = RayServeOptions.from_dict(args)
        self.backend = RayBackend(vision, llm, self.opts, read_manifest(Path(self.opts.build_dir)))

    def __serve_build_asgi_app__(self):
        return create_app(self.backend, self.opts.model_name, ServerLimits(**self.opts.limits))


def build_application(opts: RayServeOptions):
    """The bound application, with each deployment's options applied."""
    from ..manifest import read_manifest

    opts.validate()
    manifest = read_manifest(Path(opts.build_dir))
    dep = deployment_options(opts, manifest.target)
    vision = VisionEncoder.options(**dep["VisionEncoder"]).bind(opts.build_dir, opts.threads, opts.max_batch_size, opts.batch_wait_timeout_s)
    llm = LLMWorker.options(**dep["LLMWorker"]).bind(opts.build_dir, opts.threads, opts.stream_interval_s, opts.engine)
    return Ingress.options(**dep["Ingress"]).bind(vision, llm, asdict(opts))


def app_builder(args: dict[str, Any]):
    """Entry point for Serve configs: `import_path: convllava_export.runtime.ray_serve:app_builder`."""
    return build_application(RayServeOptions.from_dict(dict(args)))


def serve_config(opts: RayServeOptions, host: str = "127.0.0.1", port: int = 8000, name: str = APP_NAME) -> dict[str, Any]:
    """A Serve config (the schema `serve deploy` and KubeRay's serveConfigV2 take) for this build."""
    from ..manifest import read_manifest

    opts.validate()
    manifest = read_manifest(Path(opts.build_dir))
    args = {k: v for k, v in asdict(opts).items() if v is not None}
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": host, "port": port},
        "applications": [
            {
                "name": name,
                "route_prefix": "/",
                "import_path": "convllava_export.runtime.ray_serve:app_builder",
                "args": args,
                "deployments": [{"name": n, **o} for n, o in deployment_options(opts, manifest.target).items()],
            }
        ],
    }


def required_resources(opts: RayServeOptions, target: str) -> dict[str, float]:
    """CPUs and GPUs the application asks of the cluster at its initial size."""
    dep = deployment_options(opts, target)
    total = {"CPU": 0.0, "GPU": 0.0}
    for o in dep.values():
        n = o.get("num_replicas") or o.get("autoscaling_config", {}).get("initial_replicas", 1)
        total["CPU"] += n * o["ray_actor_options"].get("num_cpus", 0)
        total["GPU"] += n * o["ray_actor_options"].get("num_gpus", 0)
    return total


def check_resources(opts: RayServeOptions, target: str, available: dict[str, float]) -> list[str]:
    """Shortfalls as readable lines (empty when the cluster fits the application)."""
    need = required_resources(opts, target)
    short = []
    for res, hint in (("CPU", "--cpus-per-replica"), ("GPU", "--gpus-per-replica / --vision-gpus")):
        if need[res] > available.get(res, 0.0) + 1e-9:
            short.append(f"the application asks for {need[res]:g} {res}s and the cluster has {available.get(res, 0.0):g}: lower {hint} or the replica counts")
    return short


def run(opts: RayServeOptions, address: str | None = None, host: str = "127.0.0.1", port: int = 8000, say=print) -> None:
    """Deploy on Ray (a local instance unless `address`) and serve until SIGINT/SIGTERM."""
    import signal
    import threading

    import ray

    from ..manifest import read_manifest

    opts.validate()
    target = read_manifest(Path(opts.build_dir)).target
    opts.build_dir = str(Path(opts.build_dir).resolve())
    try:
        ray.init(address=address, log_to_driver=False) if address else ray.init(log_to_driver=False)
    except ConnectionError as exc:
        raise ConvLlavaError(f"could not reach the Ray cluster at {address}: {exc}. Check the address (auto, HOST:PORT or ray://HOST:10001), that the cluster is up, and, when it uses token authentication, that its token is here (RAY_AUTH_TOKEN or ~/.ray/auth_token).") from None
    started_here = not address
    stop = threading.Event()
    try:
        short = check_resources(opts, target, ray.cluster_resources())
        if short and started_here:
            raise ConvLlavaError("; ".join(short))
        for line in short:  # a cluster may autoscale: warn, don't refuse
            say(f"warning: {line}")
        serve.start(http_options={"host": host, "port": port})
        say(f"deploying {opts.build_dir} on Ray ({'local instance' if started_here else address}) ...")
        try:
            serve.run(build_application(opts), name=APP_NAME, route_prefix="/")
        except RuntimeError as exc:
            raise ConvLlavaError(f"the Ray Serve application failed to deploy: {exc}") from None
        say(f"serving '{opts.model_name}' on http://{host}:{port}/v1 with {opts.replicas if opts.min_replicas is None else f'{opts.min_replicas}-{opts.max_replicas}'} LLM replica(s); Ctrl-C stops")
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        while not stop.wait(1.0):
            pass
        say("shutting down: draining requests in flight ...")
    finally:
        try:
            if started_here:
                serve.shutdown()
            elif stop.is_set():
                serve.delete(APP_NAME)
        finally:
            ray.shutdown()
