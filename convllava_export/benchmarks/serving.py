"""`convllava-export bench serve`: a concurrency sweep against the real server, in the shape of
`vllm bench serve`, side by side with batching on and off in one run.

Each configuration is a fresh `convllava-export serve` subprocess on 127.0.0.1 (its own memory,
all cores). The dataset is synthetic: images of mixed aspect ratios with a quarter of the requests
repeating an earlier image (what the encoder and prefix caches are for), a fixed output length
(`ignore_eos`) so every configuration does the same work. Per level: request and output-token
throughput, mean / median / p99 of TTFT, TPOT (time per output token after the first) and ITL
(gap between streamed chunks), all measured by the client.
"""

from __future__ import annotations

import base64
import io
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

ASPECTS = ((512, 512), (768, 432), (432, 768), (640, 480), (480, 640), (1024, 256))
QUESTIONS = ("What is shown in this image?", "Describe the colours.", "What shape is in the picture?", "Is the image wide or tall?")


def dataset(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """n chat requests; every fourth one reuses an earlier image with another question."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    images: list[str] = []
    out = []
    for i in range(n):
        if i % 4 == 3 and images:
            url = images[int(rng.integers(len(images)))]
        else:
            w, h = ASPECTS[i % len(ASPECTS)]
            img = Image.new("RGB", (w, h), tuple(int(c) for c in rng.integers(0, 256, 3)))
            x, y = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
            ImageDraw.Draw(img).ellipse((x, y, x + w // 3, y + h // 3), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
            images.append(url)
        question = QUESTIONS[int(rng.integers(len(QUESTIONS)))]
        out.append({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]}]})
    return out


def one_request(client, url: str, body: dict[str, Any]) -> dict[str, Any]:
    """Stream one request; client-side TTFT, chunk gaps and the server's usage."""
    t0 = time.perf_counter()
    arrivals: list[float] = []
    text: list[str] = []
    usage = None
    with client.stream("POST", url, json=body) as res:
        if res.status_code != 200:
            res.read()
            return {"status": res.status_code}
        for line in res.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            elif chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                arrivals.append(time.perf_counter())
                text.append(chunk["choices"][0]["delta"]["content"])
    end = time.perf_counter()
    tokens = usage["completion_tokens"] if usage else len(arrivals)
    ttft = arrivals[0] - t0 if arrivals else end - t0
    return {
        "status": 200,
        "ttft_s": ttft,
        "tpot_s": (end - t0 - ttft) / (tokens - 1) if tokens > 1 else 0.0,
        "itl_s": list(np.diff(arrivals)),
        "latency_s": end - t0,
        "output_tokens": tokens,
        "cached_tokens": (usage or {}).get("prompt_tokens_details", {}).get("cached_tokens", 0),
        "prompt_tokens": (usage or {}).get("prompt_tokens", 0),
        "text": "".join(text),
    }


def multi_turn(url: str, images: int = 3, max_tokens: int = 32) -> dict[str, Any]:
    """A follow-up question about the same image: the second turn's TTFT against the first's
    (encoder cache + prefix reuse of the first turn and its answer)."""
    import httpx

    rows = []
    with httpx.Client(timeout=600) as client:
        for body in dataset(images, seed=99)[:images]:
            opts = {"max_tokens": max_tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
            first = one_request(client, url, {**body, **opts})
            follow = body["messages"] + [{"role": "assistant", "content": first["text"]}, {"role": "user", "content": "And what else do you see?"}]
            second = one_request(client, url, {"messages": follow, **opts})
            rows.append({"turn1_ttft_ms": first["ttft_s"] * 1e3, "turn2_ttft_ms": second["ttft_s"] * 1e3, "turn1_prompt_tokens": first["prompt_tokens"],
                         "turn2_prompt_tokens": second["prompt_tokens"], "turn2_cached_tokens": second["cached_tokens"]})
    ratios = [r["turn2_ttft_ms"] / r["turn1_ttft_ms"] for r in rows]
    return {"turns": rows, "median_turn2_vs_turn1_ttft": float(np.median(ratios))}


def summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean_ms": float("nan"), "median_ms": float("nan"), "p99_ms": float("nan")}
    a = np.asarray(values) * 1e3
    return {"mean_ms": float(a.mean()), "median_ms": float(np.median(a)), "p99_ms": float(np.percentile(a, 99))}


def run_level(url: str, bodies: list[dict[str, Any]], concurrency: int, time_limit_s: float) -> dict[str, Any]:
    import httpx

    deadline = time.perf_counter() + time_limit_s
    results: list[dict[str, Any]] = []
    todo = list(range(len(bodies)))

    def client_loop(k: int) -> None:
        with httpx.Client(timeout=time_limit_s) as client:
            while todo and time.perf_counter() < deadline:
                try:
                    i = todo.pop(0)
                except IndexError:
                    return
                results.append(one_request(client, url, bodies[i]))

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(client_loop, range(concurrency)))
    wall = time.perf_counter() - t0
    ok = [r for r in results if r["status"] == 200]
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "completed": len(ok),
        "duration_s": wall,
        "request_throughput": len(ok) / wall,
        "output_token_throughput": sum(r["output_tokens"] for r in ok) / wall,
        "cached_prompt_tokens": sum(r["cached_tokens"] for r in ok),
        "ttft": summary([r["ttft_s"] for r in ok]),
        "tpot": summary([r["tpot_s"] for r in ok]),
        "itl": summary([x for r in ok for x in r["itl_s"]]),
    }


def start_server(build: str | Path, port: int, max_running: int, max_tokens: int, threads: int) -> subprocess.Popen:
    import httpx

    cmd = [sys.executable, "-m", "convllava_export.cli", "serve", str(build), "--port", str(port), "--max-running", str(max_running),
           "--max-queue", "512", "--max-tokens", str(max_tokens), "--threads", str(threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise RuntimeError(f"server did not start: {proc.stdout.read().decode()[-2000:]}")
        time.sleep(0.3)


def bench_serving(
    build: str | Path,
    concurrencies: list[int],
    max_tokens: int = 128,
    prompts_per_level: int | None = None,
    configs: dict[str, int] | None = None,
    time_limit_s: float = 600.0,
    progress=print,
) -> dict[str, Any]:
    """Every config (name → --max-running) through every concurrency level, on the same dataset."""
    from .e2e import _free_port

    configs = configs or {"batching": max(concurrencies), "batching off": 1}
    threads = os.cpu_count() or 1
    rows, follow_up = [], None
    for name, max_running in configs.items():
        port = _free_port()
        progress(f"{name} (--max-running {max_running}): starting the server")
        proc = start_server(build, port, max_running, max_tokens, threads)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        try:
            for c in concurrencies:
                n = prompts_per_level or max(8, 2 * c)
                bodies = [{**b, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}} for b in dataset(n, seed=c)]
                run_level(url, bodies[:1], 1, time_limit_s)  # warm-up
                progress(f"{name}: {c} concurrent clients, {n} requests x {max_tokens} tokens")
                rows.append({"config": name, "max_running": max_running, **run_level(url, bodies, c, time_limit_s)})
            if follow_up is None:
                progress(f"{name}: multi-turn follow-ups about one image")
                follow_up = {"config": name, **multi_turn(url, max_tokens=min(32, max_tokens))}
        finally:
            proc.terminate()
            proc.wait(30)
    base = {r["concurrency"]: r for r in rows if r["config"] == list(configs)[-1]}
    for r in rows:
        b = base[r["concurrency"]]
        r["token_throughput_vs_last_config"] = r["output_token_throughput"] / b["output_token_throughput"] if b["output_token_throughput"] else float("nan")
        r["p99_ttft_vs_last_config"] = r["ttft"]["p99_ms"] / b["ttft"]["p99_ms"] if b["ttft"]["p99_ms"] else float("nan")
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "")
    isa = "AVX-512" + (" VNNI" if "avx512_vnni" in flags else "") if "avx512f" in flags else ("AVX2" if "avx2" in flags else "baseline")
    return {"machine": {"cpu": cpu, "isa": isa, "cpus": threads}, "build": str(build), "max_tokens": max_tokens, "configs": configs, "results": rows, "multi_turn": follow_up}


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        f"Build `{Path(result['build']).name}`, {result['max_tokens']} output tokens per request (ignore_eos), machine: {m['cpu']} ({m['isa']}), {m['cpus']} cores",
        "",
        "| config | clients | done | req/s | out tok/s | vs last config | TTFT mean / median / p99 ms | p99 TTFT vs last | TPOT mean / p99 ms | ITL mean / p99 ms | cached prompt tokens |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["results"]:
        t, p, i = r["ttft"], r["tpot"], r["itl"]
        lines.append(
            f"| {r['config']} | {r['concurrency']} | {r['completed']}/{r['requests']} | {r['request_throughput']:.2f} | {r['output_token_throughput']:.1f} | "
            f"{r['token_throughput_vs_last_config']:.2f}x | {t['mean_ms']:.0f} / {t['median_ms']:.0f} / {t['p99_ms']:.0f} | {r['p99_ttft_vs_last_config']:.2f}x | "
            f"{p['mean_ms']:.1f} / {p['p99_ms']:.1f} | {i['mean_ms']:.1f} / {i['p99_ms']:.1f} | {r['cached_prompt_tokens']} |"
        )
    mt = result.get("multi_turn")
    if mt:
        lines += ["", f"Follow-up about the same image ({mt['config']}): median turn-2 TTFT = {mt['median_turn2_vs_turn1_ttft']:.2f}x turn 1", "",
                  "| turn 1 TTFT ms | turn 2 TTFT ms | turn 1 prompt tokens | turn 2 prompt tokens | turn 2 cached |", "|---|---|---|---|---|"]
        lines += [f"| {t['turn1_ttft_ms']:.0f} | {t['turn2_ttft_ms']:.0f} | {t['turn1_prompt_tokens']} | {t['turn2_prompt_tokens']} | {t['turn2_cached_tokens']} |" for t in mt["turns"]]
    return "\n".join(lines)
