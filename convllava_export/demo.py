"""`convllava-export demo`: the whole tool in one minute of CPU: train the tiny model, build it
for CPU, and ask it about a bundled image."""

from __future__ import annotations

import sys
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import TextIO

DEMO_QUESTION = "What is shown in this image?"


def run_demo(workdir: Path, threads: int | None = None, say: Callable[[str], None] = print, out: TextIO | None = None) -> str:
    """Write (or reuse) the tiny checkpoint under WORKDIR/checkpoint, build it into WORKDIR/build
    (fp32 vision, int8 LLM on ONNX Runtime), then stream its answer to `out` (stdout); returns the answer."""
    from .build import BuildOptions, build
    from .runtime.build_loader import open_build
    from .runtime.chat import stream_answer
    from .runtime.pipeline import Request
    from .runtime.sampling import SamplingParams
    from .tiny import LLAVA_DIR, write_tiny_checkpoint

    out = out or sys.stdout
    ckpt = workdir / "checkpoint" / LLAVA_DIR
    if not (ckpt / "config.json").is_file():
        say("1/3 writing the tiny ConvLLaVA (trained ~40 s on a synthetic colour/shape task)")
        write_tiny_checkpoint(workdir / "checkpoint", progress=say)
    else:
        say(f"1/3 reusing the tiny checkpoint in {ckpt}")
    say("2/3 building it for CPU (ONNX Runtime: fp32 vision, int8 LLM)")
    build(ckpt, workdir / "build", BuildOptions(target="cpu", vision_precision="fp32", llm_precision="int8", force=True, threads=threads), progress=say)
    image = resources.files("convllava_export") / "data" / "demo_blue_wide.png"
    say(f"3/3 asking about {image.name} (a wide, mostly blue picture): {DEMO_QUESTION}")
    pipe = open_build(workdir / "build", threads)
    out.write("answer: ")
    answer = stream_answer(pipe, Request(DEMO_QUESTION, [image.read_bytes()]), SamplingParams(max_new_tokens=32), say, out)
    say(f"next: convllava-export run {workdir / 'build'} --image YOUR.png --prompt '{DEMO_QUESTION}'")
    return answer
