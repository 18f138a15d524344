"""`convllava-export bench serve`: a concurrency sweep against the real server, in the shape of
`vllm bench serve`, side by side with batching on and off in one run, or beside a peer
OpenAI-compatible server (vLLM, llama.cpp's llama-server, trtllm-serve) on the same workload.

Each configuration is a fresh `convllava-export serve` subprocess on 127.0.0.1 (its own memory,
all cores). Two synthetic workloads: `image`, images of mixed aspect ratios with a quarter of the
requests repeating an earlier image (what the encoder and prefix caches are for), and `text`,
distinct random word sequences of a target length (no prefix cache helps). A fixed output length
(`ignore_eos`, temperature 0) so every server does the same work. Every request streams with
vLLM's `continuous_usage_stats`, so tokens are counted and timed from the usage in the chunks
(with random weights many tokens decode to no visible text); a server that sends no per-chunk
usage is timed by its content chunks instead, and the rows say which. Per level: requests ok and
failed, request and output-token throughput, mean / median / p99 of TTFT, TPOT (time per output
token after the first) and ITL (gap between chunks that carried tokens), all measured by the client.

With `against`, the peer runs the same requests after ours. A text-only peer cannot take images:
for it the image workload is a text stand-in with as many prompt tokens as our server reported for
the same request (the peer's tokens per word fitted by two probe requests first), and a request
that repeats an earlier image repeats that request's stand-in prefix. With `against_cmd` the peer
is started only after our server has stopped, and its whole process group is ended afterwards:
never two models in memory at once.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConvLlavaError

ASPECTS = ((512, 512), (768, 432), (432, 768), (640, 480), (480, 640), (1024, 256))
QUESTIONS = ("What is shown in this image?", "Describe the colours.", "What shape is in the picture?", "Is the image wide or tall?")
WORKLOADS = ("text", "image")
STAND_IN = "peer: text stand-in of equal prompt length"
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "avx_vnni")
# Everyday English words (mostly one or two tokens each in Llama-style vocabularies) for prompts of random words.
WORDS = tuple(
    """time year people way day man thing woman life child world school state family student group country problem hand part
    place case week company system program question work government number night point home water room mother area money
    story fact month lot right study book eye job word business issue side kind head house service friend father power hour
    game line end member law car city community name president team minute idea kid body information back parent face others
    level office door health person art war history party result change morning reason research girl guy moment air teacher
    force education foot boy age policy music market sense nation plan college interest death experience effect class control
    care field development role effort rate heart drug show leader light voice wife police mind price report decision son view
    relationship town road arm difference value building action model season society tax director position player record paper
    space ground form event official matter center couple site project activity star table need court oil situation cost
    industry figure street image phone data picture practice piece land product doctor wall patient worker news test movie north
    love support technology step baby computer type attention film tree source organization hair window evidence population
    red green blue small large quick slow bright dark warm cold early late open close simple clear strong soft""".split()
)


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


def random_words(rng: np.random.Generator, n: int) -> list[str]:
    return [WORDS[int(i)] for i in rng.integers(len(WORDS), size=max(1, n))]


def text_dataset(n: int, words: int, seed: int = 0) -> list[dict[str, Any]]:
    """n text-only chat requests of `words` random words each: distinct from the first word on, so no
    prefix cache (ours or the peer's) helps beyond the chat template."""
    rng = np.random.default_rng([seed, 7])
    return [{"messages": [{"role": "user", "content": " ".join(random_words(rng, words))}]} for _ in range(n)]


def workload_bodies(workload: str, n: int, seed: int, prompt_words: int) -> list[dict[str, Any]]:
    if workload == "image":
        return dataset(n, seed=seed)
    if workload == "text":
        return text_dataset(n, prompt_words, seed=seed)
    raise ValueError(f"unknown workload {workload!r} (use {', '.join(WORKLOADS)})")


def request_options(max_tokens: int, model: str | None = None) -> dict[str, Any]:
    """What every measured request carries: a fixed output length, greedy, streamed with usage on every chunk."""
    opts = {"max_tokens": max_tokens, "ignore_eos": True, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    return {**opts, "model": model} if model else opts


def one_request(client, url: str, body: dict[str, Any]) -> dict[str, Any]:
    """Stream one request. Tokens are counted and timed from the usage in the chunks when the server
    sends it on every chunk (TTFT = first chunk with completion_tokens >= 1, ITL = gaps between chunks
    where it grew), else from the content chunks (output tokens then from the final usage if any)."""
    import httpx

    t0 = time.perf_counter()
    token_times: list[float] = []  # chunks where usage.completion_tokens grew
    content_times: list[float] = []  # chunks with visible text
    text: list[str] = []
    usage: dict[str, Any] | None = None
    usage_chunks = 0  # chunks with choices that carried usage: every one with vLLM's continuous_usage_stats
    count = 0
    try:
        with client.stream("POST", url, json=body) as res:
            if res.status_code != 200:
                res.read()
                return {"status": res.status_code, "error": res.text[:500]}
            for line in res.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if not data or data == "[DONE]":
                    continue
                now = time.perf_counter()
                chunk = json.loads(data)
                if chunk.get("error"):
                    err = chunk["error"]
                    return {"status": 500, "error": (err.get("message") if isinstance(err, dict) else str(err))[:500]}
                choices = chunk.get("choices") or []
                if chunk.get("usage"):
                    usage = chunk["usage"]
                    usage_chunks += bool(choices)
                    n = usage.get("completion_tokens") or 0
                    if n > count:
                        token_times.append(now)
                        count = n
                if choices and (choices[0].get("delta") or {}).get("content"):
                    content_times.append(now)
                    text.append(choices[0]["delta"]["content"])
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        return {"status": 0, "error": f"{type(exc).__name__}: {exc}"[:500]}
    end = time.perf_counter()
    # Usage on every chunk (not only on the last one with a finish_reason, as some servers send it)
    per_chunk = usage_chunks >= 2 or (usage_chunks == 1 and count <= 1)
    times = token_times if per_chunk else content_times
    tokens = usage["completion_tokens"] if usage and usage.get("completion_tokens") is not None else len(content_times)
    ttft = times[0] - t0 if times else end - t0
    return {
        "status": 200,
        "ttft_s": ttft,
        "tpot_s": (times[-1] - times[0]) / (tokens - 1) if tokens > 1 and times else 0.0,
        "itl_s": list(np.diff(times)),
        "latency_s": end - t0,
        "output_tokens": tokens,
        "timed_by": "usage" if per_chunk else "content chunks",
        "cached_tokens": ((usage or {}).get("prompt_tokens_details") or {}).get("cached_tokens", 0) or 0,
        "prompt_tokens": (usage or {}).get("prompt_tokens", 0) or 0,
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


def run_level(url: str, bodies: list[dict[str, Any]], concurrency: int, time_limit_s: float, keep: bool = False) -> dict[str, Any]:
    """`concurrency` clients, each sending its next request as soon as its last one finished, until
    `bodies` is done or the time limit passes. `keep`: the per-request results (with their index) too."""
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
                results.append({"index": i, **one_request(client, url, bodies[i])})

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(client_loop, range(concurrency)))
    wall = time.perf_counter() - t0
    ok = [r for r in results if r["status"] == 200]
    timed_by = sorted({r["timed_by"] for r in ok})
    row = {
        "concurrency": concurrency,
        "requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": wall,
        "request_throughput": len(ok) / wall,
        "output_tokens": sum(r["output_tokens"] for r in ok),
        "output_token_throughput": sum(r["output_tokens"] for r in ok) / wall,
        "prompt_tokens_mean": float(np.mean([r["prompt_tokens"] for r in ok])) if ok else float("nan"),
        "cached_prompt_tokens": sum(r["cached_tokens"] for r in ok),
        "timed_by": timed_by[0] if len(timed_by) == 1 else ("mixed" if timed_by else "none"),
        "errors": sorted({r["error"] for r in results if r["status"] != 200})[:3],
        "ttft": summary([r["ttft_s"] for r in ok]),
        "tpot": summary([r["tpot_s"] for r in ok]),
        "itl": summary([x for r in ok for x in r["itl_s"]]),
    }
    if keep:
        row["per_request"] = sorted(({k: v for k, v in r.items() if k != "itl_s"} for r in results), key=lambda r: r["index"])
    return row


def machine_info() -> dict[str, Any]:
    """CPU model, ISA flags, cores (as `bench real-size` reports them, without its bandwidth and GEMM
    runs), memory, and the GPUs nvidia-smi sees, if any."""
    cpu, flags = None, set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu is None:
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    cpu = cpu or platform.processor() or "unknown"
    isa = "AVX-512" + (" VNNI" if "avx512_vnni" in flags else "") if "avx512f" in flags else ("AVX2" if "avx2" in flags else "baseline")
    info: dict[str, Any] = {"cpu": cpu, "isa": isa, "isa_flags": [f for f in ISA_FLAGS if f in flags], "cpus": os.cpu_count() or 1,
                            "python": platform.python_version()}
    try:
        from ..sizing import available_memory

        info["memory_available_gb"] = round(available_memory() / 2**30, 1)
    except Exception:  # informative only
        pass
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            info["gpus"] = [g.strip() for g in out.stdout.splitlines() if g.strip()]
        except (OSError, subprocess.SubprocessError):
            pass
    return info


# -- servers ----------------------------------------------------------------------------------
def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, port)) == 0


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def group_rss_bytes(pgid: int) -> int:
    """Resident memory of every process in a process group (a server and the workers it forks)."""
    total = 0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if os.getpgid(int(d.name)) != pgid:
                continue
            for line in (d / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except (OSError, ValueError, ProcessLookupError):
            continue
    return total


class PeakRss:
    """Samples a process group's RSS every `every_s` while a level runs; `.peak_gb` after."""

    def __init__(self, proc: subprocess.Popen | None, every_s: float = 0.25) -> None:
        import threading

        self.pgid = proc.pid if proc is not None else None  # started with start_new_session: pgid == pid
        self.every_s, self.peak = every_s, 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, group_rss_bytes(self.pgid))
            self.stop.wait(self.every_s)

    def __enter__(self) -> PeakRss:
        if self.pgid is not None:
            self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        if self.pgid is not None:
            self.thread.join()

    @property
    def peak_gb(self) -> float | None:
        return round(self.peak / 1e9, 3) if self.pgid is not None else None


def stop_group(proc: subprocess.Popen, grace_s: float = 30) -> None:
    """End the process group `proc` leads (it was started in a session of its own): SIGTERM, up to
    `grace_s` for the leader and everything else in the group to exit, then SIGKILL to what is left."""
    deadline = time.time() + grace_s
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(max(0.1, deadline - time.time()))
    except subprocess.TimeoutExpired:
        pass
    while _group_alive(proc.pid) and time.time() < deadline:  # e.g. a shell that exited before the server it started
        time.sleep(0.2)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        pass


def start_server(build: str | Path, port: int, max_running: int, max_tokens: int, threads: int, serve_args: tuple[str, ...] = (),
                 log: Path | None = None, timeout_s: float = 300) -> subprocess.Popen:
    """`convllava-export serve` on 127.0.0.1:port in a session of its own; `serve_args` go last, verbatim."""
    import httpx

    cmd = [sys.executable, "-m", "convllava_export.cli", "serve", str(build), "--port", str(port), "--max-running", str(max_running),
           "--max-queue", "512", "--max-tokens", str(max_tokens), "--threads", str(threads), *serve_args]
    log = log or Path(tempfile.mkstemp(prefix="bench-serve-", suffix=".log")[1])
    with open(log, "ab") as f:  # a file, not a pipe nobody reads while the bench runs
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    proc.log = log  # type: ignore[attr-defined]
    deadline = time.time() + timeout_s
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            stop_group(proc, 5)
            raise ConvLlavaError(f"server did not start ({' '.join(cmd)}; output in {log}): {_tail(log, 2000)}")
        time.sleep(0.3)


def peer_base(url: str) -> str:
    """http://host:port from what a user may write: a trailing slash or /v1 are dropped."""
    url = url.strip().rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def peer_models(base: str, timeout_s: float = 5) -> list[str] | None:
    """The ids GET base/v1/models lists, or None while nothing answers there."""
    import httpx

    try:
        res = httpx.get(f"{base}/v1/models", timeout=timeout_s)
        if res.status_code != 200:
            return None
        return [m["id"] for m in res.json().get("data", []) if isinstance(m, dict) and m.get("id")]
    except (httpx.HTTPError, ValueError):
        return None


def peer_env() -> dict[str, str]:
    """This environment without what the package set for its own kernels (OWN_ENV): a peer
    server runs as its users run it (vLLM's OpenMP threads spin by default)."""
    from .. import OWN_ENV

    return {k: v for k, v in os.environ.items() if k not in OWN_ENV}


def start_peer(cmd: str, base: str, timeout_s: float, log: Path) -> subprocess.Popen:
    """Run the shell command `cmd` in a new session and wait until base/v1/models answers."""
    with open(log, "ab") as f:
        proc = subprocess.Popen(cmd, shell=True, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, env=peer_env())
    deadline = time.time() + timeout_s
    while peer_models(base) is None:
        if proc.poll() is not None:
            stop_group(proc, 5)
            raise ConvLlavaError(f"--against-cmd exited with status {proc.returncode} before {base}/v1/models answered; its output ({log}):\n{_tail(log)}")
        if time.time() > deadline:
            stop_group(proc)
            raise ConvLlavaError(f"{base}/v1/models did not answer within {timeout_s:.0f} s of starting --against-cmd; its output ({log}):\n{_tail(log)}")
        time.sleep(1)
    return proc


# -- the text stand-in for images -------------------------------------------------------------
def prompt_fit(url: str, model: str | None, target_tokens: int | None = None, seed: int = 12345) -> dict[str, Any] | None:
    """prompt_tokens = base + per_word * words on this server (chat template included), from
    non-streamed one-token requests of random words: 1 and 160 words, then, when `target_tokens`
    needs longer prompts, once more at about that length (the slope from the widest pair, so the
    stand-ins are sized where they are used). None when the server reports no prompt_tokens."""
    import httpx

    rng = np.random.default_rng([seed, 3])
    points: list[tuple[int, int]] = []

    def probe(client, words: int) -> bool:
        body = {"messages": [{"role": "user", "content": " ".join(random_words(rng, words))}], "max_tokens": 1, "temperature": 0}
        try:
            res = client.post(url, json={**body, "model": model} if model else body)
            tokens = res.json().get("usage", {}).get("prompt_tokens") if res.status_code == 200 else None
        except (httpx.HTTPError, ValueError, AttributeError):
            tokens = None
        if tokens:
            points.append((words, int(tokens)))
        return bool(tokens)

    def fit() -> tuple[float, float]:
        (w0, t0), (w1, t1) = points[0], points[-1]
        per_word = (t1 - t0) / (w1 - w0)
        return t0 - per_word * w0, per_word

    with httpx.Client(timeout=600) as client:
        if not (probe(client, 1) and probe(client, 160)) or fit()[1] <= 0:
            return None
        base, per_word = fit()
        if target_tokens and (target_tokens - base) / per_word > 240:
            probe(client, round((target_tokens - base) / per_word))
            if fit()[1] > 0:
                base, per_word = fit()
    return {"base_tokens": base, "tokens_per_word": per_word, "probes": [{"words": w, "prompt_tokens": t} for w, t in points]}


def stand_in_bodies(image_bodies: list[dict[str, Any]], prompt_tokens: dict[int, int], fit: dict[str, Any], seed: int) -> list[dict[str, Any]]:
    """One text-only request per image request, with the prompt length our server reported for that
    index (the median where ours failed). A request repeating an earlier image repeats that request's
    stand-in, all but a question's worth of words at its end, so a peer's prefix cache gets the reuse
    our encoder and prefix caches get."""
    known = [t for t in prompt_tokens.values() if t]
    fallback = int(np.median(known)) if known else 0
    rng = np.random.default_rng([seed, 11])
    per_word, base = fit["tokens_per_word"], fit["base_tokens"]
    tail = max(1, round(12 / per_word))  # about a question and the assistant tag
    first_with: dict[str, int] = {}
    texts: list[list[str]] = []
    out = []
    for i, body in enumerate(image_bodies):
        target = prompt_tokens.get(i) or fallback
        n = max(1, round((target - base) / per_word))
        url = next((p["image_url"]["url"] for p in body["messages"][0]["content"] if p.get("type") == "image_url"), None)
        earlier = first_with.setdefault(url, i) if url else i
        shared = texts[earlier][: max(0, min(n, len(texts[earlier])) - tail)] if earlier != i else []
        words = shared + random_words(rng, n - len(shared))
        texts.append(words)
        out.append({"messages": [{"role": "user", "content": " ".join(words)}]})
    return out


# -- the sweep --------------------------------------------------------------------------------
def _levels(workloads, concurrencies, prompts_per_level, prompt_words, requests_per_client: int | None = None) -> dict[tuple[str, int], list[dict[str, Any]]]:
    def n(c: int) -> int:
        return c * requests_per_client if requests_per_client else prompts_per_level or max(8, 2 * c)

    return {(w, c): workload_bodies(w, n(c), c, prompt_words) for w in workloads for c in concurrencies}


def _warm_up(url: str, workload: str, prompt_words: int, max_tokens: int, model: str | None, time_limit_s: float) -> None:
    """One request that is in no measured level (a distinct image / words), so no level starts with a cache hit."""
    body = workload_bodies(workload, 1, 10_000 + max_tokens, prompt_words)[0]
    run_level(url, [{**body, **request_options(max_tokens, model)}], 1, time_limit_s)


def _ratio(a: float, b: float) -> float:
    return a / b if b and math.isfinite(a) and math.isfinite(b) else float("nan")


def bench_serving(
    build: str | Path,
    concurrencies: list[int],
    max_tokens: int = 128,
    prompts_per_level: int | None = None,
    configs: dict[str, int] | None = None,
    time_limit_s: float = 600.0,
    progress=print,
    *,
    workloads: tuple[str, ...] | list[str] | None = None,
    prompt_words: int = 300,
    serve_args: tuple[str, ...] | list[str] = (),
    against: str | None = None,
    against_model: str | None = None,
    against_cmd: str | None = None,
    against_start_timeout_s: float = 900.0,
    requests_per_client: int | None = None,
    against_images: bool = False,
) -> dict[str, Any]:
    """Every config of ours (name → --max-running) through every workload and concurrency level;
    without `against` the configs are compared with the last one (default: batching on vs off), with
    it every config is compared with the peer at `against` on the same requests."""
    workloads = tuple(dict.fromkeys(workloads or (WORKLOADS if against else ("image",))))
    for w in workloads:
        if w not in WORKLOADS:
            raise ValueError(f"unknown workload {w!r} (use {', '.join(WORKLOADS)})")
    configs = configs or ({"convllava": max(concurrencies)} if against else {"batching": max(concurrencies), "batching off": 1})
    base = peer_base(against) if against else None
    if base:
        against_model = _check_peer(base, against_cmd, against_model)
    plan = _Plan(build, concurrencies, max_tokens, time_limit_s, workloads, prompt_words, tuple(serve_args),
                 _levels(workloads, concurrencies, prompts_per_level, prompt_words, requests_per_client), base, progress)
    ours = _measure_ours(plan, configs, stop_before_peer=bool(base and against_cmd))
    result: dict[str, Any] = {"machine": machine_info(), "build": str(build), "max_tokens": max_tokens, "configs": configs, "workloads": list(workloads),
                              "prompt_words": prompt_words, "serve_args": list(serve_args)}
    rows = ours.rows
    if base:
        result["peer"], peer_rows = _measure_peer(plan, ours, against_model, against_cmd, against_start_timeout_s, against_images)
        rows = rows + peer_rows
        result["comparison"] = _compare_with_peer(rows)
    else:
        _compare_with_last(rows, list(configs)[-1])
    result["results"] = rows
    result["multi_turn"] = ours.follow_up
    return result


@dataclass(frozen=True)
class _Plan:
    """What every level of one `bench serve` run shares."""

    build: str | Path
    concurrencies: list[int]
    max_tokens: int
    time_limit_s: float
    workloads: tuple[str, ...]
    prompt_words: int
    serve_args: tuple[str, ...]
    levels: dict[tuple[str, int], list[dict[str, Any]]]
    base: str | None  # the peer's base URL, when comparing
    progress: Any


@dataclass
class _Ours:
    rows: list[dict[str, Any]]
    follow_up: dict[str, Any] | None
    fits: dict[str, Any]  # "ours": our prompt fit (image stand-ins for the peer)
    prompt_tokens: dict[int, dict[int, int]]  # image level → request index → our prompt_tokens


def _check_peer(base: str, against_cmd: str | None, against_model: str | None) -> str | None:
    """Refuse a peer URL that is already taken (with --against-cmd) or that answers nothing
    (without); returns the model name to ask for."""
    if against_cmd:
        if peer_models(base) is not None:
            raise ConvLlavaError(f"{base}/v1/models already answers: something is serving there, and --against-cmd would start a second server "
                                 "(stop it, or drop --against-cmd to measure it as it is)")
        return against_model
    models = peer_models(base, timeout_s=30)
    if models is None:
        raise ConvLlavaError(f"nothing answers at {base}/v1/models (start the peer first, or give --against-cmd)")
    against_model = against_model or (models[0] if models else None)
    if not against_model:
        raise ConvLlavaError(f"{base}/v1/models lists no model; give --against-model")
    return against_model


def _measure_ours(plan: _Plan, configs: dict[str, int], stop_before_peer: bool) -> _Ours:
    """Each config: start our server, run every workload and level, stop it (and, before a peer is
    started beside it, wait until its port is closed)."""
    from .e2e import _free_port

    ours = _Ours([], None, {}, {})
    threads = os.cpu_count() or 1
    for name, max_running in configs.items():
        port = _free_port()
        extra = " " + " ".join(plan.serve_args) if plan.serve_args else ""
        plan.progress(f"{name} (--max-running {max_running}{extra}): starting our server on http://127.0.0.1:{port}")
        proc = start_server(plan.build, port, max_running, plan.max_tokens, threads, plan.serve_args)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        try:
            if plan.base and "image" in plan.workloads and "ours" not in ours.fits:
                ours.fits["ours"] = prompt_fit(url, None)
            for w in plan.workloads:
                _measure_workload(plan, ours, proc, url, name, max_running, w)
            if ours.follow_up is None and not plan.base and "image" in plan.workloads:
                plan.progress(f"{name}: multi-turn follow-ups about one image")
                ours.follow_up = {"config": name, **multi_turn(url, max_tokens=min(32, plan.max_tokens))}
        finally:
            stop_group(proc)
            proc.log.unlink(missing_ok=True)  # type: ignore[attr-defined]
        if stop_before_peer:
            _wait_port_closed(port)
    return ours


def _measure_workload(plan: _Plan, ours: _Ours, proc: Any, url: str, name: str, max_running: int, w: str) -> None:
    _warm_up(url, w, plan.prompt_words, plan.max_tokens, None, plan.time_limit_s)
    for c in plan.concurrencies:
        bodies = [{**b, **request_options(plan.max_tokens)} for b in plan.levels[w, c]]
        plan.progress(f"{name}, {w}: {c} concurrent clients, {len(bodies)} requests x {plan.max_tokens} tokens")
        before = server_counters(url)
        with PeakRss(proc) as mem:
            row = run_level(url, bodies, c, plan.time_limit_s, keep=bool(plan.base) and w == "image")
        row["server_peak_rss_gb"] = mem.peak_gb
        row["server_time"] = server_time(before, server_counters(url), row["duration_s"])
        if "per_request" in row:
            per = row.pop("per_request")
            ours.prompt_tokens.setdefault(c, {r["index"]: r.get("prompt_tokens", 0) for r in per if r["status"] == 200})
        ours.rows.append({"server": "ours", "config": name, "max_running": max_running, "workload": w, **row})


SERVER_COUNTERS = ("convllava_prefill_seconds_total", "convllava_prefill_passes_total", "convllava_decode_seconds_total",
                   "convllava_batch_size_count", "convllava_batch_size_sum")


def server_counters(url: str) -> dict[str, float] | None:
    """Our server's scheduler counters from /metrics (None when it does not answer)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    try:
        res = httpx.get(url.split("/v1/", 1)[0] + "/metrics", timeout=10)
        res.raise_for_status()
    except httpx.HTTPError:
        return None
    found = {s.name: s.value for fam in text_string_to_metric_families(res.text) for s in fam.samples}
    return {k: float(found.get(k, 0.0)) for k in SERVER_COUNTERS}


def server_time(before: dict[str, float] | None, after: dict[str, float] | None, duration_s: float) -> dict[str, float] | None:
    """Where our server's time went during a level: seconds in prefill passes and in decode steps
    (the scheduler's wall clock), steps, rows per step, and the share of the level they fill."""
    if before is None or after is None:
        return None
    d = {k: after[k] - before[k] for k in SERVER_COUNTERS}
    steps = d["convllava_batch_size_count"]
    busy = d["convllava_prefill_seconds_total"] + d["convllava_decode_seconds_total"]
    return {
        "prefill_s": round(d["convllava_prefill_seconds_total"], 4),
        "prefill_passes": int(d["convllava_prefill_passes_total"]),
        "decode_s": round(d["convllava_decode_seconds_total"], 4),
        "decode_steps": int(steps),
        "decoded_rows": int(d["convllava_batch_size_sum"]),
        "rows_per_step": round(d["convllava_batch_size_sum"] / steps, 2) if steps else 0.0,
        "busy_share": round(busy / duration_s, 3) if duration_s > 0 else 0.0,
    }


def _wait_port_closed(port: int, timeout_s: float = 30.0) -> None:
    deadline = time.time() + timeout_s
    while port_open("127.0.0.1", port) and time.time() < deadline:
        time.sleep(0.2)
    if port_open("127.0.0.1", port):
        raise ConvLlavaError(f"our server on port {port} still accepts connections after being stopped; not starting --against-cmd beside it")


def _measure_peer(
    plan: _Plan, ours: _Ours, against_model: str | None, against_cmd: str | None, start_timeout_s: float, images: bool = False
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The same levels against the peer (started by `against_cmd` once ours has stopped, and ended
    afterwards); image requests become text stand-ins of our prompt lengths unless the peer takes
    images (`images`: e.g. vLLM with our plugin), which then gets the very same requests."""
    base, progress = plan.base, plan.progress
    peer: dict[str, Any] = {"url": base, "model": against_model, "cmd": against_cmd, "images": images}
    stand_in = "image" in plan.workloads and not images
    rows: list[dict[str, Any]] = []
    proc, log = None, None
    try:
        if against_cmd:
            log = Path(tempfile.mkstemp(prefix="bench-serve-peer-", suffix=".log")[1])
            progress(f"peer: our server is stopped; starting --against-cmd (output in {log}), waiting up to {start_timeout_s:.0f} s for {base}/v1/models")
            t0 = time.perf_counter()
            proc = start_peer(against_cmd, base, start_timeout_s, log)
            peer["start_s"] = time.perf_counter() - t0
            models = peer_models(base) or []
            against_model = against_model or (models[0] if models else None)
            if not against_model:
                raise ConvLlavaError(f"{base}/v1/models lists no model; give --against-model")
            peer["model"] = against_model
        url = f"{base}/v1/chat/completions"
        progress(f"peer: {base} serving {against_model!r}")
        fits = dict(ours.fits)
        if stand_in:
            known = [t for level in ours.prompt_tokens.values() for t in level.values() if t]
            fit = prompt_fit(url, against_model, int(np.median(known)) if known else None)
            fits["peer"] = fit
            peer["prompt_fit"] = {"source": "peer" if fit else "ours", **(fit or fits.get("ours") or {})}
            if not (fit or fits.get("ours")):
                raise ConvLlavaError("neither server reported usage.prompt_tokens: cannot size the text stand-in for the image workload")
        for w in plan.workloads:
            _warm_up(url, "text", plan.prompt_words, plan.max_tokens, against_model, plan.time_limit_s)
            for c in plan.concurrencies:
                if w == "image" and stand_in:
                    bodies = stand_in_bodies(plan.levels[w, c], ours.prompt_tokens.get(c, {}), fits.get("peer") or fits["ours"], seed=c)
                else:
                    bodies = plan.levels[w, c]
                bodies = [{**b, **request_options(plan.max_tokens, against_model)} for b in bodies]
                progress(f"peer, {w}{' (text stand-in)' if w == 'image' and stand_in else ''}: {c} concurrent clients, {len(bodies)} requests x {plan.max_tokens} tokens")
                with PeakRss(proc) as mem:
                    row = run_level(url, bodies, c, plan.time_limit_s)
                row["server_peak_rss_gb"] = mem.peak_gb  # None for a peer this run did not start
                rows.append({"server": "peer", "config": "peer", "workload": w, **({"note": STAND_IN} if w == "image" and stand_in else {}), **row})
    finally:
        if proc is not None:
            progress("peer: ending the process group of --against-cmd")
            stop_group(proc)
            peer["log"] = str(log)
    return peer, rows


def _compare_with_peer(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each of our rows against the peer's at the same workload and clients (ratios added to our rows)."""
    peers = {(r["workload"], r["concurrency"]): r for r in rows if r["server"] == "peer"}
    comparison = []
    for r in rows:
        p = peers.get((r["workload"], r["concurrency"]))
        if r["server"] != "ours" or p is None:
            continue
        r["token_throughput_vs_peer"] = _ratio(r["output_token_throughput"], p["output_token_throughput"])
        r["p99_ttft_vs_peer"] = _ratio(r["ttft"]["p99_ms"], p["ttft"]["p99_ms"])
        comparison.append({
            "config": r["config"], "workload": r["workload"], "concurrency": r["concurrency"], **({"note": p["note"]} if "note" in p else {}),
            "ours_token_throughput": r["output_token_throughput"], "peer_token_throughput": p["output_token_throughput"],
            "token_throughput_ours_over_peer": r["token_throughput_vs_peer"],
            "ours_p99_ttft_ms": r["ttft"]["p99_ms"], "peer_p99_ttft_ms": p["ttft"]["p99_ms"], "p99_ttft_ours_over_peer": r["p99_ttft_vs_peer"],
            "ours_prompt_tokens_mean": r["prompt_tokens_mean"], "peer_prompt_tokens_mean": p["prompt_tokens_mean"],
        })
    return comparison


def _compare_with_last(rows: list[dict[str, Any]], last_config: str) -> None:
    last = {(r["workload"], r["concurrency"]): r for r in rows if r["config"] == last_config}
    for r in rows:
        b = last[r["workload"], r["concurrency"]]
        r["token_throughput_vs_last_config"] = _ratio(r["output_token_throughput"], b["output_token_throughput"])
        r["p99_ttft_vs_last_config"] = _ratio(r["ttft"]["p99_ms"], b["ttft"]["p99_ms"])


def _ms3(s: dict[str, float]) -> str:
    return f"{s['mean_ms']:.1f} / {s['median_ms']:.1f} / {s['p99_ms']:.1f}"


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    gpus = f", GPU: {'; '.join(m['gpus'])}" if m.get("gpus") else ""
    lines = [
        f"Build `{Path(result['build']).name}`, {result['max_tokens']} output tokens per request (ignore_eos, temperature 0), "
        f"machine: {m['cpu']} ({m['isa']}), {m['cpus']} cores{gpus}",
    ]
    peer = result.get("peer")
    if peer:
        fit = peer.get("prompt_fit")
        lines += [f"Peer: {peer['url']} serving `{peer['model']}`" + (f", started by `{peer['cmd']}` after our server stopped" if peer.get("cmd") else ", already running")
                  + f". Workloads: {', '.join(result['workloads'])}" + (f" (text: {result['prompt_words']} random words per request)" if "text" in result["workloads"] else "")
                  + (f"; image on the peer = {STAND_IN} ({fit['tokens_per_word']:.2f} tokens/word, fitted on {fit['source']})" if fit else ""),
                  "", "| server | config | workload | clients | ok / failed | req/s | out tok/s | TTFT mean / median / p99 ms | TPOT mean / median / p99 ms | "
                  "ITL mean / median / p99 ms | prompt tokens (mean) | timed by |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in result["results"]:
            w = r["workload"] + (" (text stand-in)" if r.get("note") == STAND_IN else "")
            lines.append(f"| {r['server']} | {r['config']} | {w} | {r['concurrency']} | {r['completed']} / {r['failed']} | {r['request_throughput']:.2f} | "
                         f"{r['output_token_throughput']:.1f} | {_ms3(r['ttft'])} | {_ms3(r['tpot'])} | {_ms3(r['itl'])} | {r['prompt_tokens_mean']:.0f} | {r['timed_by']} |")
        lines += ["", "| config | workload | clients | out tok/s ours / peer | ours / peer | p99 TTFT ms ours / peer | ours / peer | prompt tokens ours / peer (mean) |",
                  "|---|---|---|---|---|---|---|---|"]
        for c in result["comparison"]:
            w = c["workload"] + (f" ({STAND_IN})" if c.get("note") else "")
            lines.append(f"| {c['config']} | {w} | {c['concurrency']} | {c['ours_token_throughput']:.1f} / {c['peer_token_throughput']:.1f} | "
                         f"{c['token_throughput_ours_over_peer']:.2f}x | {c['ours_p99_ttft_ms']:.0f} / {c['peer_p99_ttft_ms']:.0f} | {c['p99_ttft_ours_over_peer']:.2f}x | "
                         f"{c['ours_prompt_tokens_mean']:.0f} / {c['peer_prompt_tokens_mean']:.0f} |")
        return "\n".join(lines + _server_time_lines(result))
    lines += [
        "",
        "| config | workload | clients | ok / failed | req/s | out tok/s | vs last config | TTFT mean / median / p99 ms | p99 TTFT vs last | TPOT mean / p99 ms | ITL mean / p99 ms | cached prompt tokens |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["results"]:
        t, p, i = r["ttft"], r["tpot"], r["itl"]
        lines.append(
            f"| {r['config']} | {r['workload']} | {r['concurrency']} | {r['completed']} / {r['failed']} | {r['request_throughput']:.2f} | {r['output_token_throughput']:.1f} | "
            f"{r['token_throughput_vs_last_config']:.2f}x | {t['mean_ms']:.0f} / {t['median_ms']:.0f} / {t['p99_ms']:.0f} | {r['p99_ttft_vs_last_config']:.2f}x | "
            f"{p['mean_ms']:.1f} / {p['p99_ms']:.1f} | {i['mean_ms']:.1f} / {i['p99_ms']:.1f} | {r['cached_prompt_tokens']} |"
        )
    mt = result.get("multi_turn")
    if mt:
        lines += ["", f"Follow-up about the same image ({mt['config']}): median turn-2 TTFT = {mt['median_turn2_vs_turn1_ttft']:.2f}x turn 1", "",
                  "| turn 1 TTFT ms | turn 2 TTFT ms | turn 1 prompt tokens | turn 2 prompt tokens | turn 2 cached |", "|---|---|---|---|---|"]
        lines += [f"| {t['turn1_ttft_ms']:.0f} | {t['turn2_ttft_ms']:.0f} | {t['turn1_prompt_tokens']} | {t['turn2_prompt_tokens']} | {t['turn2_cached_tokens']} |" for t in mt["turns"]]
    return "\n".join(lines + _server_time_lines(result))


def _server_time_lines(result: dict[str, Any]) -> list[str]:
    """Our server's own account of each level: prefill and decode seconds (what bounds the throughput)."""
    rows = [r for r in result["results"] if r["server"] == "ours" and r.get("server_time")]
    if not rows:
        return []
    lines = ["", "Where our server's time went (its scheduler's clock, from /metrics):", "",
             "| config | workload | clients | level s | prefill s (passes) | decode s (steps, rows per step) | busy |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r["server_time"]
        lines.append(f"| {r['config']} | {r['workload']} | {r['concurrency']} | {r['duration_s']:.0f} | {t['prefill_s']:.0f} ({t['prefill_passes']}) | "
                     f"{t['decode_s']:.0f} ({t['decode_steps']}, {t['rows_per_step']:.1f}) | {100 * t['busy_share']:.0f} % |")
    return lines
