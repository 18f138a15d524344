"""One streamed text request (ignore_eos) to an OpenAI server: TTFT and TPOT from its per-chunk usage.

Usage: python benchmarks/tpot_probe.py URL MODEL TOKENS (used by benchmarks/vllm_plain_vs_plugin.sh)
"""
import json, sys, time, random
import httpx
url, model, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
random.seed(0)
words = " ".join(random.choice(["red", "green", "blue", "house", "river", "quickly", "seven", "light"]) for _ in range(300))
body = {"model": model, "messages": [{"role": "user", "content": words}], "max_tokens": n, "temperature": 0,
        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
t0 = time.perf_counter(); times = []; last = 0
with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=900) as r:
    for line in r.iter_lines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        d = json.loads(line[6:])
        u = d.get("usage") or {}
        ct = u.get("completion_tokens", 0)
        if ct > last:
            times.append((time.perf_counter() - t0, ct)); last = ct
ttft = times[0][0]; tpot = (times[-1][0] - times[0][0]) / max(1, times[-1][1] - times[0][1])
print(json.dumps({"model": model, "prompt_tokens": u.get("prompt_tokens"), "ttft_s": round(ttft, 2), "tpot_s": round(tpot, 3), "tokens": last}))
