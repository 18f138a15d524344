"""Every client mistake is a 4xx with an OpenAI-style body; limits hold before the costly step."""

from __future__ import annotations

import json
import threading

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serving_helpers import LiveServer, data_url, message

from convllava_export.errors import ConvLlavaError
from convllava_export.runtime import server as server_mod
from convllava_export.runtime.serving_loop import LoopSettings
from convllava_export.runtime.generation import Timings, held_back
from convllava_export.runtime.pipeline import Request
from convllava_export.runtime.server import ServerLimits, create_app
from convllava_export.synthetic import colour_samples

LIMITS = ServerLimits(max_body_bytes=2 << 20, max_image_pixels=2_000_000, max_tokens=16, max_queue=2)


@pytest.fixture(scope="module")
def server(tiny_pipeline):
    with LiveServer(create_app(tiny_pipeline, "convllava-tiny", LIMITS)) as url:
        yield url


def text_body(**extra) -> dict:
    return {"messages": [{"role": "user", "content": "What colour is it?"}], "max_tokens": 4, **extra}


IMG = data_url(colour_samples(1, seed=5)[0].image)


@pytest.mark.parametrize(
    "body, param, fragment",
    [
        (text_body(seed="x"), "seed", "integer"),
        (text_body(seed=-1), "seed", "[0, 2^63)"),
        (text_body(seed=1.5), "seed", "integer"),
        (text_body(seed=True), "seed", "integer"),
        (text_body(stop=5), "stop", "string"),
        (text_body(stop=[1, 2]), "stop", "at most"),
        (text_body(stop=["x" * 300]), "stop", "256 characters"),
        (text_body(stop=["s"] * 1000), "stop", "at most 16"),
        (text_body(temperature="inf"), "temperature", "finite number"),
        (text_body(temperature=3), "temperature", "between 0 and 2"),
        (text_body(top_p=True), "top_p", "finite number"),
        (text_body(n=True), "n", "integer 1"),
        (text_body(n=2), "n", "n=1"),
        (text_body(max_tokens=True), "max_tokens", "positive integer"),
        (text_body(max_tokens=0), "max_tokens", "positive integer"),
        (text_body(stream="yes"), "stream", "boolean"),
        (text_body(ignore_eos=1), "ignore_eos", "boolean"),
        ({"messages": [{"role": "user", "content": "look: <image> here"}]}, "messages", "image_url content parts"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "messages", "must be a string"),
        ({"messages": [{"role": "system", "content": [{"type": "image_url", "image_url": {"url": IMG}}]}, {"role": "user", "content": "hi"}]}, "messages", "only user messages"),
        ({"messages": message("hi", IMG)[:1] * 1 + [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": IMG}}] * 5}]}, "messages", "more than 4 images"),
    ],
)
def test_client_mistakes_are_400_with_the_field(server, body, param, fragment):
    res = httpx.post(f"{server}/v1/chat/completions", json=body)
    assert res.status_code == 400, res.text
    err = res.json()["error"]
    assert err["param"] == param and fragment in err["message"], err


@pytest.mark.parametrize(
    "raw, fragment",
    [
        (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "finite number"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "top_p": Infinity}', "finite number"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"a": ' * 50_000 + b"1" + b"}" * 50_000, "nested too deeply"),
        (b"\xff\xfe not utf-8", "JSON object"),
        (b'"just a string"', "JSON object"),
    ],
)
def test_odd_json_is_400(server, raw, fragment):
    res = httpx.post(f"{server}/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert res.status_code == 400 and fragment in res.json()["error"]["message"], res.text


def test_chunked_body_refused_while_reading(server):
    """A chunked body (no Content-Length) is answered 413 as soon as it passes the limit."""
    import select
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(server)
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"x" * (1 << 20)
        sent, answer = 0, b""
        for _ in range(64):  # 64 MiB offered, limit 2 MiB
            if select.select([sock], [], [], 0.2)[0]:
                answer = sock.recv(65536)
                break
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except OSError:  # closed by the server after its answer
                answer = sock.recv(65536)
                break
            sent += 1
    assert answer.startswith(b"HTTP/1.1 413") and b"body_too_large" in answer, answer[:200]
    assert sent < 64, sent  # answered while the body was still coming, not after reading it whole
    assert httpx.get(f"{server}/health").status_code == 200


def test_health_shows_no_paths_and_max_images_from_profile(server, tiny_build):
    health = httpx.get(f"{server}/health").json()
    assert str(tiny_build) not in json.dumps(health) and health["max_images"] == 4


def test_four_images_run_five_are_refused(server):
    def images(n: int) -> list[dict]:
        return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": IMG}}] * n + [{"type": "text", "text": "Compare."}]}]

    one = httpx.post(f"{server}/v1/chat/completions", json={"messages": images(1), "max_tokens": 2}, timeout=60)
    res = httpx.post(f"{server}/v1/chat/completions", json={"messages": images(4), "max_tokens": 2}, timeout=60)
    assert res.status_code == 200 and one.status_code == 200, (res.text, one.text)
    out = res.json()
    assert out["choices"][0]["finish_reason"] in ("stop", "length") and out["usage"]["completion_tokens"] >= 1, out
    assert out["usage"]["prompt_tokens"] > one.json()["usage"]["prompt_tokens"], out  # all four images reached the prompt
    res = httpx.post(f"{server}/v1/chat/completions", json={"messages": images(5), "max_tokens": 2}, timeout=60)
    assert res.status_code == 400, res.text
    err = res.json()["error"]
    assert err["param"] == "messages" and "more than 4 images" in err["message"], err


def test_prompt_too_long_is_refused_before_tokenizing(tiny_pipeline, monkeypatch):
    calls = []
    real = tiny_pipeline.tokenizer.__class__.__call__
    monkeypatch.setattr(tiny_pipeline.tokenizer.__class__, "__call__", lambda self, text, *a, **k: calls.append(len(text)) or real(self, text, *a, **k))
    long_text = "word " * 400_000  # 2 MB: far beyond any context
    with pytest.raises(ConvLlavaError, match="characters, far"):
        tiny_pipeline.prepare(Request(long_text), Timings())
    assert calls == []
    # just over the context in tokens: tokenized, refused before any image is encoded or embedded
    encoded = []
    monkeypatch.setattr(tiny_pipeline, "encode_pixels", lambda *a, **k: encoded.append(1) or [])
    near = "word " * (tiny_pipeline.max_context + 10)
    with pytest.raises(ConvLlavaError, match="above the model's context"):
        tiny_pipeline.prepare(Request(near, [colour_samples(1, seed=1)[0].image]), Timings())
    assert calls and not encoded


def test_prompt_too_long_over_http_is_400(server, tiny_pipeline):
    res = httpx.post(f"{server}/v1/chat/completions", json=text_body(messages=[{"role": "user", "content": "word " * 300_000}]))
    assert res.status_code == 400 and "context" in res.json()["error"]["message"]
    res = httpx.post(f"{server}/v1/chat/completions", json=text_body(messages=[{"role": "user", "content": "word " * 300_000}], stream=True))
    assert res.status_code == 400 and "context" in res.json()["error"]["message"]  # a 4xx, not a 200 stream


def test_internal_errors_do_not_leak(tiny_pipeline, monkeypatch, caplog):
    with LiveServer(create_app(tiny_pipeline, "m", LIMITS)) as url:
        monkeypatch.setattr(tiny_pipeline.decoder, "extend", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("secret /srv/models/x")))
        res = httpx.post(f"{url}/v1/chat/completions", json=text_body())
        assert res.status_code == 500 and "secret" not in res.text and "ref" in res.json()["error"]["message"]
        assert any("secret" in str(r.exc_info[1]) for r in caplog.records if r.exc_info)  # the log has it


def test_429_carries_retry_after_and_never_decodes_the_image(tiny_pipeline, monkeypatch):
    decoded = []
    real_open = server_mod.open_image
    gate = threading.Event()

    def counting_open(source, limits):
        decoded.append(1)
        gate.wait(30)  # hold the only worker so the queue stays full
        return real_open(source, limits)

    monkeypatch.setattr(server_mod, "open_image", counting_open)
    with LiveServer(create_app(tiny_pipeline, "m", ServerLimits(max_queue=0, max_tokens=4), LoopSettings(max_running=1))) as url:
        body = {"messages": message("What colour?", IMG), "max_tokens": 2}
        with httpx.Client(timeout=60) as client:
            first = threading.Thread(target=lambda: client.post(f"{url}/v1/chat/completions", json=body))
            first.start()
            while not decoded:
                threading.Event().wait(0.01)
            res = httpx.post(f"{url}/v1/chat/completions", json=body)
            assert res.status_code == 429 and res.headers["retry-after"] == "1"
            assert len(decoded) == 1  # the refused request's image was never decoded
            gate.set()
            first.join(60)


def test_local_files_one_wording(tiny_pipeline, tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    with LiveServer(create_app(tiny_pipeline, "m", ServerLimits(allow_local_files=True, max_tokens=4))) as url:
        messages = set()
        for path in (tmp_path / "missing.png", tmp_path / "notes.txt", tmp_path, "/dev/zero"):
            res = httpx.post(f"{url}/v1/chat/completions", json={"messages": message("hi", str(path)), "max_tokens": 2})
            assert res.status_code == 400
            messages.add(res.json()["error"]["message"].replace(str(path), "PATH"))
        assert len(messages) == 1, messages


@pytest.mark.parametrize("stops", [["ab"], ["abc", "b"], ["xyz", "zz"], ["aaa"], ["a" * 256], ["\n\n", "USER:"]])
@given(text=st.text(alphabet="abxyz\nUSER:", max_size=40))
@settings(max_examples=60, deadline=None)
def test_held_back_equals_brute_force(stops, text):
    want = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    assert held_back(text, stops) == want


json_value = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
content = st.one_of(
    st.text(max_size=30),
    st.lists(
        st.one_of(
            st.fixed_dictionaries({"type": st.just("text"), "text": st.one_of(st.text(max_size=20), json_value)}),
            st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.one_of(st.just({"url": IMG}), st.fixed_dictionaries({"url": json_value}), json_value)}),
            json_value,
        ),
        max_size=3,
    ),
    json_value,
)
request_body = st.fixed_dictionaries(
    {"messages": st.one_of(st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", 1]), "content": content}), max_size=3), json_value)},
    optional={
        "max_tokens": st.one_of(st.integers(-2, 6), json_value),
        "temperature": st.one_of(st.floats(-1, 3), json_value),
        "top_p": st.one_of(st.floats(-0.5, 1.5), json_value),
        "seed": st.one_of(st.integers(-5, 2**64), json_value),
        "stop": st.one_of(st.text(max_size=5), st.lists(st.text(max_size=5), max_size=20), json_value),
        "stream": st.one_of(st.booleans(), json_value),
        "n": json_value,
        "model": st.one_of(st.just("m"), json_value),
    },
)


@pytest.fixture(scope="module")
def asgi_client(tiny_pipeline):
    from fastapi.testclient import TestClient

    with TestClient(create_app(tiny_pipeline, "m", ServerLimits(max_tokens=6, max_queue=2)), raise_server_exceptions=False) as client:
        yield client


@given(body=request_body)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
def test_fuzzed_bodies_never_500(asgi_client, body):
    res = asgi_client.post("/v1/chat/completions", content=json.dumps(body, allow_nan=True))
    assert res.status_code in (200, 400, 404), (res.status_code, res.text[:300])
    if res.status_code != 200 and res.headers["content-type"].startswith("application/json"):
        assert set(res.json()["error"]) == {"message", "type", "param", "code"}


def test_drain_deadline_ends_open_streams_with_an_error_event(tiny_pipeline):
    """Once SIGTERM's drain reaches its deadline, a stream still running gets a 503 error event and
    [DONE] (its row freed), not a connection cut in the middle of a chunk."""
    import json
    import threading
    import time

    from serving_helpers import LiveServer

    from convllava_export.runtime.server import ServerLimits, create_app

    app = create_app(tiny_pipeline, "m", ServerLimits(max_queue=4, max_tokens=4096))
    engine = app.state.backend.serving_loop
    body = {"messages": [{"role": "user", "content": "Describe it."}], "max_tokens": 1500, "ignore_eos": True, "stream": True}
    lines: list[str] = []
    with LiveServer(app) as url:
        first = threading.Event()

        def read():
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as res:
                for line in res.iter_lines():
                    lines.append(line)
                    first.set()

        reader = threading.Thread(target=read)
        reader.start()
        assert first.wait(30)
        app.state.drain.begin(0.0)  # what SIGTERM does in serve(), with no drain time left
        reader.join(30)
        assert not reader.is_alive()
        data = [ln[5:].strip() for ln in lines if ln.startswith("data:")]
        assert data[-1] == "[DONE]"
        assert json.loads(data[-2])["error"]["code"] == "shutting_down"
        deadline = time.time() + 10
        while engine.stats.running and time.time() < deadline:
            time.sleep(0.05)
        assert engine.stats.running == 0  # the row was freed
