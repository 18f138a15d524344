"""`convllava-export bench e2e`: time to first token and decode speed of a build, and the HTTP
server's throughput and p50/p95 latency under 1, 4 and 16 concurrent loopback clients."""

from __future__ import annotations

import base64
import io
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ..synthetic import colour_samples


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def pipeline_stats(pipe, n: int = 8, max_new_tokens: int = 32) -> dict[str, float]:
    samples = colour_samples(n, seed=31)
    pipe.generate(samples[0].image, samples[0].question, max_new_tokens=4)  # warm-up
    res = [pipe.generate(s.image, s.question, max_new_tokens=max_new_tokens) for s in samples]
    t = [r.timings for r in res]
    return {
        "preprocess_ms": float(np.mean([x.preprocess_s for x in t]) * 1e3),
        "vision_ms": float(np.mean([x.vision_s for x in t]) * 1e3),
        "ttft_ms": float(np.mean([x.ttft_s for x in t]) * 1e3),
        "decode_tokens_per_s": float(np.mean([x.decode_tokens_per_s for x in t])),
    }


def chat_bodies(max_new_tokens: int, n: int = 8, ignore_eos: bool = False) -> list[dict[str, Any]]:
    """The benchmark's requests: synthetic images with their questions, greedy."""
    bodies = []
    for s in colour_samples(n, seed=5):
        content = [{"type": "image_url", "image_url": {"url": _data_url(s.image)}}, {"type": "text", "text": s.question}]
        body: dict[str, Any] = {"messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": max_new_tokens}
        if ignore_eos:
            body["ignore_eos"] = True
        bodies.append(body)
    return bodies


def load_test(url: str, bodies: list[dict[str, Any]], clients: int, requests_per_client: int, time_limit_s: float = 120.0) -> dict[str, Any]:
    """`clients` threads, each posting `requests_per_client` requests back to back (within a time bound)."""
    import httpx

    deadline = time.perf_counter() + time_limit_s
    latencies: list[float] = []
    tokens = 0
    statuses: list[int] = []

    def one_client(k: int) -> None:
        nonlocal tokens
        with httpx.Client(timeout=time_limit_s) as client:
            for j in range(requests_per_client):
                if time.perf_counter() > deadline:
                    return
                t = time.perf_counter()
                r = client.post(url, json=bodies[(k + j) % len(bodies)])
                latencies.append(time.perf_counter() - t)
                statuses.append(r.status_code)
                if r.status_code == 200:
                    tokens += r.json()["usage"]["completion_tokens"]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one_client, range(clients)))
    wall = time.perf_counter() - t0
    ok = statuses.count(200)
    return {
        "clients": clients,
        "requests": len(statuses),
        "ok": ok,
        "requests_per_s": ok / wall,
        "tokens_per_s": tokens / wall,
        "p50_ms": float(np.percentile(latencies, 50) * 1e3) if latencies else float("nan"),
        "p95_ms": float(np.percentile(latencies, 95) * 1e3) if latencies else float("nan"),
    }


def server_stats(pipe, clients: list[int], requests_per_client: int = 4, max_new_tokens: int = 32, time_limit_s: float = 120.0, ignore_eos: bool = False) -> list[dict[str, Any]]:
    """Real server on 127.0.0.1; each level sends a bounded number of requests, within a time bound."""
    import uvicorn

    from ..runtime.server import ServerLimits, create_app

    port = _free_port()
    limits = ServerLimits(max_queue=max(clients) + 1, max_tokens=max_new_tokens)
    server = uvicorn.Server(uvicorn.Config(create_app(pipe, "bench", limits), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    bodies = chat_bodies(max_new_tokens, ignore_eos=ignore_eos)
    try:
        return [load_test(url, bodies, c, requests_per_client, time_limit_s) for c in clients]
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def bench_e2e(builds: list[str | Path], clients: list[int], requests_per_client: int = 4, max_new_tokens: int = 32, threads: int | None = None, progress=print) -> dict[str, Any]:
    from ..runtime.build_loader import load_pipeline

    results = []
    for b in builds:
        progress(f"{b}: pipeline timings")
        pipe = load_pipeline(b, threads=threads)
        stats = pipeline_stats(pipe, max_new_tokens=max_new_tokens)
        progress(f"{b}: server under {', '.join(map(str, clients))} concurrent clients")
        results.append({"build": str(b), "info": pipe.info, "pipeline": stats, "server": server_stats(pipe, clients, requests_per_client, max_new_tokens)})
    return {"machine": {"cpus": os.cpu_count()}, "max_new_tokens": max_new_tokens, "results": results}


def markdown(result: dict[str, Any]) -> str:
    lines = ["| build | vision | LLM | preprocess ms | vision ms | TTFT ms | decode tok/s |", "|---|---|---|---|---|---|---|"]
    for r in result["results"]:
        p = r["pipeline"]
        lines.append(f"| {Path(r['build']).name} | {r['info'].get('vision')} | {r['info'].get('llm')} | {p['preprocess_ms']:.1f} | {p['vision_ms']:.1f} | {p['ttft_ms']:.1f} | {p['decode_tokens_per_s']:.0f} |")
    lines += ["", "| build | clients | requests (ok) | req/s | tokens/s | p50 ms | p95 ms |", "|---|---|---|---|---|---|---|"]
    for r in result["results"]:
        for s in r["server"]:
            lines.append(f"| {Path(r['build']).name} | {s['clients']} | {s['requests']} ({s['ok']}) | {s['requests_per_s']:.2f} | {s['tokens_per_s']:.1f} | {s['p50_ms']:.0f} | {s['p95_ms']:.0f} |")
    return "\n".join(lines)
