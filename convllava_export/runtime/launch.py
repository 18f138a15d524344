"""`convllava-export serve`: a build served by one process (server.py) or as a Ray Serve
application (ray_serve.py), from the command's options.

Both engines get the same request limits (ServerLimits) and serving-loop settings (LoopSettings).
The local engine binds its socket before the model loads, so a busy port fails at once; a local
Ray instance is checked the same way before Ray starts.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConvLlavaError
from .build_loader import open_build

if TYPE_CHECKING:  # server.py needs fastapi and ray_serve.py ray: imported when their engine is chosen
    from .ray_serve import RayServeOptions
    from .server import ServerLimits
    from .serving_loop import LoopSettings

Say = Callable[[str], None]


def serve_build(
    build_dir: Path, *, host: str, port: int, model_name: str, allow_local_files: bool, max_tokens_limit: int, max_queue: int, max_body_mb: float,
    max_image_pixels: int, max_images: int | None, max_running: int, max_batched_tokens: int | None, prefill: str, encoder_cache_mb: float, prefix_cache_mb: float,
    kv_cache_mb: float | None, drain_s: float, threads: int | None, engine: str, replicas: int, min_replicas: int | None, max_replicas: int | None,
    target_ongoing_requests: float, vision_replicas: int, gpus_per_replica: float | None, vision_gpus: float | None, cpus_per_replica: float,
    max_batch_size: int, batch_wait_ms: float, address: str | None, write_config: Path | None, say: Say = print,
) -> None:
    """Serve `build_dir` until interrupted; the arguments are `serve`'s options (defaults there).

    engine "local": one process on host:port. engine "ray": a Ray Serve application (a local Ray
    instance unless `address`), or with `write_config` its Serve config YAML written, and no serving.
    """
    from ..manifest import read_manifest
    from .server import ServerLimits
    from .serving_loop import LoopSettings

    read_manifest(build_dir)  # a clear error for a folder that is not a build, before anything loads

    settings = LoopSettings(
        max_running=max_running, max_waiting=max_queue, max_batched_tokens=max_batched_tokens, encoder_cache_mb=encoder_cache_mb, prefix_cache_mb=prefix_cache_mb,
        kv_cache_mb=kv_cache_mb,
    )
    limits = ServerLimits(
        max_body_bytes=int(max_body_mb * (1 << 20)), max_image_pixels=max_image_pixels, max_images=max_images,
        max_tokens=max_tokens_limit, max_queue=max_queue, allow_local_files=allow_local_files,
    )
    if engine == "local":
        if write_config or address:
            raise ConvLlavaError("--write-config and --address are for --engine ray")
        serve_local(build_dir, host, port, model_name, limits, settings, drain_s, threads, say, prefill)
        return
    from dataclasses import asdict

    from .ray_serve import RayServeOptions

    opts = RayServeOptions(
        build_dir=str(build_dir.resolve()), model_name=model_name, replicas=replicas, min_replicas=min_replicas, max_replicas=max_replicas,
        target_ongoing_requests=target_ongoing_requests, vision_replicas=vision_replicas, gpus_per_replica=gpus_per_replica,
        vision_gpus=vision_gpus, cpus_per_replica=cpus_per_replica, threads=threads, max_batch_size=max_batch_size,
        batch_wait_timeout_s=batch_wait_ms / 1000, limits=asdict(limits), engine=asdict(settings),
    )
    if write_config:
        write_ray_config(opts, host, port, write_config, say)
    else:
        serve_on_ray(opts, address, host, port, say)


def serve_local(
    build_dir: Path, host: str, port: int, model_name: str, limits: ServerLimits, settings: LoopSettings, drain_s: float, threads: int | None, say: Say = print, prefill: str = "auto"
) -> None:
    """One process: bind host:port (a busy port fails now, not after loading the model), load, serve."""
    from . import server
    from .netutil import bind_listen_socket, host_port

    sock = bind_listen_socket(host, port)
    with sock:
        pipe = open_build(build_dir, threads, prefill=prefill)
        where = host_port(host, sock.getsockname()[1])
        say(f"serving {build_dir} as '{model_name}' on http://{where}/v1 ({pipe.info.get('vision')}, {pipe.info.get('llm')})")
        server.serve(pipe, host, port, model_name, limits, sock=sock, loop_settings=settings, drain_s=drain_s)


def write_ray_config(opts: RayServeOptions, host: str, port: int, dest: Path, say: Say = print) -> None:
    """The Serve config YAML for `serve deploy` (a Ray cluster) or a RayService's serveConfigV2 (KubeRay)."""
    import yaml

    from .ray_serve import serve_config

    dest.write_text(yaml.safe_dump(serve_config(opts, host, port), sort_keys=False))
    say(f"wrote {dest}: deploy it with `serve deploy {dest}` (Ray cluster) or as a RayService's serveConfigV2 (KubeRay)")


def serve_on_ray(opts: RayServeOptions, address: str | None, host: str, port: int, say: Say = print) -> None:
    """Deploy on Ray and serve until interrupted (ray_serve.run)."""
    from . import ray_serve
    from .netutil import bind_listen_socket

    if not address:  # a local Ray instance will bind host:port here; on a cluster the port is the head node's
        bind_listen_socket(host, port).close()
    ray_serve.run(opts, address, host, port, say=say)
