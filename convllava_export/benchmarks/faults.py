"""`convllava-export bench faults`: the faults a client can cause (issue 21), sent to a real `serve`
of a build, then the same greedy requests as before them.

The tests prove each fix on small models; this runs the same faults against the size that matters
(a 7B build) and records what the server answered. Each check says what was expected and what came
back, and the run fails when one does not hold:

- sampling extremes (temperature 1e-300 is greedy; NaN and out-of-range values are 400),
- a prompt at the context with a large max_tokens stops at the context (`finish_reason: length`),
- an image beyond the vision profile fails only its own request, not the two encoded beside it
  (a build made with `--mode native`; in pad mode every image is resized to the resolution, so
  no client can reach the profile's edge and the check says so),
- odd images (a decompression bomb, a truncated PNG, bytes that are no image, a 1 x 100000 sliver),
- a client that leaves mid-stream frees its row and its KV bytes,
- a burst beyond the queue gets 429 with Retry-After, never a 5xx,
- after all of it: the first requests again, answered identically, and /health 200,
- SIGTERM with streams running: the server exits within its drain time plus a margin.

Non-finite logits from the model itself cannot be caused by a client on a sound model; the test
suite poisons a decoder for that (tests/test_scheduler.py).
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import ConvLlavaError

ERROR_KEYS = {"message", "type", "param", "code"}
LEAVE_STEPS = 64  # decode steps a request that lost its client may still take before its row is freed
SERVER_ARGS = ("--max-running", "2", "--max-queue", "2")  # capacity 4: the burst check overflows it


def png(img: Any, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def data_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


def odd_images() -> dict[str, tuple[bytes, set[int]]]:
    """Images a server must survive, with the statuses each may get."""
    from PIL import Image

    rng = np.random.default_rng(0)
    grey16 = Image.fromarray((rng.integers(0, 65535, (64, 48))).astype(np.uint16))
    cmyk = io.BytesIO()
    Image.new("CMYK", (40, 40), (0, 200, 30, 10)).save(cmyk, format="JPEG")
    return {
        "1x100000 (pad to square)": (png(Image.new("RGB", (1, 100_000), (9, 9, 9))), {200, 400}),
        "100000x1": (png(Image.new("RGB", (100_000, 1), (9, 9, 9))), {200, 400}),
        "3x40000 native-like sliver": (png(Image.new("L", (3, 40_000), 128)), {200, 400}),
        "decompression bomb": (png(Image.new("L", (12_000, 12_000))), {400}),  # 144 Mpx in ~150 KB
        "truncated png": (png(Image.new("RGB", (300, 300), (200, 10, 10)))[:400], {400}),
        "not an image": (b"GIF89a" + b"\0" * 50, {400}),
        "16-bit grey": (png(grey16), {200}),
        "palette": (png(Image.new("RGB", (50, 30), (0, 90, 200)).convert("P")), {200}),
        "LA": (png(Image.new("LA", (50, 30), (90, 128))), {200}),
        "CMYK jpeg": (cmyk.getvalue(), {200}),
    }


def _chat(text: str, image: str | None = None, **opts: Any) -> dict[str, Any]:
    content: Any = text if image is None else [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": text}]
    return {"messages": [{"role": "user", "content": content}], "temperature": 0, **opts}


class _Probe:
    """One server under test and the checks made against it."""

    def __init__(self, base: str, proc: Any, progress: Callable[[str], None]) -> None:
        import httpx

        self.base, self.proc, self.progress = base, proc, progress
        self.client = httpx.Client(timeout=httpx.Timeout(1800, connect=10))
        self.checks: list[dict[str, Any]] = []

    def post(self, body: dict[str, Any] | bytes) -> Any:
        url = f"{self.base}/v1/chat/completions"
        if isinstance(body, bytes):
            return self.client.post(url, content=body, headers={"content-type": "application/json"})
        return self.client.post(url, json=body)

    def check(self, name: str, expected: str, run: Callable[[], tuple[bool, str]], ends_server: bool = False) -> bool:
        self.progress(f"faults: {name}")
        t0 = time.perf_counter()
        try:
            ok, observed = run()
        except Exception as exc:  # a check that raised did not hold; the run goes on to the next
            ok, observed = False, f"{type(exc).__name__}: {exc}"[:500]
        alive = ends_server or self.proc.poll() is None
        self.checks.append({"name": name, "expected": expected, "observed": observed if alive else f"{observed}; the server died",
                            "passed": ok and alive, "seconds": round(time.perf_counter() - t0, 2)})
        return ok and alive

    def metrics(self) -> dict[str, float]:
        out = {}
        for line in self.client.get(f"{self.base}/metrics", timeout=30).text.splitlines():
            if line.startswith("convllava_") and " " in line and "{" not in line:
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out


def _answer(res: Any) -> tuple[str, dict[str, Any], str | None]:
    if res.status_code != 200:
        raise ConvLlavaError(f"the server answered {res.status_code}: {res.text[:300]}")
    data = res.json()
    choice = data["choices"][0]
    return choice["message"]["content"], data["usage"], choice.get("finish_reason")


def _tokens(usage: dict[str, Any]) -> tuple[int, int]:
    return usage["prompt_tokens"], usage["completion_tokens"]  # not prompt_tokens_details: a repeat hits the prefix cache


def _error_shape(res: Any) -> bool:
    try:
        return set(res.json()["error"]) == ERROR_KEYS
    except (ValueError, KeyError, TypeError):
        return False


def _context_prompt(tokenizer: Any, overhead: int, target: int, seed: int = 7) -> str:
    """Random words whose chat prompt is about `target` tokens (`overhead`: the template's share)."""
    from .serving import random_words

    words = random_words(np.random.default_rng(seed), 4 * target)
    lo, hi = 1, len(words)
    while lo < hi:  # the most words that stay within the target
        mid = (lo + hi + 1) // 2
        if len(tokenizer.encode(" ".join(words[:mid]), add_special_tokens=False)) + overhead <= target:
            lo = mid
        else:
            hi = mid - 1
    return " ".join(words[:lo])


def _native_out_of_profile(manifest: Any) -> tuple[int, int] | None:
    """A (width, height) whose native-mode size exceeds the vision profile, or None if none can."""
    from ..engines.profiles import VisionProfile
    from ..preprocess import native_size
    from ..runtime.build_loader import preprocess_config

    cfg = preprocess_config(manifest)
    if cfg.mode != "native" or cfg.size is not None:
        return None
    prof = VisionProfile.from_dict(manifest.vision.profile)
    for ratio in (2, 3, 4, 6, 8, 12, 16):
        w, h = 64 * ratio * 8, 512
        nh, nw = native_size(h, w, cfg.resolution, cfg.max_tokens)
        if nh > prof.max_hw[0] or nw > prof.max_hw[1]:
            return w, h
    return None


def run_faults(build: str | Path, port: int | None = None, threads: int | None = None, max_tokens: int = 16, drain_s: float = 5.0,
               serve_args: tuple[str, ...] = (), progress: Callable[[str], None] = print) -> dict[str, Any]:
    from ..manifest import read_manifest
    from ..synthetic import colour_sample
    from ..tokenizer import load_tokenizer
    from .serving import PeakRss, machine_info, start_server, stop_group
    from .serving import port_open as _open

    build = Path(build)
    manifest = read_manifest(build)
    ctx = manifest.max_context
    tokenizer = load_tokenizer(build / "tokenizer")
    if port is None:
        from .e2e import _free_port

        port = _free_port()
    t_start = time.perf_counter()
    progress(f"faults: starting serve {build.name} on port {port}")
    proc = start_server(build, port, 2, ctx, threads or os.cpu_count() or 1, (*SERVER_ARGS, "--drain-s", str(drain_s), *serve_args), timeout_s=1800)
    base = f"http://127.0.0.1:{port}"
    p = _Probe(base, proc, progress)
    image = data_url(png(colour_sample(np.random.default_rng(3), "green", "square", base=(240, 320)).image))
    text_body = _chat("Describe a quiet morning in a small town.", max_tokens=max_tokens, ignore_eos=True)
    image_body = _chat("What is shown in this image?", image, max_tokens=max_tokens, ignore_eos=True)
    result: dict[str, Any] = {"build": build.name, "machine": machine_info(), "max_context": ctx, "max_tokens": max_tokens}
    with PeakRss(proc) as rss:
        try:
            first = {k: _answer(p.post(b)) for k, b in (("text", text_body), ("image", image_body))}
            result["baseline"] = {k: {"content": v[0], "usage": v[1]} for k, v in first.items()}
            _sampling_checks(p, text_body, first["text"][0])
            _context_check(p, tokenizer, first["text"][1]["prompt_tokens"] - len(tokenizer.encode(text_body["messages"][0]["content"], add_special_tokens=False)), ctx)
            _profile_check(p, manifest, image_body, first["image"][0])
            _odd_image_checks(p)
            _disconnect_check(p, ctx)
            _burst_check(p)

            def again() -> tuple[bool, str]:
                now = {k: _answer(p.post(b)) for k, b in (("text", text_body), ("image", image_body))}
                same = {k: now[k][0] == first[k][0] and _tokens(now[k][1]) == _tokens(first[k][1]) for k in now}
                health = p.client.get(f"{base}/health").status_code
                return all(same.values()) and health == 200, f"identical answers: {same}; /health {health}"

            p.check("the first requests again, after every fault", "identical greedy answers and token counts; /health 200", again)
            _sigterm_check(p, drain_s, ctx)
        finally:
            if proc.poll() is None:
                stop_group(proc, 30)
            p.client.close()
    result.update(checks=p.checks, passed=all(c["passed"] for c in p.checks), server_peak_rss_gb=rss.peak_gb,
                  port_closed=not _open("127.0.0.1", port), wall_s=round(time.perf_counter() - t_start, 1))
    return result


def _sampling_checks(p: _Probe, body: dict[str, Any], greedy: str) -> None:
    def cold() -> tuple[bool, str]:
        res = p.post({**body, "temperature": 1e-300, "seed": 1})
        return res.status_code == 200 and _answer(res)[0] == greedy, f"{res.status_code}, same as greedy: {res.status_code == 200 and _answer(res)[0] == greedy}"

    p.check("temperature 1e-300", "200 and the greedy answer", cold)
    for name, raw in (("temperature NaN", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}'),
                      ("temperature 1e300", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 1e300}'),
                      ("top_p -1", b'{"messages": [{"role": "user", "content": "hi"}], "top_p": -1}'),
                      ("max_tokens 10^12", b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1000000000000}')):
        p.check(name, "400 in OpenAI's error shape", lambda raw=raw: ((r := p.post(raw)).status_code == 400 and _error_shape(r), f"{r.status_code} {r.text[:160]}"))


def _context_check(p: _Probe, tokenizer: Any, overhead: int, ctx: int) -> None:
    text = _context_prompt(tokenizer, overhead, ctx - 12)

    def at_context() -> tuple[bool, str]:
        res = p.post(_chat(text, max_tokens=ctx, ignore_eos=True))
        if res.status_code != 200:
            return False, f"{res.status_code} {res.text[:200]}"
        _, usage, finish = _answer(res)
        total = usage["prompt_tokens"] + usage["completion_tokens"]
        return finish == "length" and total == ctx, f"finish_reason {finish}, prompt {usage['prompt_tokens']} + completion {usage['completion_tokens']} = {total} of {ctx}"

    p.check(f"prompt of ~{ctx - 12} tokens, max_tokens {ctx}", f"200, finish_reason length, prompt + completion = {ctx}", at_context)


def _profile_check(p: _Probe, manifest: Any, image_body: dict[str, Any], answer: str) -> None:
    from PIL import Image

    size = _native_out_of_profile(manifest)
    if size is None:
        p.checks.append({"name": "image beyond the vision profile", "expected": "not reachable: this build resizes every image into its profile (pad mode, or every native size fits)",
                         "observed": "skipped", "passed": True, "seconds": 0.0})
        return
    wide = data_url(png(Image.new("RGB", size, (200, 40, 40))))

    def burst() -> tuple[bool, str]:
        bodies = [image_body, _chat("What is shown in this image?", wide, max_tokens=4), image_body]
        with ThreadPoolExecutor(3) as pool:
            res = list(pool.map(p.post, bodies))
        codes = [r.status_code for r in res]
        good = [r.status_code == 200 and _answer(r)[0] == answer for r in (res[0], res[2])]
        return codes[1] == 400 and _error_shape(res[1]) and all(good), f"statuses {codes}; the others' answers unchanged: {good}; {res[1].text[:160]}"

    p.check(f"native {size[0]}x{size[1]} image (beyond the profile) sent beside two good ones", "400 for it alone; the others 200 with their answers", burst)


def _odd_image_checks(p: _Probe) -> None:
    for name, (raw, allowed) in odd_images().items():
        def one(raw: bytes = raw, allowed: set[int] = allowed) -> tuple[bool, str]:
            res = p.post(_chat("What colour?", data_url(raw), max_tokens=2))
            ok = res.status_code in allowed and (res.status_code == 200 or _error_shape(res))
            return ok, f"{res.status_code} {'' if res.status_code == 200 else res.text[:160]}"

        p.check(f"image: {name}", " or ".join(map(str, sorted(allowed))) + " (never 5xx)", one)


def _disconnect_check(p: _Probe, ctx: int) -> None:
    def leave() -> tuple[bool, str]:
        body = _chat("Tell a long story.", max_tokens=ctx // 2, ignore_eos=True, stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True})
        steps0 = p.metrics().get("convllava_batch_size_count", 0.0)  # decode steps so far
        chunks = 0
        with p.client.stream("POST", f"{p.base}/v1/chat/completions", json=body) as res:
            for line in res.iter_lines():
                chunks += line.startswith("data:")
                if chunks >= 3:
                    break  # leave: closing the response drops the connection
        running = kv = -1.0
        deadline = time.time() + 120
        while time.time() < deadline:
            m = p.metrics()
            running, kv = m.get("convllava_running_sequences", -1), m.get("convllava_kv_cache_bytes", -1)
            if running == 0 and kv == 0:
                break
            time.sleep(0.5)
        steps = p.metrics().get("convllava_batch_size_count", 0.0) - steps0
        freed = running == 0 and kv == 0 and steps <= LEAVE_STEPS  # a row left running would decode its ctx/2 tokens first
        return freed, f"left after {chunks} chunks; then running rows {running:g}, KV bytes {kv:g}, {steps:g} decode steps in all (of {ctx // 2} asked)"

    p.check("client leaves mid-stream", f"its row and KV bytes freed (running 0, KV 0) within {LEAVE_STEPS} decode steps", leave)


def _burst_check(p: _Probe) -> None:
    def burst() -> tuple[bool, str]:
        with ThreadPoolExecutor(10) as pool:
            res = list(pool.map(p.post, [_chat(f"Say {k}.", max_tokens=2) for k in range(10)]))
        codes = [r.status_code for r in res]
        retry = all(r.headers.get("retry-after") for r in res if r.status_code == 429)
        return set(codes) <= {200, 429} and 429 in codes and 200 in codes and retry, f"statuses {sorted(codes)}; Retry-After on every 429: {retry}"

    p.check("10 requests at once, capacity 4", "200s and 429s with Retry-After, never 5xx", burst)


def _sigterm_check(p: _Probe, drain_s: float, ctx: int) -> None:
    import httpx

    margin = 30.0
    started = [threading.Event(), threading.Event()]
    ends: list[str] = ["", ""]

    def stream(k: int) -> None:
        body = _chat(f"Count to {k + 1000}.", max_tokens=ctx // 2, ignore_eos=True, stream=True)
        error = None
        try:
            with httpx.stream("POST", f"{p.base}/v1/chat/completions", json=body, timeout=drain_s + margin + 600) as res:
                for line in res.iter_lines():
                    if '"content"' in line:
                        started[k].set()
                    if line.startswith("data:") and '"error"' in line:
                        error = (json.loads(line[5:]).get("error") or {}).get("code")
                    if line.strip() == "data: [DONE]":
                        ends[k] = f"error event ({error}), then [DONE]" if error else "finished, [DONE]"
            ends[k] = ends[k] or "ended without [DONE]"
        except httpx.HTTPError as exc:
            ends[k] = f"connection cut ({type(exc).__name__})"
        finally:
            started[k].set()

    def term() -> tuple[bool, str]:
        workers = [threading.Thread(target=stream, args=(k,), daemon=True) for k in range(2)]
        for w in workers:
            w.start()
        for s in started:
            s.wait(600)
        t0 = time.perf_counter()
        os.killpg(p.proc.pid, signal.SIGTERM)
        try:
            p.proc.wait(drain_s + margin)
        except subprocess.TimeoutExpired:
            pass  # judged below: still running
        took = time.perf_counter() - t0
        for w in workers:
            w.join(10)
        exited = p.proc.poll() is not None
        hung = sum(w.is_alive() for w in workers)
        clean = all("[DONE]" in e for e in ends)
        return exited and not hung and clean, f"exit after {took:.1f} s (drain {drain_s:g} s), code {p.proc.poll()}; streams: {ends}, {hung} still open"

    ok = p.check(f"SIGTERM with two streams running (--drain-s {drain_s:g})", f"exits within drain + {margin:g} s; every stream ends with [DONE] (an error event if cut short)", term, ends_server=True)
    if not ok and p.proc.poll() is None:
        p.proc.kill()


def markdown(result: dict[str, Any]) -> str:
    lines = [f"Faults against `serve` of {result['build']} ({result['machine'].get('cpu')}, {result['machine'].get('isa')}): "
             f"{'all held' if result['passed'] else 'SOME FAILED'}; server peak RSS {result['server_peak_rss_gb']} GB, {result['wall_s']} s", "",
             "| check | expected | observed | held | s |", "| --- | --- | --- | --- | --- |"]
    for c in result["checks"]:
        lines.append(f"| {c['name']} | {c['expected']} | {str(c['observed']).replace('|', '/')} | {'yes' if c['passed'] else '**no**'} | {c['seconds']} |")
    return "\n".join(lines)
