"""`convllava-export bench llm`: prefill and decode speed of the LLM engines, side by side.

A synthetic TinyLlama-1.1B-shaped LLaMA (random weights) is exported once and quantized; each
backend then runs in its own process (its own peak RSS) through the same `Decoder` protocol the
runtime uses. Beside the measurements: the memory-bandwidth bound on decode, from the weight
bytes read per token and the machine's read bandwidth measured with several streams.
"""

from __future__ import annotations

import os
from . import peak_rss_mb, run_in_fresh_process
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

SHAPES = {
    "tinyllama": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4, vocab_size=32000),
    "small": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=8, vocab_size=32000),
}


def build_llm(shape: str, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    with torch.no_grad():
        model = LlamaForCausalLM(cfg).eval()
    return model


def read_bandwidth_gbs(threads: int, mb: int = 1024, reps: int = 5) -> float:
    """Sustained read bandwidth: `threads` numpy streams each summing its own slice (GIL released)."""
    arr = np.ones(mb * (1 << 20) // 4, dtype=np.float32)
    parts = np.array_split(arr, threads)

    def once() -> float:
        ts = [threading.Thread(target=np.max, args=(p,)) for p in parts]
        t = time.perf_counter()
        for th in ts:
            th.start()
        for th in ts:
            th.join()
        return time.perf_counter() - t

    once()
    return arr.nbytes / min(once() for _ in range(reps)) / 1e9


def _decoder(kind: str, folder: str | None, shape: str, threads: int):
    import torch

    torch.set_num_threads(threads)
    if kind == "torch-fp32":
        from ..model.reference import TorchDecoder

        llm = build_llm(shape)
        table = llm.get_input_embeddings()
        holder = SimpleNamespace(llm=llm, dtype=torch.float32, embed_tokens=lambda ids: table(torch.as_tensor(ids)).detach().numpy())
        return TorchDecoder(holder)
    from ..engines.onnxruntime import open_decoder

    return open_decoder(Path(folder), threads=threads)


def _worker(kind: str, folder: str | None, shape: str, threads: int, prompt_len: int, decode_steps: int, queue) -> None:
    dec = _decoder(kind, folder, shape, threads)
    ids = prompt_ids(prompt_len)
    embeds = dec.embed(np.asarray(ids).reshape(-1))
    dec.extend(embeds[:16])  # warm-up, then timed prefill
    t = time.perf_counter()
    logits, kv = dec.extend(embeds)
    prefill = time.perf_counter() - t
    tokens = []
    t = time.perf_counter()
    for _ in range(decode_steps):
        tok = int(logits.argmax())
        tokens.append(tok)
        logits, kv = dec.extend(dec.embed(np.array([tok])), kv)
    decode = time.perf_counter() - t
    queue.put(
        {
            "kind": kind,
            "prefill_tokens_per_s": prompt_len / prefill,
            "decode_tokens_per_s": decode_steps / decode,
            "tokens": tokens,
            "peak_rss_mb": peak_rss_mb(),
        }
    )


def prompt_ids(prompt_len: int) -> np.ndarray:
    """The benchmark's prompt: the same random ids for every backend."""
    return np.random.default_rng(0).integers(3, 31000, size=(1, prompt_len))


def _llama_cpp_worker(gguf: str, threads: int, prompt_len: int, decode_steps: int, queue) -> None:
    from ..engines.llama_cpp import LlamaCppTimer

    timer = LlamaCppTimer(Path(gguf), threads, n_ctx=prompt_len + decode_steps + 16)
    prompt = prompt_ids(prompt_len)[0].tolist()
    timer.run(prompt[:16], 1)  # warm-up
    res = timer.run(prompt, decode_steps)
    queue.put({"kind": "llama.cpp-q4_0", **res, "peak_rss_mb": peak_rss_mb()})


def _gguf_worker(shape: str, work: str, queue) -> None:
    from ..engines.llama_cpp import quantize_gguf, write_gguf

    f16 = Path(work) / "llama-f16.gguf"
    t = time.perf_counter()
    write_gguf(build_llm(shape), f16)
    quantize_gguf(f16, Path(work) / "llama-q4_0.gguf", "q4_0")
    f16.unlink()
    queue.put({"gguf_q4_0_s": time.perf_counter() - t})


def _export_worker(shape: str, work: str, queue) -> None:
    from ..export.llm import GRAPH, export_decoder
    from ..export.stream_quant import rewrite_weights

    work_p = Path(work)
    llm = build_llm(shape)
    times = {}
    t = time.perf_counter()
    (work_p / "fp32").mkdir(parents=True, exist_ok=True)
    export_decoder(llm, work_p / "fp32", progress=lambda m: None)
    times["export_fp32_s"] = time.perf_counter() - t
    del llm
    import shutil

    from ..export.spec import PartSpec

    for precision in ("int8", "int4"):
        folder = work_p / precision
        folder.mkdir(exist_ok=True)
        t = time.perf_counter()
        rewrite_weights(work_p / "fp32" / GRAPH, folder / GRAPH, precision, progress=lambda m: None)
        times[f"quantize_{precision}_s"] = time.perf_counter() - t
        shutil.copy(work_p / "fp32" / "embed_tokens.npy", folder)
        spec = PartSpec.load(work_p / "fp32" / "decoder.json")
        spec.precision = precision
        spec.save(folder)
    times["peak_rss_mb"] = peak_rss_mb()
    queue.put(times)


def _gqa_export_worker(shape: str, work: str, queue) -> None:
    from ..export.llm_gqa import export_decoder_gqa

    t = time.perf_counter()
    export_decoder_gqa(build_llm(shape), Path(work) / "int4-gqa", "int4", progress=lambda m: None)
    queue.put({"export_int4_gqa_s": time.perf_counter() - t, "gqa_peak_rss_mb": peak_rss_mb()})


FOLDERS = {"ort-fp32": "fp32", "ort-int8": "int8", "ort-int4": "int4", "ort-int4-gqa": "int4-gqa"}


def gguf_weight_bytes(path: Path) -> int:
    """Bytes of a GGUF's tensors read per token (all but the gathered token embedding table)."""
    from gguf import GGUFReader

    return sum(int(t.n_bytes) for t in GGUFReader(str(path)).tensors if t.name != "token_embd.weight")


def weight_bytes(folder: Path) -> int:
    """Bytes of the decoder graph's weights (the embedding table is gathered, not streamed)."""
    return sum(f.stat().st_size for f in folder.iterdir() if f.name.startswith("decoder.onnx"))


def bench_llm(
    shape: str = "tinyllama", prompt_len: int = 600, decode_steps: int = 32, threads: int | None = None, workdir: str | None = None, with_llama_cpp: bool = False, progress=print
) -> dict[str, Any]:
    threads = threads or os.cpu_count() or 1
    work = Path(workdir or tempfile.mkdtemp(prefix="bench-llm-"))
    exports = {}
    if not (work / "int4" / "decoder.onnx").exists():
        progress(f"exporting a random {shape}-shaped decoder, then int8 and int4 (this takes minutes)")
        exports = run_in_fresh_process(_export_worker, shape, str(work))
    from ..export.llm_gqa import genai_available

    with_gqa = genai_available()
    if with_gqa and not (work / "int4-gqa" / "decoder.onnx").exists():
        progress("building the fused GroupQueryAttention int4 graph (onnxruntime-genai model builder)")
        exports.update(run_in_fresh_process(_gqa_export_worker, shape, str(work)))
    if with_llama_cpp and not (work / "llama-q4_0.gguf").exists():
        progress("writing the same weights as GGUF and quantizing them to Q4_0 with llama.cpp")
        exports.update(run_in_fresh_process(_gguf_worker, shape, str(work)))
    bw = {n: read_bandwidth_gbs(n) for n in sorted({1, threads})}
    results = {}
    order = ["torch-fp32", "ort-fp32", "ort-int8", "ort-int4"] + (["ort-int4-gqa"] if with_gqa else []) + (["llama.cpp-q4_0"] if with_llama_cpp else [])
    for kind in order:
        progress(f"timing {kind}: prefill {prompt_len} tokens, decode {decode_steps} tokens at context {prompt_len}")
        if kind == "llama.cpp-q4_0":
            results[kind] = run_in_fresh_process(_llama_cpp_worker, str(work / "llama-q4_0.gguf"), threads, prompt_len, decode_steps)
            continue
        folder = None if kind == "torch-fp32" else str(work / FOLDERS[kind])
        results[kind] = run_in_fresh_process(_worker, kind, folder, shape, threads, prompt_len, decode_steps)
    ref_tokens = results["torch-fp32"]["tokens"]
    best_bw = max(bw.values())
    rows = []
    for kind in order:
        r = results[kind]
        if kind == "llama.cpp-q4_0":
            wb = gguf_weight_bytes(work / "llama-q4_0.gguf")
        else:
            wb = weight_bytes(work / FOLDERS.get(kind, "fp32"))
        rows.append(
            {
                "backend": kind,
                "prefill_tokens_per_s": r["prefill_tokens_per_s"],
                "decode_tokens_per_s": r["decode_tokens_per_s"],
                "weight_gb": wb / 1e9,
                "bandwidth_bound_tokens_per_s": best_bw * 1e9 / wb,
                "decode_of_bound": r["decode_tokens_per_s"] / (best_bw * 1e9 / wb),
                "greedy_agreement_vs_torch": float(np.mean([a == b for a, b in zip(ref_tokens, r["tokens"])])),
                "peak_rss_mb": r["peak_rss_mb"],
            }
        )
    return {"shape": shape, "machine": {"cpus": os.cpu_count(), "threads": threads}, "read_bandwidth_gbs": bw, "exports": exports, "prompt_len": prompt_len, "decode_steps": decode_steps, "rows": rows}


def markdown(result: dict[str, Any]) -> str:
    bw = ", ".join(f"{n} stream(s) {v:.1f} GB/s" for n, v in result["read_bandwidth_gbs"].items())
    lines = [
        f"Model: random {result['shape']}-shaped LLaMA; prompt {result['prompt_len']} tokens, {result['decode_steps']} greedy decode steps; read bandwidth: {bw}",
        "",
        "| backend | prefill tok/s | decode tok/s | weights GB | bandwidth bound tok/s | decode / bound | greedy agreement vs torch | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['backend']} | {r['prefill_tokens_per_s']:.1f} | {r['decode_tokens_per_s']:.2f} | {r['weight_gb']:.2f} | {r['bandwidth_bound_tokens_per_s']:.1f} | "
            f"{r['decode_of_bound'] * 100:.0f} % | {r['greedy_agreement_vs_torch']:.2f} | {r['peak_rss_mb']:.0f} |"
        )
    if result.get("exports"):
        lines.append("")
        lines.append("Export: " + ", ".join(f"{k} {v:.0f}" for k, v in result["exports"].items()))
    return "\n".join(lines)
