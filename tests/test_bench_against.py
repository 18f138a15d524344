"""`bench serve --against`: our server and a peer OpenAI-compatible server on the same requests.

The peer is a second `convllava-export serve` of the tiny build (it speaks the same API, with
per-chunk usage), on 127.0.0.1 only."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time

import httpx
import pytest
from serving_helpers import free_port

from convllava_export.benchmarks import serving
from convllava_export.benchmarks.serving import STAND_IN, bench_serving, markdown, one_request, start_peer
from convllava_export.errors import ConvLlavaError

MAX_TOKENS = 8


def serve_cmd(build, port: int, name: str) -> list[str]:
    return [sys.executable, "-m", "convllava_export.cli", "serve", str(build), "--port", str(port), "--threads", "1", "--model-name", name]


@pytest.fixture(scope="module")
def peer(tiny_build, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("peer")
    port = free_port()
    with open(tmp_path / "peer.log", "wb") as log:
        proc = subprocess.Popen(serve_cmd(tiny_build, port, "tiny-peer"), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while serving.peer_models(f"http://127.0.0.1:{port}") is None:
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "peer.log").read_text()[-2000:]
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        serving.stop_group(proc, 10)


def check_rows(rows, workload: str, server: str) -> list[dict]:
    got = [r for r in rows if r["workload"] == workload and r["server"] == server]
    assert [r["concurrency"] for r in got] == [1, 2]
    for r in got:
        assert r["requests"] == r["completed"] == 4 and r["failed"] == 0, r["errors"]
        assert r["output_tokens"] == r["requests"] * MAX_TOKENS  # from the servers' usage, not from visible text
        assert r["timed_by"] == "usage"
        assert r["ttft"]["mean_ms"] > 0 and r["ttft"]["p99_ms"] >= r["ttft"]["median_ms"] > 0
        assert r["tpot"]["mean_ms"] > 0 and r["itl"]["mean_ms"] > 0
        assert r["output_token_throughput"] > 0 and r["request_throughput"] > 0 and r["prompt_tokens_mean"] > 0
    return got


def test_against_a_running_peer(tiny_build, peer):
    said: list[str] = []
    result = bench_serving(tiny_build, [1, 2], MAX_TOKENS, prompts_per_level=4, progress=said.append, workloads=("text", "image"), prompt_words=12,
                           serve_args=("--threads=1",), against=peer + "/v1")
    assert result["peer"]["model"] == "tiny-peer" and result["peer"]["url"] == peer  # the first id of /v1/models; /v1 dropped
    rows = result["results"]
    ours_text, peer_text = check_rows(rows, "text", "ours"), check_rows(rows, "text", "peer")
    # the same word sequences to the same tokenizer: the same prompt lengths on both sides
    assert [r["prompt_tokens_mean"] for r in ours_text] == [r["prompt_tokens_mean"] for r in peer_text]
    ours_image, peer_image = check_rows(rows, "image", "ours"), check_rows(rows, "image", "peer")
    assert all(r["note"] == STAND_IN for r in peer_image) and result["peer"]["prompt_fit"]["source"] == "peer"
    for o, p in zip(ours_image, peer_image):  # the stand-in is sized to our image prompts
        assert abs(p["prompt_tokens_mean"] - o["prompt_tokens_mean"]) <= 0.25 * o["prompt_tokens_mean"]
    assert {(c["workload"], c["concurrency"]) for c in result["comparison"]} == {("text", 1), ("text", 2), ("image", 1), ("image", 2)}
    for c in result["comparison"]:
        for key in ("token_throughput_ours_over_peer", "p99_ttft_ours_over_peer"):
            assert math.isfinite(c[key]) and c[key] > 0
        assert c["token_throughput_ours_over_peer"] == pytest.approx(c["ours_token_throughput"] / c["peer_token_throughput"])
    for r in ours_text + ours_image:  # our server's own clock: every token after the first is one row of a decode step
        t = r["server_time"]
        assert t["decoded_rows"] == r["requests"] * (MAX_TOKENS - 1) and t["rows_per_step"] == pytest.approx(t["decoded_rows"] / t["decode_steps"], abs=0.01)
        assert t["prefill_passes"] >= 1 and t["prefill_s"] > 0 and t["decode_s"] > 0 and 0 < t["busy_share"] <= 1
    assert ours_text[0]["server_time"]["rows_per_step"] == 1 and ours_text[1]["server_time"]["rows_per_step"] >= 1
    assert not any("server_time" in r for r in peer_text + peer_image)
    m = result["machine"]
    assert m["cpu"] and m["cpus"] >= 1 and isinstance(m["isa_flags"], list)
    table = markdown(result)
    assert "Where our server's time went" in table
    assert "| peer | peer | image (text stand-in) | 2 |" in table and STAND_IN in table
    json.dumps(result)
    assert any("--threads=1" in s for s in said)


def test_against_cmd_refused_while_something_serves_there(tiny_build, peer):
    with pytest.raises(ConvLlavaError, match="already answers"):
        bench_serving(tiny_build, [1], MAX_TOKENS, against=peer, against_cmd="true", progress=lambda m: None)


def test_against_cmd_starts_the_peer_after_ours_stopped(tiny_build, tmp_path):
    peer_port = free_port()
    ours_port_file, marker = tmp_path / "ours-port", tmp_path / "marker.json"
    script = tmp_path / "start_peer.py"
    script.write_text(
        "import json, os, socket, sys\n"
        f"port = int(open({str(ours_port_file)!r}).read())\n"
        "with socket.socket() as s:\n"
        "    s.settimeout(2)\n"
        "    ours_up = s.connect_ex(('127.0.0.1', port)) == 0\n"
        f"open({str(marker)!r}, 'w').write(json.dumps({{'ours_port': port, 'ours_accepting': ours_up, 'pid': os.getpid()}}))\n"
        f"os.execv(sys.executable, {serve_cmd(tiny_build, peer_port, 'cmd-peer')!r})\n"
    )

    def progress(msg: str) -> None:
        if m := re.search(r"starting our server on http://127\.0\.0\.1:(\d+)", msg):
            ours_port_file.write_text(m.group(1))

    result = bench_serving(tiny_build, [1, 2], MAX_TOKENS, prompts_per_level=4, progress=progress, workloads=("text",), prompt_words=12,
                           serve_args=("--threads=1",), against=f"http://127.0.0.1:{peer_port}", against_cmd=f"{sys.executable} {script}",
                           against_start_timeout_s=120)
    seen = json.loads(marker.read_text())
    assert seen["ours_port"] == int(ours_port_file.read_text()) and seen["ours_accepting"] is False
    assert result["peer"]["model"] == "cmd-peer" and result["peer"]["start_s"] > 0
    check_rows(result["results"], "text", "ours")
    check_rows(result["results"], "text", "peer")
    with pytest.raises(ProcessLookupError):  # the peer's process group was ended
        os.kill(seen["pid"], 0)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{peer_port}/v1/models", timeout=2)


def test_peer_command_that_dies_is_reported(tmp_path):
    with pytest.raises(ConvLlavaError, match="(?s)exited with status 3.*boom"):
        start_peer("echo boom; exit 3", f"http://127.0.0.1:{free_port()}", 30, tmp_path / "peer.log")


def test_bad_serve_arg_reaches_our_server(tiny_build, tmp_path):
    with pytest.raises(ConvLlavaError, match="No such option '--no-such-flag'"):  # click's answer, in the server's output
        serving.start_server(tiny_build, free_port(), 1, MAX_TOKENS, 1, ("--no-such-flag",), log=tmp_path / "ours.log", timeout_s=60)


def sse(*chunks: dict) -> bytes:
    return b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"


def delta(text: str | None, usage: dict | None = None) -> dict:
    chunk = {"choices": [{"index": 0, "delta": {"content": text} if text is not None else {}, "finish_reason": None}]}
    return {**chunk, "usage": usage} if usage else chunk


def stream(body: bytes) -> dict:
    with httpx.Client(transport=httpx.MockTransport(lambda req: httpx.Response(200, content=body))) as client:
        return one_request(client, "http://peer/v1/chat/completions", {})


def test_tokens_are_counted_from_per_chunk_usage_not_visible_text():
    u = lambda n: {"prompt_tokens": 5, "completion_tokens": n}  # noqa: E731
    r = stream(sse(delta("", u(0)), delta(None, u(1)), delta("a", u(2)), delta(None, u(3)), {"choices": [], "usage": u(3)}))
    assert r["status"] == 200 and r["timed_by"] == "usage" and r["output_tokens"] == 3 and len(r["itl_s"]) == 2 and r["prompt_tokens"] == 5


def test_without_per_chunk_usage_content_chunks_time_the_tokens():
    r = stream(sse(delta("a"), delta("b"), delta("c"), {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 4}}))  # final usage only
    assert r["timed_by"] == "content chunks" and r["output_tokens"] == 4 and len(r["itl_s"]) == 2
    last = {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}], "usage": {"prompt_tokens": 5, "completion_tokens": 3}}
    r = stream(sse(delta("a"), delta("b"), last))  # usage only on the last chunk, beside its finish_reason
    assert r["timed_by"] == "content chunks" and r["output_tokens"] == 3 and len(r["itl_s"]) == 1
    r = stream(sse(delta("a"), delta("b")))  # no usage at all
    assert r["output_tokens"] == 2 and r["prompt_tokens"] == 0


def test_an_error_mid_stream_is_a_failed_request():
    r = stream(sse(delta("a"), {"error": {"message": "engine stopped", "type": "internal_error"}}))
    assert r["status"] != 200 and "engine stopped" in r["error"]


def test_peer_servers_do_not_inherit_our_kernel_settings(monkeypatch):
    """We set GOMP_SPINCOUNT=0 for our bf16 prompt kernel; a peer (vLLM's OpenMP) must run with
    its own defaults, or the comparison would slow it down."""
    import convllava_export
    from convllava_export.benchmarks.serving import peer_env

    monkeypatch.setattr(convllava_export, "OWN_ENV", {"GOMP_SPINCOUNT": "0"})
    monkeypatch.setenv("GOMP_SPINCOUNT", "0")
    monkeypatch.setenv("SOMETHING_ELSE", "1")
    env = peer_env()
    assert "GOMP_SPINCOUNT" not in env and env["SOMETHING_ELSE"] == "1"
    monkeypatch.setattr(convllava_export, "OWN_ENV", {})  # the user set it: the peer gets it too
    assert peer_env()["GOMP_SPINCOUNT"] == "0"
