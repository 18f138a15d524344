"""The OpenAI-compatible server, started for real on loopback and spoken to over HTTP."""

from __future__ import annotations

import re
import base64
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from serving_helpers import LiveServer, data_url, message

from convllava_export.runtime.server import ServerLimits, create_app
from convllava_export.synthetic import colour_samples


@pytest.fixture(scope="module")
def server(tiny_pipeline):
    limits = ServerLimits(max_body_bytes=2 << 20, max_image_pixels=2_000_000, max_tokens=64, max_queue=2)
    with LiveServer(create_app(tiny_pipeline, "convllava-tiny", limits)) as url:
        yield url


def test_health_models_metrics(server):
    assert httpx.get(f"{server}/health").json()["status"] == "ok"
    models = httpx.get(f"{server}/v1/models").json()
    assert models["data"][0]["id"] == "convllava-tiny"
    res = httpx.get(f"{server}/metrics")
    assert res.status_code == 200 and res.headers["content-type"].startswith("text/plain")
    metrics = res.text
    for name in ("convllava_requests_total counter", "convllava_time_to_first_token_seconds histogram", "convllava_batch_size histogram"):
        assert f"# TYPE {name}" in metrics, name
    assert "convllava_queue_depth 0.0" in metrics and "convllava_running_sequences 0.0" in metrics  # nothing in flight
    assert re.search(r"convllava_kv_cache_budget_bytes [1-9]", metrics)


def test_openai_client_matches_pipeline(server, tiny_pipeline):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key="unused")
    for s in colour_samples(3, seed=21):
        want = tiny_pipeline.generate(s.image, s.question, max_new_tokens=32).text
        res = client.chat.completions.create(model="convllava-tiny", messages=message(s.question, data_url(s.image)), temperature=0, max_tokens=32)
        assert res.choices[0].message.content == want == s.answer
        assert res.choices[0].finish_reason == "stop" and res.usage.completion_tokens > 5 and res.usage.prompt_tokens > 16
        stream = client.chat.completions.create(model="convllava-tiny", messages=message(s.question, data_url(s.image)), temperature=0, max_tokens=32, stream=True)
        chunks = [c.choices[0].delta.content or "" for c in stream]
        assert "".join(chunks) == want and len([c for c in chunks if c]) > 3
    metrics = httpx.get(f"{server}/metrics").text
    assert 'convllava_requests_total{status="200"} 6.0' in metrics and "convllava_time_to_first_token_seconds_count 6.0" in metrics
    assert "convllava_queue_depth 0.0" in metrics and "convllava_time_per_output_token_seconds_count 6.0" in metrics
    assert "convllava_encoder_cache_misses_total" in metrics and "convllava_batch_size_bucket" in metrics
    assert re.search(r"convllava_kv_cache_budget_bytes [1-9]", metrics) and "convllava_kv_cache_bytes 0.0" in metrics  # rows gone, memory back


def test_multi_turn_with_system_message(server):
    s = colour_samples(1, seed=8)[0]
    msgs = [{"role": "system", "content": "You describe images."}, *message(s.question, data_url(s.image)), {"role": "assistant", "content": s.answer}, {"role": "user", "content": s.question}]
    res = httpx.post(f"{server}/v1/chat/completions", json={"messages": msgs, "temperature": 0, "max_tokens": 16})
    assert res.status_code == 200 and res.json()["choices"][0]["message"]["content"]


@pytest.mark.parametrize(
    "body, status, fragment",
    [
        ({"messages": []}, 400, "non-empty list"),
        ({"messages": message("hi", "https://example.com/cat.png")}, 400, "never fetches"),
        ({"messages": message("hi", "/etc/hosts")}, 400, "--allow-local-files"),
        ({"messages": message("hi", "data:image/png;base64,!!!")}, 400, "not valid base64"),
        ({"messages": message("hi", "data:image/png;base64," + base64.b64encode(b"not an image").decode())}, 400, "not an image"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}, 400, "limit of 64"),
        ({"messages": [{"role": "user", "content": "hi"}], "model": "gpt-9"}, 404, "does not exist"),
        ({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400, "top_p"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "role"),
    ],
)
def test_bad_requests_get_openai_errors(server, body, status, fragment):
    res = httpx.post(f"{server}/v1/chat/completions", json=body)
    assert res.status_code == status, res.text
    err = res.json()["error"]
    assert fragment in err["message"] and err["type"]
    assert httpx.get(f"{server}/health").status_code == 200


def test_body_limits(server):
    res = httpx.post(f"{server}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert res.status_code == 400 and "JSON" in res.json()["error"]["message"]
    big = "x" * (3 << 20)
    res = httpx.post(f"{server}/v1/chat/completions", json={"messages": [{"role": "user", "content": big}]})
    assert res.status_code == 413
    from PIL import Image

    huge = Image.new("RGB", (2000, 1500), (0, 0, 0))
    res = httpx.post(f"{server}/v1/chat/completions", json={"messages": message("hi", data_url(huge))})
    assert res.status_code == 400 and "decompression-bomb" in res.json()["error"]["message"]


def test_queue_bound_gives_429(tiny_pipeline):
    """One running and two waiting: the rest get 429 with Retry-After, nobody gets anything else."""
    from convllava_export.runtime.serving_loop import LoopSettings

    limits = ServerLimits(max_body_bytes=2 << 20, max_image_pixels=2_000_000, max_tokens=64, max_queue=2)
    with LiveServer(create_app(tiny_pipeline, "convllava-tiny", limits, LoopSettings(max_running=1))) as server:
        _queue_bound(server)


def _queue_bound(server):
    s = colour_samples(1, seed=3)[0]
    body = {"messages": message(s.question, data_url(s.image)), "max_tokens": 64, "temperature": 1.5, "seed": 1}

    def post(_):
        return httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60).status_code

    with ThreadPoolExecutor(12) as pool:
        codes = list(pool.map(post, range(12)))
    assert codes.count(200) >= 3 and codes.count(429) >= 1, codes
    assert set(codes) <= {200, 429}
    assert httpx.get(f"{server}/health").json()["queue_depth"] == 0


def test_local_files_when_allowed(tiny_pipeline, tmp_path):
    s = colour_samples(1, seed=4)[0]
    path = tmp_path / "img.png"
    s.image.save(path)
    with LiveServer(create_app(tiny_pipeline, "m", ServerLimits(allow_local_files=True))) as url:
        res = httpx.post(f"{url}/v1/chat/completions", json={"messages": message(s.question, str(path)), "temperature": 0, "max_tokens": 24})
        assert res.status_code == 200 and res.json()["choices"][0]["message"]["content"] == s.answer


def test_sixteen_concurrent_clients_get_their_own_answers(server, tiny_pipeline):
    """In-flight batching: 16 clients at once, every answer equal to the request run alone."""
    from convllava_export.runtime.sampling import SamplingParams

    samples = colour_samples(16, seed=40)
    want = [tiny_pipeline.generate(s.image, s.question, SamplingParams(max_new_tokens=16)).text for s in samples]

    def post(s):
        res = httpx.post(f"{server}/v1/chat/completions", json={"messages": message(s.question, data_url(s.image)), "temperature": 0, "max_tokens": 16}, timeout=120)
        return res.status_code, res.json()["choices"][0]["message"]["content"] if res.status_code == 200 else res.text

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(post, samples))
    assert [g[0] for g in got] == [200] * 16
    assert [g[1] for g in got] == want
    metrics = httpx.get(f"{server}/metrics").text
    sizes = [line for line in metrics.splitlines() if line.startswith("convllava_batch_size_bucket")]
    assert sizes and 'le="2"' in sizes[1] and float(sizes[1].split()[-1]) < float(sizes[-1].split()[-1])  # some steps decoded more than 2 rows
