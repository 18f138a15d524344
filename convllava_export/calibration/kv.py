"""Calibrating an int8 KV cache: the largest |key| and |value| each channel takes on multimodal
prompts, run through the build's own engines (its vision graph's features spliced into templated
questions, then its LLM graph), so the scales see the visual rows that make most of a prompt.

The scales are per layer, kv head and dimension (rotary keys keep a few large channels; one scale
per tensor would spend the 8 bits on them). A value past a scale saturates in the kernel, so the
scale is the observed maximum times KV_MARGIN.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from ..errors import BuildError

KV_CALIB_PROMPTS = 8  # multimodal prompts the scales are taken over (~1 min at 7B on 2 cores)
KV_MARGIN = 1.25  # head-room over the largest value seen, for prompts beyond the calibration set


def kv_amax(decoder: Any, sequences: list[np.ndarray], progress: Callable[[str], None] | None = None) -> list[np.ndarray]:
    """Per cache tensor (layer 0 key, layer 0 value, ...): max |x| over the sequences' positions,
    [kv_heads * head_dim] each. `decoder` is an OrtGqaDecoder of the float-cache graph."""
    from ..progress import Meter

    amax: list[np.ndarray] | None = None
    meter = Meter("KV cache calibration", sum(len(s) for s in sequences), "positions", progress or (lambda _: None))
    for seq in sequences:
        _, kv = decoder.extend(seq)
        seen = [np.abs(a[0, :, : kv.length].astype(np.float32)).max(axis=1).ravel() for a in kv.arrays]  # [kv_heads, pos, dim] -> [kv_heads * dim]
        amax = seen if amax is None else [np.maximum(a, b) for a, b in zip(amax, seen)]
        meter.advance(len(seq))
    if amax is None:
        raise BuildError("no calibration prompts for the int8 KV cache")
    meter.done()
    return amax


def kv_scales(amax: list[np.ndarray], margin: float = KV_MARGIN) -> list[tuple[np.ndarray, np.ndarray]]:
    """(key scale, value scale) per layer for int8: margin · amax / 127, never 0."""
    scale = [np.maximum(a * margin / 127.0, 1e-6).astype(np.float32) for a in amax]
    return list(zip(scale[0::2], scale[1::2]))


def quantize_kv_cache(build_tmp: Path, vision_graph: Path, pcfg: Any, calib: str | None, questions_path: str | None, threads: int | None,
                      progress: Callable[[str], None]) -> dict[str, Any]:
    """Calibrate and rewrite `build_tmp/llm` (a gqa graph with a float cache) to an int8 cache, with
    the vision graph `vision_graph` and `build_tmp/tokenizer` making the prompts. Returns what the
    manifest records about it."""
    from .dataset import calibration_source
    from .prompts import load_questions

    pixels, source = calibration_source(calib or "builtin", pcfg, limit=KV_CALIB_PROMPTS, progress=progress)
    sequences = _sequences(build_tmp, vision_graph, pixels[:KV_CALIB_PROMPTS], load_questions(questions_path), threads)
    return int8_cache_from(build_tmp / "llm", sequences, source, threads, progress)


def _sequences(build_tmp: Path, vision_graph: Path, pixels: list[np.ndarray], questions: list[str], threads: int | None) -> list[np.ndarray]:
    """Spliced prompts from the build's vision graph, tokenizer and embedding table (the vision
    session is gone when this returns, before the LLM's loads)."""
    from ..engines.onnxruntime import OrtVision
    from ..tokenizer import load_tokenizer
    from .prompts import multimodal_sequences

    vision = OrtVision(vision_graph, "cpu", threads)
    table = np.load(build_tmp / "llm" / "embed_tokens.npy", mmap_mode="r")
    model = SimpleNamespace(tokenizer=load_tokenizer(build_tmp / "tokenizer"), encode_images=lambda px: vision.encode(np.asarray(px)[None] if np.ndim(px) == 3 else px),
                            embed_tokens=lambda ids: np.asarray(table[np.asarray(ids)], dtype=np.float32))
    return multimodal_sequences(model, pixels, questions)


def int8_cache_from(llm: Path, sequences: list[np.ndarray], source: str, threads: int | None = None, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Rewrite the gqa decoder folder `llm` to an int8 cache with scales from `sequences` (spliced
    prompt embeddings), in place; returns the calibration's record."""
    from ..engines.onnxruntime import OrtGqaDecoder
    from ..export.llm_gqa import GRAPH, int8_kv_cache
    from ..export.spec import PartSpec

    spec = PartSpec.load(llm / "decoder.json")
    if spec.attributes.get("layout") != "gqa":
        raise BuildError("--kv-cache int8 is a gqa graph's cache: build with --llm-graph gqa (int4 or int8 LLM, onnxruntime-genai installed)")
    if spec.attributes.get("kv_dtype") == "int8":
        raise BuildError(f"{llm} already holds an int8 KV cache")
    decoder = OrtGqaDecoder(llm, "cpu", threads, prefill="onnxruntime")
    amax = kv_amax(decoder, sequences, progress)
    del decoder
    int8_kv_cache(llm / (spec.graph or GRAPH), kv_scales(amax))
    for t in [*spec.inputs, *spec.outputs]:
        if t.name.startswith(("past_key_values.", "present.")):
            t.dtype = "int8"
    record = {"source": source, "prompts": len(sequences), "positions": int(sum(len(s) for s in sequences)), "margin": KV_MARGIN}
    spec.attributes.update(kv_dtype="int8", kv_calibration=record)
    spec.save(llm)
    return record
