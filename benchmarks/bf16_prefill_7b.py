"""Issue 21 at real size: the bf16 prompt kernel (engines/gemm_prefill.py) beside ONNX Runtime's
MatMulNBits, on a 7B int4 gqa build, one process per measurement, one run.

Usage: python benchmarks/bf16_prefill_7b.py BUILD [--tokens 189,490,1024] [--serve] [--concurrency 1,16]
       [--vllm-folder FOLDER --vllm-venv VENV]
- Prefill: one prompt of N random-token embeddings through each kernel (OrtGqaDecoder.prefill on
  a fresh slot), wall time, prompt tokens/s, the logits' cosine between the two kernels.
- --serve: `bench serve BUILD --workload image --workload text` with `--prefill onnxruntime`, then
  with `--prefill bf16` (same requests, 128 tokens each, one server at a time); with
  --vllm-folder/--vllm-venv the bf16 run has vLLM-CPU + our plugin beside it (`export vllm`
  folder, the venv `.ci/vllm` makes), started only after our server has stopped.
Writes benchmarks/results/bf16_prefill_7b.json and serve_7b_prefill_{onnxruntime,bf16}.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def prefill_probe(build: Path, tokens: list[int]) -> dict:
    """In this process: both kernels over the same embeddings (the ORT session is shared)."""
    from convllava_export import set_kernel_env

    set_kernel_env()  # as the CLI does, before torch loads
    import numpy as np

    from convllava_export.engines.onnxruntime import open_decoder
    from convllava_export.benchmarks.serving import machine_info

    folder = build / "llm"
    t = time.perf_counter()
    dec = open_decoder(folder, prefill="bf16")
    load_s = time.perf_counter() - t
    rng = np.random.default_rng(0)
    rows = []
    for n in tokens:
        emb = dec.embed(rng.integers(0, dec.vocab_size, n))
        out = {}
        for kernel in ("bf16", "onnxruntime", "bf16"):  # bf16 twice: the first pass reads the weights from disk into the page cache
            cache = dec.new_cache(1 << 31, 1, 2048)
            cache.open(n + 8)
            bf16, dec.gemm = dec.gemm, (dec.gemm if kernel == "bf16" else None)
            t = time.perf_counter()
            logits = dec.prefill(cache, emb)
            out[kernel] = (time.perf_counter() - t, logits)
            dec.gemm = bf16
        (tb, lb), (to, lo) = out["bf16"], out["onnxruntime"]
        rows.append({"tokens": n, "bf16_s": round(tb, 2), "onnxruntime_s": round(to, 2), "bf16_tok_s": round(n / tb, 1), "onnxruntime_tok_s": round(n / to, 1),
                     "speedup": round(to / tb, 2), "logits_cosine": round(float(lo @ lb / np.linalg.norm(lo) / np.linalg.norm(lb)), 5)})
        print(json.dumps(rows[-1]), flush=True)
    return {"load_s": round(load_s, 1), "machine": machine_info(), "prefill": rows}


def accuracy_probe(build: Path, n: int) -> dict:
    """Both kernels against the int4 model's exact math (the same unpacked weights, fp32
    activations, fp16 cache: GemmPrefill with compute=float32), on one prompt of n positions."""
    from convllava_export import set_kernel_env

    set_kernel_env()
    import numpy as np
    import torch

    from convllava_export.engines.onnxruntime import open_decoder

    dec = open_decoder(build / "llm", prefill="bf16")
    emb = dec.embed(np.random.default_rng(1).integers(0, dec.vocab_size, n))
    out = {}
    for name in ("exact", "bf16", "onnxruntime"):
        dec.gemm.compute = torch.float32 if name == "exact" else torch.bfloat16
        kernel, dec.gemm = dec.gemm, (None if name == "onnxruntime" else dec.gemm)
        cache = dec.new_cache(1 << 31, 1, 2048)
        cache.open(n + 8)
        out[name] = dec.prefill(cache, emb)
        dec.gemm = kernel
    cos = lambda a, b: round(float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)), 5)  # noqa: E731
    top = lambda a, k=10: set(np.argsort(a)[-k:].tolist())  # noqa: E731
    row = {"tokens": n, "cosine_bf16_vs_exact": cos(out["bf16"], out["exact"]), "cosine_onnxruntime_vs_exact": cos(out["onnxruntime"], out["exact"]),
           "top1_bf16_eq_exact": bool(out["bf16"].argmax() == out["exact"].argmax()), "top1_onnxruntime_eq_exact": bool(out["onnxruntime"].argmax() == out["exact"].argmax()),
           "top10_overlap_bf16": len(top(out["bf16"]) & top(out["exact"])), "top10_overlap_onnxruntime": len(top(out["onnxruntime"]) & top(out["exact"]))}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("build", type=Path)
    ap.add_argument("--tokens", default="189,490,1024")
    ap.add_argument("--serve", action="store_true")
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--vllm-folder", type=Path, default=None)
    ap.add_argument("--vllm-venv", type=Path, default=None)
    ap.add_argument("--skip-probe", action="store_true")
    ap.add_argument("--kernels", default="onnxruntime,bf16", help="which --prefill kernels to serve with")
    ap.add_argument("--tag", default="", help="suffix of the serve JSON names")
    ap.add_argument("--accuracy", type=int, default=0, metavar="N", help="only: both kernels against the exact int4 math on N positions")
    a = ap.parse_args()
    if a.accuracy:
        (RESULTS / "bf16_prefill_7b_accuracy.json").write_text(json.dumps(accuracy_probe(a.build, a.accuracy), indent=1))
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    if not a.skip_probe:
        result = prefill_probe(a.build, [int(x) for x in a.tokens.split(",")])
        (RESULTS / "bf16_prefill_7b.json").write_text(json.dumps(result, indent=1))
    if a.serve:
        for kernel in a.kernels.split(","):
            peer = []
            if kernel == "bf16" and a.vllm_folder and a.vllm_venv:
                # bf16 as issue 21 asks (the random checkpoint stores fp16; vLLM-CPU's fp16 GEMMs are far slower here)
                cmd = (f"VLLM_CPU_KVCACHE_SPACE=4 {a.vllm_venv}/bin/python -m vllm.entrypoints.openai.api_server --model {a.vllm_folder} "
                       "--host 127.0.0.1 --port 8011 --max-model-len 2048 --enforce-eager --dtype bfloat16")
                peer = ["--against", "http://127.0.0.1:8011", "--against-images", "--against-cmd", cmd]
            subprocess.run([sys.executable, "-m", "convllava_export.cli", "bench", "serve", str(a.build), "--concurrency", a.concurrency, "--workload", "image",
                            "--workload", "text", "--prompt-words", "140", "--requests-per-client", "1", "--max-running", "16", "--time-limit-s", "1800",
                            f"--serve-arg=--prefill={kernel}", *peer, "--json", str(RESULTS / f"serve_7b_prefill_{kernel}{a.tag}.json")], check=True)


if __name__ == "__main__":
    main()
