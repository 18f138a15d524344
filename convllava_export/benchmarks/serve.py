"""`convllava-export bench serve`: the OpenAI-compatible API under concurrent loopback clients,
single-process vs Ray Serve with 1 and 2 LLM replicas, in one run on the same build and load.

Every configuration gets the whole machine: a single process runs with all cores' threads; with
N Ray replicas each replica gets cores/N intra-op threads. Outputs have a fixed length
(`ignore_eos`) so every configuration does the same work.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from .e2e import _free_port, chat_bodies, load_test, server_stats


def bench_serve(
    build: str | Path, replicas: list[int], clients: int = 8, requests_per_client: int = 4, max_new_tokens: int = 32, include_local: bool = True, progress=print
) -> dict[str, Any]:
    import ray
    from ray import serve

    from ..runtime import ray_serve
    from ..runtime.build_loader import load_pipeline

    cpus = os.cpu_count() or 1
    bodies = chat_bodies(max_new_tokens, ignore_eos=True)
    rows: list[dict[str, Any]] = []
    if include_local:
        progress(f"single process ({cpus} threads): {clients} clients x {requests_per_client} requests")
        pipe = load_pipeline(build, threads=cpus)
        stats = server_stats(pipe, [clients], requests_per_client, max_new_tokens, ignore_eos=True)[0]
        rows.append({"engine": "local", "replicas": 1, "threads_per_replica": cpus, **stats})
        del pipe
    port = _free_port()
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, object_store_memory=200 << 20)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        for n in replicas:
            threads = max(1, cpus // n)
            opts = ray_serve.RayServeOptions(
                build_dir=str(Path(build).resolve()), model_name="bench", replicas=n, cpus_per_replica=cpus / (n + 1), threads=threads,
                limits={"max_queue": 4 * clients, "max_tokens": max_new_tokens},
            )
            progress(f"ray, {n} LLM replica(s) x {threads} threads: deploying")
            t0 = time.perf_counter()
            serve.run(ray_serve.build_application(opts), name=ray_serve.APP_NAME, route_prefix="/")
            deploy_s = time.perf_counter() - t0
            load_test(url, bodies, n, 1)  # warm-up: every replica has run once
            progress(f"ray, {n} LLM replica(s): {clients} clients x {requests_per_client} requests")
            stats = load_test(url, bodies, clients, requests_per_client)
            rows.append({"engine": "ray", "replicas": n, "threads_per_replica": threads, "deploy_s": deploy_s, **stats})
            serve.delete(ray_serve.APP_NAME)
    finally:
        serve.shutdown()
        ray.shutdown()
    base = next((r for r in rows if r["engine"] == "ray" and r["replicas"] == min(replicas)), rows[0])
    for r in rows:
        r["throughput_vs_ray_min_replicas"] = r["requests_per_s"] / base["requests_per_s"] if base["requests_per_s"] else float("nan")
    return {"machine": {"cpus": cpus, "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1)}, "build": str(build), "clients": clients,
            "requests_per_client": requests_per_client, "max_new_tokens": max_new_tokens, "results": rows}


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"{result['clients']} concurrent clients x {result['requests_per_client']} requests, {result['max_new_tokens']} tokens each (ignore_eos), "
        f"machine: {result['machine']['cpus']} CPUs, {result['machine']['memory_gb']} GB",
        "",
        "| engine | LLM replicas | threads/replica | requests (ok) | req/s | tokens/s | p50 ms | p95 ms | throughput vs 1 replica |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["results"]:
        lines.append(
            f"| {r['engine']} | {r['replicas']} | {r['threads_per_replica']} | {r['requests']} ({r['ok']}) | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} | "
            f"{r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['throughput_vs_ray_min_replicas']:.2f}x |"
        )
    return "\n".join(lines)
